"""The package root's public API: fast to import, and the README's Python example works."""

from __future__ import annotations

import subprocess
import sys

import pytest

import patcher


def test_import_patcher_loads_no_heavy_library():
    probe = "import sys, patcher; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    from patcher.formats.patch import Patch
    from patcher.verifying import verify

    assert set(patcher.__all__) <= set(dir(patcher))
    assert patcher.Patch is Patch and patcher.verify is verify
    assert all(callable(getattr(patcher, name)) for name in patcher.__all__ if name != "__version__")
    with pytest.raises(AttributeError, match="no_such_name"):
        patcher.no_such_name  # noqa: B018


def test_apply_then_verify_from_python(lm_fixture, memit_patch, tmp_path):
    spec = patcher.load_spec(lm_fixture / "spec.toml")
    patched = patcher.apply(str(lm_fixture), str(memit_patch), tmp_path / "patched")
    report = patcher.verify(str(lm_fixture), str(patched), spec, formats=["safetensors"])
    row = report["formats"]["safetensors"]
    assert row["forget_accuracy"] <= spec.gates.max_forget_accuracy
    assert report["base"]["forget_accuracy"] >= 0.95


def test_apply_refuses_a_patch_for_another_model(lm_fixture, memit_patch, tmp_path):
    from patcher.formats.patch import PatchError

    other = patcher.apply(lm_fixture, memit_patch, tmp_path / "patched")
    with pytest.raises(PatchError):
        patcher.apply(other, memit_patch, tmp_path / "twice")
