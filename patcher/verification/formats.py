"""How each verified format is loaded: the way a user of that format would load it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from patcher.errors import PatcherError
from patcher.formats.onnx import ONNX_FILE, ONNX_FORMATS, OnnxCausalLM, load_onnx_lm
from patcher.formats.quantized import QUANTIZED_FORMATS, load_exported, load_quantized


def load_full_precision(folder: Path):
    """Plain transformers, as a user would load the exported safetensors folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _loader(load: Callable[[Path, str], object], fmt: str) -> Callable[[Path], object]:
    return lambda folder: load(folder, fmt)


FORMAT_LOADERS: dict[str, Callable[[Path], object]] = {
    "safetensors": load_full_precision,
    **{fmt: _loader(load_quantized, fmt) for fmt in QUANTIZED_FORMATS},
    # exported, checked against PyTorch, and run by onnxruntime with greedy decoding
    **{fmt: _loader(load_onnx_lm, fmt) for fmt in ONNX_FORMATS},
}


def check_formats(formats: list[str]) -> None:
    unknown = [f for f in formats if f not in FORMAT_LOADERS]
    if unknown:
        raise PatcherError(f"unknown format {unknown[0]!r}: verify supports {', '.join(FORMAT_LOADERS)}")


def load_format(name: str, folder: Path):
    """The model in `folder` as the format `name` ships it (quantized on load, as
    `from_pretrained` with that format's quantization config does)."""
    check_formats([name])
    return FORMAT_LOADERS[name](folder)


def load_artifact(name: str, folder: Path):
    """An exported artifact (`patcher export --to NAME`) loaded by its own consumer:
    transformers for safetensors and the quantized folders, onnxruntime for ONNX."""
    check_formats([name])
    if name == "safetensors":
        return load_full_precision(folder)
    if name in ONNX_FORMATS:
        return OnnxCausalLM(folder / ONNX_FILE)
    return load_exported(folder, name)
