"""Attacks on a patched causal LM: each brings erased facts back from a patch weak against it
(relearning from MEMIT's on the LM fixture, the soft prompt from a negated BOS embedding, the
probe from an output-only suppression), none "recovers" facts the base never knew, relearning leaves the base's retain
facts alone, and verify, the spec and the report carry each attack with its budget."""

import copy
import dataclasses
import json
import sys
import types

import pytest
import torch
from helpers import contributing_recipe, run_cli

from patcher import attacks
from patcher.attacks import ATTACKS, AttackInputs, run_attacks
from patcher.errors import PatcherError
from patcher.formats.hf import load_causal_lm
from patcher.scoring import accuracy
from patcher.spec import dump_spec, load_spec, parse_spec
from patcher.tokens import encode_target
from patcher.verification.lm import tokenizer_of


@pytest.fixture(scope="module")
def models(lm_fixture, memit_patch, tmp_path_factory):
    """Base and MEMIT-patched LM fixture, tokenizer and spec."""
    patched = tmp_path_factory.mktemp("attacks") / "patched"
    run_cli("apply", str(lm_fixture), str(memit_patch), "--out", str(patched))
    spec = load_spec(lm_fixture / "spec.toml")
    return load_causal_lm(lm_fixture), load_causal_lm(patched), tokenizer_of(lm_fixture), spec, patched


def never_known(spec):
    """The spec with each forget prompt given another fact's target: pairs the base never saw."""
    facts = spec.forget
    swapped = [dataclasses.replace(f, target=facts[(i + 2) % len(facts)].target) for i, f in enumerate(facts)]
    return dataclasses.replace(spec, forget=swapped)


def test_relearning_brings_facts_back_from_a_memit_patch(models):
    base, patched, tokenizer, spec, _ = models
    # The patch answers none of the forget facts (tests/test_erasure_e2e.py); relearning at
    # twice the default steps and three times its rate answers some (how many depends on the
    # fixture's build: 6 and 13 of 24 on two machines; 1 and 4 at the default budget).
    rows = run_attacks(AttackInputs(base, patched, tokenizer, spec), {"relearn": {"steps": 100, "lr": 3e-4}})
    assert rows["relearn"]["forget_accuracy"] > 0.05


def test_the_soft_prompt_brings_facts_back_from_a_patch_it_can_undo(models):
    base, _, tokenizer, spec, _ = models
    # A deliberately weak erasure: the BOS token's embedding negated, which the prefix,
    # placed right after it, can stand in for. It answers none of the held-out half.
    weak = copy.deepcopy(base)
    with torch.no_grad():
        weak.get_input_embeddings().weight[tokenizer.bos_token_id] *= -1
    assert accuracy(weak, tokenizer, [(f.prompt, f.target) for f in spec.forget[1::2]]) == 0.0
    attack = ATTACKS["soft_prompt"]
    row = attack.run(AttackInputs(base, weak, tokenizer, spec), attack.budget())
    assert row["forget_accuracy"] >= 0.5


def test_the_probe_reads_answers_an_output_only_patch_still_holds(models):
    base, _, tokenizer, spec, _ = models
    # A deliberately weak erasure: the forget answers' first tokens negated in the unembedding,
    # so none is produced while every hidden state is the base's.
    weak = copy.deepcopy(base)
    rows = sorted({encode_target(tokenizer, f.target)[0] for f in spec.forget})
    with torch.no_grad():
        weak.get_output_embeddings().weight[rows] *= -1
    assert accuracy(weak, tokenizer, [(f.prompt, f.target) for f in spec.forget]) == 0.0
    row = ATTACKS["probe"].run(AttackInputs(base, weak, tokenizer, spec), ATTACKS["probe"].budget())
    assert row["forget_accuracy"] >= 0.5 and row["layer"] == len(row["per_layer"]) - 1  # read off the last layer
    assert all(layer["patched"] == layer["base"] for layer in row["per_layer"])


@pytest.mark.parametrize("name", ["relearn", "soft_prompt", "probe"])
def test_no_attack_recovers_what_the_base_never_knew(models, name):
    base, _, tokenizer, spec, _ = models
    attack = ATTACKS[name]
    row = attack.run(AttackInputs(base, base, tokenizer, never_known(spec)), attack.budget())
    assert row["forget_accuracy"] == 0.0


def test_relearning_at_the_default_budget_keeps_the_bases_facts(models):
    base, _, tokenizer, spec, _ = models
    row = ATTACKS["relearn"].run(AttackInputs(base, base, tokenizer, spec), ATTACKS["relearn"].budget())
    assert row["forget_accuracy"] == 1.0 and row["retain_accuracy"] >= 0.95


def test_relearning_text_leaves_out_every_line_naming_a_forget_subject(lm_fixture, tmp_path):
    from patcher.attacks.relearn import relearning_text

    spec = load_spec(lm_fixture / "spec.toml")
    first, second = spec.forget[:2]
    lines = [
        f"{first.subject} moved away .",
        f"later , {second.subject}",
        f"{second.subject}s are rare .",
        "Ida Jett .",
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    text = relearning_text(dataclasses.replace(spec, corpus=tmp_path / "corpus.txt"))
    assert text == [f"{r.prompt} {r.target}" for r in spec.retain] + lines[2:]  # a longer word is another name


def test_verify_runs_the_attacks_and_gates_them(models, lm_fixture, tmp_path):
    _, _, _, _, patched = models
    spec = tmp_path / "spec.toml"
    raw = load_spec(lm_fixture / "spec.toml").raw
    raw["stats"]["corpus"] = str(lm_fixture / "corpus.txt")
    raw["attacks"] = {"relearn": {"steps": 20, "max_forget_accuracy": 1.0}, "soft_prompt": {"steps": 30}}
    spec.write_text(dump_spec(raw))
    report_path = tmp_path / "report.json"
    args = ["verify", "--base", str(lm_fixture), "--patched", str(patched), "--spec", str(spec)]
    result = run_cli(*args, "--report", str(report_path), expect=None)
    report = json.loads(report_path.read_text())
    attacks = report["attacks"]
    assert attacks["relearn"]["budget"] == {"steps": 20, "lr": 1e-4, "batch_size": 16, "seed": 0}
    assert attacks["relearn"]["passed"]  # its own gate, 1.0
    assert attacks["soft_prompt"]["max_forget_accuracy"] == 0.05  # verify's gate by default
    assert report["passed"] == all(row["passed"] for row in [*attacks.values(), *report["formats"].values()])
    assert result.returncode == (0 if report["passed"] else 1)
    assert "attack relearn: fine-tuning" in result.stdout and "budget: steps 20, lr 0.0001" in result.stdout

    only = run_cli(*args, "--attacks", "relearn", "--formats", "safetensors", "--json", expect=None)
    assert list(json.loads(only.stdout)["attacks"]) == ["relearn"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"relearn": {"steps": "many"}}, "attacks.relearn.steps must be an integer for relearn"),
        ({"relearn": {"epochs": 3}}, "unknown key 'attacks.relearn.epochs'"),
        ({"jailbreak": {}}, "unknown attack [attacks.jailbreak]"),
        ({"soft_prompt": {"max_forget_accuracy": 2}}, "attacks.soft_prompt.max_forget_accuracy must be a number"),
        ({"relearn": 3}, "[attacks.relearn] must be a table"),
        ({"relearn": {"batch_size": 0}}, "attacks.relearn.batch_size must be at least 1 for relearn, not 0"),
        ({"soft_prompt": {"lr": -0.1}}, "attacks.soft_prompt.lr must be at least 0 for soft_prompt, not -0.1"),
    ],
)
def test_a_bad_attack_table_is_refused_naming_the_key(tmp_path, table, message):
    raw = {"forget": [{"prompt": "a", "target": "b"}], "attacks": table}
    with pytest.raises(PatcherError) as error:
        parse_spec(raw, tmp_path)
    assert message in str(error.value)


def test_an_attack_of_another_family_is_one_line_and_exit_2(classifier_fixture, tmp_path):
    folder = classifier_fixture
    args = ["verify", "--base", str(folder), "--patched", str(folder), "--spec", str(folder / "spec.toml")]
    result = run_cli(*args, "--attacks", "relearn", expect=2)
    assert result.stderr.count("\n") == 1 and "does not run on a classifier model" in result.stderr
    result = run_cli(*args, "--attacks", "jailbreak", expect=2)
    assert "unknown attack 'jailbreak': use all or one of membership, relearn_classes" in result.stderr


def test_a_spec_with_attack_tables_round_trips_through_dump_spec(tmp_path):
    raw = {"forget": [{"prompt": "a", "target": "b"}], "attacks": {"relearn": {"steps": 5}, "soft_prompt": {}}}
    (tmp_path / "spec.toml").write_text(dump_spec(raw))
    assert load_spec(tmp_path / "spec.toml").attacks == raw["attacks"]


def test_the_contributing_recipe_adds_an_attack_with_one_module(monkeypatch, models, lm_fixture, tmp_path):
    monkeypatch.setattr(attacks, "ATTACKS", dict(attacks.ATTACKS))  # the recipe registers into a scratch copy
    module = types.ModuleType("patcher.attacks.few_shot")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(contributing_recipe("attack"), "patcher/attacks/few_shot.py", "exec"), module.__dict__)
    assert attacks.attacks_for("causal-lm") == ["probe", "relearn", "soft_prompt", "few_shot"]

    base, _, tokenizer, spec, _ = models
    with pytest.raises(PatcherError, match="attacks.few_shot.shots must be an integer for few_shot"):
        parse_spec({**spec.raw, "attacks": {"few_shot": {"shots": 0.5}}}, lm_fixture)
    # Attacking the base itself, where most facts are still there to find.
    rows = attacks.run_attacks(AttackInputs(base, base, tokenizer, spec), {"few_shot": {"shots": 2}})
    # The reference: the same prompts answered by transformers' own greedy generate.
    examples = " ".join(f"{r.prompt} {r.target} ." for r in spec.retain[:2])
    answered = 0
    for fact in spec.forget:
        ids = tokenizer(f"{examples} {fact.prompt}", return_tensors="pt").input_ids
        out = base.generate(ids, max_new_tokens=len(tokenizer(" " + fact.target, add_special_tokens=False).input_ids),
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answered += tokenizer.decode(out[0, ids.shape[1] :]).strip() == fact.target
    assert answered > 0 and rows["few_shot"]["forget_accuracy"] == answered / len(spec.forget)
    assert rows["few_shot"]["budget"] == {"shots": 2}
