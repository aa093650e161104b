"""The CLI on bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_cli, run_cli_process
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from patcher.fixtures import knowledge
from patcher.fixtures.architectures import write_tiny_lm
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch
from patcher.formats.registry import format_names
from patcher.methods import METHODS, robust_methods
from patcher.spec import dump_spec, load_spec
from patcher.verification.report import read_provenance


def assert_bad_input(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


def edited_spec(lm_fixture: Path, tmp_path: Path, edit) -> Path:
    raw = load_spec(lm_fixture / "spec.toml").raw
    raw = {k: (dict(v) if isinstance(v, dict) else [dict(e) for e in v]) for k, v in raw.items()}
    raw["model"]["path"] = str(lm_fixture)
    raw["stats"]["corpus"] = str(lm_fixture / "corpus.txt")
    edit(raw)
    path = tmp_path / "spec.toml"
    path.write_text(dump_spec(raw))
    return path


def test_missing_model_folder(lm_fixture, tmp_path):
    """In a process of its own, where every library erase loads is imported fresh and may warn."""
    result = run_cli_process(
        "erase",
        str(tmp_path / "nope"),
        "--spec",
        str(lm_fixture / "spec.toml"),
        "--out",
        str(tmp_path / "p.safetensors"),
        expect=2,
    )
    assert_bad_input(result, "does not exist")
    assert not (tmp_path / "p.safetensors").exists()


def test_unknown_spec_key_is_named(lm_fixture, tmp_path):
    spec = edited_spec(lm_fixture, tmp_path, lambda raw: raw["erase"].update(lamda=3))
    result = run_cli("erase", "--spec", str(spec), "--out", str(tmp_path / "p.safetensors"), expect=2)
    assert_bad_input(result, "unknown key 'erase.lamda'")


def test_empty_forget_list(lm_fixture, tmp_path):
    spec = edited_spec(lm_fixture, tmp_path, lambda raw: raw.update(forget=[]))
    result = run_cli("erase", "--spec", str(spec), "--out", str(tmp_path / "p.safetensors"), expect=2)
    assert_bad_input(result, "no [[forget]] facts")


def test_target_the_tokenizer_cannot_encode(lm_fixture, tmp_path):
    spec = edited_spec(lm_fixture, tmp_path, lambda raw: raw["forget"][0].update(target="Zanzibar"))
    result = run_cli("erase", "--spec", str(spec), "--out", str(tmp_path / "p.safetensors"), expect=2)
    assert_bad_input(result, "'Zanzibar' has words the tokenizer cannot encode")


def test_erase_help_lists_every_method_and_robust_format():
    help_text = " ".join(run_cli("erase", "--help").stdout.split())
    method_help = help_text[help_text.index("--method") : help_text.index("--robust-to")]
    robust_help = help_text[help_text.index("--robust-to") : help_text.index("--stats")]
    assert all(re.search(rf"\b{name}\b", method_help) for name in METHODS), method_help
    robust = (*format_names(robust=True), *robust_methods())
    assert all(re.search(rf"\b{name}\b", robust_help) for name in robust), robust_help


def test_export_help_lists_every_format_each_family_exports():
    help_text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(run_cli("export", "--help").stdout.split()))  # rewrap
    to_help = help_text[help_text.index("--to") : help_text.index("--out")]
    lm_part, pipeline_part = to_help.split("pipelines:")
    assert all(re.search(rf"\b{name}\b", lm_part) for name in format_names("causal-lm", exported=True)), to_help
    pipeline_formats = format_names("t2i-unet", exported=True)
    assert all(re.search(rf"\b{name}\b", pipeline_part) for name in pipeline_formats), to_help


def test_the_lm_fixtures_options_are_refused_for_smollm2s_demo(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--model", "smollm2", "--seed", "1", "--out", str(out), expect=2)
    assert_bad_input(result, "--seed and --threads apply to the lm fixture")
    assert not out.exists()


def test_truncated_patch(lm_fixture, memit_patch, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(memit_patch.read_bytes()[:200])
    result = run_cli("apply", str(lm_fixture), str(broken), "--out", str(tmp_path / "out"), expect=2)
    assert_bad_input(result, "not a readable patch file")
    assert not (tmp_path / "out").exists()
    assert_bad_input(run_cli("inspect", str(broken), expect=2), "not a readable patch file")


def test_patch_for_another_model_is_refused(lm_fixture, memit_patch, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(lm_fixture, other)
    weights = load_file(other / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"  # one of the tensors the patch edits
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("apply", str(other), str(memit_patch), "--out", str(tmp_path / "out"), expect=2)
    assert_bad_input(result, "fingerprint mismatch")
    assert not (tmp_path / "out").exists()
    forced = run_cli("apply", str(other), str(memit_patch), "--out", str(tmp_path / "out"), "--force")
    assert forced.returncode == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_patch_refuses_another_fine_tune_of_its_base(lm_fixture, memit_patch, tmp_path):
    """The edited tensors are the base's, another tensor is not: the whole-model digest tells."""
    other = tmp_path / "other"
    shutil.copytree(lm_fixture, other)
    weights = load_file(other / "model.safetensors")
    untouched = "model.layers.0.self_attn.q_proj.weight"  # a tensor the patch does not edit
    assert f"{untouched}.delta" not in load_file(memit_patch)
    weights[untouched] = torch.randn_like(weights[untouched])  # a re-randomised layer
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("apply", str(other), str(memit_patch), "--out", str(tmp_path / "out"), expect=2)
    assert_bad_input(result, "whole-model digest")
    assert not (tmp_path / "out").exists()
    forced = run_cli("apply", str(other), str(memit_patch), "--out", str(tmp_path / "out"), "--force")
    assert "whole-model digest differs" in forced.stderr and (tmp_path / "out" / "model.safetensors").is_file()
    digest = Checkpoint(lm_fixture).model_digest()
    assert Patch.load(memit_patch).base_model == digest != Checkpoint(other).model_digest()
    assert f"base model digest {digest[:16]}" in run_cli("inspect", str(memit_patch)).stdout


def test_a_model_with_nan_weights_is_refused_by_every_command_that_reads_it(lm_fixture, memit_patch, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lm_fixture, broken)
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    weights[name][3, 4] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    spec, out = str(lm_fixture / "spec.toml"), tmp_path / "out"
    commands = [
        ("stats", str(broken), "--corpus", str(lm_fixture / "corpus.txt"), "--out", str(out)),
        ("erase", str(broken), "--spec", spec, "--method", "memit", "--out", str(out)),
        ("apply", str(broken), str(memit_patch), "--out", str(out), "--force"),  # --force: past the digest check
        ("export", str(broken), "--to", "nf4", "--out", str(out)),
        ("verify", "--base", str(broken), "--patched", str(lm_fixture), "--spec", spec, "--force"),
    ]
    for command in commands:
        result = run_cli(*command, expect=2)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # apply also warns
        assert len(errors) == 1 and f"{name} holds NaN or inf values" in errors[0], result.stderr
        assert "Traceback" not in result.stderr and not out.exists(), command[0]


def test_a_pickle_only_model_is_refused_before_anything_reads_it(lm_fixture, memit_patch, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(lm_fixture, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    spec, out = str(lm_fixture / "spec.toml"), tmp_path / "out"
    commands = [
        ("stats", str(pickled), "--corpus", str(lm_fixture / "corpus.txt"), "--out", str(out)),
        ("erase", str(pickled), "--spec", spec, "--out", str(out)),
        ("locate", str(pickled), "--spec", spec),
        ("apply", str(pickled), str(memit_patch), "--out", str(out)),
        ("export", str(pickled), "--to", "int8", "--out", str(out)),
        ("verify", "--base", str(pickled), "--patched", str(lm_fixture), "--spec", spec, "--force"),
    ]
    for command in commands:
        assert_bad_input(run_cli(*command, expect=2), "(only pytorch_model.bin: pickle, which patcher never reads)")
        assert not out.exists(), command[0]


@pytest.mark.parametrize("damage", ["truncated", "link loop"])
def test_damaged_weights_are_one_line_in_every_command(lm_fixture, memit_patch, tmp_path, damage):
    damaged = tmp_path / "damaged"
    shutil.copytree(lm_fixture, damaged)
    weights = damaged / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        fragment = "is truncated: its header describes"
    else:
        weights.unlink()
        weights.symlink_to("model.safetensors")
        fragment = "is a link that leads nowhere"
    spec, out = str(lm_fixture / "spec.toml"), tmp_path / "out"
    commands = [
        ("stats", str(damaged), "--corpus", str(lm_fixture / "corpus.txt"), "--out", str(out)),
        ("erase", str(damaged), "--spec", spec, "--out", str(out)),
        ("apply", str(damaged), str(memit_patch), "--out", str(out)),
        ("export", str(damaged), "--to", "nf4", "--out", str(out)),
    ]
    for command in commands:
        assert_bad_input(run_cli(*command, expect=2), fragment)
        assert not out.exists(), command[0]


def test_apply_writes_a_folder_transformers_loads(lm_fixture, memit_patch, tmp_path):
    result = run_cli("apply", str(lm_fixture), str(memit_patch), "--out", str(tmp_path / "patched"))
    assert result.returncode == 0, result.stderr
    base = AutoModelForCausalLM.from_pretrained(lm_fixture)
    patched = AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    deltas = load_file(memit_patch)
    for name, param in patched.named_parameters():
        expected = dict(base.named_parameters())[name].detach()
        if f"{name}.delta" in deltas:
            expected = expected + deltas[f"{name}.delta"]
        torch.testing.assert_close(param.detach(), expected)
    assert (tmp_path / "patched" / "tokenizer.json").is_file()


def test_inspect_reports_the_patch(memit_patch):
    result = run_cli("inspect", str(memit_patch), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "memit"
    assert summary["forget_facts"] == len(knowledge.erasure_spec(knowledge.build_facts())["forget"])
    assert all(len(t["base_sha256"]) == 64 for t in summary["tensors"].values())
    # What erase chose itself: the layers edited (those of the patch's tensors) and the calibration trace.
    choices = summary["choices"]
    assert {f"model.layers.{layer}.mlp.down_proj.weight" for layer in choices["layers"]} == set(summary["tensors"])
    trace = choices["calibration"]
    chosen = trace["rungs"][trace["chosen"]]
    assert chosen["erased"] and chosen["kept"] >= trace["retain_gate"]
    assert all(not rung["erased"] or rung["kept"] < trace["retain_gate"] for rung in trace["rungs"][: trace["chosen"]])
    text = run_cli("inspect", str(memit_patch)).stdout
    assert f"erase chose layers {', '.join(map(str, choices['layers']))}" in text
    assert f"erase chose calibration rung {trace['chosen'] + 1} of {len(trace['rungs'])}" in text


def test_verify_refuses_a_folder_patched_from_another_base(lm_fixture, memit_patch, tmp_path):
    patched = tmp_path / "patched"
    run_cli("apply", str(lm_fixture), str(memit_patch), "--out", str(patched))
    spec = str(lm_fixture / "spec.toml")
    # The patched model, as --base, is a model its own patch was not computed from.
    args = ("verify", "--base", str(patched), "--patched", str(patched), "--spec", spec, "--formats", "safetensors")
    assert_bad_input(run_cli(*args, expect=2), f"{patched} was patched from another model than {patched}")
    report = tmp_path / "report.json"
    run_cli(*args, "--force", "--report", str(report), expect=None)
    edited = set(json.loads(read_provenance(patched)["base"]))
    assert json.loads(report.read_text())["base_mismatch"] in edited
    assert run_cli("verify", "--base", str(lm_fixture), *args[3:], expect=None).returncode in (0, 1)  # its own base


def test_unknown_export_format(lm_fixture, tmp_path):
    result = run_cli("export", str(lm_fixture), "--to", "gguf", "--out", str(tmp_path / "x"), expect=2)
    assert_bad_input(result, "unknown export format 'gguf'")


@pytest.mark.parametrize(
    "family, extra, fragment",
    [
        # The experts' module is named by the model's code: block_sparse_moe in transformers 4, mlp.experts in 5.
        ("mixtral", (), "mixtral is a mixture-of-experts model (model.layers.0."),
        ("llama", ("--layers", "7"), "layer 7 does not exist: the model has 3 layers"),
        ("llama", ("--layers=-1",), "--layers must be"),
        ("llama", ("--layers", ""), "--layers must be"),
    ],
)
def test_a_model_erase_cannot_edit_is_one_line(tmp_path, family, extra, fragment):
    write_tiny_lm(family, tmp_path)
    spec, out = str(tmp_path / "spec.toml"), str(tmp_path / "p.safetensors")
    assert_bad_input(run_cli("erase", str(tmp_path), "--spec", spec, *extra, "--out", out, expect=2), fragment)


def test_a_prompt_longer_than_the_context_is_one_line_with_the_numbers(tmp_path):
    write_tiny_lm("gpt2", tmp_path)  # learned positions: 64
    raw = load_spec(tmp_path / "spec.toml").raw
    raw["retain"][0]["prompt"] = " ".join(["ba"] * 100)
    spec = tmp_path / "long.toml"
    spec.write_text(dump_spec(raw))
    commands = [
        ("erase", str(tmp_path), "--spec", str(spec), "--method", "memit", "--out", str(tmp_path / "p.safetensors")),
        ("locate", str(tmp_path), "--spec", str(spec)),
        ("verify", "--base", str(tmp_path), "--patched", str(tmp_path), "--spec", str(spec), "--force"),
    ]
    for command in commands:
        result = run_cli(*command, expect=2)
        assert_bad_input(result, "tokens with its target, more than the model's context of 64: shorten it")
        assert "'ba ba ba" in result.stderr and len(result.stderr) < 300  # the prompt is cut in the message


def test_stats_on_a_pipeline_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "corpus.txt").write_text("a line\n")
    result = run_cli("stats", str(tmp_path), "--corpus", str(tmp_path / "corpus.txt"), "--out", "s.st", expect=2)
    assert_bad_input(result, "is a t2i-unet model: `patcher stats` collects for causal-lm and classifier models")


def test_a_hub_download_keeps_chat_templates_and_fetches_code_only_when_trusted(tmp_path, monkeypatch):
    import huggingface_hub

    from patcher.models import remote_code, resolve_model_dir

    asked = []

    def fake_download(repo_id, allow_patterns, **hub_options):
        asked.append(allow_patterns)
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_dir("org/model") == tmp_path
    with remote_code(True):
        resolve_model_dir("org/model")
    plain, trusted = asked
    assert {"*.jinja", "*.safetensors", "*.json"} <= set(plain) and "*.py" not in plain
    assert "*.py" in trusted and not any(p.endswith((".bin", ".pt", ".pth")) for p in trusted)
