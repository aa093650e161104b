"""A real pretrained model: patcher's defaults erase real facts from SmolLM2-135M, and the
patched folder, loaded by plain transformers in full precision and in int8, shows it (slow:
builds the fixture, 2 min, and erases with calibration)."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from patcher.erasure import erase
from patcher.fixtures import build_fixture
from patcher.formats.hf import write_model_folder
from patcher.spec import load_spec

pytestmark = pytest.mark.slow

ERASED = 10  # of the fixture's 40 forget facts


def greedy_answers(model, tokenizer, prompts: list[str], new_tokens: int = 12) -> list[str]:
    """What transformers' own greedy `generate` continues each prompt with (enough tokens for
    the longest target)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(
            **batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    return [
        text.strip()
        for text in tokenizer.batch_decode(generated[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    ]


def says(model, tokenizer, facts: list[tuple[str, str]]) -> list[bool]:
    """Whether greedy generation starts with each fact's target."""
    answers = greedy_answers(model, tokenizer, [prompt for prompt, _ in facts])
    return [answer.startswith(target) for answer, (_, target) in zip(answers, facts, strict=True)]


def heldout_loss(model, tokenizer, text: str, window: int = 128) -> float:
    """Mean next-token loss over windows of the held-out text, from transformers' `labels=`."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = [ids[start : start + window] for start in range(0, len(ids) - window + 1, window)]
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss for row in rows]
    return torch.stack(losses).mean().item()


def test_defaults_erase_ten_real_facts_and_keep_the_rest(tmp_path):
    fixture = build_fixture("smollm2", tmp_path / "smollm2")
    spec = load_spec(fixture / "spec.toml")
    spec = dataclasses.replace(spec, forget=spec.forget[:ERASED])
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    forget = [(fact.prompt, fact.target) for fact in spec.forget]
    base = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    assert all(says(base, tokenizer, forget)), "the base must answer every fact erased"
    write_model_folder(fixture, tmp_path / "patched", erase(spec, fixture))

    paraphrases = [(text, fact.target) for fact in spec.forget for text in fact.paraphrases]
    retain = [(fact.prompt, fact.target) for fact in spec.retain]
    text = spec.heldout.read_text()
    # Full precision, then bitsandbytes int8 as a user loads it; each compared with the base
    # loaded the same way, as verify does.
    for load in ({"dtype": torch.float32}, {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}):
        base = AutoModelForCausalLM.from_pretrained(fixture, **load).eval()
        patched = AutoModelForCausalLM.from_pretrained(tmp_path / "patched", **load).eval()
        assert not any(says(patched, tokenizer, forget)), load
        assert sum(says(patched, tokenizer, paraphrases)) <= spec.gates.max_paraphrase_accuracy * len(paraphrases)
        known = says(base, tokenizer, retain)
        kept = [b and p for b, p in zip(known, says(patched, tokenizer, retain), strict=True)]
        assert sum(kept) >= spec.gates.min_retain_ratio * sum(known), (load, sum(kept), sum(known))
        increase = torch.tensor(heldout_loss(patched, tokenizer, text) - heldout_loss(base, tokenizer, text)).exp() - 1
        assert increase <= spec.gates.max_perplexity_increase, load
