"""Statistics across the processes torchrun launches: each rank's slice of the corpus, and
sums added over ranks with torch.distributed (gloo on CPU, nccl on CUDA).

Without torchrun (no WORLD_SIZE, or 1) the world is this one process and nothing is sent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the results; the others only contribute their sums."""
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's GPU (torchrun's LOCAL_RANK) when CUDA is there, else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def slice(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of `items` (a list, a tensor's rows); the shares are
        disjoint and cover them all."""
        start, end = (len(items) * r // self.size for r in (self.rank, self.rank + 1))
        return items[start:end]

    def sum_(self, tensors: dict[str, torch.Tensor], count: int) -> int:
        """Add every rank's `tensors` in place (each rank ends with the totals); returns the summed count."""
        if self.size == 1:
            return count
        for tensor in tensors.values():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        total = torch.tensor([count], dtype=torch.float64, device=next(iter(tensors.values())).device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return int(total.item())

    def leave(self) -> None:
        """Wait for every rank (so rank 0's file is complete before any exits), then close the group."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def join_world() -> World:
    """The process group torchrun set up in the environment (joined on first call), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())
