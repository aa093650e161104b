"""Which release stages are done: a stage whose outputs exist and were made from the same
inputs is skipped on a rerun, so a release interrupted at any point resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from patcher.formats.atomic import atomic_path

STATE_FILE = "release-state.json"


def digest(*parts: str | bytes | Path) -> str:
    """sha256 over strings, bytes and the contents of files, in order."""
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    hasher.update(block)
        else:
            hasher.update(part if isinstance(part, bytes) else part.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()


class StageLog:
    """`DIR/release-state.json`: per finished stage, the digest of the inputs it was made from."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        self.state: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def is_done(self, stage: str, inputs: str, outputs: list[Path]) -> bool:
        """True when `stage` was finished from these `inputs` and all its `outputs` still exist."""
        return self.state.get(stage) == inputs and all(output.exists() for output in outputs)

    def record(self, stage: str, inputs: str) -> None:
        self.state[stage] = inputs
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
