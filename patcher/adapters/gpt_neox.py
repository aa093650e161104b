"""GPT-NeoX (Pythia): the MLP output is `dense_4h_to_h`."""

from patcher.adapters.base import CausalLMAdapter


class GPTNeoXAdapter(CausalLMAdapter):
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    down_proj_path = "mlp.dense_4h_to_h"
