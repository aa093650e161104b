"""Read the weights of a Hugging Face folder tensor by tensor, single-file or sharded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The safetensors weights of one model folder: which tensor lives in which shard.

    Opening reads only headers; `tensor(name)` reads one tensor. That is what keeps apply
    and fingerprinting streaming: a 70B checkpoint is never in memory at once.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.shard_of = {name: self.folder / shard for name, shard in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as f:
                self.shard_of = {name: self.folder / SINGLE_FILE for name in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(
                f"{self.folder} holds no {SINGLE_FILE} or {INDEX_FILE}: "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )

    @property
    def shards(self) -> list[Path]:
        """Shard files in a stable order."""
        return sorted(set(self.shard_of.values()))

    def names(self, shard: Path | None = None) -> list[str]:
        return sorted(n for n, s in self.shard_of.items() if shard is None or s == shard)

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.shard_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def fingerprints(self, names: Iterable[str]) -> dict[str, str]:
        """sha256 of each named tensor's bytes exactly as stored (dtype and layout)."""
        return {name: tensor_sha256(self.tensor(name)) for name in names}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes; independent of the dtype's numpy support."""
    flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()
