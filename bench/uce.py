"""UCE's closed form at Stable Diffusion 1.5's cross-attention shapes: 1 and 100 erased concepts,
and RECE's rounds on top of it.

    python bench/uce.py [--quick]

16 transformer blocks, each with attn2.to_k and attn2.to_v (out 320, 640 or 1280, in 768),
randomly initialised in fp32 as SD 1.5 ships; 768-wide concept, anchor and preserve
embeddings (50 preserved).
`per-matrix-solve` is UCE's own loop: for every matrix, form the numerator with W₀ inside
and solve against the d × d denominator. `patcher` solves the W₀-free factor once, as
M − I = U V of rank n (the number of erased concepts), and forms each ΔW = (W₀ U) V.
For RECE, `per-matrix-solve` runs that loop once per round over every row erased so far and
derives c′ from the edited matrices; `patcher` carries the rows as two d × d sums.
"""

from __future__ import annotations

import sys

import torch
from kernel_harness import Results, detect_device, parse_args, relative_error, time_ms

from patcher.methods.uce import RECEConfig, UCEConfig, projection_deltas, rece_factors, uce_factors

SD15_BLOCK_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
TEXT_WIDTH = 768
PRESERVED = 50
RECE_ROWS, RECE_ROUNDS = 148, 10  # two concepts' rows from their last token of a 77-token prompt
REGULARIZATION = RECEConfig().rece_regularization


def per_matrix_solve(weights: dict[str, torch.Tensor], erase, anchors, preserve, hp: UCEConfig) -> dict:
    eye = torch.eye(TEXT_WIDTH, dtype=erase.dtype)
    edited = {}
    for name, w in weights.items():
        lam, scale_e, scale_p = hp.uce_lambda, hp.erase_scale, hp.preserve_scale
        numerator = lam * w + scale_e * w @ anchors.T @ erase + scale_p * w @ preserve.T @ preserve
        denominator = lam * eye + scale_e * erase.T @ erase + scale_p * preserve.T @ preserve
        edited[name] = numerator @ torch.linalg.inv(denominator)
    return edited


def shared_transform(weights: dict[str, torch.Tensor], erase, anchors, preserve, hp: UCEConfig) -> dict:
    return projection_deltas(weights, uce_factors(erase, anchors, preserve, hp))


def rece_per_matrix(weights: dict[str, torch.Tensor], erase, anchors, preserve, hp: UCEConfig) -> dict:
    eye = torch.eye(TEXT_WIDTH, dtype=erase.dtype)
    erased, targets = erase, anchors
    for _ in range(RECE_ROUNDS):
        edited = per_matrix_solve(weights, erased, targets, preserve, hp)
        system = sum(w.T @ w for w in edited.values()) + REGULARIZATION * eye
        recovered = torch.linalg.solve(system, sum(edited[n].T @ weights[n] for n in weights) @ erase.T).T
        erased, targets = torch.cat([erased, recovered]), torch.cat([targets, anchors])
    return per_matrix_solve(weights, erased, targets, preserve, hp)


def rece_shared(weights: dict[str, torch.Tensor], erase, anchors, preserve, hp: UCEConfig) -> dict:
    gram = sum(w.double().T @ w.double() for w in weights.values())
    factors = rece_factors(erase, anchors, preserve, gram, RECE_ROUNDS, REGULARIZATION, hp)
    return projection_deltas(weights, factors)


def main() -> None:
    args = parse_args(__doc__)
    device = detect_device()
    results = Results("uce", device)
    generator = torch.Generator().manual_seed(0)
    widths = SD15_BLOCK_WIDTHS[:2] if args.quick else SD15_BLOCK_WIDTHS
    weights = {
        f"block{i}.attn2.to_{kv}": torch.randn(out, TEXT_WIDTH, generator=generator) * 0.02
        for i, out in enumerate(widths)
        for kv in "kv"
    }
    hp = UCEConfig()
    preserve = torch.randn(PRESERVED, TEXT_WIDTH, generator=generator)
    for concepts in (1, 100):
        erase = torch.randn(concepts, TEXT_WIDTH, generator=generator)
        anchors = torch.randn(concepts, TEXT_WIDTH, generator=generator)
        shape = f"{concepts} concept{'s' if concepts > 1 else ''}, {len(weights)} matrices"
        as64 = [t.double() for t in (erase, anchors, preserve)]
        reference = per_matrix_solve({n: w.double() for n, w in weights.items()}, *as64, hp)
        ours = shared_transform(weights, erase, anchors, preserve, hp)
        theirs = per_matrix_solve(weights, erase, anchors, preserve, hp)
        errors = {
            "patcher": max(relative_error(weights[n] + ours[n], reference[n]) for n in weights),
            "per-matrix-solve": max(relative_error(theirs[n], reference[n]) for n in weights),
        }
        assert errors["patcher"] < 1e-5, f"the shared factor is off the float64 solve by {errors['patcher']:.1e}"
        for provider, fn in (
            ("per-matrix-solve", lambda: per_matrix_solve(weights, erase, anchors, preserve, hp)),  # noqa: B023
            ("patcher", lambda: shared_transform(weights, erase, anchors, preserve, hp)),  # noqa: B023
        ):
            ms = time_ms(fn, device.torch_device)
            results.add(provider, shape, ms, error_vs_float64=f"{errors[provider]:.1e}")
    erase = torch.randn(RECE_ROWS, TEXT_WIDTH, generator=generator)
    anchors = torch.randn(RECE_ROWS, TEXT_WIDTH, generator=generator)
    shape = f"RECE {RECE_ROUNDS} rounds, {RECE_ROWS} rows, {len(weights)} matrices"
    as64 = [t.double() for t in (erase, anchors, preserve)]
    reference = rece_per_matrix({n: w.double() for n, w in weights.items()}, *as64, hp)
    ours, theirs = (
        rece_shared(weights, erase, anchors, preserve, hp),
        rece_per_matrix(weights, erase, anchors, preserve, hp),
    )
    errors = {
        "patcher": max(relative_error(weights[n] + ours[n], reference[n]) for n in weights),
        "per-matrix-solve": max(relative_error(theirs[n], reference[n]) for n in weights),
    }
    for provider, fn in (("per-matrix-solve", rece_per_matrix), ("patcher", rece_shared)):
        ms = time_ms(lambda: fn(weights, erase, anchors, preserve, hp), device.torch_device)  # noqa: B023
        results.add(provider, shape, ms, error_vs_float64=f"{errors[provider]:.1e}")
    results.write("per-matrix-solve", args.out)


if __name__ == "__main__":
    sys.exit(main())
