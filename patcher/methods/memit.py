"""MEMIT (Meng et al., 2023): a least-squares edit that preserves the corpus keys' outputs."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from patcher.methods import Deltas, EditInputs, register
from patcher.methods.closed_form import ClosedFormConfig
from patcher.methods.linalg import guarded_solve
from patcher.methods.lm_edit import edit_layers
from patcher.methods.protect import protected_moments
from patcher.methods.robust import Robustness, box_solver
from patcher.methods.rounds import erase_in_rounds
from patcher.settings import setting
from patcher.stats import SecondMoments


@dataclass(frozen=True)
class MEMITConfig(ClosedFormConfig):
    """MEMIT's [erase] keys."""

    preservation = "mom2_weight"

    mom2_weight: float = setting(15000.0, "λ: weight of the corpus keys' outputs (MEMIT's published value)")
    ridge: float = setting(0.0, "μ‖Δ‖²: shrinks the entries where the corpus covariance is nearly empty")
    escalation: float = setting(1.0, "each round divides λ by this (1: the same λ every round)")


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


def warn_on_thin_statistics(stats: SecondMoments, modules: Iterable[str]) -> None:
    """Warn when the corpus gave fewer tokens than a module has key dimensions.

    C then has rank at most the token count: λC holds no output on the directions no corpus
    token reached, and the update is free to grow along them.
    """
    width = max((stats.sums[m].shape[0] for m in modules if m in stats.sums), default=0)
    if stats.token_count < width:
        warnings.warn(
            f"the statistics cover {stats.token_count} tokens, fewer than the {width} key dimensions "
            "they describe: the corpus covariance is rank-deficient and MEMIT's update can grow "
            f"along the directions it misses; collect statistics over at least {width} tokens, "
            "or set [erase] ridge",
            stacklevel=2,
        )


@register("memit", MEMITConfig, ("causal-lm",), needs_stats=True, robust=True, calibrated=True)
def memit(inputs: EditInputs) -> Deltas:
    """Erase the spec's forget facts with MEMIT (λ = mom2_weight, μ = ridge, w = retain_weight
    of the protected retain keys).

    Facts still answered after a round are solved again, with λ divided by `escalation`, up
    to `rounds` times (see `rounds`).
    """
    config: MEMITConfig = inputs.config
    adapter, tokenizer, layers = inputs.adapter, inputs.tokenizer, inputs.layers
    warn_on_thin_statistics(inputs.stats, [adapter.down_proj_name(layer) for layer in layers])
    protected = protected_moments(inputs, config.retain_weight)

    weight = config.mom2_weight  # this round's λ

    def system(layer: int, keys: torch.Tensor, residuals: torch.Tensor):
        cov = inputs.stats.mean(adapter.down_proj_name(layer))
        return memit_system(keys, residuals, cov, weight, config.ridge, protected[layer])

    def update(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        cov = inputs.stats.mean(adapter.down_proj_name(layer))
        return memit_update(keys, residuals, cov, weight, config.ridge, protected[layer])

    # Built once: the box is set by the base weights, before any round's update.
    solve = box_solver(adapter, layers, system, Robustness(inputs.robust_to)) if inputs.robust_to else update

    def edit_round(facts, strength: float) -> Deltas:
        nonlocal weight
        weight = config.mom2_weight / strength
        return edit_layers(adapter, tokenizer, facts, layers, solve, config.target())

    return erase_in_rounds(
        adapter,
        tokenizer,
        inputs.spec.forget,
        edit_round,
        inputs.robust_to,
        config.rounds,
        config.escalation,
        margin=config.margin,
        hint="raise erase.rounds or erase.escalation, or edit more layers",
    )
