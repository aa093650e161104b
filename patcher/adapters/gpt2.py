"""GPT-2: the MLP output is a Conv1D, whose weight is stored as (in, out)."""

from patcher.adapters.base import CausalLMAdapter


class GPT2Adapter(CausalLMAdapter):
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    down_proj_path = "mlp.c_proj"
    weight_is_transposed = True
