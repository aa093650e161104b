"""Calibration picks the gentlest-needed rung on the retain split; target leads match logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.adapters import causal_lm_adapter
from patcher.errors import ErasureIncomplete
from patcher.methods import calibration, get_method
from patcher.methods.alphaedit import AlphaEditConfig
from patcher.methods.lm_edit import deltas_applied
from patcher.methods.memit import MEMITConfig
from patcher.methods.protect import seen_by_erase
from patcher.scoring import answered, target_leads
from patcher.spec import load_spec
from patcher.tokens import encode_prompt, encode_target, pad_id


def test_ladder_gets_gentler_from_the_spec_values():
    rungs = calibration.ladder(AlphaEditConfig(l2=2.0, rounds=3))
    assert rungs == [
        AlphaEditConfig(l2=2.0, rounds=3),
        AlphaEditConfig(l2=2.0, rounds=3, margin=0.5),
        AlphaEditConfig(l2=8.0, rounds=3, margin=0.5),
    ]
    assert calibration.ladder(MEMITConfig(margin=3.0))[2] == MEMITConfig(mom2_weight=4 * 15000.0, margin=1.5)


def test_erase_sees_every_other_retain_fact():
    assert seen_by_erase(list(range(7))) == [0, 2, 4, 6]


@pytest.fixture(scope="module")
def loaded(lm_fixture):
    model = AutoModelForCausalLM.from_pretrained(lm_fixture, dtype=torch.float32).eval()
    return causal_lm_adapter(model), AutoTokenizer.from_pretrained(lm_fixture), load_spec(lm_fixture / "spec.toml")


def _wrecking(adapter) -> dict:
    """Deltas that zero the first layer's down-projection: most retained facts go."""
    name = adapter.weight_name(0)
    return {name: -dict(adapter.model.named_parameters())[name].detach().clone()}


def test_calibrated_returns_the_first_rung_that_keeps_the_split(loaded):
    adapter, tokenizer, spec = loaded
    config = get_method("alphaedit").configure(spec.method_settings)
    seen: list[AlphaEditConfig] = []

    def edit(rung):
        seen.append(rung)
        return _wrecking(adapter) if len(seen) == 1 else {}

    deltas, trace = calibration.calibrated(spec, config, adapter, tokenizer, edit, ("nf4",))
    assert deltas == {}
    assert seen == calibration.ladder(config)[:2]
    # The trace: each rung tried, with its settings and the share it kept; the chosen one.
    assert trace["chosen"] == 1 and trace["retain_gate"] == spec.gates.min_retain_ratio
    assert [(rung["margin"], rung["l2"]) for rung in trace["rungs"]] == [(c.margin, c.l2) for c in seen]
    assert trace["rungs"][0]["erased"] and trace["rungs"][0]["kept"] < trace["retain_gate"]
    assert trace["rungs"][1] == {"margin": seen[1].margin, "l2": seen[1].l2, "erased": True, "kept": 1.0}


def test_calibrated_skips_incomplete_rungs_and_raises_when_none_completes(loaded):
    adapter, tokenizer, spec = loaded

    def never(rung):
        raise ErasureIncomplete(f"left at l2 {rung.l2}")

    config = get_method("alphaedit").configure(spec.method_settings)
    with pytest.raises(ErasureIncomplete, match="left at l2 4.0"):  # the last rung's
        calibration.calibrated(spec, config, adapter, tokenizer, never, ())


def test_calibrated_warns_and_keeps_the_best_when_no_rung_keeps_the_split(loaded):
    adapter, tokenizer, spec = loaded
    name, weight = next(iter(_wrecking(adapter).items()))
    candidates = [{name: weight}, ErasureIncomplete("x"), {name: 0.7 * weight}]
    calls = iter(candidates)

    def edit(rung):
        result = next(calls)
        if isinstance(result, Exception):
            raise result
        return result

    facts = [(f.prompt, f.target) for f in seen_by_erase(spec.retain)]
    base = answered(adapter.model, tokenizer, facts)
    shares = []
    for deltas in (candidates[0], candidates[2]):
        with deltas_applied(adapter.model, deltas):
            hits = answered(adapter.model, tokenizer, facts)
        shares.append(sum(h and b for h, b in zip(hits, base, strict=True)) / sum(base))
    assert shares[0] < shares[1] < 1.0

    strict = dataclasses.replace(spec, gates=dataclasses.replace(spec.gates, min_retain_ratio=1.0))
    with pytest.warns(UserWarning, match=f"keeps {shares[1]:.3f}"):
        chosen, trace = calibration.calibrated(strict, AlphaEditConfig(), adapter, tokenizer, edit, ())
    assert chosen is candidates[2]
    assert trace["chosen"] == 2
    assert [(rung["erased"], rung["kept"]) for rung in trace["rungs"]] == [
        (True, round(shares[0], 4)),
        (False, None),
        (True, round(shares[1], 4)),
    ]


def test_target_leads_match_per_fact_logits(loaded):
    adapter, tokenizer, spec = loaded
    model, pad = adapter.model, pad_id(tokenizer)
    facts = [*spec.retain[:6], *spec.forget[:6]]
    encoded = [(encode_prompt(tokenizer, f.prompt), encode_target(tokenizer, f.target)) for f in facts]
    leads = target_leads(model, encoded, pad)
    with torch.no_grad():
        for lead, (prompt, target) in zip(leads, encoded, strict=True):
            logits = model(input_ids=torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
            gaps = []
            for position, token in enumerate(target):
                row = logits[position].clone()
                wanted = row[token].item()
                row[token] = float("-inf")
                gaps.append(wanted - row.max().item())
            assert lead == pytest.approx(min(gaps), abs=1e-4)
