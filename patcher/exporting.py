"""`patcher export`: a model folder, optionally patched, in one of the shipped formats."""

from __future__ import annotations

import tempfile
from pathlib import Path

from patcher.errors import PatcherError
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.hf import check_patch_fits, write_model_folder
from patcher.formats.lora import export_diffusers_lora
from patcher.formats.onnx import ONNX_FORMATS, export_onnx
from patcher.formats.onnx_pipeline import export_pipeline_onnx
from patcher.formats.patch import Patch
from patcher.formats.peft import export_peft
from patcher.formats.quantized import QUANTIZED_FORMATS, export_quantized
from patcher.models import detect_family

EXPORT_FORMATS = ("safetensors", "peft", "diffusers-lora", *QUANTIZED_FORMATS, *ONNX_FORMATS)
PIPELINE_EXPORT_FORMATS = ("safetensors", "diffusers-lora", *ONNX_FORMATS)


def export_model(
    source: str | Path,
    fmt: str,
    out: str | Path,
    patch: Patch | None = None,
    force: bool = False,
    rank: int | None = None,
) -> Path:
    """Write `source` (+ `patch`) to `out` as `fmt`; quantized formats go through a patched
    full-precision folder first, so the quantizer sees exactly the weights a user ships.

    `rank` fixes the rank of a LoRA export (default: the smallest rank keeping 99.9% of each
    delta's energy for peft, 99.75% for diffusers-lora).
    """
    source, out = Path(source), Path(out)
    if fmt not in EXPORT_FORMATS:
        raise PatcherError(f"unknown export format {fmt!r}: supported formats: {', '.join(EXPORT_FORMATS)}")
    family = detect_family(source)
    if family == "t2i-unet" and fmt not in PIPELINE_EXPORT_FORMATS:
        raise PatcherError(
            f"a pipeline exports to {', '.join(PIPELINE_EXPORT_FORMATS)}; "
            "its bitsandbytes-quantized UNet is checked by verify"
        )
    if fmt == "safetensors":
        return write_model_folder(source, out, patch, force)
    if fmt == "peft":
        if patch is None:
            raise PatcherError("--to peft exports a patch as an adapter: pass --patch PATCH")
        export_peft(source, patch, out, rank)
        return out
    if fmt == "diffusers-lora":
        if patch is None:
            raise PatcherError("--to diffusers-lora exports a patch: pass --patch PATCH")
        check_patch_fits(Checkpoint(source), patch, force)
        export_diffusers_lora(source, patch, out, rank)
        return out
    if family not in ("causal-lm", "t2i-unet"):
        kinds = "causal LMs and text-to-image pipelines" if fmt in ONNX_FORMATS else "causal LMs"
        raise PatcherError(f"--to {fmt} exports {kinds}; {source} is a {family} model")
    convert = export_quantized
    if fmt in ONNX_FORMATS:
        convert = export_pipeline_onnx if family == "t2i-unet" else export_onnx
    if patch is None:
        convert(source, fmt, out)
        return out
    with tempfile.TemporaryDirectory(prefix="patcher-export-") as tmp:
        patched = write_model_folder(source, Path(tmp) / "patched", patch, force)
        convert(patched, fmt, out)
        return out
