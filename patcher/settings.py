"""Typed settings: a method's `[erase]` keys or an attack's `[attacks.<name>]` budget,
declared once as a dataclass.

Each field is one spec key, with its default and a line of help (`setting`). The spec
reference in docs/spec.md is generated from these fields, and `parse_config` checks a
spec's values against their types, so a method never reads an untyped dict.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from patcher.errors import PatcherError

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def setting(default: Any, help: str, minimum: float | None = None) -> Any:
    """A config field: its default, the line the spec reference prints for it and, for a
    number, the smallest value it accepts."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum})


def setting_types(config: type) -> dict[str, type]:
    """Each field's scalar type (bool, int or float); `float | None` reads as float."""
    hints = typing.get_type_hints(config)
    kinds = {}
    for field in dataclasses.fields(config):
        hint = hints[field.name]
        if isinstance(hint, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        kinds[field.name] = hint
    return kinds


def check_value(key: str, value: Any, kind: type, owner: str, section: str = "erase") -> Any:
    """`value` as `kind` (an integer is a valid float), or a PatcherError naming the key as
    `section.key` and the method or attack (`owner`) that reads it."""
    if kind is bool:
        valid = isinstance(value, bool)
    elif kind is int:
        valid = isinstance(value, int) and not isinstance(value, bool)
    else:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid:
        raise PatcherError(f"{section}.{key} must be {_TYPE_NAMES[kind]} for {owner}, not {value!r}")
    return kind(value)


def parse_config(config: type, settings: dict[str, Any], owner: str, section: str = "erase") -> Any:
    """An instance of `config` from the keys of `section` it declares; other keys are left to
    the methods that read them (a spec may carry settings for a `--method` alternative)."""
    kinds = setting_types(config)
    minimums = {field.name: field.metadata.get("minimum") for field in dataclasses.fields(config)}
    values = {k: check_value(k, v, kinds[k], owner, section) for k, v in settings.items() if k in kinds}
    for key, value in values.items():
        if minimums[key] is not None and value < minimums[key]:
            raise PatcherError(f"{section}.{key} must be at least {minimums[key]} for {owner}, not {value!r}")
    return config(**values)
