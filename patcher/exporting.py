"""`patcher export`: a model folder, optionally patched, in one of the shipped formats."""

from __future__ import annotations

from pathlib import Path

from patcher.errors import PatcherError
from patcher.formats.patch import Patch
from patcher.formats.registry import ExportOptions, get_target
from patcher.models import detect_family


def export_model(
    source: str | Path,
    fmt: str,
    out: str | Path,
    patch: Patch | None = None,
    force: bool = False,
    rank: int | None = None,
) -> Path:
    """Write `source` (+ `patch`) to `out` as `fmt`, the way `fmt`'s registered target for the
    model's family exports it; formats that convert a whole model see the patched weights.

    `rank` fixes the rank of a LoRA export (default: the smallest rank keeping 99.9% of each
    delta's energy for peft, 99.75% for diffusers-lora).
    """
    source, out = Path(source), Path(out)
    target = get_target(fmt, detect_family(source), "export")
    if target.needs_patch and patch is None:
        raise PatcherError(f"--to {fmt} exports a patch as an adapter: pass --patch PATCH")
    target.export(source, out, patch, ExportOptions(force=force, rank=rank))
    return out
