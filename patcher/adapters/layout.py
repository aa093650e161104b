"""Where a causal LM keeps what MEMIT-style edits rewrite, found from its structure.

The decoder layers are the module list with one entry per hidden layer. Inside a layer,
the MLP's output projection is the matrix whose output is added to the residual stream
after the MLP: in every decoder layout transformers ships (sequential like Llama's,
parallel like GPT-J's, Falcon's or Cohere's), the last linear map of the hidden width
that a layer's forward calls. One traced forward of a few tokens finds it, so a family
needs no entry of its own unless that rule is ambiguous for it. The same trace tells
whether the projection's output is normalised before it joins the residual stream (Gemma 2
and 3's and OLMo 2's `post_feedforward_layernorm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patcher.adapters.base import stores_transposed
from patcher.errors import PatcherError


@dataclass(frozen=True)
class Layout:
    """The decoder layers' path, the output projection's path inside a layer, whether its
    weight is stored as (in, out), and whether a non-linear module (a norm) maps its output
    before the residual stream adds it."""

    layers_path: str
    down_proj_path: str
    weight_is_transposed: bool
    output_normalised: bool


def is_projection(module: nn.Module) -> bool:
    """A dense linear map: `nn.Linear`, or transformers' Conv1D (GPT-2's, weight stored (in, out))."""
    return isinstance(module, nn.Linear) or stores_transposed(module)


def find_layout(model: nn.Module) -> Layout:
    """The layout of a loaded causal LM; a one-line PatcherError naming what was not found."""
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", type(model).__name__)
    layers_path = _decoder_layers(model, config.num_hidden_layers, model_type)
    layers = model.get_submodule(layers_path)
    _refuse_experts(layers[0], f"{layers_path}.0", model_type)
    down_proj_path = _output_projection(model, layers, config, model_type)
    for index, layer in enumerate(layers):
        try:
            module = layer.get_submodule(down_proj_path)
        except AttributeError:
            module = None
        if module is None or not is_projection(module):
            raise PatcherError(f"{model_type}: layer {index} has no {down_proj_path} like layer 0's; cannot edit it")
    transposed = stores_transposed(layers[0].get_submodule(down_proj_path))
    return Layout(layers_path, down_proj_path, transposed, _output_normalised(model, layers[0], down_proj_path))


def _decoder_layers(model: nn.Module, count: int, model_type: str) -> str:
    """The path of the module list holding `count` decoder layers (the largest, if several)."""
    lists = [
        (sum(p.numel() for p in module.parameters()), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and name
    ]
    if not lists:
        raise PatcherError(f"{model_type}: found no list of {count} decoder layers in {type(model).__name__}")
    return max(lists)[1]


def _refuse_experts(layer: nn.Module, where: str, model_type: str) -> None:
    """Mixture-of-experts layers route each token through some of several MLPs; one output
    projection per layer does not describe them."""
    for name, _ in layer.named_modules():
        if name.split(".")[-1] in ("experts", "block_sparse_moe"):
            raise PatcherError(
                f"{model_type} is a mixture-of-experts model ({where}.{name}): patcher edits one MLP "
                "output projection per layer and does not edit routed experts; use a dense model"
            )


@torch.no_grad()
def _output_projection(model: nn.Module, layers: nn.ModuleList, config, model_type: str) -> str:
    """The path, inside a layer, of the last projection to the hidden width that layer 0's
    forward calls, from one traced forward of three tokens."""
    calls: list[str] = []

    def record(name: str):
        def hook(module, args, output):
            if output.shape[-1] == config.hidden_size:
                calls.append(name)

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in layers[0].named_modules()
        if name and is_projection(module)
    ]
    try:
        _trace(model)
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        raise PatcherError(
            f"{model_type}: no linear map in a decoder layer writes the hidden width {config.hidden_size}; "
            "cannot find the MLP output projection"
        )
    return calls[-1]


@torch.no_grad()
def _output_normalised(model: nn.Module, layer: nn.Module, down_proj_path: str) -> bool:
    """Whether a module of `layer` takes the projection's output as its input and is not
    linear in it (checked by scaling the input: a norm's output does not scale with it,
    an inference-mode dropout's does)."""
    projection = layer.get_submodule(down_proj_path)
    produced: list[torch.Tensor] = []
    receivers: list[tuple[nn.Module, torch.Tensor]] = []

    def keep_output(module, args, output):
        produced.append(output)

    def find_receiver(module, args):
        if produced and len(args) == 1 and args[0] is produced[-1]:
            receivers.append((module, args[0]))

    handles = [projection.register_forward_hook(keep_output)]
    handles += [module.register_forward_pre_hook(find_receiver) for module in layer.modules() if module is not layer]
    try:
        _trace(model)
    finally:
        for handle in handles:
            handle.remove()
    return any(not _scales_with_input(module, value) for module, value in receivers)


def _scales_with_input(module: nn.Module, value: torch.Tensor) -> bool:
    """Whether module(2x) = 2 module(x) at x = `value` (a module with another kind of output counts as scaling)."""
    plain, doubled = module(value), module(2 * value)
    return not isinstance(plain, torch.Tensor) or torch.allclose(doubled, 2 * plain, rtol=1e-4, atol=1e-6)


def _trace(model: nn.Module) -> None:
    """One forward pass of three tokens, for hooks to watch."""
    device = next(model.parameters()).device
    model(input_ids=torch.arange(1, 4, device=device)[None] % model.config.get_text_config().vocab_size)
