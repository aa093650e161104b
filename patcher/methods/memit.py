"""MEMIT (Meng et al., 2023): a least-squares edit that preserves the corpus keys' outputs."""

from __future__ import annotations

import torch

from patcher.methods import Deltas, EditInputs, hparam, register
from patcher.methods.linalg import guarded_solve
from patcher.methods.lm_edit import TargetHparams, edit_layers
from patcher.methods.protect import protected_moments
from patcher.methods.robust import Robustness, box_solver
from patcher.methods.rounds import DEFAULT_ESCALATION, DEFAULT_MARGIN, DEFAULT_ROUNDS, erase_in_rounds

DEFAULT_MOM2_WEIGHT = 15000.0


def memit_system(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    cov: torch.Tensor,
    mom2_weight: float,
    ridge: float = 0.0,
    protected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's objective ‖ΔK − R‖² + λ·tr(Δ C Δᵀ) + μ‖Δ‖² + tr(Δ P Δᵀ) as
    tr(Δ A Δᵀ) − 2 tr(Δ Bᵀ) + const.

    A = λC + K Kᵀ + μI + P, B = R Kᵀ, in float64. P = w·K_r K_rᵀ holds the keys whose
    outputs must not move (`protect`).
    """
    keys, residuals, cov = keys.double(), residuals.double(), cov.double()
    system = mom2_weight * cov + keys @ keys.T + ridge * torch.eye(cov.shape[0], dtype=torch.float64)
    if protected is not None:
        system = system + protected.double()
    return system, residuals @ keys.T


def memit_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    cov: torch.Tensor,
    mom2_weight: float,
    ridge: float = 0.0,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Δ = R Kᵀ (λC + K Kᵀ + μI + P)⁻¹, the minimiser of `memit_system`'s objective.

    keys K (d_k, n), residuals R (d_model, n), C = E[k kᵀ] (d_k, d_k): fit the new facts,
    barely move outputs on corpus keys and on the protected keys P, and (μ > 0) keep
    entries small where the corpus leaves C nearly empty.
    """
    system, rhs = memit_system(keys, residuals, cov, mom2_weight, ridge, protected)
    return guarded_solve(system, rhs.T, "MEMIT's system").T  # the system is symmetric


@register("memit")
def memit(inputs: EditInputs) -> Deltas:
    """Erase the spec's forget facts with MEMIT (hyperparameters mom2_weight = λ, ridge = μ,
    retain_weight = w of the protected retain keys).

    Facts still answered after a round are solved again, with λ divided by erase.escalation
    (default 1: the same λ), up to erase.rounds times (see `rounds`).
    """
    mom2_weight = hparam(inputs, "mom2_weight", DEFAULT_MOM2_WEIGHT)
    ridge = hparam(inputs, "ridge", 0.0)
    adapter, tokenizer, layers = inputs.adapter, inputs.tokenizer, inputs.layers
    hp = TargetHparams.from_spec(inputs.spec.hparams)
    protected = protected_moments(inputs)

    weight = mom2_weight  # this round's λ

    def system(layer: int, keys: torch.Tensor, residuals: torch.Tensor):
        cov = inputs.stats.mean(adapter.down_proj_name(layer))
        return memit_system(keys, residuals, cov, weight, ridge, protected[layer])

    def update(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        cov = inputs.stats.mean(adapter.down_proj_name(layer))
        return memit_update(keys, residuals, cov, weight, ridge, protected[layer])

    # Built once: the box is set by the base weights, before any round's update.
    solve = box_solver(adapter, layers, system, Robustness(inputs.robust_to)) if inputs.robust_to else update

    def edit_round(facts, strength: float) -> Deltas:
        nonlocal weight
        weight = mom2_weight / strength
        return edit_layers(adapter, tokenizer, facts, layers, solve, hp)

    return erase_in_rounds(
        adapter,
        tokenizer,
        inputs.spec.forget,
        edit_round,
        inputs.robust_to,
        hparam(inputs, "rounds", DEFAULT_ROUNDS),
        hparam(inputs, "escalation", DEFAULT_ESCALATION),
        margin=hparam(inputs, "margin", DEFAULT_MARGIN),
        hint="raise erase.rounds or erase.escalation, or edit more layers",
    )
