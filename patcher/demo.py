"""`patcher demo`: the whole job on a built-in model, end to end."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from patcher.erasure import erase
from patcher.errors import PatcherError
from patcher.exporting import export_model
from patcher.fixtures import build_fixture
from patcher.formats.hf import write_model_folder
from patcher.formats.onnx import ONNX_FORMATS
from patcher.spec import load_spec
from patcher.verification.report import write_report
from patcher.verifying import verify


@dataclass(frozen=True)
class DemoModel:
    """What the demo runs on a built-in model: an erase made robust to every quantized format
    the spec verifies (`--robust-to`), or not; ONNX exports verified too, or not."""

    robust: bool
    onnx: bool


# On SmolLM2 a robust erase ran 26 minutes on a 2-core CPU and still left 3 of 40 facts
# answered in nf4 or fp4 (docs/real-model.md), so its demo erases as `patcher erase` does
# by default and verifies the spec's formats.
MODELS = {"lm": DemoModel(robust=True, onnx=True), "smollm2": DemoModel(robust=False, onnx=False)}


def run_demo(
    out: Path, seed: int = 0, threads: int | None = None, fixture: Path | None = None, model: str = "lm"
) -> dict:
    """Fixture -> erase (on the LM fixture made to hold in every quantized format the spec
    verifies) -> export every format (for the LM fixture ONNX and ONNX int8 too) -> verify
    each -> report.json.

    `model` is the built-in model: "lm", the trained fixture, or "smollm2", SmolLM2-135M.
    `seed` and `threads` pick another build of the LM fixture (see `build_fixture`);
    `fixture`, a folder `patcher fixture MODEL` wrote, is used as it is instead.
    """
    if model not in MODELS:
        raise PatcherError(f"unknown demo model {model!r}: use one of {', '.join(MODELS)}")
    timings = {}
    if fixture is None:
        start = time.perf_counter()
        fixture = build_fixture(model, out / "fixture", seed=seed, threads=threads)
        timings["fixture"] = time.perf_counter() - start
    spec = load_spec(fixture / "spec.toml")
    start = time.perf_counter()
    quantized = tuple(f for f in spec.formats if f != "safetensors")
    onnx_formats = ONNX_FORMATS if MODELS[model].onnx else ()
    patch = erase(spec, fixture, robust_to=quantized if MODELS[model].robust else ())
    patch.save(out / "patch.safetensors")
    timings["erase"] = time.perf_counter() - start
    start = time.perf_counter()
    write_model_folder(fixture, out / "safetensors", patch)
    for fmt in (*quantized, *onnx_formats):
        export_model(out / "safetensors", fmt, out / fmt, overwrite=True)  # a rerun replaces its own
    timings["export"] = time.perf_counter() - start
    report = verify(fixture, out / "safetensors", spec, [*spec.formats, *onnx_formats])
    report["timings"].update({k: round(v, 3) for k, v in timings.items()})
    write_report(report, out / "report.json")
    return report
