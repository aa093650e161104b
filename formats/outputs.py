"""Where a command may write its output: never over its input, never over data patcher did
not write. Every folder patcher writes carries `patcher.json`, which is how it knows its own."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from patcher.errors import PatcherError

PROVENANCE_FILE = "patcher.json"  # what wrote this folder (and which patch), read back by verify


def check_output(out: str | Path, inputs: Iterable[str | Path], overwrite: bool = False) -> None:
    """Refuse `out` when it is an input, lies inside one or holds one (always), or already
    exists and is not empty (unless `overwrite`, and then only an output patcher wrote)."""
    target = Path(out).resolve()
    for source in (Path(path).resolve() for path in inputs):
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise PatcherError(f"--out {out} overlaps the input {source}: write the output to a folder outside it")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not overwrite:
        raise PatcherError(f"--out {out} already exists: choose a new path, or --overwrite an output of patcher")
    if not (target / PROVENANCE_FILE).is_file():
        raise PatcherError(
            f"--out {out} was not written by patcher (it has no {PROVENANCE_FILE}): --overwrite replaces only "
            "patcher's own outputs; move it away first"
        )


def mark_output(folder: Path, record: dict) -> None:
    """Write `record` as the folder's `patcher.json` (what wrote it, and from which patch)."""
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
