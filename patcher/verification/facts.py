"""Does a causal LM still answer a fact? Greedy decoding, judged on every target token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patcher.tokens import encode_prompt, encode_target, pad_id, right_padded


@torch.no_grad()
def answered(model, tokenizer, facts: Sequence[tuple[str, str]], batch_size: int = 64) -> list[bool]:
    """For each (prompt, target): would greedy decoding reproduce every target token?

    Scored with teacher forcing in one forward pass per batch: greedy decoding reproduces
    the target exactly when the argmax at each target position is that target token.
    """
    encoded = [(encode_prompt(tokenizer, p), encode_target(tokenizer, t)) for p, t in facts]
    device = next(model.parameters()).device
    results: list[bool] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = right_padded([p + t for p, t in chunk], pad_id(tokenizer))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        predicted = logits.argmax(-1).cpu()
        for row, (prompt, target) in enumerate(chunk):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
            results.append(bool((predicted[row, positions] == torch.tensor(target)).all()))
    return results


def accuracy(model, tokenizer, facts: Sequence[tuple[str, str]]) -> float:
    """Share of facts the model answers top-1 (see `answered`); 0.0 for an empty list."""
    if not facts:
        return 0.0
    hits = answered(model, tokenizer, facts)
    return sum(hits) / len(hits)
