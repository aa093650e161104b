"""The retain facts erase may look at, and the keys a closed-form edit must leave alone.

An update Δ to a down-projection moves that layer's output at key k by Δk. MEMIT keeps
Δk small on average over the corpus keys, but a person who shares a first or last name
with a forget subject has keys close to that subject's and is moved with it: on one LM
fixture build that cost 6-7 of 120 retained facts in every setting tried. Adding the keys
at every token of the seen retain prompts to the objective, as AlphaEdit does for the keys
of earlier edits, keeps Δk ≈ 0 there: ‖Δ K_r‖² weighted by erase.retain_weight.
"""

from __future__ import annotations

import torch

from patcher.methods import EditInputs
from patcher.spec import RetainFact
from patcher.stats import collect_second_moments, corpus_batches


def seen_by_erase(retain: list[RetainFact]) -> list[RetainFact]:
    """Every other retain fact, from the first: the ones erase protects and calibrates on.
    Verify grades every retain fact, so half of them are unseen until then."""
    return retain[::2]


def protected_moments(inputs: EditInputs, weight: float) -> dict[int, torch.Tensor]:
    """`weight` (erase.retain_weight) × Σ k kᵀ over every token of the seen retain prompts,
    per edited layer (d_k, d_k) float64; zeros when the weight is 0 or the spec keeps no facts."""
    prompts = [fact.prompt for fact in seen_by_erase(inputs.spec.retain)]
    if weight == 0 or not prompts:
        width = inputs.adapter.key_dim
        return {layer: torch.zeros(width, width, dtype=torch.float64) for layer in inputs.layers}
    adapter = inputs.adapter
    moments = collect_second_moments(adapter, corpus_batches(inputs.tokenizer, prompts), inputs.layers)
    return {layer: weight * moments.sums[adapter.down_proj_name(layer)].double().cpu() for layer in inputs.layers}
