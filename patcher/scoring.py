"""Whether a causal LM reproduces a target: the one rule both edits and verification use.

Teacher-forced in one batched pass: greedy decoding reproduces the target exactly when the
argmax at each target position is that target token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patcher.tokens import right_padded


@torch.no_grad()
def reproduces(model, encoded: Sequence[tuple[list[int], list[int]]], pad: int, batch_size: int = 64) -> list[bool]:
    """For each (prompt ids, target ids): would greedy decoding produce every target token?"""
    device = model.device  # transformers, peft and patcher's onnxruntime models all say where they run
    results: list[bool] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = right_padded([p + t[:-1] for p, t in chunk], pad)
        predicted = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        for row, (prompt, target) in enumerate(chunk):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
            results.append(bool((predicted[row, positions] == torch.tensor(target)).all()))
    return results
