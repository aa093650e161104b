"""The CLI behaves like the Hugging Face tools its users type every day: -v/-q, the hub
options, shell completion, and --json on every command that prints a result."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from helpers import run_cli, run_cli_process
from transformers import AutoConfig

from patcher.cli import main
from patcher.fixtures.architectures import write_tiny_lm
from patcher.stats import SecondMoments


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    write_tiny_lm("llama", folder)
    return folder


def test_hub_options_reach_the_download_and_the_token_defaults_to_hf_token(tiny_lm, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, **options):
        asked.append((repo_id, options))
        return str(tiny_lm)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    spec = str(tiny_lm / "spec.toml")
    run_cli("locate", "org/model", "--spec", spec, "--revision", "v2", "--cache-dir", str(tmp_path), "--token", "hf_a")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    run_cli("locate", "org/model", "--spec", spec)
    (repo, given), (_, defaults) = asked
    assert repo == "org/model"
    assert (given["revision"], given["cache_dir"], given["token"]) == ("v2", tmp_path, "hf_a")
    assert (defaults["revision"], defaults["cache_dir"], defaults["token"]) == (None, None, "hf_from_env")


def test_a_revision_for_a_local_folder_is_one_line_exit_2(tiny_lm):
    result = run_cli("locate", str(tiny_lm), "--spec", str(tiny_lm / "spec.toml"), "--revision", "v2", expect=2)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "a revision applies to hub ids only" in result.stderr


def test_verbose_and_quiet_together_is_one_line_exit_2():
    result = run_cli("-v", "-q", "inspect", "p.safetensors", expect=2)
    assert result.stderr == "error: -v and -q contradict each other: pass one of them\n"


def test_quiet_hides_the_warnings_the_default_shows_and_verbose_adds_the_libraries_logs(tiny_lm, tmp_path):
    """In fresh processes: the switches set process-wide logging and warning filters."""
    width = AutoConfig.from_pretrained(tiny_lm).intermediate_size
    thin = SecondMoments({"model.layers.0.mlp.down_proj": torch.eye(width)}, token_count=3)
    thin.save(tmp_path / "thin.safetensors")
    erase = ["erase", str(tiny_lm), "--spec", str(tiny_lm / "spec.toml"), "--method", "memit", "--layers", "0"]
    erase += ["--stats", str(tmp_path / "thin.safetensors"), "--out", str(tmp_path / "p.safetensors")]
    default, quiet = run_cli_process(*erase, expect=None), run_cli_process("-q", *erase, expect=None)
    warned = f"warning: the statistics cover 3 tokens, fewer than the {width} key dimensions"
    assert warned in default.stderr, default.stderr
    assert "warning:" not in quiet.stderr and quiet.returncode == default.returncode
    locate = ["locate", str(tiny_lm), "--spec", str(tiny_lm / "spec.toml")]
    assert "loading configuration file" not in run_cli_process(*locate).stderr
    assert "loading configuration file" in run_cli_process("-v", *locate).stderr


def test_bash_completion_completes_commands_and_options():
    def complete(words: str) -> list[str]:
        env = {"_PATCHER_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        outcome = CliRunner().invoke(main, [], prog_name="patcher", env=env)
        return [line.split(",", 1)[1] for line in outcome.output.splitlines()]

    assert complete("patcher ex") == ["export"]
    assert "--trust-remote-code" in complete("patcher erase --tr")


def test_every_command_that_prints_a_result_prints_it_as_json(tiny_lm, tmp_path):
    spec = str(tiny_lm / "spec.toml")
    stats_file, patch, patched, int8 = (str(tmp_path / name) for name in ("s.safetensors", "p.safetensors", "m", "q"))
    stats = run_cli("stats", str(tiny_lm), "--corpus", str(tiny_lm / "corpus.txt"), "--spec", spec,
                    "--out", stats_file, "--json")  # fmt: skip
    summary = json.loads(stats.stdout)
    assert summary["kind"] == "second-moment" and summary["unit"] == "tokens" and summary["count"] > 0
    erased = json.loads(run_cli("erase", str(tiny_lm), "--spec", spec, "--stats", stats_file, "--out", patch,
                                "--json").stdout)  # fmt: skip
    assert erased["path"] == patch and erased["method"] == "memit"
    assert erased["tensors"] and all(name.endswith("down_proj.weight") for name in erased["tensors"])
    applied = json.loads(run_cli("apply", str(tiny_lm), patch, "--out", patched, "--json").stdout)
    assert applied == {"path": patched, "base": str(tiny_lm), "patch": patch}
    assert os.path.isfile(os.path.join(patched, "config.json"))
    exported = json.loads(run_cli("export", patched, "--to", "int8", "--out", int8, "--json").stdout)
    assert exported == {"path": int8, "format": "int8", "base": patched, "patch": None}
