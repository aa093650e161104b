"""`patcher release` as a library call: spec -> patch -> every artifact -> verified -> card and report.

Stages, each skipped on a rerun when it was made from the same inputs (the spec, the base's
whole-model digest, the corpus and other data files, the patch) and its outputs still hold
the bytes it wrote:
1. erase with the spec's method, made robust to the spec's quantized formats when the
   method supports it (memit, alphaedit);
2. export every format of `[verify].formats` and `[export].formats` that the model family
   ships as a file (a pipeline's bitsandbytes UNet is quantized at load instead);
3. verify: each artifact loaded by its own consumer (transformers, bitsandbytes,
   compressed-tensors, onnxruntime, peft), against the base in the same format;
4. write report.json, the model card (README.md) and report.html.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from patcher import __version__
from patcher.erasure import erase, model_dir_for
from patcher.errors import PatcherError
from patcher.exporting import export_model
from patcher.families import Family, family_of
from patcher.formats.atomic import atomic_path
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.hf import check_patch_fits
from patcher.formats.patch import Patch
from patcher.formats.registry import format_names, get_target
from patcher.methods import get_method
from patcher.models import model_fingerprint
from patcher.progress import progress
from patcher.releasing.card import model_card
from patcher.releasing.html import report_html
from patcher.releasing.stages import StageLog, digest
from patcher.spec import Spec, load_spec
from patcher.verification.grading import failures_by_format, graded_row
from patcher.verification.report import write_report
from patcher.verifying import verify

PATCH_FILE = "patch.safetensors"
ARTIFACTS = "artifacts"


@dataclass
class Release:
    """What one release run knows: its inputs, and what each stage produced."""

    spec: Spec
    base: Path
    family: Family
    out: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def patch_path(self) -> Path:
        return self.out / PATCH_FILE

    @property
    def robust_to(self) -> tuple[str, ...]:
        """The quantized formats the edit is made to survive, when the spec's method accepts --robust-to."""
        if not get_method(self.spec.method).robust:
            return ()
        robust = format_names(self.family.name, robust=True)
        return tuple(f for f in self.spec.formats if f in robust)

    def summary(self) -> dict:
        """The `--json` output: verdict, per-format results, artifacts and skipped stages."""
        keys = ("forget_accuracy", "paraphrase_accuracy", "retain_accuracy", "recovery", "passed", "failures")
        rows = {fmt: {k: row.get(k) for k in keys} for fmt, row in self.report["formats"].items()}
        return {
            "passed": self.report["passed"],
            "out": str(self.out),
            "model": str(self.base),
            "method": self.spec.method,
            "failing": failures_by_format(self.report),
            "formats": rows,
            "attacks": self.report.get("attacks", {}),
            "artifacts": {fmt: str(path) for fmt, path in self.artifacts.items()},
            "skipped_stages": self.skipped,
        }


def artifact_formats(family: str, spec: Spec) -> list[str]:
    """The formats this release writes as files, in spec order, safetensors first."""
    known = format_names(exported=True)
    unknown = [f for f in spec.export_formats if f not in known]
    if unknown:
        raise PatcherError(f"[export] formats: unknown format {unknown[0]!r}; use {', '.join(known)}")
    wanted = dict.fromkeys(["safetensors", *spec.formats, *spec.export_formats])
    return [f for f in wanted if f in format_names(family, exported=True)]


def prepare(spec_path: Path, out: Path) -> Release:
    """Read the spec and find the base model; every input error surfaces here, before any work."""
    spec = load_spec(spec_path)
    base = model_dir_for(spec, None)
    family = family_of(spec, base)
    verifiable = format_names(family.name, loaded=True)
    unknown = [f for f in spec.formats if f not in verifiable]
    if unknown:
        raise PatcherError(f"[verify] formats: {unknown[0]!r} cannot be verified for a {family.name} model; "
                           f"use {', '.join(verifiable)}")  # fmt: skip
    artifact_formats(family.name, spec)
    return Release(spec, base, family, Path(out))


def run_release(release: Release) -> Release:
    """Run every stage not already done; the report is in `release.report`."""
    release.out.mkdir(parents=True, exist_ok=True)
    log = StageLog(release.out)
    formats = artifact_formats(release.family.name, release.spec)
    stages = [("erase", _erase), *((f"export {fmt}", _exporter(fmt)) for fmt in formats), ("verify", _verify)]
    for name, stage in progress(stages, "release"):
        start = time.perf_counter()
        stage(release, log)
        release.timings[name] = round(time.perf_counter() - start, 3)
    _write_documents(release)
    return release


def _data_files(spec: Spec) -> list[Path]:
    """The files a spec names besides the model: corpus, held-out text, image sets, judge."""
    named = (spec.corpus, spec.heldout, spec.stats_data, spec.eval_data, spec.images.judge)
    return [path for path in named if path is not None]


def _erase(release: Release, log: StageLog) -> None:
    base = Checkpoint(release.base).model_digest()
    inputs = digest(release.spec.to_json(), ",".join(release.robust_to), __version__, base, *_data_files(release.spec))
    if log.is_done("erase", inputs, [release.patch_path]) and _patch_fits(release):
        release.skipped.append("erase")
        return
    patch = erase(release.spec, release.base, robust_to=release.robust_to)
    patch.save(release.patch_path)
    log.record("erase", inputs, [release.patch_path])


def _patch_fits(release: Release) -> bool:
    """The saved patch still matches the base (its fingerprints) and the spec."""
    patch = Patch.load(release.patch_path)
    try:
        check_patch_fits(Checkpoint(release.base), patch)
    except PatcherError:
        return False
    return patch.spec == release.spec.raw


def _exporter(fmt: str):
    def stage(release: Release, log: StageLog) -> None:
        target = release.out / ARTIFACTS / fmt
        release.artifacts[fmt] = target
        inputs = digest(release.patch_path, fmt)
        if log.is_done(f"export {fmt}", inputs, [target]):
            release.skipped.append(f"export {fmt}")
            return
        export_model(release.base, fmt, target, Patch.load(release.patch_path), overwrite=True)
        log.record(f"export {fmt}", inputs, [target])

    return stage


def _verified_formats(release: Release) -> list[str]:
    """The spec's formats, plus every other artifact verify can grade as its consumer loads it
    (int4, ONNX: `[export]` extras); the PEFT adapter gets its own row."""
    if not release.family.grades_artifacts:
        return release.spec.formats
    gradable = [f for f in release.artifacts if get_target(f, release.family.name).load_artifact is not None]
    return list(dict.fromkeys([*release.spec.formats, *gradable]))


def _verify(release: Release, log: StageLog) -> None:
    report_path = release.out / "report.json"
    formats = _verified_formats(release)
    exported = [log.outputs_of(f"export {fmt}") for fmt in release.artifacts]  # the bytes each export wrote
    base = Checkpoint(release.base).model_digest()
    spec = (release.spec.to_json(), ",".join(formats), *release.artifacts, *_data_files(release.spec))
    inputs = digest(release.patch_path, base, *spec, *exported)
    # report.json is rewritten with every run's timings, so only its presence is checked
    if log.is_done("verify", inputs, []) and report_path.is_file():
        release.skipped.append("verify")
        release.report = json.loads(report_path.read_text())
        return
    shipped = release.artifacts["safetensors"]
    artifacts = release.artifacts if release.family.grades_artifacts else None
    report = verify(release.base, shipped, release.spec, formats, artifacts)
    if "peft" in release.artifacts:
        _add_peft_row(release, report)
    report["base_fingerprint"] = model_fingerprint(release.base)
    report["artifacts"] = {fmt: str(path.relative_to(release.out)) for fmt, path in release.artifacts.items()}
    write_report(report, report_path)
    release.report = report
    log.record("verify", inputs, [])


def _add_peft_row(release: Release, report: dict) -> None:
    """The PEFT adapter graded like a format: the base with the adapter loaded by peft."""
    from patcher.verification.adapters import peft_adapter_metrics

    row = peft_adapter_metrics(release.base, release.artifacts["peft"], release.spec)
    reference = report["formats"]["safetensors"]
    report["formats"]["peft"] = graded_row(row, report["base"], reference, report["base"], release.spec.gates)
    report["passed"] = report["passed"] and report["formats"]["peft"]["passed"]


def _write_documents(release: Release) -> None:
    """report.json's timings, the model card and the HTML report; always rewritten (cheap)."""
    release.report.setdefault("timings", {}).update({f"release {k}": v for k, v in release.timings.items()})
    write_report(release.report, release.out / "report.json")
    for name, text in (("README.md", model_card(release)), ("report.html", report_html(release))):
        with atomic_path(release.out / name) as tmp:
            tmp.write_text(text)
