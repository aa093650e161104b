"""`patcher bench`: run the benchmark scripts of a source checkout's bench/ folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from patcher.errors import PatcherError

SUITES = {
    "kernels": ("second_moment.py", "fisher_diag.py", "attention_stats.py"),
    "e2e": ("e2e.py", "stats.py", "apply.py"),
    "quantization": ("quantization.py",),
    "perturbed": ("perturbed.py",),
}


def bench_folder() -> Path:
    """bench/ beside the installed package: benchmarks ship with the source, not the wheel."""
    folder = Path(__file__).resolve().parent.parent / "bench"
    if not (folder / "kernel_harness.py").is_file():
        raise PatcherError(f"no bench/ folder at {folder}: benchmarks run from a source checkout (pip install -e .)")
    return folder


def run_suite(suite: str, quick: bool = False) -> None:
    """Run each script of `suite` in its own process (each prints its table and writes its CSV)."""
    if quick and suite != "kernels":
        raise PatcherError("--quick applies to the kernels suite only")
    folder = bench_folder()
    for script in SUITES[suite]:
        command = [sys.executable, str(folder / script), *(["--quick"] if quick else [])]
        if subprocess.run(command, cwd=folder.parent).returncode != 0:
            raise PatcherError(f"benchmark {script} failed (its output is above)")
