"""Every supported family: the adapter finds the down-projection, its input and its layout."""

import pytest
import torch
from helpers import DECODER
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from patcher.adapters import causal_lm_adapter
from patcher.errors import PatcherError

TINY_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_inner=80, n_layer=3, n_head=4)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(**{k: v for k, v in DECODER.items() if k != "num_key_value_heads"})
    ),
}


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_adapter_locates_down_projection(family):
    torch.manual_seed(0)
    model = TINY_MODELS[family]().eval()
    adapter = causal_lm_adapter(model)
    assert adapter.num_layers == 3
    assert (adapter.model_dim, adapter.key_dim) == (32, 80)
    assert adapter.weight_name(1) in dict(model.named_parameters())

    captured = {}
    adapter.down_proj(1).register_forward_pre_hook(lambda m, args: captured.setdefault("k", args[0]))
    ids = torch.randint(50, (2, 6))
    before = model(input_ids=ids).logits
    key = captured["k"]
    assert key.shape == (2, 6, 80)

    # An (out, in) update, written in the parameter's layout, must shift the module's
    # output by exactly delta @ key.
    delta = torch.randn(32, 80) * 0.01
    module = adapter.down_proj(1)
    expected = module(key) + key @ delta.T
    with torch.no_grad():
        module.weight.add_(adapter.to_param_layout(delta))
    torch.testing.assert_close(module(key), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_unknown_family_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "mamba"})()
    with pytest.raises(PatcherError, match="no causal-LM adapter for model_type 'mamba'"):
        causal_lm_adapter(model)
