"""The method registry: typed settings checked against the spec, families declared by the
method, the spec reference generated from the configs, and CONTRIBUTING's worked example
(a knowledge-neuron ablation) registered as the one new module it describes."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import contributing_recipe

import patcher
from patcher import methods
from patcher.adapters import causal_lm_adapter
from patcher.errors import PatcherError
from patcher.families import get_family
from patcher.methods.alphaedit import AlphaEditConfig
from patcher.methods.lm_edit import build_request
from patcher.models import load_causal_lm
from patcher.spec import Spec, parse_spec
from patcher.spec_reference import with_reference

SPEC_DOC = Path(__file__).resolve().parent.parent / "docs" / "spec.md"


def erase_spec(tmp_path, **erase) -> Spec:
    raw = {"erase": {"method": "alphaedit", **erase}, "forget": [{"prompt": "A is in", "target": "B", "subject": "A"}]}
    return parse_spec(raw, tmp_path)


def test_settings_are_typed_from_the_config(tmp_path):
    spec = erase_spec(tmp_path, l2=2, rounds=3, calibrate=False, mom2_weight=1500.0)
    config = methods.get_method("alphaedit").configure(spec.method_settings)
    assert config == AlphaEditConfig(l2=2.0, rounds=3, calibrate=False) and isinstance(config.l2, float)
    assert methods.get_method("memit").configure(spec.method_settings).mom2_weight == 1500.0  # memit's key, kept


@pytest.mark.parametrize(
    "erase, message",
    [
        ({"l2": "big"}, "erase.l2 must be a number for alphaedit, not 'big'"),
        ({"rounds": 2.5}, "erase.rounds must be an integer for alphaedit"),
        ({"calibrate": 1}, "erase.calibrate must be true or false"),
        ({"ssd_alpha": True}, "erase.ssd_alpha must be a number for ssd"),  # another method's key, its type
        ({"nullspace_treshold": 1e-3}, "unknown key 'erase.nullspace_treshold'; keys alphaedit reads: .*l2"),
        ({"method": "rome"}, "erase.method must be one of alphaedit, fila, ga, memit, rece, ssd, uce, not 'rome'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_key(tmp_path, erase, message):
    with pytest.raises(PatcherError, match=message) as err:
        erase_spec(tmp_path, **erase)
    assert "\n" not in str(err.value)


def test_the_spec_reference_is_generated_from_the_configs():
    text = SPEC_DOC.read_text()
    assert with_reference(text) == text, "run: python -m patcher.spec_reference docs/spec.md"
    assert all(f"### `{name}`" in text for name in methods.METHODS)


@pytest.fixture
def scratch_methods():
    """Methods registered by a test are gone after it (the registry is emptied and refilled
    in place: other modules hold the same dict)."""
    registered = dict(methods.METHODS)
    yield
    methods.METHODS.clear()
    methods.METHODS.update(registered)


def test_the_contributing_recipe_adds_a_method_with_one_module(scratch_methods, monkeypatch, lm_fixture):
    module = types.ModuleType("patcher.methods.neurons")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(contributing_recipe("method"), "patcher/methods/neurons.py", "exec"), module.__dict__)
    assert "neurons" in get_family("causal-lm").methods and "neurons" not in get_family("classifier").methods

    spec = patcher.load_spec(lm_fixture / "spec.toml")
    spec.method_settings["top_k"] = 4
    spec.layers = [1]
    with pytest.raises(PatcherError, match="--robust-to works with alphaedit, memit, not neurons"):
        patcher.erase(spec, lm_fixture, method="neurons", robust_to=("nf4",))
    patch = patcher.erase(spec, lm_fixture, method="neurons")

    # The reference: the units' mean |activation| at each subject's last token, read by a hook.
    model, tokenizer = load_causal_lm(lm_fixture)
    adapter = causal_lm_adapter(model)
    assert not adapter.weight_is_transposed  # a Llama: (out, in), a unit is a column
    activations = []
    hook = adapter.down_proj(1).register_forward_pre_hook(lambda _, args: activations.append(args[0][0]))
    with torch.no_grad():
        for fact in spec.forget:
            request = build_request(tokenizer, fact)
            model(input_ids=torch.tensor([request.prompt_ids]))
            activations[-1] = activations[-1][request.subject_end]
    hook.remove()
    units = torch.stack(activations).abs().mean(0).topk(4).indices
    name = adapter.weight_name(1)
    weight = dict(model.named_parameters())[name].detach()
    assert list(patch.params) == [name]
    assert torch.equal(weight + patch.delta(name).to(weight.dtype), weight.index_fill(1, units, 0.0))
