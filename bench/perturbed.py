"""The demo on LM fixtures trained differently: does the erasure depend on where the fixture was built?

    python bench/perturbed.py [--fixtures default,threads1,scalar,avx512,seed1,seed2] [--readme README.md]

Each fixture is `patcher fixture lm` built in its own process under one perturbation (same
world, same spec; another initialisation and batch order, another thread count, or the
summation order of a CPU with other vector units). On each, the demo runs as `patcher demo`
does: robust erase, export of every format, verify. Prints the per-fixture summary and the
min-max of every format's figures over the fixtures, writes the rows as CSV and, with
--readme, rewrites the README's demo table between its markers, so the README shows a
measured spread, never one machine's numbers.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from patcher.demo import run_demo
from patcher.errors import ErasureIncomplete

# name -> (label, `patcher fixture lm` options, environment). The kernels torch, MKL and
# oneDNN pick follow the CPU's vector units and are chosen when torch loads; the fixture
# holds them to AVX2 unless the environment says otherwise, so "scalar" and "avx512"
# emulate builds on other CPUs by setting them before the build process starts.
PERTURBATIONS = {
    "default": ("seed 0", [], {}),
    "threads1": ("seed 0, 1 thread", ["--threads", "1"], {}),
    "scalar": (
        "seed 0, no SIMD kernels",
        [],
        {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    ),
    "avx512": (
        "seed 0, AVX-512 kernels",
        [],
        {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "ALL"},
    ),
    "seed1": ("seed 1", ["--seed", "1"], {}),
    "seed2": ("seed 2", ["--seed", "2"], {}),
}
METRICS = ("forget_accuracy", "paraphrase_accuracy", "retain_ratio", "recovery")
MARKERS = ("<!-- perturbed-demo:start -->", "<!-- perturbed-demo:end -->")


def build_perturbed(name: str, folder: Path) -> float:
    """Build the fixture of perturbation `name` into `folder` in a fresh process; its seconds.

    A perturbation with its own environment gets its own cache, so its build never
    answers for the default one's.
    """
    _, options, environment = PERTURBATIONS[name]
    env = {**os.environ, **environment}
    if environment:
        env["PATCHER_CACHE"] = str(folder.parent / f"cache-{name}")
    start = time.perf_counter()
    # -P keeps this checkout's kernels/ folder from shadowing the `kernels` package transformers imports.
    command = [sys.executable, "-P", "-m", "patcher", "fixture", "lm", *options, "--out", str(folder)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def run(names: list[str]) -> list[dict]:
    """One row per (fixture, format) of the demo's verification."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            build_seconds = build_perturbed(name, Path(tmp) / name / "fixture")
            try:
                report = run_demo(Path(tmp) / name, fixture=Path(tmp) / name / "fixture")
            except ErasureIncomplete as err:  # erase refused to write a patch: the fixture fails
                rows.append({"fixture": PERTURBATIONS[name][0], "format": "erase", "passed": False, "error": str(err)})
                continue
            for fmt, row in report["formats"].items():
                rows.append(
                    {
                        "fixture": PERTURBATIONS[name][0],
                        "format": fmt,
                        **{metric: row[metric] for metric in METRICS},
                        "passed": row["passed"],
                        "fixture_seconds": round(build_seconds, 1),
                        "erase_seconds": report["timings"]["erase"],
                        "error": "",
                    }
                )
    return rows


def spread_table(rows: list[dict]) -> str:
    """Markdown: per format, min-max of each figure over the fixtures, and how many passed."""
    fixtures = list(dict.fromkeys(r["fixture"] for r in rows))
    verified = [r for r in rows if not r["error"]]
    lines = [
        f"| format | forget | paraphrase | retain ratio | recovery | passed (of {len(fixtures)}) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fmt in dict.fromkeys(r["format"] for r in verified):
        mine = [r for r in verified if r["format"] == fmt]
        cells = []
        for metric in METRICS:
            low, high = min(r[metric] for r in mine), max(r[metric] for r in mine)
            cells.append(f"{low:.3f}" if low == high else f"{low:.3f}–{high:.3f}")
        lines.append(f"| {fmt} | {' | '.join(cells)} | {sum(r['passed'] for r in mine)} |")
    return "\n".join(lines)


def fixture_table(rows: list[dict]) -> str:
    """Markdown: per fixture, the worst figure over its formats and whether all passed."""
    lines = [
        "| fixture | worst forget | worst paraphrase | lowest retain ratio | all gates | erase (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fixture in dict.fromkeys(r["fixture"] for r in rows):
        mine = [r for r in rows if r["fixture"] == fixture]
        if mine[0]["error"]:
            lines.append(f"| {fixture} | erase exit 1: {mine[0]['error'].split(':')[0]} | | | FAIL | |")
            continue
        lines.append(
            f"| {fixture} | {max(r['forget_accuracy'] for r in mine):.3f} | "
            f"{max(r['paraphrase_accuracy'] for r in mine):.3f} | {min(r['retain_ratio'] for r in mine):.3f} | "
            f"{'pass' if all(r['passed'] for r in mine) else 'FAIL'} | {mine[0]['erase_seconds']:.0f} |"
        )
    return "\n".join(lines)


def rewrite_readme(readme: Path, table: str) -> None:
    """Replace the text between the README's perturbed-demo markers with `table`."""
    text = readme.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fixtures", default=",".join(PERTURBATIONS), help=f"comma-separated, of {', '.join(PERTURBATIONS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/perturbed-cpu.csv"))
    parser.add_argument("--readme", type=Path, default=None, help="rewrite this README's demo table")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    names = args.fixtures.split(",")
    unknown = [name for name in names if name not in PERTURBATIONS]
    if unknown:
        parser.error(f"unknown fixture {unknown[0]!r}: use {', '.join(PERTURBATIONS)}")
    rows = run(names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(max(rows, key=len)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    spread, per_fixture = spread_table(rows), fixture_table(rows)
    print(per_fixture, spread, sep="\n\n")
    if args.readme is not None:
        rewrite_readme(args.readme, f"{spread}\n\n{per_fixture}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
