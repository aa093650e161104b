"""The safetensors files patcher writes for itself (patches, key statistics, image sets):
written atomically, read back with a one-line error for a missing or corrupt file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save `tensors` (made contiguous, on the CPU) so that a crash never leaves a partial file."""
    with atomic_path(path) as tmp:
        save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, tmp, metadata=metadata)
    return Path(path)


def require_file(path: str | Path, what: str, hint: str, error: type[PatcherError] = PatcherError) -> Path:
    """`path` as a Path; `error` saying what is missing and how to make it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist" + (f": {hint}" if hint else ""))
    return path


def read_tensors(
    path: Path, what: str, error: type[PatcherError] = PatcherError
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an existing safetensors file; `error` naming the first line of
    the reader's complaint when the file is not one (safetensors raises several types)."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{path} is not a readable {what} (truncated or corrupt?): {reason}") from None
    return tensors, metadata
