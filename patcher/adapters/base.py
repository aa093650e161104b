"""What the closed-form edits need to know about a causal LM, in one place."""

from __future__ import annotations

import torch
from torch import nn


class CausalLMAdapter:
    """Locates each layer's MLP down-projection: the matrix MEMIT-style edits rewrite.

    `layers_path` is where the decoder layers live, `down_proj_path` the down-projection
    inside a layer, `weight_is_transposed` whether it stores its weight as (in, out)
    (GPT-2's Conv1D), and `output_normalised` whether a norm maps the projection's output
    before the residual stream adds it. `patcher.adapters.layout` finds all four for a
    loaded model.
    """

    def __init__(
        self,
        model: nn.Module,
        layers_path: str,
        down_proj_path: str,
        weight_is_transposed: bool,
        output_normalised: bool,
    ) -> None:
        self.model = model
        self.layers_path = layers_path
        self.down_proj_path = down_proj_path
        self.weight_is_transposed = weight_is_transposed
        self.output_normalised = output_normalised

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

    def value_site(self, layer: int) -> nn.Module:
        """The module whose output a layer's target values describe: the layer itself (the
        residual stream, which the projection's output joins unchanged) or, where a norm
        maps that output first, the projection (the norm is then part of the search)."""
        return self.down_proj(layer) if self.output_normalised else self.layers[layer]

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


def per_token(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A projection's input or output as (batch, tokens, width): some layouts (OPT's) flatten
    the batch's tokens into one dimension before the MLP."""
    return tensor.reshape(batch, -1, tensor.shape[-1])


def stores_transposed(module: nn.Module) -> bool:
    """Whether a linear map stores its weight as (in, out): transformers' Conv1D (GPT-2's)."""
    return type(module).__name__ == "Conv1D"
