"""`patcher demo`: the whole job on the built-in LM fixture, end to end."""

from __future__ import annotations

import time
from pathlib import Path

from patcher.erase import erase
from patcher.fixtures import build_fixture
from patcher.formats.hf import write_model_folder
from patcher.formats.onnx import ONNX_FORMATS, export_onnx
from patcher.formats.quantized import export_quantized
from patcher.spec import load_spec
from patcher.verification.report import verify, write_report


def run_demo(out: Path, seed: int = 0, threads: int | None = None, fixture: Path | None = None) -> dict:
    """Fixture -> robust erase (the spec's closed-form method, made to hold in every quantized
    format the spec verifies) -> export every format, ONNX and ONNX int8 too -> verify each -> report.json.

    `seed` and `threads` pick another build of the LM fixture (see `build_fixture`);
    `fixture`, a folder `patcher fixture lm` wrote, is used as it is instead.
    """
    timings = {}
    if fixture is None:
        start = time.perf_counter()
        fixture = build_fixture("lm", out / "fixture", seed=seed, threads=threads)
        timings["fixture"] = time.perf_counter() - start
    spec = load_spec(fixture / "spec.toml")
    start = time.perf_counter()
    quantized = tuple(f for f in spec.formats if f != "safetensors")
    patch = erase(spec, fixture, robust_to=quantized)
    patch.save(out / "patch.safetensors")
    timings["erase"] = time.perf_counter() - start
    start = time.perf_counter()
    write_model_folder(fixture, out / "safetensors", patch)
    for fmt in quantized:
        export_quantized(out / "safetensors", fmt, out / fmt)
    for fmt in ONNX_FORMATS:
        export_onnx(out / "safetensors", fmt, out / fmt)
    timings["export"] = time.perf_counter() - start
    report = verify(fixture, out / "safetensors", spec, [*spec.formats, *ONNX_FORMATS])
    report["timings"].update({k: round(v, 3) for k, v in timings.items()})
    write_report(report, out / "report.json")
    return report
