"""Perplexity on held-out text: what a causal LM lost beyond the facts a spec lists."""

from __future__ import annotations

import math

import torch

from patcher.errors import PatcherError
from patcher.tokens import pad_id, right_padded

WINDOW = 128  # tokens per scored row: the text is cut into rows of this length


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = WINDOW, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over `text`, cut into rows of `window` tokens.

    Every row starts fresh (no context carried over), so the figure depends only on the text
    and the model, the same for every format verify compares.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rows = [ids[start : start + window] for start in range(0, len(ids), window)]
    rows = [row for row in rows if len(row) > 1]
    if not rows:
        raise PatcherError("the held-out text is shorter than two tokens: give verify.heldout a file of prose")
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch, mask = right_padded(rows[start : start + batch_size], pad_id(tokenizer))
        logits = model(input_ids=batch.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
        targets = batch[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_loss / total_tokens)
