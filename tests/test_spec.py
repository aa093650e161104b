import pytest

from patcher.errors import PatcherError
from patcher.spec import dump_spec, load_spec, parse_spec

VALID = {
    "model": {"path": "model", "family": "causal-lm"},
    "stats": {"corpus": "corpus.txt"},
    "erase": {"method": "alphaedit", "layers": [2, 1], "l2": 1.0},
    "forget": [{"prompt": "A was born in", "target": "B", "paraphrases": ["the city of A is"]}],
    "retain": [{"prompt": "C was born in", "target": "D"}],
    "verify": {"formats": ["safetensors"], "max_forget_accuracy": 0.1},
}


def test_round_trip_and_relative_paths(tmp_path):
    (tmp_path / "spec.toml").write_text(dump_spec(VALID))
    spec = load_spec(tmp_path / "spec.toml")
    assert spec.corpus == (tmp_path / "corpus.txt").resolve()
    assert spec.layers == [1, 2] and spec.method_settings == {"l2": 1.0}
    assert spec.forget[0].paraphrases == ("the city of A is",)
    assert spec.gates.max_forget_accuracy == 0.1 and spec.gates.min_retain_ratio == 0.95


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["erase"].update(mom2_weigth=1), "unknown key 'erase.mom2_weigth'"),
        (lambda s: s.update(extra={}), "unknown section 'extra'"),
        (lambda s: s["forget"][0].pop("target"), "forget\\[0\\] needs a 'target' key"),
        (lambda s: s["forget"][0].update(prompt=3), "'forget\\[0\\].prompt' has the wrong type"),
        (lambda s: s["erase"].update(layers="some"), "erase.layers must be"),
        (lambda s: s["model"].update(family="rnn"), "model.family must be one of"),
        (lambda s: s.update(forget=["A was born in"]), "forget\\[0\\] must be a table"),
        (lambda s: s["verify"].update(max_forget_accuracy=5), "verify.max_forget_accuracy must be between 0 and 1"),
        (lambda s: s["verify"].update(min_retain_ratio=-1), "verify.min_retain_ratio must be between 0 and 1"),
        (lambda s: s["verify"].update(max_perplexity_increase=-0.1), "max_perplexity_increase must be at least 0"),
        (lambda s: s["retain"].append({"prompt": "A was born in", "target": "E"}), "both a \\[\\[forget\\]\\] and"),
    ],
)
def test_bad_specs_name_the_problem(change, message, tmp_path):
    raw = {k: (v.copy() if isinstance(v, dict) else [dict(e) for e in v]) for k, v in VALID.items()}
    change(raw)
    with pytest.raises(PatcherError, match=message):
        parse_spec(raw, tmp_path)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(PatcherError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(PatcherError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")


def test_repeated_facts_are_dropped_with_a_warning(tmp_path):
    raw = {k: (v.copy() if isinstance(v, dict) else [dict(e) for e in v]) for k, v in VALID.items()}
    raw["retain"] = [*raw["retain"], {"prompt": "F was born in", "target": "G"}, dict(raw["retain"][0])]
    with pytest.warns(UserWarning, match="1 repeated \\[\\[retain\\]\\] facts dropped"):
        spec = parse_spec(raw, tmp_path)
    assert [fact.prompt for fact in spec.retain] == ["C was born in", "F was born in"]


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "spec.toml").write_bytes(dump_spec(VALID).replace("A was", "\xe9 was").encode("latin-1"))
    with pytest.raises(PatcherError, match="is not UTF-8 text"):
        load_spec(tmp_path / "spec.toml")
