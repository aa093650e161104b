"""What closed-form text-to-image edits need to know about a UNet2DConditionModel pipeline.

The edited matrices are the cross-attention key and value projections (`attn2.to_k`,
`attn2.to_v`) of every transformer block: they are the only place where the text reaches
the image. A concept is embedded the way the pipeline embeds a prompt (SD 1.x/2.x: the text
encoder's last hidden state; SDXL: the penultimate hidden states of both encoders,
concatenated), and read from the concept's last token to the end of the padded prompt, as
UCE does: a causal text encoder carries the concept into every later position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from patcher.errors import PatcherError

KEY_VALUE_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def check_unet_pipeline(folder: Path) -> None:
    """Refuse, before loading, a pipeline that draws with a transformer (SD3, FLUX, PixArt)."""
    index = json.loads((folder / "model_index.json").read_text())
    if "unet" not in index and "transformer" in index:
        denoiser = index["transformer"][-1] if isinstance(index["transformer"], list) else "a transformer"
        raise PatcherError(
            f"{folder} is a {index.get('_class_name', 'diffusers pipeline')} that draws with {denoiser}, a "
            "transformer: patcher edits the cross-attention K/V projections of a UNet (Stable Diffusion 1.x, 2.x "
            "and SDXL pipelines); SD3 and FLUX mix text and image tokens in joint attention, which has none"
        )


@dataclass
class TextEncoder:
    """One tokenizer + encoder pair, and which hidden state the pipeline feeds the UNet."""

    tokenizer: object
    model: nn.Module
    penultimate: bool  # SDXL feeds hidden_states[-2]; SD 1.x/2.x the final one


class UNetAdapter:
    """Cross-attention K/V projections of a UNet2DConditionModel and concept embeddings for it."""

    def __init__(self, unet: nn.Module, encoders: list[TextEncoder], prefix: str = "unet") -> None:
        self.unet = unet
        self.encoders = encoders
        self.prefix = prefix
        self.projections = {
            name: module
            for name, module in unet.named_modules()
            if name.endswith(KEY_VALUE_SUFFIXES) and isinstance(module, nn.Linear)
        }
        if not self.projections:
            raise PatcherError(
                f"{type(unet).__name__} has no cross-attention (attn2.to_k / attn2.to_v): "
                "concept erasure edits a text-conditioned UNet"
            )
        width = sum(e.model.config.hidden_size for e in encoders)
        in_features = {m.in_features for m in self.projections.values()}
        if in_features != {width}:
            raise PatcherError(
                f"the text encoders give {width}-wide embeddings but the cross-attention expects "
                f"{sorted(in_features)}: the pipeline's encoders do not match its UNet"
            )

    @classmethod
    def from_pipeline(cls, pipe) -> UNetAdapter:
        """From a loaded diffusers pipeline (SD 1.x/2.x, or SDXL with two encoders)."""
        unet = getattr(pipe, "unet", None)
        if unet is None or getattr(pipe, "text_encoder", None) is None:
            raise PatcherError(
                f"{type(pipe).__name__} has no UNet and text encoder: it is not a text-to-image pipeline"
            )
        second = getattr(pipe, "text_encoder_2", None)
        if second is None:
            return cls(unet, [TextEncoder(pipe.tokenizer, pipe.text_encoder, penultimate=False)])
        return cls(
            unet,
            [
                TextEncoder(pipe.tokenizer, pipe.text_encoder, penultimate=True),
                TextEncoder(pipe.tokenizer_2, second, penultimate=True),
            ],
        )

    def param_name(self, projection: str) -> str:
        """The checkpoint name of a projection's weight, as a patch stores it (`unet/<module>.weight`)."""
        return f"{self.prefix}/{projection}.weight"

    @torch.no_grad()
    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """(tokens, d) float64: `prompt` embedded exactly as the pipeline feeds it to the UNet,
        padded to the tokenizer's length; one row per token position."""
        parts = [self._embed(encoder, prompt) for encoder in self.encoders]
        return torch.cat(parts, dim=-1).double()

    def concept_embeddings(self, concept: str, templates: list[str], allow_empty: bool = False) -> list[torch.Tensor]:
        """Per template, the rows of `template.format(concept)` from the concept's last token
        to the end of the padded sequence: where a causal text encoder carries the concept.

        An empty concept (`allow_empty`, for anchors) starts at the token before its slot.
        """
        if not concept.strip() and not allow_empty:
            raise PatcherError("a concept is empty: give each [[concept]] and [[preserve]] some text")
        rows = []
        for template in templates:
            prefix = template.split("{}")[0]
            start = self._token_count(prefix + concept) - 1
            rows.append(self.prompt_embeddings(template.format(concept))[start:])
        return rows

    def prefix_embeddings(self, template: str) -> torch.Tensor:
        """The rows of `template` before its concept slot (start token included): the same in
        every prompt the template makes, since the text encoders are causal."""
        prefix = template.split("{}")[0]
        return self.prompt_embeddings(prefix)[: self._token_count(prefix)]

    def _token_count(self, text: str) -> int:
        """Tokens of `text` with the start token and without the end token."""
        tokenizer = self.encoders[0].tokenizer
        ids = tokenizer(text, truncation=False).input_ids
        return len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id else len(ids)

    def _embed(self, encoder: TextEncoder, prompt: str) -> torch.Tensor:
        tokenizer = encoder.tokenizer
        limit = min(tokenizer.model_max_length, encoder.model.config.max_position_embeddings)
        count = len(tokenizer(prompt, truncation=False).input_ids)
        if count > limit:
            raise PatcherError(
                f"{prompt!r} is {count} tokens, more than the text encoder's {limit}: "
                "the pipeline would truncate it; shorten the concept or its templates"
            )
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        device = next(encoder.model.parameters()).device
        output = encoder.model(ids.to(device), output_hidden_states=encoder.penultimate)
        hidden = output.hidden_states[-2] if encoder.penultimate else output.last_hidden_state
        return hidden[0].float().cpu()
