"""ONNX export of a diffusers text-to-image pipeline: text encoder, UNet and VAE decoder as
separate graphs, each checked in onnxruntime against PyTorch before anything is written.

The folder follows optimum's ONNX Stable Diffusion layout (`<component>/model.onnx` beside
the component's config, with the pipeline's tokenizer, scheduler and model_index.json), so
onnxruntime-based pipelines can load it. Covered: SD 1.x/2.x-style pipelines (one CLIP text
encoder, a UNet2DConditionModel without added conditioning, an AutoencoderKL).

Tolerances (max abs difference, fp32): the text encoder 1e-4 like a causal LM's logits; the
UNet and VAE decoder 1e-3, optimum's validation tolerance for them: their deeper conv stacks
reorder more float sums than a text transformer does (the fixture's measure about 1e-6).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.onnx import ONNX_FILE, ONNX_FORMATS, export_graph, quantize_int8
from patcher.formats.registry import Target, register, whole_model
from patcher.models import remote_code_trusted

TOLERANCES = {"text_encoder": 1e-4, "unet": 1e-3, "vae_decoder": 1e-3}
QUANTIZED_COMPONENTS = ("text_encoder", "unet")  # where the prompt meets the weights; the VAE stays fp32
COPIED_FOLDERS = ("tokenizer", "scheduler", "feature_extractor")
DYNAMIC = torch.export.Dim.AUTO  # the exporter works out which axes may vary (and their multiples)


class _TextEncoderGraph(torch.nn.Module):
    """input_ids -> last_hidden_state: what SD 1.x/2.x feed the UNet."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids).last_hidden_state


class _UNetGraph(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) -> the UNet's prediction, as a plain tensor."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoderGraph(torch.nn.Module):
    """latent_sample -> image: the autoencoder's decoder alone."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class GraphPlan:
    """One component's graph: its module, output name, and inputs for case 0 (the export's
    shapes) and cases 1-3 (the check's, each of other shapes)."""

    component: str
    module: torch.nn.Module
    output: str
    make_inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]


def graph_plans(pipe) -> list[GraphPlan]:
    """The graphs of an SD 1.x/2.x-style pipeline; one line for any other kind."""
    unet, encoder, vae = (getattr(pipe, name, None) for name in ("unet", "text_encoder", "vae"))
    if unet is None or encoder is None or vae is None:
        raise PatcherError(f"{type(pipe).__name__} lacks a UNet, text encoder or VAE: no ONNX pipeline to export")
    if getattr(pipe, "text_encoder_2", None) is not None or unet.config.addition_embed_type is not None:
        raise PatcherError(
            f"ONNX export covers SD 1.x/2.x-style pipelines; {type(pipe).__name__} has a second text encoder "
            "or added conditioning (SDXL): export it with optimum"
        )
    length = pipe.tokenizer.model_max_length
    size, multiple = unet.config.sample_size, 2 ** (len(unet.config.block_out_channels) - 1)
    # (batch, height, width, tokens) per case; spatial sizes stay multiples of the UNet's downsampling
    shapes = [(2, size, size, length), (1, size, size, length), (3, 2 * size, size + multiple, length),
              (2, size + 2 * multiple, size, max(2, length // 2))]  # fmt: skip
    vocab, width = encoder.config.vocab_size, encoder.config.hidden_size

    def text_inputs(case: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        batch, _, _, tokens = shapes[case]
        return {"input_ids": torch.randint(0, vocab, (batch, tokens), generator=g)}

    def unet_inputs(case: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        batch, height, width_, tokens = shapes[case]
        return {
            "sample": torch.randn(batch, unet.config.in_channels, height, width_, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "encoder_hidden_states": torch.randn(batch, tokens, width, generator=g),
        }

    def vae_inputs(case: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        batch, height, width_, _ = shapes[case]
        return {"latent_sample": torch.randn(batch, vae.config.latent_channels, height, width_, generator=g)}

    return [
        GraphPlan("text_encoder", _TextEncoderGraph(encoder), "last_hidden_state", text_inputs),
        GraphPlan("unet", _UNetGraph(unet), "out_sample", unet_inputs),
        GraphPlan("vae_decoder", _VaeDecoderGraph(vae), "sample", vae_inputs),
    ]


def max_graph_difference(plan: GraphPlan, graph: Path, seed: int = 0) -> float:
    """Largest |output| difference between PyTorch and onnxruntime over the check cases."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for case in (1, 2, 3):
        inputs = plan.make_inputs(case, generator)
        with torch.no_grad():
            expected = plan.module(**inputs)
        got = session.run(None, {name: value.numpy() for name, value in inputs.items()})[0]
        worst = max(worst, (torch.from_numpy(got) - expected).abs().max().item())
    return worst


def export_pipeline_onnx(source: str | Path, fmt: str, out: str | Path) -> dict[str, float]:
    """Export the pipeline in `source` to `out` as `fmt` (onnx, or onnx-int8: the text encoder
    and UNet graphs quantized by onnxruntime); returns each graph's largest difference to PyTorch."""
    from diffusers import DiffusionPipeline

    if fmt not in ONNX_FORMATS:
        raise PatcherError(f"unknown ONNX format {fmt!r}: use one of {', '.join(ONNX_FORMATS)}")
    source = Path(source)
    pipe = DiffusionPipeline.from_pretrained(source, dtype=torch.float32, trust_remote_code=remote_code_trusted())
    differences = {}
    with atomic_path(out, is_dir=True) as tmp:
        for plan in graph_plans(pipe):
            folder = tmp / plan.component
            folder.mkdir()
            graph = folder / ONNX_FILE
            inputs = plan.make_inputs(0, torch.Generator().manual_seed(0))
            dynamic = {name: dict.fromkeys(range(value.dim()), DYNAMIC) for name, value in inputs.items()}
            export_graph(plan.module.eval(), inputs, dynamic, [plan.output], graph)
            difference = max_graph_difference(plan, graph)
            if difference > TOLERANCES[plan.component]:
                raise PatcherError(
                    f"the ONNX {plan.component} of {source} differs from PyTorch by {difference:.2e} "
                    f"(tolerance {TOLERANCES[plan.component]:.0e}): not written"
                )
            differences[plan.component] = difference
            if fmt == "onnx-int8" and plan.component in QUANTIZED_COMPONENTS:
                quantize_int8(graph)
            config = source / ("vae" if plan.component == "vae_decoder" else plan.component) / "config.json"
            shutil.copy2(config, folder / "config.json")
        for name in COPIED_FOLDERS:
            if (source / name).is_dir():
                shutil.copytree(source / name, tmp / name)
        shutil.copy2(source / "model_index.json", tmp / "model_index.json")
    return differences


def _pipeline_target(fmt: str) -> Target:
    note = "also text_encoder/, vae_decoder/" if fmt == "onnx" else "int8 text encoder and UNet"
    return Target(
        fmt,
        "t2i-unet",
        whole_model(lambda source, out: export_pipeline_onnx(source, fmt, out)),
        snippet=f'optimum.onnxruntime.ORTStableDiffusionPipeline.from_pretrained("{{path}}")  # {note}',
    )


register(*map(_pipeline_target, ONNX_FORMATS))
