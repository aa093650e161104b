"""Soft-prompt attack: continuous prefix embeddings optimised to bring the forget targets back.

The adversarial setting of "Towards Robust Knowledge Unlearning": an attacker who can feed
embeddings tunes `tokens` prefix vectors on half of the forget facts (teacher-forced
likelihood of their targets) and uses the prefix on the other half. The gated figure is
that held-out half's accuracy, which is what a prefix found on known facts buys an
attacker; the tuned half is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.attacks import AttackInputs, register
from patcher.errors import PatcherError
from patcher.models import trainable_only
from patcher.settings import setting
from patcher.tokens import encode_prompt, encode_target, leading_special_tokens


@dataclass(frozen=True)
class SoftPromptBudget:
    """The soft-prompt attack's [attacks.soft_prompt] keys."""

    tokens: int = setting(8, "prefix vectors, inserted after the tokenizer's special tokens", minimum=1)
    steps: int = setting(100, "Adam steps on the tuned half of the forget facts", minimum=0)
    lr: float = setting(0.05, "Adam's learning rate, in units of the embedding table's RMS norm", minimum=0)
    seed: int = setting(0, "seed of the prefix's initial vectors")


Encoded = list[tuple[list[int], list[int]]]  # (prompt ids, target ids) per fact


def _logits_with_prefix(model, prefix: torch.Tensor, encoded: Encoded, n_special: int) -> torch.Tensor:
    """Logits of every (prompt, target) teacher-forced with `prefix` after the special tokens,
    right-padded: (facts, width, vocab)."""
    table = model.get_input_embeddings()
    rows = [prompt + target[:-1] for prompt, target in encoded]
    width = max(len(r) for r in rows) + len(prefix)
    embeds = torch.zeros(len(rows), width, prefix.shape[-1], dtype=table.weight.dtype, device=prefix.device)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        tokens = table(torch.tensor(ids, device=prefix.device))
        pieces = [tokens[:n_special], prefix.to(tokens.dtype), tokens[n_special:]]
        length = sum(len(p) for p in pieces)
        embeds[i, :length] = torch.cat(pieces)
        mask[i, :length] = 1
    return model(inputs_embeds=embeds, attention_mask=mask.to(prefix.device)).logits.float()


def _target_scores(logits: torch.Tensor, encoded: Encoded, offset: int) -> list[torch.Tensor]:
    """Per fact, the log-probabilities at its target positions, (target length, vocab)."""
    scores = []
    for i, (prompt, target) in enumerate(encoded):
        start = offset + len(prompt) - 1
        scores.append(F.log_softmax(logits[i, start : start + len(target)], -1))
    return scores


def _accuracy(model, prefix: torch.Tensor, encoded: Encoded, n_special: int) -> float:
    """Share of facts whose every target token is the argmax with the prefix (greedy answers)."""
    if not encoded:
        return 0.0
    with torch.no_grad():
        scores = _target_scores(_logits_with_prefix(model, prefix, encoded, n_special), encoded, len(prefix))
    hits = [bool((s.argmax(-1).cpu() == torch.tensor(t)).all()) for s, (_, t) in zip(scores, encoded, strict=True)]
    return sum(hits) / len(hits)


@register(
    "soft_prompt",
    SoftPromptBudget,
    ("causal-lm",),
    "prefix embeddings tuned on half of the forget facts, scored on the other half",
)
def soft_prompt(inputs: AttackInputs, budget: SoftPromptBudget) -> dict:
    model, tokenizer, spec = inputs.patched, inputs.tokenizer, inputs.spec
    if len(spec.forget) < 2:
        raise PatcherError(
            "the soft_prompt attack needs 2 [[forget]] facts or more: it tunes on half, scores the rest"
        )
    facts = [(encode_prompt(tokenizer, f.prompt), encode_target(tokenizer, f.target)) for f in spec.forget]
    tuned, held_out = facts[0::2], facts[1::2]
    paraphrases = [
        (encode_prompt(tokenizer, p), encode_target(tokenizer, f.target))
        for f in spec.forget[1::2]
        for p in f.paraphrases
    ]
    n_special = leading_special_tokens(tokenizer)
    table = model.get_input_embeddings().weight.detach().float()
    scale = table.pow(2).sum(-1).mean().sqrt()
    generator = torch.Generator().manual_seed(budget.seed)
    picks = torch.randint(len(table), (budget.tokens,), generator=generator).to(table.device)
    prefix = table[picks].clone().requires_grad_(True)  # starts as real tokens' embeddings
    optimizer = torch.optim.Adam([prefix], lr=budget.lr * float(scale))
    targets = [torch.tensor(t, device=table.device).view(-1, 1) for _, t in tuned]
    with trainable_only(model):
        for _ in range(budget.steps):
            scores = _target_scores(_logits_with_prefix(model, prefix, tuned, n_special), tuned, budget.tokens)
            nll = [-s.gather(1, t).mean() for s, t in zip(scores, targets, strict=True)]
            optimizer.zero_grad(set_to_none=True)
            torch.stack(nll).mean().backward()
            optimizer.step()
    prefix = prefix.detach()
    return {
        "forget_accuracy": _accuracy(model, prefix, held_out, n_special),
        "paraphrase_accuracy": _accuracy(model, prefix, paraphrases, n_special) if paraphrases else None,
        "tuned_accuracy": _accuracy(model, prefix, tuned, n_special),
        "held_out_facts": len(held_out),
    }
