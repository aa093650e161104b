"""Sharded checkpoints: apply streams them within one-shard memory, writes exactly base + delta,
and a killed or interrupted apply/export leaves nothing under the target name."""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from helpers import run_cli, tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch

PATCHED = ("model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight")

# After the imports the peak RSS (VmHWM) is reset, so the peak that follows is apply's own.
MEASURE_APPLY = """
import json, re, sys
import torch, transformers
import patcher.cli, patcher.formats.hf, patcher.models
def status_kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")
before = status_kb("VmRSS")
patcher.cli.main(["apply", *sys.argv[1:]])
print(json.dumps({"peak_above_imports_mb": (status_kb("VmHWM") - before) / 1024}))
"""


def sharded_model(folder, hidden: int, layers: int, shard: str):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden, 4 * hidden, layers=layers, vocab=2000)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    return folder


def patch_for(folder) -> Patch:
    checkpoint = Checkpoint(folder)
    generator = torch.Generator().manual_seed(1)
    deltas = {p: torch.randn(checkpoint.tensor(p).shape, generator=generator) for p in PATCHED}
    return Patch.from_deltas(deltas, "memit", {}, checkpoint.fingerprints(PATCHED))


@pytest.fixture(scope="module")
def small_sharded(tmp_path_factory):
    """About 140 MB in 16 MB shards: loading it whole would need several times the bound below."""
    return sharded_model(tmp_path_factory.mktemp("sharded") / "model", 512, 8, "16MB")


def test_apply_writes_base_plus_delta_shard_by_shard_within_one_shard_of_memory(small_sharded, tmp_path):
    assert (small_sharded / "model.safetensors.index.json").is_file()
    patch = patch_for(small_sharded)
    patch_file = patch.save(tmp_path / "patch.safetensors")
    out = tmp_path / "patched"
    command = [sys.executable, "-c", MEASURE_APPLY, str(small_sharded), str(patch_file), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_above_imports_mb"]
    shards = [s.stat().st_size / 2**20 for s in small_sharded.glob("model-*.safetensors")]
    # Apply holds the patch, one shard's mapped pages and a patched tensor or two; allocator and
    # page-mapping noise moved the peak by up to 9 MB between identical runs, so the bound allows
    # a third shard. Loading the whole model would need all of `shards`, over twice the bound.
    bound = 3 * max(shards) + patch_file.stat().st_size / 2**20
    assert sum(shards) > 2 * bound
    assert peak <= bound

    base, patched = Checkpoint(small_sharded), Checkpoint(out)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == sorted(p.name for p in small_sharded.glob("*.sa*"))
    for name in base.names():
        expected = base.tensor(name) + (patch.delta(name) if name in PATCHED else 0)
        assert torch.equal(patched.tensor(name), expected), name
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers reads the rewritten shards
    torch.testing.assert_close(model.model.layers[2].mlp.down_proj.weight, patched.tensor(PATCHED[1]))


def test_a_missing_shard_is_one_line_and_exit_2(small_sharded, tmp_path):
    patch_file = patch_for(small_sharded).save(tmp_path / "patch.safetensors")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(small_sharded, incomplete)
    lost = sorted(incomplete.glob("model-*.safetensors"))[-1]
    lost.unlink()
    result = run_cli("apply", str(incomplete), str(patch_file), "--out", str(tmp_path / "out"), expect=2)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"is missing {lost.name}, which model.safetensors.index.json lists" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def large_sharded(tmp_path_factory):
    """About 100 MB in 4 MB shards: long enough to apply that a kill lands midway."""
    folder = tmp_path_factory.mktemp("large") / "model"
    return sharded_model(folder, 512, 8, "4MB")


def start(command: list[str]) -> subprocess.Popen:
    """`patcher COMMAND` in its own process, with Ctrl-C delivered even when the test run
    itself was started in the background (where the shell sets SIGINT to be ignored, and
    children inherit that)."""
    return subprocess.Popen([sys.executable, "-m", "patcher", *command], cwd=tempfile.gettempdir(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for_temporary(parent, target_name: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not list(parent.glob(f".{target_name}.tmp-*")):
        assert process.poll() is None and time.monotonic() < deadline, "the command ended before writing"
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["apply", "export"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_stopped_apply_or_export_leaves_no_folder_under_the_target_name(large_sharded, tmp_path, command, sig):
    patch_file = patch_for(large_sharded).save(tmp_path / "patch.safetensors")
    out = tmp_path / "out"
    if command == "apply":
        args = ["apply", str(large_sharded), str(patch_file), "--out", str(out)]
    else:
        args = ["export", str(large_sharded), "--to", "safetensors", "--patch", str(patch_file), "--out", str(out)]
    process = start(args)
    wait_for_temporary(tmp_path, "out", process)
    process.send_signal(sig)
    code = process.wait()
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # Ctrl-C: the temporary folder is removed too, and the user is told
        assert code == 130 and "aborted" in process.stderr.read()
        assert not list(tmp_path.glob(".out.tmp-*"))
    run_cli(*args)  # a rerun completes
    assert Checkpoint(out).names() == Checkpoint(large_sharded).names()
