"""`patcher export`: a model folder, optionally patched, in one of the shipped formats."""

from __future__ import annotations

import tempfile
from pathlib import Path

from patcher.errors import PatcherError
from patcher.formats.hf import write_model_folder
from patcher.formats.patch import Patch
from patcher.formats.quantized import QUANTIZED_FORMATS, export_quantized

EXPORT_FORMATS = ("safetensors", *QUANTIZED_FORMATS)


def export_model(source: Path, fmt: str, out: Path, patch: Patch | None = None, force: bool = False) -> Path:
    """Write `source` (+ `patch`) to `out` as `fmt`; quantized formats go through a patched
    full-precision folder first, so the quantizer sees exactly the weights a user ships."""
    if fmt not in EXPORT_FORMATS:
        raise PatcherError(f"unknown export format {fmt!r}: supported formats: {', '.join(EXPORT_FORMATS)}")
    if fmt == "safetensors":
        return write_model_folder(source, out, patch, force)
    if patch is None:
        return export_quantized(source, fmt, out)
    with tempfile.TemporaryDirectory(prefix="patcher-export-") as tmp:
        patched = write_model_folder(source, Path(tmp) / "patched", patch, force)
        return export_quantized(patched, fmt, out)
