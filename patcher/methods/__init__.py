"""Edit methods, registered by name. Each is a pure function from EditInputs to deltas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from patcher.errors import PatcherError
from patcher.formats.patch import LowRankDelta
from patcher.spec import Spec
from patcher.stats import SecondMoments

Deltas = dict[str, torch.Tensor | LowRankDelta]  # param name -> delta in the parameter's own layout


@dataclass
class EditInputs:
    """Everything a method may read: the model (through its adapter), spec and statistics."""

    adapter: object
    tokenizer: object
    spec: Spec
    stats: SecondMoments | None
    layers: list[int]
    robust_to: tuple[str, ...] = ()  # quantized formats the edit must survive


METHODS: dict[str, Callable[[EditInputs], Deltas]] = {}


def register(name: str):
    """Add a method to the registry under `name` (the value of --method)."""

    def decorate(fn: Callable[[EditInputs], Deltas]) -> Callable[[EditInputs], Deltas]:
        METHODS[name] = fn
        return fn

    return decorate


def get_method(name: str) -> Callable[[EditInputs], Deltas]:
    if name not in METHODS:
        raise PatcherError(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def hparam(inputs: EditInputs, name: str, default):
    """A method hyperparameter from the spec's [erase] table, or its default."""
    return type(default)(inputs.spec.hparams.get(name, default))


# Importing the method modules registers them.
from patcher.methods import alphaedit, fila, ga, memit, ssd, uce  # noqa: E402,F401
