"""Llama and the families that share its layout (Mistral, Qwen2)."""

from patcher.adapters.base import CausalLMAdapter


class LlamaAdapter(CausalLMAdapter):
    model_types = ("llama", "mistral", "qwen2")
    layers_path = "model.layers"
    down_proj_path = "mlp.down_proj"
