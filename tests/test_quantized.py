"""Quantized formats: fake quantization is exact, envelopes, the box solver, bad input."""

import importlib.util

import numpy as np
import pytest
import torch
from helpers import tiny_llama_config
from transformers import LlamaForCausalLM

from patcher.errors import PatcherError
from patcher.formats.quantized import (
    export_quantized,
    load_exported,
    load_quantized,
    quantization_config,
    quantize_linears,
)
from patcher.methods.robust import solve_in_box, solve_in_box_on_subspace
from patcher.quantizers import check_format, check_quantizable, dequantized_weight, fake_quantize, scale_envelope

# 4-bit modules compute in bf16: their effective weight differs from an fp32 dequantization
# by bf16 rounding (2^-8 relative); int8 matches to fp16 rounding.
TOLERANCE = {"int8": 1e-3, "nf4": 8e-3, "fp4": 8e-3, "int4": 1e-6}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_llama_config(128, 256, layers=2)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp4", "int4"])
def test_fake_quantize_matches_the_real_quantizer(tiny_folder, fmt):
    """bitsandbytes on load; int4 through a compressed-tensors export read back by transformers."""
    full = LlamaForCausalLM.from_pretrained(tiny_folder)
    quantized = load_quantized(tiny_folder, fmt)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        weight = full.get_submodule(name).weight
        effective = dequantized_weight(quantized.get_submodule(name))
        error = (fake_quantize(weight, fmt) - effective).abs().max() / weight.abs().max()
        assert error < TOLERANCE[fmt], (name, float(error))
        assert (fake_quantize(weight, fmt) - weight).abs().max() > 0  # it does quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_fake_quantization_is_the_artifact_bit_for_bit(tmp_path, dtype):
    """The weights an int4 export decompresses to, for a base stored in each dtype, equal
    fake_quantize's in that dtype on every entry (a hand-written absmax / 7.5 in fp32 missed 8%)."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(256, 512)).to(dtype).save_pretrained(tmp_path / "base")
    exported = load_exported(export_quantized(tmp_path / "base", "int4", tmp_path / "int4"), "int4")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype="auto")
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        weight, shipped = base.get_submodule(name).weight.detach(), exported.get_submodule(name).weight.detach()
        assert weight.dtype == shipped.dtype == dtype
        assert torch.equal(fake_quantize(weight, "int4").to(dtype), shipped), name
        assert not torch.equal(shipped, weight)  # it does quantize


def test_scale_envelopes():
    weight = torch.randn(4, 128)
    blocks = weight.abs().reshape(-1, 64).amax(dim=1)
    envelope = scale_envelope(weight, "nf4")
    assert torch.equal(envelope[0, :64], blocks[0].expand(64))
    assert torch.equal(envelope[3, 64:], blocks[7].expand(64))
    assert torch.equal(scale_envelope(weight, "int8"), weight.abs().amax(1, keepdim=True).expand(4, 128))
    assert torch.equal(scale_envelope(weight, "int4"), weight.abs().amax(1, keepdim=True).expand(4, 128))


def test_solve_in_box_satisfies_kkt_conditions():
    rng = np.random.default_rng(0)
    factor = rng.normal(size=(9, 9))
    system = torch.from_numpy(factor @ factor.T + np.eye(9))
    rhs = torch.from_numpy(rng.normal(size=(3, 9)) * 4)
    lower, upper = -torch.full((3, 9), 0.3, dtype=torch.float64), torch.full((3, 9), 0.2, dtype=torch.float64)
    delta = solve_in_box(system, rhs, lower, upper, iterations=5000)
    assert ((delta >= lower - 1e-12) & (delta <= upper + 1e-12)).all()
    gradient = 2 * (delta @ system - rhs)
    inside = (delta > lower + 1e-6) & (delta < upper - 1e-6)
    assert gradient[inside].abs().max() < 1e-5
    assert (gradient[delta <= lower + 1e-6] >= -1e-5).all()  # pushing further down would not help
    assert (gradient[delta >= upper - 1e-6] <= 1e-5).all()
    assert inside.any() and (~inside).any()
    loose = solve_in_box(system, rhs, lower * 1e6, upper * 1e6, iterations=10)
    torch.testing.assert_close(loose, torch.linalg.solve(system, rhs.T).T)


def test_solve_in_box_on_subspace_matches_a_general_qp_solver():
    """Independent reference: scipy's SLSQP on the same problem written in the subspace coordinates."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(1)
    factor = rng.normal(size=(6, 6))
    system = factor @ factor.T + np.eye(6)
    rhs = rng.normal(size=(2, 6)) * 3
    basis, _ = np.linalg.qr(rng.normal(size=(6, 3)))
    lower, upper = np.full((2, 6), -0.25), np.full((2, 6), 0.2)

    def objective(flat):
        delta = flat.reshape(2, 3) @ basis.T
        return np.trace(delta @ system @ delta.T) - 2 * np.trace(delta @ rhs.T)

    box = [
        {"type": "ineq", "fun": lambda flat: (flat.reshape(2, 3) @ basis.T - lower).ravel()},
        {"type": "ineq", "fun": lambda flat: (upper - flat.reshape(2, 3) @ basis.T).ravel()},
    ]
    # At ftol 1e-14, scipy 1.17 ends in a line-search stop at the same optimum; 1e-12 converges cleanly.
    reference = minimize(objective, np.zeros(6), constraints=box, method="SLSQP", options={"ftol": 1e-12})
    assert reference.success
    as_torch = [torch.from_numpy(a) for a in (system, rhs, basis, lower, upper)]
    delta = solve_in_box_on_subspace(*as_torch, iterations=20000).numpy()
    assert ((delta >= lower - 1e-12) & (delta <= upper + 1e-12)).all()
    np.testing.assert_allclose(delta @ basis @ basis.T, delta, atol=1e-5)  # rows in the subspace
    np.testing.assert_allclose(delta, reference.x.reshape(2, 3) @ basis.T, atol=1e-4)
    stopped = solve_in_box_on_subspace(*as_torch, iterations=20000, tolerance=1e-7).numpy()
    np.testing.assert_allclose(stopped, reference.x.reshape(2, 3) @ basis.T, atol=1e-4)
    loose = solve_in_box_on_subspace(*as_torch[:3], *(b * 1e6 for b in as_torch[3:]), iterations=2000).numpy()
    unconstrained = np.linalg.solve(basis.T @ system @ basis, basis.T @ rhs.T).T @ basis.T
    np.testing.assert_allclose(loose, unconstrained, atol=1e-8)


def test_bad_formats_are_clear_errors(monkeypatch):
    with pytest.raises(PatcherError, match="unknown quantized format 'int3'"):
        check_format("int3")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(PatcherError, match="needs bitsandbytes"):
        quantization_config("nf4")


def test_model_too_small_for_the_4bit_block():
    config = tiny_llama_config(48, 96)
    model = LlamaForCausalLM(config)
    with pytest.raises(PatcherError, match="too small for nf4"):
        check_quantizable(model, "nf4")
    with pytest.raises(PatcherError, match="too small for int4"):
        check_quantizable(model, "int4")
    check_quantizable(model, "int8")  # LLM.int8 has no such constraint


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp4"])
def test_quantize_linears_swaps_in_bitsandbytes_modules_with_the_formats_rounding(fmt):
    """A UNet's quantized layers compute with exactly the weights fake_quantize predicts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=False))
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    quantize_linears(model, fmt)
    assert all(type(m).__module__.startswith("bitsandbytes") for m in (model[0], model[2]))
    for module, weight in zip((model[0], model[2]), weights, strict=True):
        torch.testing.assert_close(dequantized_weight(module), fake_quantize(weight, fmt), rtol=2e-3, atol=2e-3)
    with pytest.raises(PatcherError, match="too small for nf4"):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(32, 64)), "nf4")
