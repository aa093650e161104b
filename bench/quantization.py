"""The quantization-recovery matrix on the LM fixture: base x method x format.

    python bench/quantization.py [--out bench/results/quantization-cpu.csv]

For each method the patch is computed, exported, loaded in every format the way a user
loads it (transformers + bitsandbytes, compressed-tensors for int4, transformers' GGUF
loader for gguf-*) and judged by
`patcher verify`'s evaluator. Two bases: the fixture as trained, and the same fixture with
its quantized layers snapped onto the fp4 grid (`patcher fixture lm --grid fp4`), where
updates smaller than half a step round away.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from tables import print_markdown, write_csv

from patcher.erasure import erase
from patcher.errors import PatcherError
from patcher.fixtures import build_fixture
from patcher.formats.hf import write_model_folder
from patcher.spec import load_spec
from patcher.verifying import verify

FORMATS = ["safetensors", "int8", "nf4", "fp4", "int4", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k"]
ROBUST = ("int8", "nf4", "fp4")
# (base grid, label, method, robust_to, extra [erase] hyperparameters)
RUNS = [
    (None, "memit", "memit", (), {}),
    (None, "alphaedit", "alphaedit", (), {}),
    (None, "memit --robust-to int8,nf4,fp4", "memit", ROBUST, {}),
    (None, "alphaedit --robust-to int8,nf4,fp4", "alphaedit", ROBUST, {}),
    (None, "memit --robust-to gguf-q8_0", "memit", ("gguf-q8_0",), {}),
    (None, "alphaedit --robust-to gguf-q8_0", "alphaedit", ("gguf-q8_0",), {}),
    (None, "memit --robust-to gguf-q4_0", "memit", ("gguf-q4_0",), {}),
    (None, "alphaedit --robust-to gguf-q4_0", "alphaedit", ("gguf-q4_0",), {}),
    # The published recipe scaled to the fixture: small steps, a strong retain term.
    (None, "ga (lr 1e-5, retain x5)", "ga", (), {"ga_lr": 1e-5, "ga_steps": 1000, "retain_weight": 5.0}),
    ("fp4", "memit", "memit", (), {}),
    ("fp4", "memit --robust-to int8,nf4,fp4", "memit", ROBUST, {}),
    ("fp4", "ga (lr 1e-5, 1200 steps: the spec's)", "ga", (), {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantization-cpu.csv"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows, refusals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for grid, label, method, robust_to, extra in RUNS:
            fixture = build_fixture("lm", Path(tmp) / f"fixture-{grid}", grid=grid)
            spec = load_spec(fixture / "spec.toml")
            spec.method_settings.update(extra)
            start = time.perf_counter()
            try:
                patch = erase(spec, fixture, method=method, robust_to=robust_to)
            except PatcherError as error:  # a robust solve that cannot erase every fact says so
                print(f"{label}: {error}")
                refusals.append((label, str(error)))
                continue
            seconds = time.perf_counter() - start
            patched = write_model_folder(fixture, Path(tmp) / f"{grid}-{method}-{len(robust_to)}", patch)
            report = verify(fixture, patched, spec, FORMATS)
            for fmt, row in report["formats"].items():
                kept = row["edit_kept"].values()
                rows.append(
                    {
                        "base": f"{grid} grid" if grid else "as trained",
                        "method": label,
                        "format": fmt,
                        "forget": row["forget_accuracy"],
                        "paraphrase": row["paraphrase_accuracy"],
                        "retain_ratio": row["retain_ratio"],
                        "recovery": row["recovery"],
                        "edit_kept": sum(kept) / max(len(kept), 1),
                        "passed": row["passed"],
                        "erase_seconds": round(seconds, 1),
                    }
                )
    write_csv(args.out, rows)
    header = ["base", "method", "format", "forget", "paraphrase", "retain ratio", "recovery", "edit kept", "gates"]
    print_markdown(
        header,
        [
            [
                r["base"],
                r["method"],
                r["format"],
                *(f"{r[key]:.3f}" for key in ("forget", "paraphrase", "retain_ratio", "recovery")),
                f"{r['edit_kept']:.2f}",
                "pass" if r["passed"] else "fail",
            ]
            for r in rows
        ],
    )
    for label, error in refusals:
        print(f"\n{label} wrote no patch: {error}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
