"""The LM fixture: a real Hugging Face folder that knows its facts."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.fixtures import build_fixture, knowledge
from patcher.fixtures.lm import all_fact_prompts
from patcher.spec import load_spec
from patcher.verification.facts import accuracy


def test_knowledge_base_shape_and_determinism():
    facts = knowledge.build_facts(0)
    assert facts == knowledge.build_facts(0)
    people = {f.subject for f in facts}
    assert len(people) >= 200
    assert all(len(phrasings) >= 3 for phrasings in knowledge.PHRASINGS.values())
    assert any(len(f.answer.split()) > 1 for f in facts)  # multi-token targets exist


def test_lm_fixture_loads_with_auto_classes_and_knows_its_facts(lm_fixture):
    tokenizer = AutoTokenizer.from_pretrained(lm_fixture)
    model = AutoModelForCausalLM.from_pretrained(lm_fixture).eval()
    assert model.config.hidden_size % 128 == 0 and model.config.intermediate_size % 128 == 0
    assert accuracy(model, tokenizer, all_fact_prompts(knowledge.build_facts(0))) >= 0.95
    spec = load_spec(lm_fixture / "spec.toml")
    assert len(spec.forget) >= 20 and len(spec.retain) >= 100
    for fact in spec.forget:
        # paraphrases use phrasings the edit never sees
        assert fact.paraphrases and all(p != fact.prompt for p in fact.paraphrases)
    assert (lm_fixture / "corpus.txt").read_text().strip()


@pytest.mark.slow
def test_gpt2_fixture_knows_its_facts(tmp_path):
    folder = build_fixture("lm", tmp_path / "gpt2", arch="gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "gpt2"
    assert accuracy(model, AutoTokenizer.from_pretrained(folder), all_fact_prompts(knowledge.build_facts(0))) >= 0.95
