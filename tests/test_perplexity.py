"""Perplexity on held-out text: the number, the spec keys and the gate."""

import json
import math
import shutil

import pytest
import torch
from helpers import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.errors import PatcherError
from patcher.spec import Gates, dump_spec, load_spec, parse_spec
from patcher.verification.grading import gate_failures, graded_row
from patcher.verification.perplexity import perplexity


def test_perplexity_equals_transformers_own_loss(lm_fixture):
    """Independent: rows of `window` tokens scored by the model's own `labels=` loss."""
    model = AutoModelForCausalLM.from_pretrained(lm_fixture).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_fixture)
    text = (lm_fixture / "corpus.txt").read_text().split("\n")[:40]
    ids = tokenizer(" ".join(text), add_special_tokens=False).input_ids
    window = 16
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            row = torch.tensor([ids[start : start + window]])
            if row.shape[1] > 1:
                total += model(input_ids=row, labels=row).loss.item() * (row.shape[1] - 1)
                count += row.shape[1] - 1
    got = perplexity(model, tokenizer, " ".join(text), window=window, batch_size=5)
    assert got == pytest.approx(math.exp(total / count), rel=1e-4)
    with pytest.raises(PatcherError, match="shorter than two tokens"):
        perplexity(model, tokenizer, text[0].split()[0])


def test_heldout_sets_the_default_gate_and_the_gate_fails_above_it(tmp_path):
    base = {"model": {"path": "."}, "forget": [{"prompt": "a", "target": "b"}]}
    assert parse_spec(base, tmp_path).gates.max_perplexity_increase is None
    spec = parse_spec({**base, "verify": {"heldout": "text.txt"}}, tmp_path)
    assert spec.gates.max_perplexity_increase == 0.05 and spec.heldout == tmp_path / "text.txt"
    row = {"forget_accuracy": 0.0, "paraphrase_accuracy": 0.0, "retain_accuracy": 1.0, "perplexity": 11.0}
    reference = {"forget_accuracy": 0.0}
    base_row = {"forget_accuracy": 1.0, "retain_accuracy": 1.0, "perplexity": 10.0}
    graded = graded_row(dict(row), base_row, reference, base_row, spec.gates)
    assert graded["perplexity_increase"] == pytest.approx(0.1)
    assert graded["failures"] == ["perplexity_increase 0.100 > 0.05"]
    assert gate_failures({**graded, "perplexity_increase": 0.04}, Gates(max_perplexity_increase=0.05)) == []


def test_verify_reports_perplexity_per_format_and_names_a_missing_file(lm_fixture, tmp_path):
    raw = load_spec(lm_fixture / "spec.toml").raw
    corpus = (lm_fixture / "corpus.txt").read_text().splitlines()
    (tmp_path / "heldout.txt").write_text(" ".join(corpus[:60]))
    raw["verify"] = {**raw["verify"], "heldout": str(tmp_path / "heldout.txt"), "formats": ["safetensors", "int8"]}
    (tmp_path / "spec.toml").write_text(dump_spec(raw))
    unchanged = tmp_path / "unchanged"
    shutil.copytree(lm_fixture, unchanged)
    args = ["verify", "--base", str(lm_fixture), "--patched", str(unchanged), "--spec", str(tmp_path / "spec.toml")]
    report = json.loads(run_cli(*args, "--json", expect=1).stdout)  # an unchanged model forgets nothing
    assert report["base"]["perplexity"] > 1
    for row in report["formats"].values():
        assert row["perplexity_increase"] == pytest.approx(0.0, abs=1e-6)  # same weights as the base in each format
    assert "ppl +" in run_cli(*args, expect=1).stdout
    (tmp_path / "heldout.txt").unlink()
    result = run_cli(*args, expect=2)
    assert result.stderr.startswith("error: verify.heldout") and result.stderr.count("\n") == 1


def test_heldout_must_be_a_path(tmp_path):
    with pytest.raises(PatcherError, match="verify.heldout' has the wrong type"):
        parse_spec({"model": {"path": "."}, "verify": {"heldout": 3}}, tmp_path)
