"""The one linear solve every closed-form method makes, guarded against ill-conditioning.

An edit solved from a nearly singular system amplifies float rounding into the weights. So
each solve measures the system's 1-norm condition number from its LU factors, and above
`MAX_CONDITION` adds the ridge μ = ‖A‖₁ / MAX_CONDITION (which bounds the condition of a
symmetric positive semi-definite A + μI near MAX_CONDITION) and says so in a warning.
"""

from __future__ import annotations

import warnings

import torch

MAX_CONDITION = 1e12  # float64 keeps about four significant digits of the solution here


def condition_number(system: torch.Tensor) -> float:
    """‖A‖₁ ‖A⁻¹‖₁ in float64; inf for a singular A."""
    system = system.double()
    factors, pivots, info = torch.linalg.lu_factor_ex(system)
    if info.item() != 0:
        return float("inf")
    eye = torch.eye(system.shape[0], dtype=torch.float64, device=system.device)
    inverse = torch.linalg.lu_solve(factors, pivots, eye)
    condition = torch.linalg.matrix_norm(system, ord=1) * torch.linalg.matrix_norm(inverse, ord=1)
    return condition.item() if torch.isfinite(condition) else float("inf")


def guarded_solve(system: torch.Tensor, rhs: torch.Tensor, what: str = "the edit's system") -> torch.Tensor:
    """X with A X = B in float64; an ill-conditioned A is regularised first, with a warning
    that gives its condition number."""
    system, rhs = system.double(), rhs.double()
    condition = condition_number(system)
    if condition > MAX_CONDITION:
        ridge = torch.linalg.matrix_norm(system, ord=1).item() / MAX_CONDITION
        warnings.warn(
            f"{what} is ill-conditioned (condition number {condition:.1e}): solved with a ridge of {ridge:.1e}",
            stacklevel=2,
        )
        system = system + ridge * torch.eye(system.shape[0], dtype=torch.float64, device=system.device)
    return torch.linalg.solve(system, rhs)
