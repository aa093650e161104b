"""The format registry: one declaration per format and family, read by export, verify and the card.

The worked example of CONTRIBUTING.md (a bf16 format) is executed here as the new module
it describes, then used through the public API as any built-in format is.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import contributing_recipe

import patcher
from patcher.errors import PatcherError
from patcher.formats import registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are gone after it."""
    registry.targets()
    monkeypatch.setattr(registry, "_TARGETS", dict(registry._TARGETS))


def test_each_family_lists_what_it_ships():
    robust = ("int8", "nf4", "fp4", "int4", "gguf-q8_0", "gguf-q4_0")
    assert registry.format_names("causal-lm", robust=True) == robust
    assert set(registry.format_names("t2i-unet", exported=True)) == {
        "safetensors",
        "diffusers-lora",
        "onnx",
        "onnx-int8",
    }
    assert set(registry.format_names("t2i-unet", loaded=True)) == {"safetensors", "int8", "nf4", "fp4"}
    assert registry.format_names("classifier") == ("safetensors",)
    assert all(t.snippet for t in registry.targets() if t.export is not None), "every artifact needs a card line"


def test_a_format_outside_a_family_is_one_line_naming_what_the_family_ships():
    with pytest.raises(PatcherError, match="unknown export format 'gguf'"):
        registry.get_target("gguf", "causal-lm")
    with pytest.raises(PatcherError) as err:
        registry.get_target("diffusers-lora", "causal-lm")
    assert "applies to text-to-image pipelines, not to a causal-lm model" in str(err.value)
    assert "peft" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PatcherError, match="unknown format 'peft'"):
        registry.get_target("peft", "causal-lm", "verify")  # graded as an adapter by release, not loaded


def test_the_contributing_recipe_adds_a_format_with_one_module(scratch_registry, lm_fixture, memit_patch, tmp_path):
    exec(compile(contributing_recipe("format"), "formats/bf16.py", "exec"), {"__name__": "patcher.formats.bf16"})
    assert "bf16" in registry.format_names("causal-lm", exported=True, loaded=True)

    patch = patcher.Patch.load(memit_patch)
    exported = patcher.export(lm_fixture, "bf16", tmp_path / "bf16", patch=patch)
    config = json.loads((exported / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    patched = patcher.apply(lm_fixture, patch, tmp_path / "patched")
    spec = patcher.load_spec(lm_fixture / "spec.toml")
    report = patcher.verify(lm_fixture, patched, spec, formats=["bf16"], artifacts={"bf16": exported})
    row = report["formats"]["bf16"]
    assert row["forget_accuracy"] <= spec.gates.max_forget_accuracy
    assert row["retain_ratio"] >= spec.gates.min_retain_ratio, row
    loaded = registry.get_target("bf16", "causal-lm").load_artifact(exported)
    assert next(loaded.parameters()).dtype == torch.bfloat16
