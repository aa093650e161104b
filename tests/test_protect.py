"""Protected retain keys: solves that leave them unmoved."""

import numpy as np
import pytest
import torch
from test_solvers import random_problem

from patcher.methods.alphaedit import alphaedit_update
from patcher.methods.memit import memit_update


def protected_problem(weight: float):
    keys, residuals, cov = random_problem(4)
    retain_keys = keys[:, :1] + 0.1 * np.random.default_rng(5).normal(size=(keys.shape[0], 3))  # near-twins of key 0
    return keys, residuals, cov, retain_keys, weight * retain_keys @ retain_keys.T


@pytest.mark.parametrize("weight", [1.0, 100.0])
def test_memit_update_with_protected_keys_is_the_minimiser_and_moves_them_less(weight):
    keys, residuals, cov, retain_keys, protected = protected_problem(weight)
    lam = 0.5
    as_torch = [torch.from_numpy(a) for a in (keys, residuals, cov)]
    delta = memit_update(*as_torch, lam, protected=torch.from_numpy(protected)).numpy()
    # The gradient of ‖ΔK − R‖² + λ tr(Δ C Δᵀ) + w‖Δ K_r‖² vanishes at the solution.
    gradient = 2 * (delta @ keys - residuals) @ keys.T + 2 * lam * delta @ cov + 2 * delta @ protected
    assert np.abs(gradient).max() < 1e-9
    plain = memit_update(*as_torch, lam).numpy()
    assert np.linalg.norm(delta @ retain_keys) < np.linalg.norm(plain @ retain_keys)


def test_alphaedit_protected_keys_enter_as_earlier_batches_do():
    """Protected keys are `previous` keys: same solve as passing them as an earlier batch's."""
    keys, residuals, cov, retain_keys, protected = protected_problem(1.0)
    projector = torch.eye(keys.shape[0], dtype=torch.float64)
    args = torch.from_numpy(keys), torch.from_numpy(residuals), projector
    with_protection = alphaedit_update(*args, torch.from_numpy(protected), l2=1.0).numpy()
    plain = alphaedit_update(*args, torch.zeros_like(projector), l2=1.0).numpy()
    assert np.linalg.norm(with_protection @ retain_keys) < 0.5 * np.linalg.norm(plain @ retain_keys)
