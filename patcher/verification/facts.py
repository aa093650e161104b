"""Does a causal LM still answer a fact? Greedy decoding, judged on every target token."""

from __future__ import annotations

from collections.abc import Sequence

from patcher.scoring import target_leads
from patcher.tokens import encode_prompt, encode_target, pad_id


def leads(model, tokenizer, facts: Sequence[tuple[str, str]]) -> list[float]:
    """For each (prompt, target): the smallest lead, in nats, of a target token's logit over
    the best other token's (`scoring.target_leads`); positive exactly when it is answered."""
    encoded = [(encode_prompt(tokenizer, p), encode_target(tokenizer, t)) for p, t in facts]
    return target_leads(model, encoded, pad_id(tokenizer))


def answered(model, tokenizer, facts: Sequence[tuple[str, str]]) -> list[bool]:
    """For each (prompt, target): would greedy decoding reproduce every target token?"""
    return [lead > 0 for lead in leads(model, tokenizer, facts)]


def accuracy(model, tokenizer, facts: Sequence[tuple[str, str]]) -> float:
    """Share of facts the model answers top-1 (see `answered`); 0.0 for an empty list."""
    if not facts:
        return 0.0
    hits = answered(model, tokenizer, facts)
    return sum(hits) / len(hits)
