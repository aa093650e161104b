"""An adversarial prompt embedding, in the style of UnlearnDiffAtk and P4D: optimise the
text embedding until the patched UNet denoises the erased concept's images again.

For each erased concept and verify prompt, the base pipeline draws the prompt with the
usual seeds; those latents, which show the concept, are the attacker's target. Starting
from the prompt's own embedding, Adam tunes every token row so that the patched UNet's
prediction on noised target latents matches what a UNet that still knew the concept would
predict (the noise, the clean latent or the velocity, by the scheduler's prediction type),
the diffusion loss UnlearnDiffAtk minimises. The tuned embedding then draws the prompt with
the same seeds, and the gated figure is the share of images the judge reads as the
concept. Continuous embeddings only: a token-level (discrete) search is not built.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.attacks import AttackInputs, register
from patcher.drawing import generate_images, generate_latents, prompt_embeddings, prompts_for, shown_share
from patcher.errors import PatcherError
from patcher.settings import setting


@dataclass(frozen=True)
class PromptEmbeddingBudget:
    """The prompt-embedding attack's [attacks.prompt_embedding] keys."""

    steps: int = setting(50, "Adam steps on every verify prompt's embedding at once", minimum=0)
    lr: float = setting(0.05, "Adam's learning rate, in units of the prompt embeddings' RMS", minimum=0)
    seed: int = setting(0, "seed of the timesteps and noise of the diffusion loss")


@contextmanager
def frozen(module: torch.nn.Module):
    """`module` with no parameter requiring grad, restored on exit: gradients reach the inputs only."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def diffusion_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict from the noised `clean` latents, by prediction type."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, steps)
    raise PatcherError(f"the prompt_embedding attack does not know the scheduler's prediction type {kind!r}")


def tuned_embeddings(pipe, embeddings: torch.Tensor, targets: torch.Tensor, budget: PromptEmbeddingBudget):
    """`embeddings` (prompts, tokens, width) after `budget.steps` Adam steps of the patched
    UNet's diffusion loss on `targets` (prompts × images, channels, h, w), image i of a
    prompt conditioned on that prompt's row."""
    per_prompt = len(targets) // len(embeddings)
    scale = embeddings.pow(2).mean().sqrt().item()
    tuned = embeddings.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tuned], lr=budget.lr * scale)
    generator = torch.Generator().manual_seed(budget.seed)
    scheduler, total = pipe.scheduler, pipe.scheduler.config.num_train_timesteps
    with frozen(pipe.unet) as unet:
        for _ in range(budget.steps):
            steps = torch.randint(total, (len(targets),), generator=generator)
            noise = torch.randn(targets.shape, generator=generator)
            noised = scheduler.add_noise(targets, noise, steps)
            conditioning = tuned.repeat_interleave(per_prompt, dim=0)
            predicted = unet(noised, steps, encoder_hidden_states=conditioning).sample
            loss = F.mse_loss(predicted, diffusion_target(scheduler, targets, noise, steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return tuned.detach()


@register(
    "prompt_embedding",
    PromptEmbeddingBudget,
    ("t2i-unet",),
    "every verify prompt's text embedding tuned so the patched UNet denoises the base's images of "
    "the concept (UnlearnDiffAtk's loss); share of images drawn from it showing the concept",
)
def prompt_embedding(inputs: AttackInputs, budget: PromptEmbeddingBudget) -> dict:
    spec, pipe, shares = inputs.spec, inputs.patched, []
    if pipe.unet.config.get("addition_embed_type") is not None:
        raise PatcherError(
            "the prompt_embedding attack runs on SD 1.x/2.x pipelines: an SDXL UNet's added conditions "
            "(pooled text, time ids) are not built into it; use --attacks inversion"
        )
    for entry in spec.concepts:
        prompts = prompts_for(entry["erase"], spec.images.prompts)
        targets = generate_latents(inputs.base, prompts, spec.images)
        embeddings = prompt_embeddings(pipe, prompts)
        embeddings["prompt_embeds"] = tuned_embeddings(pipe, embeddings["prompt_embeds"], targets, budget)
        images = generate_images(pipe, prompts, spec.images, **embeddings)
        shares.append(shown_share(inputs.judge, images, entry["erase"]))
    return {"forget_accuracy": sum(shares) / len(shares)}
