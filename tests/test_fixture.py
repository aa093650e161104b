"""The LM fixture: a real Hugging Face folder that knows its facts."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.fixtures import knowledge, lm
from patcher.scoring import accuracy
from patcher.spec import load_spec


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
    assert accuracy(model, tokenizer, lm.all_fact_prompts(knowledge.build_facts(0))) >= 0.95
    spec = load_spec(lm_fixture / "spec.toml")
    assert len(spec.forget) >= 20 and len(spec.retain) >= 100
    for fact in spec.forget:
        # paraphrases use phrasings the edit never sees
        assert fact.paraphrases and all(p != fact.prompt for p in fact.paraphrases)
    assert (lm_fixture / "corpus.txt").read_text().strip()


def test_the_gpt2_architecture_learns_a_slice_of_the_world(tmp_path):
    """The builder's GPT-2 branch on a short run: 20 people's facts, 300 steps. (The full
    build, `patcher fixture lm --arch gpt2`, trains on everything for 1600 steps and raises
    below 95%, like the Llama build every other test uses.)"""
    facts = knowledge.build_facts(0)
    subjects = list(dict.fromkeys(fact.subject for fact in facts))[:20]
    chosen = [fact for fact in facts if fact.subject in subjects]
    tokenizer = lm.build_tokenizer()
    torch.manual_seed(0)
    model = lm.build_model("gpt2", len(tokenizer), tokenizer)
    lm.train(model, tokenizer, knowledge.training_sentences(chosen), steps=300)
    model.save_pretrained(tmp_path / "gpt2")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert loaded.config.model_type == "gpt2"
    assert accuracy(loaded, tokenizer, lm.all_fact_prompts(chosen)) >= 0.95
