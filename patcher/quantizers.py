"""Exact quantizer numerics: what bitsandbytes' int8/nf4/fp4, int4 round-to-nearest and
llama.cpp's GGUF block types do to a weight, without writing or loading a checkpoint.

Robust edits solve inside the formats' scale envelopes and check every format by fake
quantization; verify reads back the weight a quantized module computes with; exports
check shapes before any work. Tests hold each function equal to the real quantizer.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch

from patcher.adapters.base import stores_transposed
from patcher.adapters.layout import is_projection
from patcher.errors import PatcherError
from patcher.kquants import SUPER_BLOCK, quantize_q4_k

BITSANDBYTES_FORMATS = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}
INT4_GROUP = 128
# llama.cpp's block types, by patcher's format name. q8_0 and q4_0: one fp16 absmax scale per
# 32 consecutive weights of a row, 8- or 4-bit codes (the `gguf` package's quantizers); q4_k:
# super-blocks of 256 with 6-bit sub-block scales and minimums (`patcher.kquants`), and, as
# llama.cpp does, q5_0 for a matrix whose rows super-blocks do not divide.
GGUF_TYPES = {"gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0", "gguf-q4_k": "Q4_K"}
GGUF_BLOCK = 32
GGUF_K_FALLBACK = "Q5_0"
QUANTIZED_FORMATS = (*BITSANDBYTES_FORMATS, "int4", *GGUF_TYPES)
# bitsandbytes' CPU 4-bit path packs weights in blocks of 32 output rows, and of 64 inputs.
CPU_4BIT_ROW_BLOCK = 32
BLOCK_4BIT = 64  # bitsandbytes' default blocksize: one absmax scale per 64 consecutive weights
SKIPPED_MODULES = ("lm_head",)  # transformers keeps the output head in full precision


def check_format(fmt: str) -> None:
    """A clear error for an unknown quantized format or a missing library."""
    if fmt not in QUANTIZED_FORMATS:
        raise PatcherError(f"unknown quantized format {fmt!r}: use one of {', '.join(QUANTIZED_FORMATS)}")
    package, module = {"int4": ("compressed-tensors", "compressed_tensors")}.get(
        fmt, ("gguf", "gguf") if fmt in GGUF_TYPES else ("bitsandbytes", "bitsandbytes")
    )
    if importlib.util.find_spec(module) is None:
        raise PatcherError(f"the {fmt} format needs {package}: pip install {package}")


def check_quantizable(model: torch.nn.Module, fmt: str) -> None:
    """Refuse, before any work, a model whose layers the quantizer rejects."""
    check_format(fmt)
    if fmt in GGUF_TYPES:
        _check_gguf_blocks(model, fmt)
    for name, module in model.named_modules():
        if fmt == "int4" and stores_transposed(module):
            raise PatcherError(
                f"{name} is a Conv1D (GPT-2's layout): compressed-tensors' int4 quantizes nn.Linear layers only; "
                "ship this model in int8, nf4 or fp4"
            )
        if isinstance(module, torch.nn.Linear) and not name.endswith(SKIPPED_MODULES):
            out_features, in_features = module.weight.shape
            if fmt == "int4" and in_features % INT4_GROUP:
                raise PatcherError(
                    f"{name} ({out_features}x{in_features}) is too small for int4: groups of {INT4_GROUP} "
                    "need in-features divisible by it"
                )
            if fmt in ("nf4", "fp4") and (out_features % CPU_4BIT_ROW_BLOCK or in_features % BLOCK_4BIT):
                raise PatcherError(
                    f"{name} ({out_features}x{in_features}) is too small for {fmt}: bitsandbytes' CPU kernels "
                    f"need out-features divisible by {CPU_4BIT_ROW_BLOCK} and in-features by {BLOCK_4BIT}"
                )


def _check_gguf_blocks(model: torch.nn.Module, fmt: str) -> None:
    """GGUF's block types hold runs of GGUF_BLOCK consecutive weights of a row."""
    for name, module in quantized_linears(model).items():
        out_features, in_features = (module.weight.T if stores_transposed(module) else module.weight).shape
        if in_features % GGUF_BLOCK:
            raise PatcherError(
                f"{name} ({out_features}x{in_features}) does not fit {fmt}: llama.cpp's blocks of {GGUF_BLOCK} "
                "need rows divisible by it"
            )


def int4_args():
    """compressed-tensors' description of patcher's int4: symmetric, groups of INT4_GROUP (W4A16)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=INT4_GROUP)


def int4_qparams(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of each group, from compressed-tensors' own `calculate_qparams`,
    in the weight's dtype as the export stores them: a hand-written absmax / 7.5 in fp32
    rounds 8% of a bf16 weight's entries differently from the artifact."""
    from compressed_tensors.quantization.utils import calculate_qparams

    groups = weight.detach().reshape(weight.shape[0], -1, INT4_GROUP)
    return calculate_qparams(groups.amin(-1), groups.amax(-1), int4_args())


@torch.no_grad()
def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight a (possibly quantized) linear module computes with, in fp32.

    Read off the module's own forward on the identity rather than from its storage, whose
    layout bitsandbytes repacks on CPU.
    """
    in_features = module.in_features if hasattr(module, "in_features") else module.weight.shape[0]
    # Quantized storage (int8, packed uint8) computes in fp32; a plain layer in its own dtype.
    dtype = module.weight.dtype if module.weight.dtype.is_floating_point else torch.float32
    eye = torch.eye(in_features, device=module.weight.device, dtype=dtype)
    out = module(eye).float()
    if getattr(module, "bias", None) is not None:
        out = out - module.bias.float()
    return out.T


def gguf_type(fmt: str, columns: int) -> str:
    """The GGML type `fmt` stores a matrix with rows of `columns` weights in."""
    kind = GGUF_TYPES[fmt]
    return GGUF_K_FALLBACK if kind == "Q4_K" and columns % SUPER_BLOCK else kind


def gguf_quantize(weight: torch.Tensor, fmt: str):
    """The (out, in) weight's GGUF blocks in `fmt`, as bytes (numpy uint8), quantized from fp32
    as llama.cpp's converter and `llama-quantize` do."""
    from gguf import GGMLQuantizationType, quantize

    values = weight.detach().float().cpu().numpy()
    kind = gguf_type(fmt, values.shape[1])
    return quantize_q4_k(values) if kind == "Q4_K" else quantize(values, GGMLQuantizationType[kind])


def fake_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize then dequantize an (out, in) weight exactly as `fmt` does on load (fp32 out).

    4-bit: bitsandbytes' blockwise absmax over 64 consecutive values of the fp32 weight;
    int8: LLM.int8's row-wise absmax of the fp16 weight; int4: compressed-tensors' own
    `fake_quantize` in the weight's dtype; GGUF: the `gguf` package's quantizer and
    dequantizer, which transformers' GGUF loader uses. Lets an edit be checked in a format
    without writing a checkpoint.
    """
    check_format(fmt)
    if fmt in GGUF_TYPES:
        from gguf import GGMLQuantizationType, dequantize

        kind = GGMLQuantizationType[gguf_type(fmt, weight.shape[1])]
        return torch.from_numpy(dequantize(gguf_quantize(weight, fmt), kind)).to(weight.device).float()
    if fmt == "int4":
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

        scale, zero_point = int4_qparams(weight)
        return ct_fake_quantize(weight.detach(), scale, zero_point, int4_args()).float()
    import bitsandbytes.functional as bnbf

    settings = BITSANDBYTES_FORMATS[fmt]
    if settings.get("load_in_4bit"):
        packed, state = bnbf.quantize_4bit(weight.detach().float(), quant_type=settings["bnb_4bit_quant_type"])
        return bnbf.dequantize_4bit(packed, state).float()
    quantized, scales, _ = bnbf.int8_vectorwise_quant(weight.detach().half())
    return quantized.float() * scales.float().view(-1, 1) / 127.0


def scale_envelope(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per entry of an (out, in) weight, the absmax that sets its quantization scale in `fmt`.

    Keeping |W + Δ| within this envelope leaves every scale, and so every other weight's
    rounding, exactly as in the quantized base.
    """
    magnitude = weight.detach().abs()
    if fmt == "int4" or fmt in GGUF_TYPES:
        groups = magnitude.reshape(weight.shape[0], -1, INT4_GROUP if fmt == "int4" else GGUF_BLOCK)
        return groups.amax(-1, keepdim=True).expand_as(groups).reshape(weight.shape)
    if BITSANDBYTES_FORMATS[fmt].get("load_in_4bit"):
        flat = magnitude.reshape(-1)
        pad = (-flat.numel()) % BLOCK_4BIT
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK_4BIT)
        envelope = blocks.amax(dim=1, keepdim=True).expand_as(blocks).reshape(-1)[: flat.numel()]
        return envelope.reshape(weight.shape)
    return magnitude.amax(dim=1, keepdim=True).expand_as(magnitude)


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear layers a bitsandbytes load quantizes (all but the output head)."""
    return {
        name: module
        for name, module in model.named_modules()
        if is_projection(module) and not name.endswith(SKIPPED_MODULES)
    }


@contextmanager
def fake_quantized(model: torch.nn.Module, fmt: str):
    """Temporarily give every quantized layer its `fmt`-rounded weight, in place."""
    saved = {}
    with torch.no_grad():
        for name, module in quantized_linears(model).items():
            saved[name] = module.weight.detach().clone()
            transposed = stores_transposed(module)
            weight = module.weight.T if transposed else module.weight
            rounded = fake_quantize(weight, fmt)
            module.weight.copy_((rounded.T if transposed else rounded).to(module.weight.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, module in quantized_linears(model).items():
                module.weight.copy_(saved[name])
