"""Drawing from a text-to-image pipeline with fixed seeds, and asking a judge what was drawn.

Each prompt is drawn with fixed seeds (image i of a prompt always uses seed i), so the base,
the patched pipeline, every format and every attack are graded on the same starting noise.
Verification and the text-to-image attacks both draw this way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from patcher.errors import PatcherError
from patcher.spec import ImageChecks

if TYPE_CHECKING:
    from patcher.verification.judge import ShapeJudge


def generate_images(pipe, prompts: list[str], checks: ImageChecks, **embeddings) -> torch.Tensor:
    """(len(prompts) × images_per_prompt, 3, H, W) images in [-1, 1]; image i of each prompt uses seed i.

    `embeddings` (prompt_embeds, ...) replace the prompts' own text embeddings.
    """
    return _draw(pipe, prompts, checks, "pt", embeddings) * 2 - 1


def generate_latents(pipe, prompts: list[str], checks: ImageChecks) -> torch.Tensor:
    """The final latents of the images `generate_images` draws, before the VAE decodes them."""
    return _draw(pipe, prompts, checks, "latent", {})


@torch.no_grad()
def _draw(pipe, prompts: list[str], checks: ImageChecks, output_type: str, embeddings: dict) -> torch.Tensor:
    per_prompt = checks.images_per_prompt
    generators = [torch.Generator().manual_seed(i) for _ in prompts for i in range(per_prompt)]
    if embeddings:  # one row per image, as the pipeline expects precomputed embeddings
        conditioning = {name: value.repeat_interleave(per_prompt, dim=0) for name, value in embeddings.items()}
    else:
        conditioning = {"prompt": prompts, "num_images_per_prompt": per_prompt}
    output = pipe(
        **conditioning,
        num_inference_steps=checks.inference_steps,
        guidance_scale=checks.guidance_scale,
        generator=generators,
        output_type=output_type,
    )
    return output.images


def prompts_for(concept: str, templates: tuple[str, ...] | list[str]) -> list[str]:
    """Each template with `concept` in its slot."""
    return [template.format(concept) for template in templates]


def shown_share(judge: ShapeJudge, images: torch.Tensor, concept: str) -> float:
    """Share of `images` the judge reads as `concept`."""
    if concept not in judge.shapes:
        raise PatcherError(f"the image judge does not know {concept!r}: it grades {', '.join(judge.shapes)}")
    seen = judge.shapes_of(images)
    return sum(s == concept for s in seen) / len(seen)


def prompt_embeddings(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own text embeddings of `prompts` (and of the empty negative prompt), by name."""
    encoded = pipe.encode_prompt(
        prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, encoded, strict=False))
