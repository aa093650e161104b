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


FULL_PRECISION = {"dtype": torch.float32}
INT8 = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """(fixture folder, patched folder, spec, tokenizer): the first ERASED forget facts erased
    with every default, once for the module."""
    tmp_path = tmp_path_factory.mktemp("smollm2-erasure")
    fixture = build_fixture("smollm2", tmp_path / "smollm2")
    spec = load_spec(fixture / "spec.toml")
    spec = dataclasses.replace(spec, forget=spec.forget[:ERASED])
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    base = AutoModelForCausalLM.from_pretrained(fixture, **FULL_PRECISION).eval()
    assert all(says(base, tokenizer, [(f.prompt, f.target) for f in spec.forget])), "the base must answer every fact"
    write_model_folder(fixture, tmp_path / "patched", erase(spec, fixture))
    return fixture, tmp_path / "patched", spec, tokenizer


def loaded(erased, load: dict):
    """(base, patched) as a user loads them with `load`; verify compares in the same load."""
    fixture, patched, _, _ = erased
    return (
        AutoModelForCausalLM.from_pretrained(fixture, **load).eval(),
        AutoModelForCausalLM.from_pretrained(patched, **load).eval(),
    )


def assert_erased_and_fluent(erased, load: dict) -> None:
    """No erased fact answered, paraphrases under their gate, held-out perplexity under its gate."""
    _, _, spec, tokenizer = erased
    base, patched = loaded(erased, load)
    assert not any(says(patched, tokenizer, [(f.prompt, f.target) for f in spec.forget]))
    paraphrases = [(text, f.target) for f in spec.forget for text in f.paraphrases]
    assert sum(says(patched, tokenizer, paraphrases)) <= spec.gates.max_paraphrase_accuracy * len(paraphrases)
    text = spec.heldout.read_text()
    increase = torch.tensor(heldout_loss(patched, tokenizer, text) - heldout_loss(base, tokenizer, text)).exp() - 1
    assert increase <= spec.gates.max_perplexity_increase


def assert_retained(erased, load: dict) -> None:
    """At least the retain gate's share of the retain facts the base answers in `load`."""
    _, _, spec, tokenizer = erased
    base, patched = loaded(erased, load)
    retain = [(f.prompt, f.target) for f in spec.retain]
    known = says(base, tokenizer, retain)
    kept = [b and p for b, p in zip(known, says(patched, tokenizer, retain), strict=True)]
    assert sum(kept) >= spec.gates.min_retain_ratio * sum(known), (sum(kept), sum(known))


def test_full_precision_meets_every_gate(erased):
    assert_erased_and_fluent(erased, FULL_PRECISION)
    assert_retained(erased, FULL_PRECISION)


def test_int8_stays_erased_and_fluent(erased):
    assert_erased_and_fluent(erased, INT8)


# On the AMD EPYC machine of earlier CI runs this passed; on the Intel Sapphire Rapids one
# it keeps 130 of 138 (0.942 < 0.95). Why, and what was tried: docs/real-model.md, "Open".
@pytest.mark.xfail(reason="int8 retain ratio 0.94 on some CPUs (gate 0.95): issue 24, docs/real-model.md")
def test_int8_keeps_the_retain_facts(erased):
    assert_retained(erased, INT8)
