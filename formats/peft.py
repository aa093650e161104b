"""Any patch as a standard PEFT LoRA adapter that `PeftModel.from_pretrained` loads onto the base.

Dense deltas are factored by truncated SVD; a patch already stored low rank keeps its
factors. peft itself writes the adapter (`adapter_config.json` +
`adapter_model.safetensors`), with per-layer ranks in `rank_pattern` and α = r, so that
every layer's scaling is 1 and B @ A is exactly the factored delta.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from patcher.adapters.base import stores_transposed
from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.hf import check_patch_fits
from patcher.formats.lora import low_rank_factors
from patcher.formats.patch import Patch
from patcher.formats.registry import ExportOptions, Target, register
from patcher.models import remote_code_trusted

PEFT_ENERGY = 0.999  # share of each dense delta's energy the adapter keeps by default
SUMMARY_FILE = "patcher_export.json"  # per module: rank and energy kept


def export_peft(
    model_dir: Path, patch: Patch, out: Path, rank: int | None = None, energy: float = PEFT_ENERGY
) -> dict[str, dict[str, float]]:
    """Write `patch` as a PEFT adapter for the causal LM in `model_dir`; per module, its rank
    and the share of the delta's energy (squared norm) the adapter keeps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    check_patch_fits(Checkpoint(model_dir), patch)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=remote_code_trusted()
    ).eval()
    modules = dict(model.named_modules())
    factors, summary = {}, {}
    for param in patch.params:
        module_name = param.removesuffix(".weight")
        module = modules.get(module_name)
        if module is None or not param.endswith(".weight"):
            raise PatcherError(f"{param} is not the weight of a linear layer: a PEFT LoRA adapter cannot carry it")
        delta = patch.delta(param)
        transposed = stores_transposed(module)  # peft's B @ A is (out, in)
        a, b = low_rank_factors(delta.T if transposed else delta, rank, energy)
        factors[module_name] = (a, b)
        kept = float((b.double() @ a.double()).norm() ** 2 / delta.double().norm().clamp_min(1e-30) ** 2)
        summary[module_name] = {"rank": a.shape[0], "energy_kept": min(kept, 1.0)}
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules=sorted(factors),
        rank_pattern={f"^{name}$": r for name, r in ranks.items()},
        alpha_pattern={f"^{name}$": r for name, r in ranks.items()},
        fan_in_fan_out=any(stores_transposed(modules[n]) for n in factors),
        lora_dropout=0.0,
        base_model_name_or_path=str(model_dir),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, lora in peft_model.base_model.model.named_modules():
            if name in factors:
                a, b = factors[name]
                lora.lora_A["default"].weight.copy_(a)
                lora.lora_B["default"].weight.copy_(b)
    with atomic_path(out, is_dir=True) as tmp:
        peft_model.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _export(source: Path, out: Path, patch: Patch | None, options: ExportOptions) -> None:
    export_peft(source, patch, out, options.rank)


register(
    Target(
        "peft",
        "causal-lm",
        _export,
        snippet='PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{path}")',
        needs_patch=True,
    )
)
