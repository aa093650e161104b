"""Low-rank exports of a patch: truncated SVD of each delta, written as a diffusers LoRA.

`pipe.load_lora_weights(folder)` reads `pytorch_lora_weights.safetensors`; diffusers'
own `save_lora_weights` writes it, so the key names are whatever the installed diffusers
expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.hf import check_patch_fits
from patcher.formats.patch import Patch
from patcher.formats.registry import ExportOptions, Target, register

# Share of each delta's energy (squared Frobenius norm) the factors keep: 1 − 0.05², so
# the dropped part is at most 5% of the delta's norm (99% energy would allow 10%).
DEFAULT_ENERGY = 1 - 0.05**2
LORA_FILE = "pytorch_lora_weights.safetensors"


def low_rank_factors(
    delta: torch.Tensor, rank: int | None = None, energy: float = DEFAULT_ENERGY
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with B @ A the best rank-r approximation of `delta`.

    r is `rank` when given, else the smallest rank keeping `energy` of ‖delta‖²_F.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        kept = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(torch.finfo(torch.float64).tiny)
        rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64)).item()) + 1
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()


def export_diffusers_lora(
    pipeline_dir: Path, patch: Patch, out: Path, rank: int | None = None, energy: float = DEFAULT_ENERGY
) -> dict[str, int]:
    """Write the patch's UNet deltas as a diffusers LoRA in `out`; returns each layer's rank."""
    import diffusers

    index = pipeline_dir / "model_index.json"
    if not index.is_file():
        raise PatcherError(f"{pipeline_dir} is not a diffusers pipeline folder: diffusers-lora exports pipelines")
    pipeline_class = getattr(diffusers, json.loads(index.read_text())["_class_name"], None)
    if pipeline_class is None or not hasattr(pipeline_class, "save_lora_weights"):
        raise PatcherError(f"{pipeline_dir}'s pipeline class does not load LoRA weights")
    foreign = [p for p in patch.params if not p.startswith("unet/")]
    if foreign:
        raise PatcherError(
            f"the patch edits {foreign[0]}, outside the UNet: a diffusers LoRA carries UNet layers only"
        )
    factors = {
        param.removeprefix("unet/").removesuffix(".weight"): low_rank_factors(patch.delta(param), rank, energy)
        for param in patch.params
    }
    # Every layer is written at one rank, the lower ones padded with zero factors (B @ A is
    # unchanged): diffusers 0.35 to 0.39 read one alpha for all layers and scale each by that
    # alpha over its own rank, which shrinks the deltas of layers whose rank differs.
    width = max(a.shape[0] for a, _ in factors.values())
    layers = {}
    for module, (a, b) in factors.items():
        padding = width - a.shape[0]
        layers[f"{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, padding)).contiguous()
        layers[f"{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, padding)).contiguous()
    with atomic_path(out, is_dir=True) as tmp:
        pipeline_class.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=LORA_FILE)
    return {module: a.shape[0] for module, (a, _) in factors.items()}


def _export(source: Path, out: Path, patch: Patch | None, options: ExportOptions) -> None:
    check_patch_fits(Checkpoint(source), patch, options.force)
    export_diffusers_lora(source, patch, out, options.rank)


register(
    Target(
        "diffusers-lora",
        "t2i-unet",
        _export,
        snippet='DiffusionPipeline.from_pretrained("{base}").load_lora_weights("{path}")',
        needs_patch=True,
    )
)
