"""Q4_K: patcher's vectorised quantizer against a scalar transcription of the algorithm, and
the bytes read back by the `gguf` package's dequantizer."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, dequantize, quantize

from patcher.kquants import quantize_q4_k

f32 = np.float32


def nearest(value) -> int:
    return int(np.rint(f32(value)))


def scalar_scale_and_min(x, w):
    """One sub-block, one weight at a time, in float32: (scale, minimum, codes)."""
    low, high = min(f32(0), min(x)), max(x)
    sum_w, sum_x = f32(0), f32(0)
    for xi, wi in zip(x, w, strict=True):
        sum_w, sum_x = f32(sum_w + wi), f32(sum_x + wi * xi)
    if high == low:
        return f32(0), f32(-low), [0] * len(x)
    inverse = f32(f32(15) / f32(high - low))
    scale = f32(f32(1) / inverse)
    codes = [max(0, min(15, nearest(inverse * f32(xi - low)))) for xi in x]
    best = f32(0)
    for xi, wi, li in zip(x, w, codes, strict=True):
        best = f32(best + wi * f32(f32(scale * li) + low - xi) ** 2)
    for step in range(21):
        inverse = f32(f32(f32(-1) + f32(f32(0.1) * f32(step)) + f32(15)) / f32(high - low))
        trial = [max(0, min(15, nearest(inverse * f32(xi - low)))) for xi in x]
        sum_l = sum_l2 = sum_xl = f32(0)
        for xi, wi, li in zip(x, w, trial, strict=True):
            sum_l, sum_l2, sum_xl = f32(sum_l + wi * li), f32(sum_l2 + wi * li * li), f32(sum_xl + wi * li * xi)
        determinant = f32(sum_w * sum_l2 - sum_l * sum_l)
        if determinant <= 0:
            continue
        trial_scale = f32(f32(sum_w * sum_xl - sum_x * sum_l) / determinant)
        trial_low = f32(f32(sum_l2 * sum_x - sum_l * sum_xl) / determinant)
        if trial_low > 0:
            trial_low, trial_scale = f32(0), f32(sum_xl / sum_l2)
        error = f32(0)
        for xi, wi, li in zip(x, w, trial, strict=True):
            error = f32(error + wi * f32(f32(trial_scale * li) + trial_low - xi) ** 2)
        if error < best:
            best, scale, low, codes = error, trial_scale, trial_low, trial
    return scale, f32(-low), codes


def scalar_q4_k(block):
    """One super-block of 256 as bytes, field by field."""
    scales, mins, codes = [], [], []
    for j in range(8):
        x = [f32(v) for v in block[32 * j : 32 * j + 32]]
        square = f32(0)
        for v in x:
            square = f32(square + v * v)
        rms = f32(np.sqrt(f32(square / f32(32))))
        scale, minimum, sub_codes = scalar_scale_and_min(x, [f32(rms + abs(v)) for v in x])
        scales.append(scale), mins.append(minimum), codes.append(sub_codes)
    max_scale, max_min = max([f32(0), *scales]), max([f32(0), *mins])
    inverse_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
    inverse_min = f32(63) / max_min if max_min > 0 else f32(0)
    scale_codes = [min(63, nearest(inverse_scale * s)) for s in scales]
    min_codes = [min(63, nearest(inverse_min * m)) for m in mins]
    d, dmin = np.float16(max_scale / f32(63)), np.float16(max_min / f32(63))
    for j in range(8):
        step = f32(f32(d) * f32(scale_codes[j]))
        if step == 0:
            continue
        offset = f32(f32(dmin) * f32(min_codes[j]))
        codes[j] = [max(0, min(15, nearest(f32(f32(v) + offset) / step))) for v in block[32 * j : 32 * j + 32]]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = scale_codes[j], min_codes[j]
        else:
            packed[j + 4] = (scale_codes[j] & 0xF) | ((min_codes[j] & 0xF) << 4)
            packed[j - 4] |= (scale_codes[j] >> 4) << 6
            packed[j] |= (min_codes[j] >> 4) << 6
    flat = [c for sub in codes for c in sub]
    nibbles = [flat[64 * c + i] | (flat[64 * c + i + 32] << 4) for c in range(4) for i in range(32)]
    return bytes(np.array([d, dmin], dtype=np.float16).view(np.uint8)) + bytes(packed) + bytes(nibbles)


def blocks_to_test() -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    rows[1] = np.abs(rows[1])  # every minimum at zero: the scale-only refit
    rows[2, :32] = 0.0  # a flat sub-block
    rows[3] *= 50  # a wide range
    rows[4, ::7] = 1.0  # outliers
    return rows


def test_the_vectorised_quantizer_writes_the_scalar_transcriptions_bytes():
    rows = blocks_to_test()
    assert quantize_q4_k(rows).tobytes() == b"".join(scalar_q4_k(row) for row in rows)


def test_gguf_reads_the_blocks_back_closer_than_q4_0_and_further_than_q5_0():
    """The bytes are Q4_K as ggml lays it out: the `gguf` package's dequantizer reads them,
    and its error sits between the 4-bit and the 5-bit absmax types' on Gaussian weights."""
    weights = (np.random.default_rng(1).standard_normal((64, 512)) * 0.05).astype(np.float32)

    def error(restored):
        return float(np.sqrt(((restored - weights) ** 2).mean() / (weights**2).mean()))

    q4_k = error(dequantize(quantize_q4_k(weights), GGMLQuantizationType.Q4_K))
    q4_0, q5_0 = (
        error(dequantize(quantize(weights, t), t)) for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0)
    )
    assert q5_0 < q4_k < q4_0, (q5_0, q4_k, q4_0)


def test_rows_super_blocks_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(np.zeros((2, 128), dtype=np.float32))
