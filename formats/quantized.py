"""Quantized exports that their consumers load without patcher (the numerics: `patcher.quantizers`).

int8, nf4 and fp4 are bitsandbytes formats, written with transformers' `save_pretrained`
so `AutoModelForCausalLM.from_pretrained(folder)` loads them (on CPU too). int4 is
weight-only round-to-nearest in groups of 128 (W4A16), stored by compressed-tensors in its
"pack-quantized" format: what vLLM serves, and what transformers loads and decompresses
on CPU.

Models load with `dtype="auto"`, in the checkpoint's own dtype: transformers 5's default,
which transformers 4 replaces by fp16 for a bitsandbytes load and by fp32 otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.registry import Target, register, whole_model
from patcher.models import remote_code_trusted
from patcher.quantizers import (
    BITSANDBYTES_FORMATS,
    SKIPPED_MODULES,
    check_format,
    check_quantizable,
    int4_args,
    int4_qparams,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def quantization_config(fmt: str):
    """transformers' BitsAndBytesConfig for a bitsandbytes format name."""
    from transformers import BitsAndBytesConfig

    check_format(fmt)
    return BitsAndBytesConfig(**BITSANDBYTES_FORMATS[fmt])


def _skeleton(folder: Path) -> torch.nn.Module:
    """The model's modules without weights, to check shapes before any work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trusted = remote_code_trusted()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(folder, trust_remote_code=trusted), trust_remote_code=trusted
        )


def load_quantized(folder: str | Path, fmt: str):
    """A causal LM from a full-precision folder in `fmt`, loaded the way its users load it."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    check_quantizable(_skeleton(folder), fmt)
    if fmt == "int4":
        with tempfile.TemporaryDirectory(prefix="patcher-int4-") as tmp:
            return load_exported(export_quantized(folder, fmt, Path(tmp) / "int4"), fmt)
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization_config(fmt),
        device_map="cpu",
        dtype="auto",
        trust_remote_code=remote_code_trusted(),
    ).eval()


def load_exported(folder: str | Path, fmt: str):
    """A folder `export_quantized` wrote, loaded by plain `from_pretrained` (its config carries
    the quantization); int4 is decompressed at load instead of on the first forward."""
    from transformers import AutoModelForCausalLM

    check_format(fmt)
    trusted = remote_code_trusted()
    if fmt != "int4":
        return AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu", dtype="auto", trust_remote_code=trusted
        ).eval()
    from transformers import CompressedTensorsConfig

    with warnings.catch_warnings():  # transformers notes that the passed config overrides the saved one
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        config = CompressedTensorsConfig(run_compressed=False)
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype="auto", trust_remote_code=trusted
        ).eval()


def export_quantized(source: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `source` quantized as `fmt` to `out`, with its tokenizer; atomic."""
    source = Path(source)
    check_quantizable(_skeleton(source), fmt)
    model, compressor = _int4_compressed(source) if fmt == "int4" else (load_quantized(source, fmt), None)
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        if compressor is not None:
            compressor.update_config(tmp)  # writes the quantization_config transformers reads
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    return Path(out)


def _int4_compressed(source: Path):
    """(model, compressor): every quantized linear layer rounded to int4 groups and packed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=remote_code_trusted()).eval()
    scheme = QuantizationScheme(targets=["Linear"], weights=int4_args())
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(SKIPPED_MODULES))
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                scale, zero_point = int4_qparams(module.weight)
                module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
                module.weight_zero_point.copy_(zero_point.to(module.weight_zero_point.dtype))
                module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    return model, compressor


LLM_INT8_THRESHOLD = 6.0  # transformers' and diffusers' BitsAndBytesConfig default


@torch.no_grad()
def quantize_linears(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """Swap every nn.Linear of `model` for the bitsandbytes module a `BitsAndBytesConfig` load
    installs (Linear8bitLt or Linear4bit), holding the same weights quantized; in place.

    diffusers refuses bitsandbytes quantization without a GPU, so a pipeline's UNet is
    quantized here, with the same modules and kernels, on any device.
    """
    import bitsandbytes as bnb

    check_format(fmt)
    if fmt not in BITSANDBYTES_FORMATS:
        raise PatcherError(f"{fmt} is not a bitsandbytes format: use one of {', '.join(BITSANDBYTES_FORMATS)}")
    check_quantizable(model, fmt)
    settings = BITSANDBYTES_FORMATS[fmt]
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    for name, linear in linears:
        weight = linear.weight.detach().float().clone()
        if settings.get("load_in_4bit"):
            kind = settings["bnb_4bit_quant_type"]
            quantized = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, linear.bias is not None, torch.float32, quant_type=kind
            )
            quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind)
        else:
            quantized = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, linear.bias is not None,
                has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD,
            )  # fmt: skip
            quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized.to(linear.weight.device))  # moving a bnb parameter quantizes it
    return model.eval()


def load_pipeline_quantized(folder: Path, fmt: str):
    """The pipeline in `folder` with its UNet's linear layers in bitsandbytes `fmt` (text
    encoder and autoencoder as they are): diffusers cannot save such a UNet on a CPU, so
    verify quantizes it at load and nothing is exported."""
    from diffusers import UNet2DConditionModel

    from patcher.models import load_pipeline

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    return load_pipeline(folder, unet=quantize_linears(unet, fmt))


_CARD_NOTES = {
    "int8": "bitsandbytes LLM.int8",
    "nf4": "bitsandbytes nf4",
    "fp4": "bitsandbytes fp4",
    "int4": "compressed-tensors W4A16; vLLM serves it",
}


def _lm_target(fmt: str) -> Target:
    device = ', device_map="cpu"' if fmt in BITSANDBYTES_FORMATS else ""
    return Target(
        fmt,
        "causal-lm",
        whole_model(lambda source, out: export_quantized(source, fmt, out)),
        load=lambda folder: load_quantized(folder, fmt),
        load_artifact=lambda folder: load_exported(folder, fmt),
        snippet=f'AutoModelForCausalLM.from_pretrained("{{path}}"{device})  # {_CARD_NOTES[fmt]}',
        robust=True,
    )


def _pipeline_target(fmt: str) -> Target:
    return Target(fmt, "t2i-unet", None, load=lambda folder: load_pipeline_quantized(folder, fmt))


register(*map(_lm_target, (*BITSANDBYTES_FORMATS, "int4")), *map(_pipeline_target, BITSANDBYTES_FORMATS))
