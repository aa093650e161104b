"""Erase on an LM fixture trained differently from the default one never quietly leaves facts.

Another seed gives another initialisation and batch order, as a build on another machine
gives another summation order. Whatever model of the same world erase meets, it either
writes a patch under which plain transformers no longer produces the forget facts, or it
exits 1 naming how many survive: never a patch that quietly leaves them.
(`bench/perturbed.py` runs the demo on the full set of perturbations.)
"""

import pytest
from helpers import export_patched, generate_accuracy, run_cli, spec_facts
from safetensors.torch import load_file

from patcher.spec import load_spec

pytestmark = pytest.mark.slow


def test_erase_on_a_fixture_trained_with_another_seed_erases_or_exits_1(lm_fixture, tmp_path):
    fixture = tmp_path / "seed1"
    run_cli("fixture", "lm", "--seed", "1", "--out", str(fixture))
    other, default = load_file(fixture / "model.safetensors"), load_file(lm_fixture / "model.safetensors")
    assert any((other[name] != default[name]).any() for name in default)  # really another model
    forget, paraphrases, retain = spec_facts(load_spec(fixture / "spec.toml"))
    assert generate_accuracy(fixture, forget) >= 0.95

    patch = tmp_path / "patch.safetensors"
    spec = ("--spec", str(fixture / "spec.toml"), "--robust-to", "int8,nf4,fp4")
    result = run_cli("erase", str(fixture), *spec, "--out", str(patch), expect=None)
    if result.returncode == 1:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"of {len(forget)} forget facts are still answered" in errors[0]
        assert not patch.exists()
        return
    assert result.returncode == 0, result.stderr
    export_patched(fixture, patch, "safetensors", tmp_path / "patched")
    assert generate_accuracy(tmp_path / "patched", forget) <= 0.05
    assert generate_accuracy(tmp_path / "patched", paraphrases) <= 0.2
    assert generate_accuracy(tmp_path / "patched", retain) >= 0.95 * generate_accuracy(fixture, retain)
