"""`patcher verify` for image classifiers: accuracy on the forget classes and on the others,
then the spec's attacks.

Forget accuracy is the share of test images of a `[[forget_class]]` label still predicted
as that label; retain accuracy the same over every other class. There is no paraphrase
column. Only full precision is verified: bitsandbytes quantizes linear layers, and a
convolutional classifier's one linear layer is its head, which quantization configs skip.
"""

from __future__ import annotations

import time
from pathlib import Path

from patcher.attacks import AttackInputs, run_spec_attacks
from patcher.errors import PatcherError
from patcher.formats.registry import get_target
from patcher.imagesets import ImageSet, top1_accuracy
from patcher.models import load_classifier
from patcher.spec import Spec
from patcher.verification.grading import assemble_report, graded_row
from patcher.verification.report import read_provenance


def class_metrics(model, images: ImageSet, forget_classes: list[int]) -> dict[str, float | None]:
    """Forget and retain top-1 accuracy on a labelled test set."""
    forget, retain = images.of_classes(forget_classes), images.of_classes(forget_classes, keep=False)
    if not len(forget) or not len(retain):
        raise PatcherError("the [verify] data needs test images of the forget classes and of the others")
    return {
        "forget_accuracy": top1_accuracy(model, forget),
        "paraphrase_accuracy": None,
        "retain_accuracy": top1_accuracy(model, retain),
    }


def verify_classifier(base: Path, patched: Path, spec: Spec, formats: list[str]) -> dict:
    """Forget and retain accuracy of base and patched classifier; the report docs/formats.md describes."""
    for name in formats:
        get_target(name, "classifier", "verify")
    if not spec.forget_classes:
        raise PatcherError("the spec has no [[forget_class]] entries to verify")
    if spec.eval_data is None:
        raise PatcherError("classifier verify needs labelled test images: set [verify] data in the spec")
    images = ImageSet.load(spec.eval_data)
    start = time.perf_counter()
    base_model, patched_model = load_classifier(base), load_classifier(patched)
    base_row = class_metrics(base_model, images, spec.forget_classes)
    reference = class_metrics(patched_model, images, spec.forget_classes)
    timings = {"full_precision": round(time.perf_counter() - start, 3)}
    rows = {"safetensors": graded_row(dict(reference), base_row, reference, base_row, spec.gates)}
    attacks = run_spec_attacks(AttackInputs(base_model, patched_model, None, spec), timings)
    method = read_provenance(patched).get("method", spec.method)
    return assemble_report(base, method, rows, base_row, spec.gates, timings, attacks)
