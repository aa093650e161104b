"""MEMIT and AlphaEdit with one spec on the LM fixture trained in three architectures.

    python bench/trained_families.py [--archs llama,gpt2,gpt_neox] [--out bench/results/trained-families-cpu.csv]

The same world, spec and settings (the fixture's spec.toml: no value differs between
architectures) on the fixture trained as a Llama, a GPT-2 (Conv1D layout, tied
embeddings) and a GPT-NeoX (parallel attention and MLP, fused query/key/value, untied
embeddings). Each method runs plain and with `--robust-to int8,nf4,fp4` (what `patcher
release` runs for a spec that verifies those formats); each patch is applied and verified
as `patcher verify` does, in safetensors and in int8, nf4 and fp4 loaded with
transformers + bitsandbytes, against the spec's gates. Prints a Markdown table and writes
it as CSV.
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

FORMATS = ["safetensors", "int8", "nf4", "fp4"]
ROBUST = ("int8", "nf4", "fp4")
RUNS = [(method, robust_to) for method in ("memit", "alphaedit") for robust_to in ((), ROBUST)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama,gpt2,gpt_neox")
    parser.add_argument("--out", type=Path, default=Path("bench/results/trained-families-cpu.csv"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows, refusals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            start = time.perf_counter()
            fixture = build_fixture("lm", Path(tmp) / f"fixture-{arch}", arch=arch)
            print(f"{arch}: fixture ready in {time.perf_counter() - start:.0f} s", flush=True)
            spec = load_spec(fixture / "spec.toml")
            for method, robust_to in RUNS:
                label = f"{method} --robust-to {','.join(robust_to)}" if robust_to else method
                start = time.perf_counter()
                try:
                    patch = erase(spec, fixture, method=method, robust_to=robust_to)
                except PatcherError as error:
                    print(f"{arch} {label}: {error}", flush=True)
                    refusals.append((arch, label, str(error)))
                    continue
                seconds = time.perf_counter() - start
                patched = write_model_folder(fixture, Path(tmp) / f"{arch}-{method}-{len(robust_to)}", patch)
                report = verify(fixture, patched, spec, FORMATS)
                for fmt, row in report["formats"].items():
                    rows.append(
                        {
                            "arch": arch,
                            "method": label,
                            "format": fmt,
                            "forget": row["forget_accuracy"],
                            "paraphrase": row["paraphrase_accuracy"],
                            "retain_ratio": row["retain_ratio"],
                            "passed": row["passed"],
                            "erase_seconds": round(seconds, 1),
                        }
                    )
                    print(rows[-1], flush=True)
    write_csv(args.out, rows)
    print_markdown(
        ["fixture", "method", "format", "forget", "paraphrase", "retain ratio", "gates", "erase s"],
        [
            [
                r["arch"],
                r["method"],
                r["format"],
                *(f"{r[key]:.3f}" for key in ("forget", "paraphrase", "retain_ratio")),
                "pass" if r["passed"] else "fail",
                str(r["erase_seconds"]),
            ]
            for r in rows
        ],
    )
    for arch, method, error in refusals:
        print(f"\n{arch} {method} wrote no patch: {error}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
