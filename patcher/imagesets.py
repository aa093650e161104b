"""Labelled image sets in safetensors files: the data classifier specs point at.

A file holds `pixel_values` (N, 3, H, W) as the model takes them (already normalised) and
`labels` (N,) int64. Classifier statistics (`[stats] data`) and verification (`[verify]
data`) read them; no pickle is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from patcher.errors import PatcherError
from patcher.formats.tensorfile import read_tensors, require_file, write_tensors

if TYPE_CHECKING:
    from patcher.spec import Spec


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
        return write_tensors(path, {"pixel_values": self.pixel_values, "labels": self.labels})

    @classmethod
    def load(cls, path: str | Path) -> ImageSet:
        """Read an image set; a one-line error when the file is missing or malformed."""
        path = require_file(path, "image set", "set [stats] data / [verify] data in the spec")
        tensors, _ = read_tensors(path, "safetensors image set")
        pixels, labels = tensors.get("pixel_values"), tensors.get("labels")
        if pixels is None or labels is None or pixels.ndim != 4 or labels.shape != pixels.shape[:1]:
            raise PatcherError(f"{path} needs tensors pixel_values (N, C, H, W) and labels (N,)")
        return cls(pixels.float(), labels.long())


@torch.no_grad()
def logits_of(model, images: ImageSet, batch_size: int = 64) -> torch.Tensor:
    """The classifier's logits for every image, (N, classes) on the CPU, a batch at a time."""
    batches = torch.split(images.pixel_values, batch_size)
    return torch.cat([model(pixel_values=batch.to(model.device)).logits.float().cpu() for batch in batches])


def top1_accuracy(model, images: ImageSet) -> float:
    """The share of `images` whose highest logit is their label."""
    return (logits_of(model, images).argmax(-1) == images.labels).float().mean().item()


def train_and_test_sets(spec: Spec, needed_by: str) -> tuple[ImageSet, ImageSet]:
    """The spec's training (`[stats] data`) and test (`[verify] data`) image sets; a one-line
    error naming `needed_by` when either is not set."""
    if spec.stats_data is None or spec.eval_data is None:
        raise PatcherError(f"{needed_by} needs training and test images: set [stats] data and [verify] data")
    return ImageSet.load(spec.stats_data), ImageSet.load(spec.eval_data)
