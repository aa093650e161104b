"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of the
corpus keys, so preserved knowledge is untouched to first order and sequential batches of
erasures do not undo each other.
"""

from __future__ import annotations

import torch

from patcher.errors import PatcherError
from patcher.methods import Deltas, EditInputs, hparam, register
from patcher.methods.lm_edit import TargetHparams, accumulate, deltas_applied, edit_layers
from patcher.methods.robust import Robustness, robust_edit

DEFAULT_NULLSPACE_THRESHOLD = 1e-2
DEFAULT_L2 = 10.0
# Robust mode trades the exact projection for a penalty ρ‖Δ(I − P)‖², so that the update
# can also be kept inside the quantizers' scale envelopes; ρ is this multiple of the
# largest eigenvalue of K Kᵀ + K_p K_pᵀ.
NULLSPACE_PENALTY = 1.0


def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of C whose eigenvalue is below `threshold` × the largest.

    The threshold is relative to the spectrum's top so one setting fits models whose keys
    have different scales.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    null = eigenvectors[:, eigenvalues < threshold * eigenvalues.max()]
    if null.shape[1] == 0:
        raise PatcherError(
            "the key statistics leave no null space to edit in: raise erase.nullspace_threshold "
            f"(now {threshold}) or use --method memit"
        )
    return null @ null.T


def alphaedit_update(
    keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor, previous: torch.Tensor, l2: float
) -> torch.Tensor:
    """Δ = R Kᵀ P (P (K Kᵀ + K_p K_pᵀ) + l2·I)⁻ᵀ, solved in float64.

    keys K (d_k, n), residuals R (d_model, n), projector P (d_k, d_k), previous = K_p K_pᵀ
    of the keys edited in earlier batches. The result satisfies Δ = Δ P: it acts only on
    the null space of the corpus keys.
    """
    keys, residuals = keys.double(), residuals.double()
    projector, previous = projector.double(), previous.double()
    eye = torch.eye(keys.shape[0], dtype=torch.float64)
    system = projector @ (keys @ keys.T + previous) + l2 * eye
    return torch.linalg.solve(system, projector @ keys @ residuals.T).T


def alphaedit_system(
    keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor, previous: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's objective with the null-space constraint as a penalty, for box solves.

    ‖ΔK − R‖² + ‖ΔK_p‖² + l2‖Δ‖² + ρ‖Δ(I − P)‖² as tr(Δ A Δᵀ) − 2 tr(Δ Bᵀ): A = K Kᵀ + K_p K_pᵀ
    + l2·I + ρ(I − P), B = R Kᵀ.
    """
    keys, residuals = keys.double(), residuals.double()
    fitted = keys @ keys.T + previous.double()
    eye = torch.eye(keys.shape[0], dtype=torch.float64)
    penalty = NULLSPACE_PENALTY * torch.linalg.eigvalsh(fitted).max().clamp(min=1.0)
    return fitted + l2 * eye + penalty * (eye - projector.double()), residuals @ keys.T


@register("alphaedit")
def alphaedit(inputs: EditInputs) -> Deltas:
    """Erase the forget facts in batches of erase.batch_size (default: all at once).

    Keys of earlier batches enter later solves, so a later batch cannot undo an earlier one.
    """
    adapter, spec = inputs.adapter, inputs.spec
    threshold = hparam(inputs, "nullspace_threshold", DEFAULT_NULLSPACE_THRESHOLD)
    l2 = hparam(inputs, "l2", DEFAULT_L2)
    batch_size = hparam(inputs, "batch_size", max(len(spec.forget), 1))
    projectors = {
        layer: nullspace_projector(inputs.stats.mean(adapter.down_proj_name(layer)), threshold)
        for layer in inputs.layers
    }
    previous = {layer: torch.zeros_like(p) for layer, p in projectors.items()}

    def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        update = alphaedit_update(keys, residuals, projectors[layer], previous[layer], l2)
        previous[layer] += keys @ keys.T
        return update

    def system(layer: int, keys: torch.Tensor, residuals: torch.Tensor):
        quadratic = alphaedit_system(keys, residuals, projectors[layer], previous[layer], l2)
        previous[layer] += keys @ keys.T
        return quadratic

    hp = TargetHparams.from_spec(spec.hparams)
    if inputs.robust_to:
        return robust_edit(
            adapter, inputs.tokenizer, spec.forget, inputs.layers, system, hp, Robustness(inputs.robust_to)
        )
    total: Deltas = {}
    for start in range(0, len(spec.forget), batch_size):
        batch = spec.forget[start : start + batch_size]
        with deltas_applied(adapter.model, total):
            accumulate(total, edit_layers(adapter, inputs.tokenizer, batch, inputs.layers, solve, hp))
    return total
