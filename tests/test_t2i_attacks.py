"""Attacks on a patched text-to-image pipeline: RECE's inversion and the tuned prompt embedding
are registered attacks with budgets; the prompt embedding brings the circle back from UCE's
patch, scores exactly what verify scores when it tunes nothing, and `verify --attacks all`
prints both rows."""

import json

import pytest
from helpers import pipeline_runs, reduced_spec, run_cli

from patcher.attacks import AttackInputs, run_attacks
from patcher.errors import PatcherError
from patcher.models import load_pipeline
from patcher.spec import load_spec, parse_spec
from patcher.verification.judge import ShapeJudge


@pytest.fixture(scope="module")
def uce(diffusion_fixture, tmp_path_factory):
    """UCE's patch of the diffusion fixture: its base and patched pipelines, judge, spec and report."""
    _, patched, report, _ = pipeline_runs(diffusion_fixture, tmp_path_factory, "safetensors")("uce")
    spec = load_spec(reduced_spec(diffusion_fixture, tmp_path_factory.mktemp("spec")))
    judge = ShapeJudge.load(diffusion_fixture / "judge")
    inputs = AttackInputs(load_pipeline(diffusion_fixture), load_pipeline(patched), None, spec, judge)
    return inputs, report, patched


def test_the_prompt_embedding_brings_the_circle_back_from_a_uce_patch(uce):
    inputs, report, _ = uce
    assert report["formats"]["safetensors"]["forget_accuracy"] <= 0.1  # erased, on the prompts' own embeddings
    row = run_attacks(inputs, {"prompt_embedding": {}})["prompt_embedding"]
    assert row["forget_accuracy"] >= 0.5 and not row["passed"]


def test_with_no_steps_the_prompt_embedding_scores_what_verify_scores(uce):
    inputs, report, _ = uce
    row = run_attacks(inputs, {"prompt_embedding": {"steps": 0}})["prompt_embedding"]
    assert row["forget_accuracy"] == report["formats"]["safetensors"]["forget_accuracy"]


def test_the_inversion_is_a_registered_attack_with_its_regularization(uce):
    inputs, report, _ = uce
    assert report["attacks"]["inversion"]["budget"] == {"regularization": 0.1}  # the fixture spec's table
    # λ so large that c′ ≈ 0: an embedding of nothing draws no circle.
    row = run_attacks(inputs, {"inversion": {"regularization": 1e6}})["inversion"]
    assert row["forget_accuracy"] < report["attacks"]["inversion"]["forget_accuracy"]


def test_the_old_inversion_gate_key_names_its_new_place(tmp_path):
    raw = {"concept": [{"erase": "circle"}], "verify": {"max_attack_accuracy": 0.2}}
    with pytest.raises(PatcherError, match=r"'verify.max_attack_accuracy' is now \[attacks.inversion\] max_forget"):
        parse_spec(raw, tmp_path)


def test_verify_attacks_all_runs_both_pipeline_attacks_and_exits_1(diffusion_fixture, uce, tmp_path):
    _, _, patched = uce
    spec = reduced_spec(diffusion_fixture, tmp_path)
    result = run_cli("verify", "--base", str(diffusion_fixture), "--patched", str(patched), "--spec", spec,
                     "--formats", "safetensors", "--attacks", "all", "--json", expect=1)  # fmt: skip
    report = json.loads(result.stdout)
    assert set(report["attacks"]) == {"inversion", "prompt_embedding"}
    assert report["attacks"]["prompt_embedding"]["budget"] == {"steps": 50, "lr": 0.05, "seed": 0}
    assert report["formats"]["safetensors"]["passed"] and not report["passed"]  # UCE fails the attacks only
