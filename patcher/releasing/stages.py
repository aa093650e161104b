"""Which release stages are done: a stage whose outputs exist and were made from the same
inputs is skipped on a rerun, so a release interrupted at any point resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from patcher.formats.atomic import atomic_path

STATE_FILE = "release-state.json"


def digest(*parts: str | bytes | Path) -> str:
    """sha256 over strings, bytes and the contents of files and folders (every file's relative
    path and bytes), in order; a path that does not exist counts as empty."""
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = [part] if part.is_file() else sorted(p for p in part.rglob("*") if p.is_file())
            for file in files:
                hasher.update(str(file.relative_to(part)).encode() if file != part else b"")
                with file.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        hasher.update(block)
        else:
            hasher.update(part if isinstance(part, bytes) else part.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()


class StageLog:
    """`DIR/release-state.json`: per finished stage, the digest of the inputs it was made from
    and of the bytes it wrote, so a changed input or a damaged output reruns the stage."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        self.state: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def is_done(self, stage: str, inputs: str, outputs: list[Path]) -> bool:
        """True when `stage` was finished from these `inputs` and its `outputs` hold the bytes it wrote."""
        entry = self.state.get(stage)
        if not isinstance(entry, dict) or entry.get("inputs") != inputs:
            return False
        return all(output.exists() for output in outputs) and entry.get("outputs") == digest(*outputs)

    def outputs_of(self, stage: str) -> str:
        """The digest of what a finished `stage` wrote ("" when it has not run)."""
        return self.state.get(stage, {}).get("outputs", "")

    def record(self, stage: str, inputs: str, outputs: list[Path]) -> None:
        self.state[stage] = {"inputs": inputs, "outputs": digest(*outputs)}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
