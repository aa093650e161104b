"""The model family registry: every family the spec accepts is registered, every method
edits some family, and a method that cannot edit a model is one line naming who can."""

import pytest

from patcher.errors import PatcherError
from patcher.families import FAMILIES, check_method_fits, family_of, get_family
from patcher.methods import METHODS
from patcher.spec import FAMILIES as SPEC_FAMILIES


def test_the_spec_accepts_exactly_the_registered_families():
    assert set(FAMILIES) == set(SPEC_FAMILIES) - {"auto"}


def test_every_method_edits_registered_families_only():
    assert all(method.families and set(method.families) <= set(FAMILIES) for method in METHODS.values())
    assert get_family("classifier").methods == ("ssd",)
    assert set(get_family("causal-lm").methods) == {"memit", "alphaedit", "fila", "ga", "ssd"}


def test_only_causal_lms_grade_exported_artifacts():
    assert [f.name for f in FAMILIES.values() if f.grades_artifacts] == ["causal-lm"]


def test_a_method_that_cannot_edit_the_family_is_one_line(tmp_path):
    with pytest.raises(PatcherError) as err:
        check_method_fits(get_family("causal-lm"), "uce", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "uce cannot edit" in message and "uce, rece edit t2i-unet models" in message
    check_method_fits(get_family("classifier"), "ssd", tmp_path)  # fits: no error


def test_auto_detects_the_family_from_the_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")

    class Declared:
        family = "auto"

    assert family_of(Declared(), tmp_path).name == "t2i-unet"
    Declared.family = "classifier"
    assert family_of(Declared(), tmp_path).name == "classifier"
    with pytest.raises(PatcherError, match="unknown model family 'rnn'"):
        get_family("rnn")
