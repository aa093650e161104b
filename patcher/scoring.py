"""Whether a causal LM reproduces a target: the one rule both edits and verification use.

Teacher-forced in one batched pass: greedy decoding reproduces the target exactly when the
argmax at each target position is that target token. `target_leads` takes token ids;
`leads`, `answered` and `accuracy` take (prompt, target) text pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patcher.tokens import encode_prompt, encode_target, pad_id, right_padded

SCORING_BATCH = 64  # facts per forward pass


@torch.no_grad()
def target_leads(
    model, encoded: Sequence[tuple[list[int], list[int]]], pad: int, batch_size: int = SCORING_BATCH
) -> list[float]:
    """For each (prompt ids, target ids): the smallest lead, over the target's positions, of
    the target token's logit over the best other token's.

    Positive exactly when greedy decoding produces every target token; a fact whose lead is
    below -m is erased with a margin of m nats at one of its tokens at least.
    """
    device = model.device  # transformers, peft and patcher's onnxruntime models all say where they run
    leads: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = right_padded([p + t[:-1] for p, t in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        for row, (prompt, target) in enumerate(chunk):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
            scores = logits[row, positions]
            wanted = scores.gather(1, torch.tensor(target).view(-1, 1)).squeeze(1)
            others = scores.scatter(1, torch.tensor(target).view(-1, 1), float("-inf")).amax(1)
            leads.append(float((wanted - others).min()))
    return leads


def leads(model, tokenizer, facts: Sequence[tuple[str, str]], batch_size: int = SCORING_BATCH) -> list[float]:
    """For each (prompt, target): the smallest lead, in nats, of a target token's logit over
    the best other token's (`scoring.target_leads`); positive exactly when it is answered."""
    encoded = [(encode_prompt(tokenizer, p), encode_target(tokenizer, t)) for p, t in facts]
    return target_leads(model, encoded, pad_id(tokenizer), batch_size)


def answered(model, tokenizer, facts: Sequence[tuple[str, str]], batch_size: int = SCORING_BATCH) -> list[bool]:
    """For each (prompt, target): would greedy decoding reproduce every target token?"""
    return [lead > 0 for lead in leads(model, tokenizer, facts, batch_size)]


def accuracy(model, tokenizer, facts: Sequence[tuple[str, str]], batch_size: int = SCORING_BATCH) -> float:
    """Share of facts the model answers top-1 (see `answered`); 0.0 for an empty list."""
    if not facts:
        return 0.0
    hits = answered(model, tokenizer, facts, batch_size)
    return sum(hits) / len(hits)
