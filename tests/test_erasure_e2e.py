"""Acceptance: erase the fixture's facts, export, and check the export with plain transformers.

Accuracy here is judged by transformers' own `generate` (greedy), not by patcher's
evaluator, so the method cannot grade its own homework.
"""

import json
import subprocess
import sys
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.spec import load_spec

pytestmark = pytest.mark.slow


def cli(*args):
    result = subprocess.run(
        [sys.executable, "-m", "patcher", *args], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    assert result.returncode == 0, result.stderr
    return result


@torch.no_grad()
def generate_accuracy(folder, facts):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    hits = 0
    for prompt, target in facts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        wanted = tokenizer(" " + target, add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=len(wanted), do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += out[0, ids.shape[1] :].tolist() == wanted
    return hits / len(facts)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_erasure_holds_in_the_exported_model(method, lm_fixture, tmp_path):
    spec_path = lm_fixture / "spec.toml"
    cli(
        "erase",
        str(lm_fixture),
        "--spec",
        str(spec_path),
        "--method",
        method,
        "--out",
        str(tmp_path / "patch.safetensors"),
    )
    cli(
        "export",
        str(lm_fixture),
        "--to",
        "safetensors",
        "--patch",
        str(tmp_path / "patch.safetensors"),
        "--out",
        str(tmp_path / "export"),
    )

    spec = load_spec(spec_path)
    forget = [(f.prompt, f.target) for f in spec.forget]
    paraphrases = [(p, f.target) for f in spec.forget for p in f.paraphrases]
    retain = [(r.prompt, r.target) for r in spec.retain]
    assert len(forget) >= 20 and len(retain) >= 100

    assert generate_accuracy(lm_fixture, forget) >= 0.95
    base_retain = generate_accuracy(lm_fixture, retain)
    assert generate_accuracy(tmp_path / "export", forget) <= 0.05
    assert generate_accuracy(tmp_path / "export", paraphrases) <= 0.20
    assert generate_accuracy(tmp_path / "export", retain) >= 0.95 * base_retain

    report = tmp_path / "report.json"
    cli(
        "verify",
        "--base",
        str(lm_fixture),
        "--patched",
        str(tmp_path / "export"),
        "--spec",
        str(spec_path),
        "--report",
        str(report),
    )
    data = json.loads(report.read_text())
    assert data["passed"] and data["method"] == method
    assert set(data["formats"]["safetensors"]) >= {
        "forget_accuracy",
        "paraphrase_accuracy",
        "retain_accuracy",
        "recovery",
        "passed",
    }


def test_demo_writes_a_passing_report(lm_fixture, tmp_path):
    result = cli("demo", "--out", str(tmp_path / "demo"), "--json")
    report = json.loads(result.stdout)
    assert report["passed"]
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["formats"] == report["formats"]
    assert report["base"]["forget_accuracy"] >= 0.95
