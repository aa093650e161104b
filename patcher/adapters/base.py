"""What the closed-form edits need to know about a causal-LM family, in one place."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class CausalLMAdapter:
    """Locates each layer's MLP down-projection: the matrix MEMIT-style edits rewrite.

    A family subclass names where its decoder layers live, which module inside a layer is
    the down-projection, and whether that module stores its weight as (in, out).
    """

    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]
    down_proj_path: ClassVar[str]
    weight_is_transposed: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def down_proj_name(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}.{self.down_proj_path}"

    def down_proj(self, layer: int) -> nn.Module:
        return self.model.get_submodule(self.down_proj_name(layer))

    def weight_name(self, layer: int) -> str:
        """The parameter (and checkpoint tensor) name of the down-projection weight."""
        return f"{self.down_proj_name(layer)}.weight"

    def weight(self, layer: int) -> torch.Tensor:
        """The down-projection weight as (out_features, in_features), whatever its storage."""
        weight = self.down_proj(layer).weight
        return weight.T if self.weight_is_transposed else weight

    def to_param_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in) update into the parameter's own layout."""
        return delta.T.contiguous() if self.weight_is_transposed else delta

    @property
    def key_dim(self) -> int:
        return self.weight(0).shape[1]

    @property
    def model_dim(self) -> int:
        return self.weight(0).shape[0]
