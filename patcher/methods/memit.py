"""MEMIT (Meng et al., 2023): a least-squares edit that preserves the corpus keys' outputs."""

from __future__ import annotations

import torch

from patcher.methods import Deltas, EditInputs, hparam, register
from patcher.methods.lm_edit import TargetHparams, edit_layers

DEFAULT_MOM2_WEIGHT = 15000.0


def memit_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """Δ = R Kᵀ (λC + K Kᵀ)⁻¹, solved in float64.

    keys K (d_k, n), residuals R (d_model, n), C = E[k kᵀ] (d_k, d_k). Minimises
    ‖ΔK − R‖² + λ·tr(Δ C Δᵀ): fit the new facts, barely move outputs on corpus keys.
    """
    keys, residuals, cov = keys.double(), residuals.double(), cov.double()
    system = mom2_weight * cov + keys @ keys.T
    adjusted_keys = torch.linalg.solve(system, keys)  # (λC + KKᵀ)⁻¹ K, the system is symmetric
    return residuals @ adjusted_keys.T


@register("memit")
def memit(inputs: EditInputs) -> Deltas:
    """Erase the spec's forget facts with MEMIT (hyperparameter mom2_weight = λ)."""
    mom2_weight = hparam(inputs, "mom2_weight", DEFAULT_MOM2_WEIGHT)
    adapter = inputs.adapter

    def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        cov = inputs.stats.mean(adapter.down_proj_name(layer))
        return memit_update(keys, residuals, cov, mom2_weight)

    return edit_layers(
        adapter,
        inputs.tokenizer,
        inputs.spec.forget,
        inputs.layers,
        solve,
        TargetHparams.from_spec(inputs.spec.hparams),
    )
