"""Model-family adapters, looked up by the checkpoint's `config.model_type`."""

from __future__ import annotations

from torch import nn

from patcher.adapters.base import CausalLMAdapter
from patcher.adapters.gpt2 import GPT2Adapter
from patcher.adapters.gpt_neox import GPTNeoXAdapter
from patcher.adapters.llama import LlamaAdapter
from patcher.errors import PatcherError

CAUSAL_LM_ADAPTERS: tuple[type[CausalLMAdapter], ...] = (LlamaAdapter, GPT2Adapter, GPTNeoXAdapter)


def causal_lm_adapter(model: nn.Module) -> CausalLMAdapter:
    """The adapter for a loaded causal LM; a clear error for families patcher does not know."""
    model_type = getattr(model.config, "model_type", None)
    for adapter in CAUSAL_LM_ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    known = ", ".join(t for a in CAUSAL_LM_ADAPTERS for t in a.model_types)
    raise PatcherError(f"no causal-LM adapter for model_type {model_type!r}; supported: {known}")


__all__ = ["CausalLMAdapter", "causal_lm_adapter"]
