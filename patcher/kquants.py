"""The Q4_K quantizer of llama.cpp's reference code (what `llama-quantize` runs without an
importance matrix), written anew in numpy: the `gguf` package dequantizes Q4_K but cannot
quantize it. Not compared byte for byte with llama.cpp, which does not install here.

A super-block of 256 weights holds eight sub-blocks of 32. Each sub-block gets a scale and
a minimum from a weighted least-squares search over 21 candidate grids (weights: the
sub-block's RMS plus each |x|), codes 0..15 with x ≈ scale·code − min. The eight scales
and eight minimums are then quantized to 6 bits against the super-block's largest (two
fp16 numbers, d and dmin), and the codes recomputed against the 6-bit values. Arithmetic
is float32 with sums taken in order, as the C code does; rounding is to nearest, ties to
even, as its `nearest_int`.

Bytes per super-block: d, dmin (fp16), 12 bytes of packed 6-bit scales and minimums, 128
bytes of 4-bit codes (two per byte: weight l of each 64 in the low nibble, l + 32 in the high).
"""

from __future__ import annotations

import numpy as np

SUPER_BLOCK = 256
SUB_BLOCK = 32
LEVELS = 15  # 4-bit codes 0..15
SIX_BITS = 63
CANDIDATES = 20  # grids tried besides the min-max one: (15 - 1 + 0.1·k) / (max − min), k = 0..20
BYTES_PER_SUPER_BLOCK = 144

_f32 = np.float32


def _ordered_sum(values: np.ndarray) -> np.ndarray:
    """Sum along the last axis one term after another, as a C loop does in float32."""
    return np.cumsum(values, axis=-1, dtype=_f32)[..., -1]


def _codes(x: np.ndarray, low: np.ndarray, inverse_scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(inverse_scale[:, None] * (x - low[:, None])), 0, LEVELS).astype(_f32)


def _scale_and_min(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, minimum, codes) per row of `x` (sub-blocks of 32): the weighted least-squares
    search of llama.cpp's `make_qkx2_quants`, with x ≈ scale·code − minimum and minimum ≥ 0."""
    low = np.minimum(x.min(axis=1), _f32(0))
    high = x.max(axis=1)
    span = high - low
    flat = span == 0
    span = np.where(flat, _f32(1), span)
    sum_w, sum_x = _ordered_sum(weights), _ordered_sum(weights * x)

    inverse = _f32(LEVELS) / span
    scale = _f32(1) / inverse
    codes = _codes(x, low, inverse)
    best = _ordered_sum(weights * (scale[:, None] * codes + low[:, None] - x) ** 2)
    for step in range(CANDIDATES + 1):
        # The range is taken from the best minimum so far, as the reference updates it in the loop.
        span = np.where(flat, _f32(1), high - low)
        inverse = (_f32(-1) + _f32(0.1) * _f32(step) + _f32(LEVELS)) / span
        trial = _codes(x, low, inverse)
        sum_l, sum_l2 = _ordered_sum(weights * trial), _ordered_sum(weights * trial * trial)
        sum_xl = _ordered_sum(weights * trial * x)
        determinant = sum_w * sum_l2 - sum_l * sum_l
        solvable = determinant > 0
        safe = np.where(solvable, determinant, _f32(1))
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        trial_low = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = trial_low > 0  # the minimum may not rise above zero: refit the scale alone
        trial_low = np.where(positive, _f32(0), trial_low)
        trial_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, _f32(1)), trial_scale)
        error = _ordered_sum(weights * (trial_scale[:, None] * trial + trial_low[:, None] - x) ** 2)
        better = solvable & (error < best)
        codes = np.where(better[:, None], trial, codes)
        best = np.where(better, error, best)
        scale = np.where(better, trial_scale, scale)
        low = np.where(better, trial_low, low)
    scale = np.where(flat, _f32(0), scale)
    codes = np.where(flat[:, None], _f32(0), codes)
    return scale.astype(_f32), (-low).astype(_f32), codes


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """The (rows, columns) fp32 `weight` as Q4_K blocks: uint8 of shape (rows, columns / 256 · 144)."""
    rows, columns = weight.shape
    if columns % SUPER_BLOCK:
        raise ValueError(f"Q4_K needs rows of a multiple of {SUPER_BLOCK} weights, not {columns}")
    blocks = weight.astype(_f32).reshape(-1, SUPER_BLOCK)
    x = blocks.reshape(-1, SUB_BLOCK)
    rms = np.sqrt(_ordered_sum(x * x) / _f32(SUB_BLOCK))
    scales, mins, codes = _scale_and_min(x, rms[:, None] + np.abs(x))
    scales, mins, codes = scales.reshape(-1, 8), mins.reshape(-1, 8), codes.reshape(-1, 8, SUB_BLOCK)

    max_scale = np.maximum(scales.max(axis=1), _f32(0))
    max_min = np.maximum(mins.max(axis=1), _f32(0))
    inverse_scale = np.where(max_scale > 0, _f32(SIX_BITS) / np.where(max_scale > 0, max_scale, 1), _f32(0))
    inverse_min = np.where(max_min > 0, _f32(SIX_BITS) / np.where(max_min > 0, max_min, 1), _f32(0))
    scale_codes = np.minimum(np.rint(inverse_scale[:, None] * scales), SIX_BITS).astype(np.uint8)
    min_codes = np.minimum(np.rint(inverse_min[:, None] * mins), SIX_BITS).astype(np.uint8)
    d = (max_scale / _f32(SIX_BITS)).astype(np.float16)
    dmin = (max_min / _f32(SIX_BITS)).astype(np.float16)

    step = d.astype(_f32)[:, None] * scale_codes.astype(_f32)
    offset = dmin.astype(_f32)[:, None] * min_codes.astype(_f32)
    refit = np.clip(
        np.rint((blocks.reshape(-1, 8, SUB_BLOCK) + offset[..., None]) / np.where(step, step, 1)[..., None]), 0, 15
    )
    codes = np.where((step != 0)[..., None], refit, codes).astype(np.uint8)  # a zero step keeps the search's codes

    packed_scales = np.zeros((len(blocks), 12), dtype=np.uint8)
    packed_scales[:, 0:4] = scale_codes[:, 0:4]
    packed_scales[:, 4:8] = min_codes[:, 0:4]
    packed_scales[:, 8:12] = (scale_codes[:, 4:8] & 0xF) | ((min_codes[:, 4:8] & 0xF) << 4)
    packed_scales[:, 0:4] |= (scale_codes[:, 4:8] >> 4) << 6
    packed_scales[:, 4:8] |= (min_codes[:, 4:8] >> 4) << 6
    halves = codes.reshape(-1, 4, 2, SUB_BLOCK)  # per 64 weights: the first 32 and the next 32
    nibbles = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)

    out = np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed_scales, nibbles], axis=1
    )
    return out.reshape(rows, -1)
