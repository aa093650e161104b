"""Where a model reads the subject: per layer and head, the attention its prompts pay to subject tokens.

Every attention layer runs through `kernels.attention_stats` (registered with transformers as
an attention implementation for the duration of the call), which returns, beside the
output, the attention each key receives summed over queries. For each forget fact the
subject's tokens are located in its prompt; a head's subject mass is the share of
attention that the queries able to see the subject (those at or after its first token)
put on it, averaged over the spec's forget prompts and their paraphrases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from patcher import kernels
from patcher.adapters import CausalLMAdapter
from patcher.errors import PatcherError, quoted
from patcher.spec import ForgetFact, infer_subject
from patcher.tokens import encode_prompt

ATTENTION_NAME = "patcher_attention_stats"
# MEMIT's published GPT-J setting edits layers 3-8: 6 of 28, about a fifth of the depth.
EDIT_WINDOW_SHARE = 0.18


@dataclass
class SubjectAttention:
    """mass[layer, head]: mean share of attention on subject tokens, over `prompts` prompts."""

    mass: torch.Tensor
    prompts: int

    @property
    def per_layer(self) -> torch.Tensor:
        return self.mass.mean(dim=1)

    @property
    def reading_layer(self) -> int:
        """The layer (after the first) whose heads attend most to the subject: where its attributes are read."""
        return 1 + int(self.per_layer[1:].argmax()) if len(self.per_layer) > 1 else 0

    def edit_layers(self) -> list[int]:
        """The MLPs that write the subject's residual before the reading layer's attention reads it.

        At least two layers, as MEMIT spreads each update over several; when the reading
        layer comes too early for the window to fit before it, the window starts at layer 0.
        """
        layers = len(self.per_layer)
        span = min(layers, max(2, round(EDIT_WINDOW_SHARE * layers)))
        start = max(0, self.reading_layer - span)
        return list(range(start, min(start + span, layers)))

    def table(self) -> str:
        """Layers as rows, heads as columns, the reading layer and the chosen edit layers marked."""
        heads = self.mass.shape[1]
        lines = [
            f"subject attention share over {self.prompts} prompts",
            "layer  " + " ".join(f"h{h:<5}" for h in range(heads)) + "  mean",
        ]
        for layer, row in enumerate(self.mass):
            mark = "  <- reads the subject" if layer == self.reading_layer else ""
            mark += "  (edit)" if layer in self.edit_layers() else ""
            cells = " ".join(f"{float(m):.3f} " for m in row)
            lines.append(f"{layer:>5}  {cells} {float(self.per_layer[layer]):.3f}{mark}")
        lines.append(f"erase --layers auto edits layers {self.edit_layers()}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "prompts": self.prompts,
            "reading_layer": self.reading_layer,
            "edit_layers": self.edit_layers(),
            "per_layer": [round(float(m), 4) for m in self.per_layer],
            "per_head": [[round(float(m), 4) for m in row] for row in self.mass],
        }


def subject_positions(tokenizer, prompt: str, subject: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, indices of the subject's tokens among them)."""
    start = prompt.find(subject)
    if start < 0:
        raise PatcherError(f"the subject {quoted(subject)} does not occur in the prompt {quoted(prompt)}")
    ids = encode_prompt(tokenizer, prompt)
    # A subject that opens the prompt starts after the tokenizer's own leading tokens (BOS), if any.
    first = len(encode_prompt(tokenizer, prompt[:start].rstrip())) if start else len(tokenizer("").input_ids)
    last = len(encode_prompt(tokenizer, prompt[: start + len(subject)])) - 1
    return ids, list(range(first, last + 1))


@torch.no_grad()
def locate(adapter: CausalLMAdapter, tokenizer, facts: list[ForgetFact]) -> SubjectAttention:
    """Subject attention mass per layer and head over the facts' prompts and paraphrases."""
    if not facts:
        raise PatcherError("locate needs [[forget]] facts with subjects in the spec")
    config = adapter.model.config
    heads = config.num_attention_heads
    total = torch.zeros(adapter.num_layers, heads, dtype=torch.float64)
    prompts = 0
    device = next(adapter.model.parameters()).device
    for ids, positions in subject_prompts(tokenizer, facts):
        with recorded_key_mass(adapter.model) as key_mass:
            adapter.model(input_ids=torch.tensor([ids], device=device))
        seeing = len(ids) - positions[0]  # queries at or after the subject's first token
        for layer, mass in key_mass.items():
            total[layer] += mass[0][:, positions].sum(-1).double().cpu() / seeing
        prompts += 1
    return SubjectAttention((total / max(prompts, 1)).float(), prompts)


def subject_prompts(tokenizer, facts: list[ForgetFact]) -> Iterator[tuple[list[int], list[int]]]:
    """(token ids, subject token indices) of every forget prompt and paraphrase that names its subject."""
    for fact in facts:
        subject = infer_subject(fact)
        for prompt in (fact.prompt, *fact.paraphrases):
            if subject in prompt:
                yield subject_positions(tokenizer, prompt, subject)


@contextlib.contextmanager
def recorded_key_mass(model) -> Iterator[dict[int, torch.Tensor]]:
    """Run `model`'s attention through attention_stats and collect key mass (B, H, T) per layer.

    For unpadded single prompts only: the attention mask is taken as plain causal (no
    padding, no sliding window, which prompts shorter than the window never reach).
    """
    recorded: dict[int, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        output, _, key_mass = kernels.attention_stats(query, key, value, causal=True, scale=scaling)
        recorded[module.layer_idx] = key_mass
        return output.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ATTENTION_NAME, attention)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except ValueError as err:
        raise PatcherError(
            f"cannot hook the attention of {type(model).__name__} ({str(err).splitlines()[0]}): "
            "pass --layers explicitly"
        ) from None
    try:
        yield recorded
    finally:
        model.set_attn_implementation(previous)
