"""Labelled image sets in safetensors files: the data classifier specs point at.

A file holds `pixel_values` (N, 3, H, W) as the model takes them (already normalised) and
`labels` (N,) int64. Classifier statistics (`[stats] data`) and verification (`[verify]
data`) read them; no pickle is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path


@dataclass
class ImageSet:
    pixel_values: torch.Tensor
    labels: torch.Tensor

    def of_classes(self, classes: list[int], keep: bool = True) -> ImageSet:
        """The images whose label is in `classes` (or, with keep=False, is not)."""
        chosen = torch.isin(self.labels, torch.tensor(classes, dtype=self.labels.dtype))
        chosen = chosen if keep else ~chosen
        return ImageSet(self.pixel_values[chosen], self.labels[chosen])

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            save_file({"pixel_values": self.pixel_values.contiguous(), "labels": self.labels.contiguous()}, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ImageSet:
        """Read an image set; a one-line error when the file is missing or malformed."""
        path = Path(path)
        if not path.is_file():
            raise PatcherError(f"image set {path} does not exist: set [stats] data / [verify] data in the spec")
        try:
            tensors = load_file(path)
        except Exception as err:
            raise PatcherError(f"{path} is not a readable safetensors image set: {err}") from None
        pixels, labels = tensors.get("pixel_values"), tensors.get("labels")
        if pixels is None or labels is None or pixels.ndim != 4 or labels.shape != pixels.shape[:1]:
            raise PatcherError(f"{path} needs tensors pixel_values (N, C, H, W) and labels (N,)")
        return cls(pixels.float(), labels.long())
