"""`patcher verify` for text-to-image pipelines: images of each concept in every format, graded
by the judge, then the spec's attacks on the patched pipeline."""

from __future__ import annotations

import time
from pathlib import Path

from patcher.attacks import AttackInputs, run_spec_attacks
from patcher.formats.registry import get_target
from patcher.models import load_pipeline
from patcher.spec import Spec
from patcher.verification.grading import assemble_report, graded_row
from patcher.verification.images import image_metrics
from patcher.verification.judge import JUDGE_FOLDER, ShapeJudge
from patcher.verification.report import read_provenance


def verify_pipeline(base: Path, patched: Path, spec: Spec, formats: list[str]) -> dict:
    """Forget, held-out-prompt and retain accuracy of base and patch in every format, then the attacks."""
    targets = {name: get_target(name, "t2i-unet", "verify") for name in formats}
    judge = ShapeJudge.load(spec.images.judge or base / JUDGE_FOLDER)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base_pipe, patched_pipe = load_pipeline(base), load_pipeline(patched)
    base_row = image_metrics(base_pipe, judge, spec)
    reference = image_metrics(patched_pipe, judge, spec)
    timings["full_precision"] = round(time.perf_counter() - start, 3)
    rows = {}
    for name in formats:
        start = time.perf_counter()
        if name == "safetensors":
            row, base_in_format = dict(reference), base_row
        else:
            base_in_format = image_metrics(targets[name].load(base), judge, spec)
            row = image_metrics(targets[name].load(patched), judge, spec)
        rows[name] = graded_row(row, base_in_format, reference, base_row, spec.gates)
        timings[name] = round(time.perf_counter() - start, 3)
    attacks = run_spec_attacks(AttackInputs(base_pipe, patched_pipe, None, spec, judge), timings)
    method = read_provenance(patched).get("method", spec.method)
    return assemble_report(base, method, rows, base_row, spec.gates, timings, attacks)
