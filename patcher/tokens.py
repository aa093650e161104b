"""Turning spec prompts and targets into token ids, and batching them for a causal LM."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from patcher.errors import PatcherError, quoted

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")  # where configs keep the context length


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (BOS, if it adds one)."""
    ids = tokenizer(text).input_ids
    _check_known(tokenizer, ids, text, "prompt")
    return ids


def encode_target(tokenizer, text: str) -> list[int]:
    """Token ids of a completion, encoded as it follows a prompt (with its leading space)."""
    ids = tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
    _check_known(tokenizer, ids, text, "target")
    return ids


def check_fits_context(tokenizer, config, facts: Iterable[tuple[str, str]]) -> None:
    """Refuse, before any work, a prompt that with its target is longer than the model's context
    (GPT-2's learned positions would fail deep inside the forward)."""
    limit = next((getattr(config, key) for key in CONTEXT_KEYS if getattr(config, key, None)), None)
    if limit is None:
        return
    for prompt, target in facts:
        count = len(encode_prompt(tokenizer, prompt)) + len(encode_target(tokenizer, target))
        if count > limit:
            raise PatcherError(
                f"the prompt {quoted(prompt)} is {count} tokens with its target, more than the model's "
                f"context of {limit}: shorten it"
            )


def _check_known(tokenizer, ids: list[int], text: str, what: str) -> None:
    if not ids:
        raise PatcherError(f"the {what} {quoted(text)} encodes to no tokens: give a non-empty {what}")
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise PatcherError(
            f"the {what} {quoted(text)} has words the tokenizer cannot encode: use words from the model's vocabulary"
        )


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences into (input_ids, attention_mask), padding on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    """A token id safe to pad with (masked out, never scored)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts before any text."""
    return len(tokenizer("").input_ids)
