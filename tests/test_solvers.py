"""MEMIT and AlphaEdit updates against independent float64 (numpy) implementations."""

import warnings

import numpy as np
import pytest
import torch

from patcher.errors import PatcherError
from patcher.methods.alphaedit import alphaedit_update, nullspace_basis
from patcher.methods.linalg import condition_number, guarded_solve
from patcher.methods.memit import memit_update, warn_on_thin_statistics
from patcher.stats import SecondMoments


def random_problem(seed, d_model=7, d_k=13, n=4, corpus=50):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(d_k, n))
    residuals = rng.normal(size=(d_model, n))
    corpus_keys = rng.normal(size=(d_k, corpus))
    cov = corpus_keys @ corpus_keys.T / corpus
    return keys, residuals, cov


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.5, 15000.0])
@pytest.mark.parametrize("ridge", [0.0, 3.0])
def test_memit_update_matches_numpy(seed, lam, ridge):
    keys, residuals, cov = random_problem(seed)
    expected = residuals @ keys.T @ np.linalg.inv(lam * cov + keys @ keys.T + ridge * np.eye(cov.shape[0]))
    got = memit_update(torch.from_numpy(keys), torch.from_numpy(residuals), torch.from_numpy(cov), lam, ridge)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_memit_update_is_the_minimiser():
    keys, residuals, cov = random_problem(3)
    lam = 2.0
    delta = memit_update(torch.from_numpy(keys), torch.from_numpy(residuals), torch.from_numpy(cov), lam).numpy()
    # Gradient of ‖ΔK − R‖² + λ tr(Δ C Δᵀ) vanishes at the solution.
    gradient = 2 * (delta @ keys - residuals) @ keys.T + 2 * lam * delta @ cov
    assert np.abs(gradient).max() < 1e-9


def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over AlphaEdit's null-space basis."""
    basis = nullspace_basis(torch.linalg.eigh(cov.double()), threshold)
    return basis @ basis.T


def test_nullspace_projector_keeps_only_small_eigen_directions():
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    spectrum = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 1e-6, 1e-7, 0, 0, 0])
    cov = basis @ np.diag(spectrum) @ basis.T
    projector = nullspace_projector(torch.from_numpy(cov), threshold=1e-3).numpy()
    null = basis[:, 5:]
    np.testing.assert_allclose(projector, null @ null.T, atol=1e-9)
    with pytest.raises(PatcherError, match="no null space"):
        nullspace_projector(torch.eye(4, dtype=torch.float64), threshold=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_alphaedit_update_matches_numpy_and_spares_preserved_keys(seed):
    rng = np.random.default_rng(seed)
    d_model, d_k, n = 6, 12, 3
    preserved = rng.normal(size=(d_k, 5))  # the corpus keys span 5 directions
    cov = preserved @ preserved.T / 5
    keys, residuals = rng.normal(size=(d_k, n)), rng.normal(size=(d_model, n))
    earlier = rng.normal(size=(d_k, 2))
    previous = earlier @ earlier.T
    projector = nullspace_projector(torch.from_numpy(cov), threshold=1e-8).numpy()
    l2 = 10.0

    system = projector @ (keys @ keys.T + previous) + l2 * np.eye(d_k)
    expected = (np.linalg.inv(system) @ projector @ keys @ residuals.T).T
    got = alphaedit_update(*(torch.from_numpy(a) for a in (keys, residuals, projector, previous)), l2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # The update lives in the null space: preserved keys' outputs do not move.
    assert np.abs(got @ preserved).max() < 1e-9
    assert np.abs(got @ projector - got).max() < 1e-9


def test_a_well_conditioned_solve_is_plain_and_silent():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 9)) + 9 * np.eye(9)
    b = rng.normal(size=(9, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = guarded_solve(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a, b), rtol=1e-12)
    assert condition_number(torch.from_numpy(a)) == pytest.approx(np.linalg.cond(a, 1), rel=1e-9)


def test_a_singular_memit_system_is_regularised_with_a_warning():
    keys, residuals, _ = random_problem(4)
    rank_two = np.random.default_rng(5).normal(size=(13, 2))
    cov = rank_two @ rank_two.T  # the corpus spans 2 of 13 key directions, and λ·C + K Kᵀ has rank 6
    above_1e12 = r"MEMIT's system is ill-conditioned \(condition number [\d.]+e\+(1[2-9]|[2-9]\d)\)"
    with pytest.warns(UserWarning, match=above_1e12):
        delta = memit_update(torch.from_numpy(keys), torch.from_numpy(residuals), torch.from_numpy(cov), 1.0)
    assert torch.isfinite(delta).all()
    np.testing.assert_allclose(delta.numpy() @ keys, residuals, atol=1e-6)  # the facts are still fitted


def test_statistics_over_fewer_tokens_than_key_dimensions_are_warned_about_with_the_numbers():
    sums = {"model.layers.0.mlp.down_proj": torch.eye(13)}
    with pytest.warns(UserWarning, match="cover 5 tokens, fewer than the 13 key dimensions"):
        warn_on_thin_statistics(SecondMoments(sums, 5), sums)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_thin_statistics(SecondMoments(sums, 13), sums)
