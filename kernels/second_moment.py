"""Uncentered second moment: out += xᵀx, accumulated in fp32.

The torch reference is the implementation on every device for now; the Triton kernel of
the kernels issue plugs in behind `second_moment` without changing its callers.
"""

from __future__ import annotations

import torch


def second_moment_reference(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out += xᵀx for x of shape (N, d), computed from an fp32 upcast of x."""
    if x.dim() != 2:
        raise ValueError(f"second_moment expects x of shape (N, d), got {tuple(x.shape)}")
    d = x.shape[1]
    if out is None:
        out = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    if out.shape != (d, d) or out.dtype != torch.float32:
        raise ValueError(f"out must be a ({d}, {d}) float32 tensor, got {tuple(out.shape)} {out.dtype}")
    x32 = x.float()
    return out.addmm_(x32.T, x32)


def second_moment(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulate xᵀx into an fp32 (d, d) tensor `out` (allocated when None) and return it."""
    return second_moment_reference(x, out)
