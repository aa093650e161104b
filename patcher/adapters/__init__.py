"""Causal-LM adapters: the edited projections of any decoder layout, found from its structure."""

from __future__ import annotations

from torch import nn

from patcher.adapters.base import CausalLMAdapter
from patcher.adapters.layout import find_layout


def causal_lm_adapter(model: nn.Module) -> CausalLMAdapter:
    """The adapter for a loaded causal LM; a one-line PatcherError for a layout patcher cannot edit."""
    layout = find_layout(model)
    return CausalLMAdapter(
        model, layout.layers_path, layout.down_proj_path, layout.weight_is_transposed, layout.output_normalised
    )


__all__ = ["CausalLMAdapter", "causal_lm_adapter"]
