"""Choose how gently a closed-form edit acts, on the half of the retain facts erase sees.

How many neighbouring facts an erasure takes with it depends on the model build as much as
on the settings: on LM fixtures trained with other seeds, one AlphaEdit setting kept
0.88-0.90 of the retained facts on one build and 0.96-0.97 on another, and the setting
that did best moved from build to build (docs/reproducibility.md). So erase tries a short
ladder of settings, each gentler than the one before, and keeps the first patch that
erases every forget fact and keeps the retain facts erase sees (every other one,
`protect.seen_by_erase`) at the spec's retain gate, in full precision and in every
`--robust-to` format. Each rung erases less firmly than the one before (a smaller margin,
then also a larger preservation weight), so the first rung that holds the gate is the
firmest erasure that does. Paraphrases are never looked at here; verify grades every
retain fact, half of them unseen until then.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from patcher.errors import ErasureIncomplete
from patcher.methods import Deltas
from patcher.methods.closed_form import ClosedFormConfig
from patcher.methods.lm_edit import deltas_applied
from patcher.methods.protect import seen_by_erase
from patcher.methods.rounds import in_each_format
from patcher.scoring import answered
from patcher.spec import Spec


def ladder(config: ClosedFormConfig) -> list[ClosedFormConfig]:
    """The settings to try, gentler rung by rung: the spec's own; half the margin past the
    decision boundary, so each fact is pushed less far; then also the preservation weight
    (the config's `preservation` field) times 4."""
    closer = dataclasses.replace(config, margin=0.5 * config.margin)
    key = config.preservation
    return [config, closer, dataclasses.replace(closer, **{key: 4 * getattr(closer, key)})]


def answered_in_each_format(
    model, tokenizer, facts: list[tuple[str, str]], formats: tuple[str, ...]
) -> list[list[bool]]:
    """Which (prompt, target) facts the model answers in full precision, then in each of `formats`."""
    return [answered(model, tokenizer, facts) for _ in in_each_format(model, formats)]


def kept_share(hits: list[list[bool]], base_hits: list[list[bool]]) -> float:
    """The smallest share, over the formats of `answered_in_each_format`, of the facts the
    base answers in a format that the edited model answers in that format too (verify's
    retain ratio compares with the base in the same format as well)."""
    shares = []
    for edited, base in zip(hits, base_hits, strict=True):
        known = sum(base)
        shares.append(sum(e and b for e, b in zip(edited, base, strict=True)) / known if known else 1.0)
    return min(shares)


def calibrated(
    spec: Spec,
    config: ClosedFormConfig,
    adapter,
    tokenizer,
    edit: Callable[[ClosedFormConfig], Deltas],
    formats: tuple[str, ...],
) -> tuple[Deltas, dict]:
    """The first rung's deltas that erase every fact and keep the seen retain facts at the
    spec's retain gate; else those of the completed rung that keeps most, with a warning.
    Also the search's trace: each rung's settings, whether it erased every fact and the
    share of the seen retain facts it kept, and the index of the rung chosen.

    `edit` runs the method with a config. Raises the last ErasureIncomplete when no rung erases
    every fact.
    """
    facts = [(f.prompt, f.target) for f in seen_by_erase(spec.retain)]
    base_hits = answered_in_each_format(adapter.model, tokenizer, facts, formats)
    wanted = spec.gates.min_retain_ratio
    trace: dict = {"retain_gate": wanted, "seen_retain_facts": len(facts), "rungs": []}
    best: tuple[float, int, Deltas] | None = None
    failure: ErasureIncomplete | None = None
    for index, rung in enumerate(ladder(config)):
        settings = {"margin": rung.margin, rung.preservation: getattr(rung, rung.preservation)}
        try:
            deltas = edit(rung)
        except ErasureIncomplete as err:
            trace["rungs"].append({**settings, "erased": False, "kept": None})
            failure = err
            continue
        with deltas_applied(adapter.model, deltas):
            share = kept_share(answered_in_each_format(adapter.model, tokenizer, facts, formats), base_hits)
        trace["rungs"].append({**settings, "erased": True, "kept": round(share, 4)})
        if share >= wanted:
            return deltas, {**trace, "chosen": index}
        if best is None or share > best[0]:
            best = (share, index, deltas)
    if best is None:
        raise failure
    warnings.warn(
        f"no setting tried kept {wanted:.3f} of the seen retain facts: the patch keeps {best[0]:.3f} of them",
        stacklevel=2,
    )
    return best[2], {**trace, "chosen": best[1]}
