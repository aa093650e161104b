"""`patcher stats` at scale: torchrun ranks equal one process, and a killed run resumes to the same sums."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file

from patcher.stats.distributed import World
from patcher.stats.resume import Checkpointer, Progress


def stats_args(fixture, corpus, out, kind: str, *extra: str) -> list[str]:
    return ["stats", str(fixture), "--corpus", str(corpus), "--out", str(out), "--layers", "1,2", "--kind", kind,
            *extra]  # fmt: skip


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["second-moment", "fisher"])
def test_torchrun_with_two_gloo_processes_equals_one_process(lm_fixture, tmp_path, kind):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    corpus = lm_fixture / "corpus.txt"
    run_cli(*stats_args(lm_fixture, corpus, one, kind, "--batch-size", "8"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*torchrun, "-m", "patcher", *stats_args(lm_fixture, corpus, two, kind, "--batch-size", "8")],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" -> ") == 1 and "on 2 ranks" in result.stdout  # rank 0 reports, once
    assert relative_difference(load_file(two), load_file(one)) <= 1e-6
    with safe_open(one, "pt") as a, safe_open(two, "pt") as b:
        count = "token_count" if kind == "second-moment" else "sample_count"
        assert a.metadata()[count] == b.metadata()[count]


@pytest.mark.slow
def test_a_killed_collection_resumes_to_the_same_sums(lm_fixture, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((lm_fixture / "corpus.txt").read_text() * 3)
    out, uninterrupted = tmp_path / "stats.safetensors", tmp_path / "uninterrupted.safetensors"
    partial = tmp_path / "stats.safetensors.partial"
    args = stats_args(lm_fixture, corpus, out, "second-moment", "--batch-size", "2", "--checkpoint-every", "500")
    process = subprocess.Popen([sys.executable, "-m", "patcher", *args], cwd=tempfile.gettempdir(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.5)  # a few more checkpoints
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and partial.exists() and not out.exists()

    resumed = run_cli(*args)
    assert "resumed after" in resumed.stdout and not partial.exists()
    run_cli(*stats_args(lm_fixture, corpus, uninterrupted, "second-moment", "--batch-size", "2"))
    expected, got = load_file(uninterrupted), load_file(out)
    assert all(torch.equal(got[name], expected[name]) for name in expected)  # bit for bit


def test_a_checkpoint_of_other_arguments_is_ignored(tmp_path):
    sums = {"w": torch.ones(3)}
    Checkpointer(tmp_path / "p", every=1, key="a").update(sums, Progress(batches=4, tokens=10, samples=2))
    fresh = {"w": torch.zeros(3)}
    with pytest.warns(UserWarning, match="other arguments"):
        assert Checkpointer(tmp_path / "p", every=1, key="b").restore(fresh) == Progress()
    assert torch.equal(fresh["w"], torch.zeros(3))
    assert Checkpointer(tmp_path / "p", every=1, key="a").restore(fresh) == Progress(4, 10, 2)
    assert torch.equal(fresh["w"], torch.ones(3))


@pytest.mark.parametrize("count", [0, 1, 5, 8, 13])
def test_ranks_take_disjoint_slices_that_cover_the_corpus(count):
    items = list(range(count))
    for size in (1, 2, 3, 4):
        slices = [World(rank, size).slice(items) for rank in range(size)]
        assert [i for part in slices for i in part] == items
