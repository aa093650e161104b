"""Acceptance: erase the fixture's facts, export, and check the export with plain transformers.

Accuracy here is judged by transformers' own `generate` (greedy), not by patcher's
evaluator, so the method cannot grade its own homework.
"""

import json

import pytest
from helpers import export_patched, generate_accuracy, run_cli, spec_facts

from patcher.spec import dump_spec, load_spec

pytestmark = pytest.mark.slow


def test_memit_erasure_holds_in_the_exported_model(lm_fixture, memit_patch, tmp_path):
    """AlphaEdit's export is checked the same way on the demo's run (test_quantization_gate)."""
    spec_path = lm_fixture / "spec.toml"
    export_patched(lm_fixture, memit_patch, "safetensors", tmp_path / "export")

    forget, paraphrases, retain = spec_facts(load_spec(spec_path))
    assert len(forget) >= 20 and len(retain) >= 100

    assert generate_accuracy(lm_fixture, forget) >= 0.95
    base_retain = generate_accuracy(lm_fixture, retain)
    assert generate_accuracy(tmp_path / "export", forget) <= 0.05
    assert generate_accuracy(tmp_path / "export", paraphrases) <= 0.20
    assert generate_accuracy(tmp_path / "export", retain) >= 0.95 * base_retain

    report = tmp_path / "report.json"
    run_cli(
        "verify",
        "--base",
        str(lm_fixture),
        "--patched",
        str(tmp_path / "export"),
        "--spec",
        str(spec_path),
        "--formats",
        "safetensors",  # full precision; the quantized formats are test_quantization_gate's
        "--report",
        str(report),
    )
    data = json.loads(report.read_text())
    assert data["passed"] and data["method"] == "memit"
    assert set(data["formats"]["safetensors"]) >= {
        "forget_accuracy",
        "paraphrase_accuracy",
        "retain_accuracy",
        "recovery",
        "passed",
    }


def test_demo_writes_a_passing_report(demo_run):
    out, report = demo_run
    assert report["passed"] and report["method"] == "alphaedit"
    assert json.loads((out / "report.json").read_text())["formats"] == report["formats"]
    assert report["base"]["forget_accuracy"] >= 0.95


def test_alphaedit_sequential_batches_do_not_undo_each_other(lm_fixture, tmp_path):
    """Two batches: keys of the first enter the second's solve, so the first stays erased."""
    from patcher.erasure import erase
    from patcher.formats.hf import write_model_folder

    spec = load_spec(lm_fixture / "spec.toml")
    spec.method_settings["batch_size"] = len(spec.forget) // 2
    write_model_folder(lm_fixture, tmp_path / "out", erase(spec, lm_fixture, method="alphaedit"))
    first_batch = [(f.prompt, f.target) for f in spec.forget[: len(spec.forget) // 2]]
    assert generate_accuracy(tmp_path / "out", first_batch) <= 0.10


def test_an_erasure_that_cannot_reach_its_facts_exits_1_naming_the_survivors(lm_fixture, tmp_path):
    """λ a million times the spec's, one round: MEMIT barely moves, and erase says so instead of writing a patch."""
    spec = load_spec(lm_fixture / "spec.toml")
    raw = {k: (dict(v) if isinstance(v, dict) else [dict(e) for e in v]) for k, v in spec.raw.items()}
    raw["model"]["path"] = str(lm_fixture)
    raw["stats"]["corpus"] = str(lm_fixture / "corpus.txt")
    raw["erase"].update(mom2_weight=1e9, rounds=1)
    (tmp_path / "spec.toml").write_text(dump_spec(raw))
    out = tmp_path / "patch.safetensors"
    result = run_cli("erase", "--spec", str(tmp_path / "spec.toml"), "--method", "memit", "--out", str(out), expect=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    survivors = int(lines[0].removeprefix("error: ").split()[0])
    assert 0 < survivors <= len(spec.forget)
    assert f"of {len(spec.forget)} forget facts are still answered after 1 round" in lines[0]
    assert "erase.rounds" in lines[0]  # what to try
    assert not out.exists()
