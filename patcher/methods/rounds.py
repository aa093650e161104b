"""Erase, check, erase what survives.

How strong a closed-form edit must be depends on the model, not only on the method: on
LM fixtures trained with another seed or for longer, one MEMIT λ left 1 to 17 of 24 facts
answered or, set lower, broke retained facts that the model holds weakly. So every round checks the
facts the way verify does (greedy decoding of the whole target, in full precision and in
each quantized format the edit must survive), and the next round solves again, only for
the facts still answered, on top of the edit so far, optionally with the method's
strength raised by a factor (`escalation`). Facts that outlast every round make erase
fail: a patch never quietly leaves them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

from patcher.adapters import CausalLMAdapter
from patcher.errors import ErasureIncomplete
from patcher.methods.lm_edit import accumulate, build_request, deltas_applied, require_facts, still_answered
from patcher.quantizers import fake_quantized
from patcher.spec import ForgetFact
from patcher.tokens import pad_id

DEFAULT_ROUNDS = 8
DEFAULT_ESCALATION = 1.0  # the same strength every round unless the spec asks for more
DEFAULT_MARGIN = 1.0
FULL_PRECISION = "full precision"

# (facts still answered, strength) -> the update that erases them, computed on the model as
# it is. Strength is escalation ** round: 1 in the first round, then escalation, its square, ...
EditRound = Callable[[list[ForgetFact], float], dict]


def erase_in_rounds(
    adapter: CausalLMAdapter,
    tokenizer,
    facts: list[ForgetFact],
    edit_round: EditRound,
    formats: tuple[str, ...] = (),
    rounds: int = DEFAULT_ROUNDS,
    escalation: float = DEFAULT_ESCALATION,
    hint: str = "",
    margin: float = DEFAULT_MARGIN,
) -> dict:
    """Edit `facts` until none is answered in full precision or any of `formats`.

    Each round edits the facts still answered, with every earlier round's update applied,
    at `escalation` times the previous round's strength. Raises ErasureIncomplete, naming
    how many facts survive and where, after `rounds`.
    """
    require_facts(facts)
    model = adapter.model
    total: dict = {}
    remaining = list(facts)
    survivors: list[list[str]] = []
    for round_index in range(rounds):
        with deltas_applied(model, total):
            accumulate(total, edit_round(remaining, escalation**round_index))
        with deltas_applied(model, total):
            survivors = answered_where(model, tokenizer, facts, formats, margin)
        remaining = [fact for fact, where in zip(facts, survivors, strict=True) if where]
        if not remaining:
            return total
    counts: dict[str, int] = {}
    for where in survivors:
        for name in where:
            counts[name] = counts.get(name, 0) + 1
    detail = ", ".join(f"{name} {count}" for name, count in counts.items())
    raise ErasureIncomplete(
        f"{len(remaining)} of {len(facts)} forget facts are still answered after {rounds} "
        f"round{'s' if rounds != 1 else ''} ({detail})" + (f": {hint}" if hint else "")
    )


def answered_where(
    model, tokenizer, facts: list[ForgetFact], formats: tuple[str, ...], margin: float = 0.0
) -> list[list[str]]:
    """For each fact, where greedy decoding of its prompt still produces the target, or comes
    within `margin` nats of it: "full precision" and/or the named quantized formats (exact
    fake quantization)."""
    requests = [build_request(tokenizer, fact) for fact in facts]
    pad = pad_id(tokenizer)
    where: list[list[str]] = [[] for _ in facts]
    for name in in_each_format(model, formats):
        hits = still_answered(model, requests, pad, margin)
        for places, hit in zip(where, hits, strict=True):
            if hit:
                places.append(name)
    return where


def in_each_format(model, formats: tuple[str, ...]) -> Iterator[str]:
    """Yield "full precision", then each of `formats` with the model fake-quantized to it
    until the next step of the loop."""
    for name in (FULL_PRECISION, *formats):
        with nullcontext() if name == FULL_PRECISION else fake_quantized(model, name):
            yield name
