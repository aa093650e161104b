"""Resumable statistics: partial sums saved atomically every N tokens, picked up after a crash.

A checkpoint holds the running sums, how many batches and tokens they cover, and a key of
everything that decides them (model, corpus slice, layers, kind, batch size, rank). A rerun
with the same arguments finds a checkpoint with its own key, restores the sums and skips
the batches already counted, so it ends with the same sums, bit for bit, as an
uninterrupted run: the same batches are added in the same order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.tensorfile import read_tensors, write_tensors
from patcher.progress import progress

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


@dataclass(frozen=True)
class Progress:
    """Where a collection stands: batches added so far, and the tokens and samples in them."""

    batches: int = 0
    tokens: int = 0
    samples: int = 0


@dataclass
class Checkpointer:
    """Saves partial sums to `path` every `every` tokens and restores them on a rerun with the same `key`."""

    path: Path
    every: int
    key: str
    restored: Progress = field(default_factory=Progress, init=False)  # what the last restore found
    _saved_at: int = field(default=0, init=False)

    def restore(self, sums: dict[str, torch.Tensor]) -> Progress:
        """Copy a matching checkpoint's sums into `sums`; where it left off (nothing, without one)."""
        if not self.path.is_file():
            return Progress()
        try:
            saved, metadata = read_tensors(self.path, "checkpoint")
        except PatcherError as err:  # a checkpoint is only ever renamed into place, but a disk can still fail
            warnings.warn(f"{err}: collecting from the start", stacklevel=2)
            return Progress()
        if metadata.get("key") != self.key or set(saved) != set(sums):
            warnings.warn(f"{self.path} is from a run with other arguments: collecting from the start", stacklevel=2)
            return Progress()
        for name, tensor in saved.items():
            sums[name].copy_(tensor)
        self.restored = Progress(*(int(metadata[k]) for k in ("batches", "tokens", "samples")))
        self._saved_at = self.restored.tokens
        return self.restored

    def update(self, sums: dict[str, torch.Tensor], done: Progress) -> None:
        """Save when `every` tokens have been added since the last save."""
        if done.tokens - self._saved_at < self.every:
            return
        metadata = {"key": self.key, "batches": str(done.batches), "tokens": str(done.tokens),
                    "samples": str(done.samples)}  # fmt: skip
        write_tensors(self.path, sums, metadata)
        self._saved_at = done.tokens

    def discard(self) -> None:
        """Remove the checkpoint once the final statistics are written."""
        self.path.unlink(missing_ok=True)


class BatchRun:
    """A collection's batches, less those a checkpoint already holds; after each batch the
    consumer adds to `sums`, `done` counts it, and the checkpointer may save."""

    def __init__(
        self,
        batches: Iterable[Batch],
        sums: dict[str, torch.Tensor],
        checkpointer: Checkpointer | None,
        desc: str,
        total: int | None = None,
    ) -> None:
        self.batches, self.sums, self.checkpointer, self.desc, self.total = batches, sums, checkpointer, desc, total
        self.done = checkpointer.restore(sums) if checkpointer is not None else Progress()

    def __iter__(self) -> Iterator[Batch]:
        skip = self.done.batches
        for index, (ids, mask) in enumerate(progress(self.batches, self.desc, total=self.total)):
            if index < skip:
                continue
            yield ids, mask
            samples = int((mask[:, 1:].sum(1) > 0).sum())  # rows with a next-token target
            self.done = Progress(index + 1, self.done.tokens + int(mask.sum()), self.done.samples + samples)
            if self.checkpointer is not None:
                self.checkpointer.update(self.sums, self.done)
