"""How verify grades a format: its retention against the base in the same format."""

import pytest

from patcher.spec import Gates
from patcher.verification.grading import graded_row

BASE_FULL = {"forget_accuracy": 1.0, "paraphrase_accuracy": 1.0, "retain_accuracy": 1.0}
PATCHED_FULL = {"forget_accuracy": 0.0, "paraphrase_accuracy": 0.0, "retain_accuracy": 1.0}


def _row(retain: float) -> dict:
    return {"forget_accuracy": 0.0, "paraphrase_accuracy": 0.0, "retain_accuracy": retain}


def test_quantization_own_loss_of_retained_facts_is_not_charged_to_the_edit():
    # fp4 costs the unedited model 70% of its retained facts; the patch in fp4 keeps as many.
    base_fp4 = {**BASE_FULL, "retain_accuracy": 0.3}
    graded = graded_row(_row(0.3), base_fp4, PATCHED_FULL, BASE_FULL, Gates())
    assert graded["retain_ratio"] == pytest.approx(1.0) and graded["passed"]


def test_a_patch_that_loses_retained_facts_in_a_format_fails_there():
    base_nf4 = {**BASE_FULL, "retain_accuracy": 0.8}
    graded = graded_row(_row(0.6), base_nf4, PATCHED_FULL, BASE_FULL, Gates())
    assert graded["retain_ratio"] == pytest.approx(0.75)
    assert graded["failures"] == ["retain_ratio 0.750 < 0.95"] and not graded["passed"]
