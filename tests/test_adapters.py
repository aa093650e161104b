"""The adapter finds each family's decoder layers and MLP output projection from structure:
its input is the key, its layout (out, in) or (in, out), and an update shifts its output."""

import pytest
import torch

from patcher.adapters import causal_lm_adapter
from patcher.adapters.base import per_token
from patcher.errors import PatcherError
from patcher.fixtures.architectures import ARCHITECTURES, LAYERS, MLP_WIDTH, VOCAB, WIDTH, tiny_model

MIXTURES_OF_EXPERTS = ("mixtral", "qwen2_moe")
DENSE = [family for family in ARCHITECTURES if family not in MIXTURES_OF_EXPERTS]
# The output projection's path inside a layer, as each family's modelling code names it:
# the reference the structural search is checked against.
NAMED = {
    "gpt2": "mlp.c_proj",
    "gpt_bigcode": "mlp.c_proj",
    "starcoder2": "mlp.c_proj",
    "gptj": "mlp.fc_out",
    "phi": "mlp.fc2",
    "opt": "fc2",
    "gpt_neox": "mlp.dense_4h_to_h",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
}


@pytest.mark.parametrize("family", DENSE)
def test_adapter_finds_the_mlp_output_projection(family):
    model = tiny_model(family)
    adapter = causal_lm_adapter(model)
    assert adapter.num_layers == LAYERS
    assert adapter.down_proj_path == NAMED.get(family, "mlp.down_proj")
    key_width = 4 * WIDTH if family == "bloom" else MLP_WIDTH  # Bloom's MLP is 4 × hidden
    assert (adapter.model_dim, adapter.key_dim) == (WIDTH, key_width)
    assert adapter.weight_is_transposed == (family == "gpt2")
    assert adapter.weight_name(1) in dict(model.named_parameters())
    # Gemma 2/3 and OLMo 2 name the norm their modelling code applies to the MLP's output.
    normalised = any(name.endswith("post_feedforward_layernorm") for name, _ in model.named_modules())
    assert adapter.output_normalised == normalised
    assert adapter.value_site(1) is (adapter.down_proj(1) if normalised else adapter.layers[1])

    captured = {}
    adapter.down_proj(1).register_forward_pre_hook(lambda m, args: captured.update(k=args[0]))
    ids = torch.randint(3, VOCAB, (2, 6))
    before = model(input_ids=ids).logits
    key = per_token(captured["k"], 2)  # OPT flattens the batch's tokens before its MLP
    assert key.shape == (2, 6, key_width)

    # An (out, in) update, written in the parameter's layout, must shift the module's
    # output by exactly delta @ key, and so change the logits.
    delta = torch.randn(WIDTH, key_width) * 0.01
    module = adapter.down_proj(1)
    expected = module(key) + key @ delta.T
    with torch.no_grad():
        module.weight.add_(adapter.to_param_layout(delta))
    torch.testing.assert_close(module(key), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("family", MIXTURES_OF_EXPERTS)
def test_a_mixture_of_experts_is_refused_in_one_line(family):
    with pytest.raises(PatcherError, match=f"{family} is a mixture-of-experts model .*experts") as err:
        causal_lm_adapter(tiny_model(family))
    assert "\n" not in str(err.value)


def test_a_model_without_decoder_layers_names_what_is_missing():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.config = type("Config", (), {"get_text_config": lambda self: self, "num_hidden_layers": 4})()
    with pytest.raises(PatcherError, match="found no list of 4 decoder layers in Sequential"):
        causal_lm_adapter(model)
