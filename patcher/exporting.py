"""`patcher export`: a model folder, optionally patched, in one of the shipped formats."""

from __future__ import annotations

from pathlib import Path

from patcher.errors import PatcherError
from patcher.formats.hf import written_by
from patcher.formats.outputs import PROVENANCE_FILE, check_output, mark_output
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
    overwrite: bool = False,
) -> Path:
    """Write `source` (+ `patch`) to `out` as `fmt`, the way `fmt`'s registered target for the
    model's family exports it; formats that convert a whole model see the patched weights.

    `rank` fixes the rank of a LoRA export (default: the smallest rank keeping 99.9% of each
    delta's energy for peft, 99.75% for diffusers-lora). `out` must not overlap `source`, nor
    exist unless `overwrite` and patcher wrote it (`check_output`).
    """
    source, out = Path(source), Path(out)
    check_output(out, [source], overwrite)
    target = get_target(fmt, detect_family(source), "export")
    if target.needs_patch and patch is None:
        raise PatcherError(f"--to {fmt} exports a patch as an adapter: pass --patch PATCH")
    target.export(source, out, patch, ExportOptions(force=force, rank=rank))
    if out.is_dir() and not (out / PROVENANCE_FILE).is_file():
        mark_output(out, written_by(patch))
    return out
