"""RECE's inversion: the text embedding that makes the patched UNet attend as the base did to
the erased concept, solved in closed form from the two UNets' cross-attention weights.

UCE and RECE edit only the key and value projections of cross-attention, so for each token
row c of a prompt's embedding there is a c′ whose patched keys and values best match the
base's: c′ = (Σ W′ᵀW′ + λI)⁻¹ Σ W′ᵀW₀ c over every projection. The attack draws each erased
concept's verify prompts from those c′ with the usual seeds; the gated figure is the share
of images the judge still reads as the concept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patcher.adapters.unet import KEY_VALUE_SUFFIXES
from patcher.attacks import AttackInputs, register
from patcher.drawing import generate_images, prompt_embeddings, prompts_for, shown_share
from patcher.settings import setting


@dataclass(frozen=True)
class InversionBudget:
    """The inversion attack's [attacks.inversion] keys."""

    regularization: float = setting(0.1, "λ of the closed form (RECE's nudity setting)", minimum=0)


def _cross_attention_weights(unet) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().double()
        for name, module in unet.named_modules()
        if name.endswith(KEY_VALUE_SUFFIXES) and isinstance(module, torch.nn.Linear)
    }


@torch.no_grad()
def inverted_embeddings(base_unet, patched_unet, embeddings: torch.Tensor, regularization: float) -> torch.Tensor:
    """Per token row c of `embeddings`, the c′ = (Σ W′ᵀW′ + λI)⁻¹ Σ W′ᵀW₀ c over every
    cross-attention key and value projection W (base W₀, patched W′)."""
    base, patched = _cross_attention_weights(base_unet), _cross_attention_weights(patched_unet)
    width = embeddings.shape[-1]
    system = sum(w.T @ w for w in patched.values()) + regularization * torch.eye(width, dtype=torch.float64)
    target = sum(patched[name].T @ base[name] for name in patched)
    rows = embeddings.reshape(-1, width).double()
    solved = torch.linalg.solve(system, target @ rows.T).T
    return solved.reshape(embeddings.shape).to(embeddings.dtype)


@register(
    "inversion",
    InversionBudget,
    ("t2i-unet",),
    "RECE's closed-form inverted embedding against the patched UNet; share of images showing the concept",
)
def inversion(inputs: AttackInputs, budget: InversionBudget) -> dict:
    spec, pipe, shares = inputs.spec, inputs.patched, []
    for entry in spec.concepts:
        prompts = prompts_for(entry["erase"], spec.images.prompts)
        embeddings = prompt_embeddings(pipe, prompts)
        embeddings["prompt_embeds"] = inverted_embeddings(
            inputs.base.unet, pipe.unet, embeddings["prompt_embeds"], budget.regularization
        )
        images = generate_images(pipe, prompts, spec.images, **embeddings)
        shares.append(shown_share(inputs.judge, images, entry["erase"]))
    return {"forget_accuracy": sum(shares) / len(shares)}
