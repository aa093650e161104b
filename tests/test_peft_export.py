"""`export --to peft`: a dense MEMIT patch as a standard PEFT adapter, loaded by peft onto the base."""

import json

from helpers import run_cli, spec_facts
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.formats.patch import Patch
from patcher.scoring import accuracy
from patcher.spec import load_spec


def test_memit_patch_as_a_peft_adapter_keeps_the_erasure(lm_fixture, memit_patch, tmp_path):
    patch_path, adapter = memit_patch, tmp_path / "adapter"
    result = run_cli("export", str(lm_fixture), "--to", "peft", "--patch", str(patch_path), "--out", str(adapter))
    assert "through peft: forget_accuracy" in result.stdout
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").is_file()

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_fixture), adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_fixture)
    forget, _, retain = spec_facts(load_spec(lm_fixture / "spec.toml"))
    assert accuracy(model, tokenizer, forget) <= 0.05
    assert accuracy(model, tokenizer, retain) >= 0.95  # the base answers all of them

    # the adapter's B @ A is the patch's delta, up to the 0.1% of energy it may drop
    patch = Patch.load(patch_path)
    merged = dict(model.merge_and_unload().named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(lm_fixture).named_parameters())
    for param in patch.params:
        delta = patch.delta(param)
        error = (merged[param].detach() - base[param].detach() - delta).norm()
        assert error <= 0.035 * delta.norm()  # sqrt(1 - 0.999) ≈ 0.032


def test_peft_export_needs_a_patch(lm_fixture, tmp_path):
    result = run_cli("export", str(lm_fixture), "--to", "peft", "--out", str(tmp_path / "a"), expect=2)
    assert "pass --patch PATCH" in result.stderr and not (tmp_path / "a").exists()
