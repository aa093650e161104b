"""Edit methods, registered by name: each is a function from EditInputs to weight deltas,
declared with its typed settings, the model families it edits and what it needs."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from patcher.errors import PatcherError
from patcher.formats.patch import LowRankDelta
from patcher.settings import parse_config, setting_types
from patcher.spec import SCHEMA, Spec
from patcher.stats import SecondMoments

Deltas = dict[str, torch.Tensor | LowRankDelta]  # param name -> delta in the parameter's own layout


@dataclass
class EditInputs:
    """Everything a method may read: the model (through its adapter), spec, settings and statistics."""

    adapter: object
    tokenizer: object
    spec: Spec
    config: Any  # the method's config dataclass, from the spec's [erase] table
    stats: SecondMoments | None
    layers: list[int]
    robust_to: tuple[str, ...] = ()  # quantized formats the edit must survive


@dataclass(frozen=True)
class Method:
    """A registered method and what erase must know about it before running it."""

    name: str
    run: Callable[[EditInputs], Deltas]
    config: type  # a dataclass of `config.setting` fields: the [erase] keys it reads
    families: tuple[str, ...]  # the model families it edits (the spec's [model] family names)
    needs_stats: bool = False  # reads the key second moments of `patcher stats`
    robust: bool = False  # accepts --robust-to
    calibrated: bool = False  # erase tries gentler settings on the seen retain facts (methods/calibration.py)

    def configure(self, settings: dict[str, Any]) -> Any:
        """The method's config from the spec's [erase] keys; a wrong type is a PatcherError."""
        return parse_config(self.config, settings, self.name)


METHODS: dict[str, Method] = {}


def register(name: str, config: type, families: tuple[str, ...], **needs: bool):
    """Add the decorated function to the registry as method `name` (the value of --method);
    `needs` sets Method's flags: needs_stats, robust, calibrated."""

    def decorate(run: Callable[[EditInputs], Deltas]) -> Callable[[EditInputs], Deltas]:
        METHODS[name] = Method(name, run, config, families, **needs)
        return run

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PatcherError(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_erase_keys(settings: dict[str, Any], method: str, where: str) -> None:
    """A PatcherError for an [erase] key no method reads, or for a value of the wrong type
    for the method that reads it (`method`, the spec's own, when it does)."""
    if method not in METHODS:
        raise PatcherError(f"{where}: erase.method must be one of {', '.join(sorted(METHODS))}, not {method!r}")
    chosen = METHODS[method]
    for key, value in settings.items():
        readers = [m for m in METHODS.values() if key in setting_types(m.config)]
        if not readers:
            known = ", ".join([*SCHEMA["erase"], *setting_types(chosen.config)])
            raise PatcherError(f"{where}: unknown key 'erase.{key}'; keys {method} reads: {known}")
        try:
            (chosen if chosen in readers else readers[0]).configure({key: value})
        except PatcherError as err:
            raise PatcherError(f"{where}: {err}") from None


def robust_methods() -> tuple[str, ...]:
    """The methods that accept --robust-to."""
    return tuple(name for name, method in METHODS.items() if method.robust)


# Importing every module of this package registers its methods: a new method is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
