"""MEMIT (Meng et al., 2023): a least-squares edit that preserves the corpus keys' outputs."""

from __future__ import annotations

import torch

from patcher.methods import Deltas, EditInputs, hparam, register
from patcher.methods.linalg import guarded_solve
from patcher.methods.lm_edit import TargetHparams, edit_layers
from patcher.methods.robust import Robustness, robust_edit

DEFAULT_MOM2_WEIGHT = 15000.0


def memit_system(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, mom2_weight: float, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's objective ‖ΔK − R‖² + λ·tr(Δ C Δᵀ) + μ‖Δ‖² as tr(Δ A Δᵀ) − 2 tr(Δ Bᵀ) + const.

    A = λC + K Kᵀ + μI, B = R Kᵀ, in float64.
    """
    keys, residuals, cov = keys.double(), residuals.double(), cov.double()
    system = mom2_weight * cov + keys @ keys.T + ridge * torch.eye(cov.shape[0], dtype=torch.float64)
    return system, residuals @ keys.T


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, mom2_weight: float, ridge: float = 0.0
) -> torch.Tensor:
    """Δ = R Kᵀ (λC + K Kᵀ + μI)⁻¹, the minimiser of `memit_system`'s objective.

    keys K (d_k, n), residuals R (d_model, n), C = E[k kᵀ] (d_k, d_k): fit the new facts,
    barely move outputs on corpus keys, and (μ > 0) keep entries small where the corpus
    leaves C nearly empty.
    """
    system, rhs = memit_system(keys, residuals, cov, mom2_weight, ridge)
    return guarded_solve(system, rhs.T, "MEMIT's system").T  # the system is symmetric


@register("memit")
def memit(inputs: EditInputs) -> Deltas:
    """Erase the spec's forget facts with MEMIT (hyperparameters mom2_weight = λ, ridge = μ)."""
    mom2_weight = hparam(inputs, "mom2_weight", DEFAULT_MOM2_WEIGHT)
    ridge = hparam(inputs, "ridge", 0.0)
    adapter, hp = inputs.adapter, TargetHparams.from_spec(inputs.spec.hparams)

    def cov(layer: int) -> torch.Tensor:
        return inputs.stats.mean(adapter.down_proj_name(layer))

    if inputs.robust_to:
        return robust_edit(
            adapter,
            inputs.tokenizer,
            inputs.spec.forget,
            inputs.layers,
            lambda layer, keys, residuals: memit_system(keys, residuals, cov(layer), mom2_weight, ridge),
            hp,
            Robustness(inputs.robust_to),
        )
    return edit_layers(
        adapter,
        inputs.tokenizer,
        inputs.spec.forget,
        inputs.layers,
        lambda layer, keys, residuals: memit_update(keys, residuals, cov(layer), mom2_weight, ridge),
        hp,
    )
