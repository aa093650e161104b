"""The LM fixture: a real Hugging Face folder that knows its facts."""

import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import patcher.fixtures as fixtures
from patcher.errors import PatcherError
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


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_the_other_architectures_learn_a_slice_of_the_world(tmp_path, arch):
    """The builder's other architectures on a short run: 20 people's facts, 300 steps. (The
    full build, `patcher fixture lm --arch ARCH`, trains on everything for 1600 steps and
    raises below 95%, like the Llama build every other test uses.)"""
    facts = knowledge.build_facts(0)
    subjects = list(dict.fromkeys(fact.subject for fact in facts))[:20]
    chosen = [fact for fact in facts if fact.subject in subjects]
    tokenizer = lm.build_tokenizer()
    torch.manual_seed(0)
    model = lm.build_model(arch, len(tokenizer), tokenizer)
    lm.train(model, tokenizer, knowledge.training_sentences(chosen), steps=300)
    model.save_pretrained(tmp_path / arch)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
    assert loaded.config.model_type == arch
    assert accuracy(loaded, tokenizer, lm.all_fact_prompts(chosen)) >= 0.95


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_lm_trains_in_a_child_with_its_kernels_held_to_avx2(monkeypatch, tmp_path, machine):
    """The child's environment holds torch's, MKL's and oneDNN's kernels to AVX2 on x86-64
    only, a variable the caller set wins, and a failed build is one PatcherError line."""
    seen = {}

    def fake_run(command, env, **kwargs):
        seen.update(command=command, env=env)
        return subprocess.CompletedProcess(command, 1, "", "warning: x\nerror: the llama fixture answers 90.0%\n")

    monkeypatch.setattr(fixtures.subprocess, "run", fake_run)
    monkeypatch.setattr(fixtures.platform, "machine", lambda: machine)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with pytest.raises(PatcherError, match=r"^training the LM fixture failed: the llama fixture answers 90.0%$"):
        fixtures._train_lm_in_child(tmp_path, "llama", 1, 2)
    assert seen["command"][1:] == ["-P", "-m", "patcher.fixtures.lm", str(tmp_path), "llama", "1", "2"]
    assert seen["env"]["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    expected = "avx2" if machine == "x86_64" else None
    assert seen["env"].get("ATEN_CPU_CAPABILITY") == expected
