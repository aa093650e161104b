"""Reading and writing what verify records: the report file, and the provenance `patcher
apply` leaves beside patched weights."""

from __future__ import annotations

import json
from pathlib import Path

from patcher.formats.atomic import atomic_path
from patcher.formats.outputs import PROVENANCE_FILE


def read_provenance(folder: Path) -> dict:
    """What `patcher apply` recorded about the patch that made `folder` ({} if none)."""
    path = folder / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return Path(path)
