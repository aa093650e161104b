"""How each verified format is loaded: the way a user of that format would load it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from patcher.errors import PatcherError


def load_full_precision(folder: Path):
    """Plain transformers, as a user would load the exported safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


FORMAT_LOADERS: dict[str, Callable[[Path], tuple]] = {"safetensors": load_full_precision}


def check_formats(formats: list[str]) -> None:
    unknown = [f for f in formats if f not in FORMAT_LOADERS]
    if unknown:
        raise PatcherError(
            f"unknown or unsupported format {unknown[0]!r}: verify supports {', '.join(FORMAT_LOADERS)}"
        )


def load_format(name: str, folder: Path):
    """(model, tokenizer) of the patched folder as the format `name` ships it."""
    check_formats([name])
    return FORMAT_LOADERS[name](folder)
