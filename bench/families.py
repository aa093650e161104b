"""Compatibility matrix: every step of patcher on a tiny random model of each causal-LM family.

    python bench/families.py [--families llama,gpt2] [--out bench/results/families-cpu.csv] [--doc docs/families.md]

Each model is built from transformers' own config class (patcher/fixtures/architectures.py),
randomly initialised, and saved with a word-level tokenizer. Its facts are prompts of
random words and the word the model itself continues each with, so every fact starts
answered. Each step runs as a user's command would and is recorded as `pass`, `refused:`
with patcher's one-line reason, `incomplete:` (the method ran but left facts answered),
or `error:` with the first line of anything else: locate, stats, erase with each method,
apply (read back by `from_pretrained`), and every export loaded by its own consumer
(transformers + bitsandbytes, compressed-tensors, onnxruntime, peft), and the onnx export
generating in optimum's ORTModelForCausalLM the tokens PyTorch generates from the patched
model (where PATCHER_OPTIMUM_PYTHON names optimum's environment). Prints the matrix,
writes it as CSV and, with --doc, as the Markdown table between the doc's markers.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from patcher.adapters import causal_lm_adapter
from patcher.erasure import erase
from patcher.errors import ErasureIncomplete, PatcherError
from patcher.exporting import export_model
from patcher.fixtures.architectures import ARCHITECTURES, write_tiny_lm
from patcher.formats.hf import write_model_folder
from patcher.formats.registry import get_target
from patcher.locate import locate
from patcher.models import load_causal_lm
from patcher.spec import load_spec
from patcher.stats.job import run_stats
from patcher.verification.optimum import OPTIMUM_PYTHON, optimum_generate, optimum_python, pytorch_generate

METHODS = ("memit", "alphaedit", "fila", "ga")
EXPORTS = ("int8", "nf4", "fp4", "int4", "onnx", "onnx-int8", "gguf-q4_0")
STEPS = ("locate", "stats", *METHODS, "apply", *EXPORTS, "optimum", "peft")
OPTIMUM_TOKENS = 4
MARKERS = ("<!-- families-matrix:start -->", "<!-- families-matrix:end -->")


def outcome(step: Callable[[], object]) -> tuple[str, object]:
    """(cell, value): how `step` ended, and what it returned when it passed."""
    try:
        return "pass", step()
    except ErasureIncomplete as err:
        return f"incomplete: {err}", None
    except PatcherError as err:
        return f"refused: {err}", None
    except Exception as err:  # the matrix records every failure instead of stopping
        first = (str(err).splitlines() or [""])[0]
        return f"error: {type(err).__name__}: {first}", None


def run_family(family: str, work: Path) -> dict[str, str]:
    """Every step on `family`; the cell of each."""
    folder = work / family
    folder.mkdir()
    write_tiny_lm(family, folder)
    spec = load_spec(folder / "spec.toml")
    cells: dict[str, str] = {}
    patches = {}

    def locate_subjects():
        model, tokenizer = load_causal_lm(folder)
        return locate(causal_lm_adapter(model), tokenizer, spec.forget)

    cells["locate"], _ = outcome(locate_subjects)
    stats_out = work / f"{family}-stats.safetensors"
    cells["stats"], _ = outcome(lambda: run_stats(str(folder), folder / "corpus.txt", stats_out, [1]))
    for method in METHODS:
        cells[method], patches[method] = outcome(lambda method=method: erase(spec, folder, method=method))
    patch = patches["memit"]
    without = f"refused: no memit patch ({cells['memit'].split(':')[0]})"

    def apply_and_load():
        patched = write_model_folder(folder, work / f"{family}-patched", patch)
        from transformers import AutoModelForCausalLM

        loaded = dict(AutoModelForCausalLM.from_pretrained(patched).named_parameters())
        base = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
        name = patch.params[0]
        expected = base[name].detach() + patch.delta(name).to(base[name].dtype)
        if not torch.allclose(loaded[name].detach(), expected, atol=1e-6):
            raise AssertionError(f"{name} read back is not base + delta")

    cells["apply"] = outcome(apply_and_load)[0] if patch is not None else without
    for fmt in EXPORTS:
        if patch is None:
            cells[fmt] = without
            continue

        def export_and_load(fmt=fmt):
            out = export_model(folder, fmt, work / f"{family}-{fmt}", patch=patch)
            get_target(fmt, "causal-lm", "verify").load_artifact(out)

        cells[fmt] = outcome(export_and_load)[0]

    def optimum_generation():
        prompts = [fact.prompt for fact in [*spec.forget[:2], *spec.retain[:2]]]
        generated = optimum_generate(work / f"{family}-onnx", prompts, OPTIMUM_TOKENS)
        if not generated.pop("cache"):
            raise AssertionError("optimum found no past-key-values inputs in the graph")
        if generated != pytorch_generate(work / f"{family}-patched", prompts, OPTIMUM_TOKENS):
            raise AssertionError("optimum generates other tokens than PyTorch")

    if optimum_python() is None:
        cells["optimum"] = f"skipped: {OPTIMUM_PYTHON} names no Python with optimum-onnx"
    elif cells["onnx"] != "pass" or cells["apply"] != "pass":
        cells["optimum"] = "refused: no onnx export and patched folder to compare"
    else:
        cells["optimum"] = outcome(optimum_generation)[0]

    def peft_adapter():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        out = export_model(folder, "peft", work / f"{family}-peft", patch=patches["fila"])
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out)

    fila = cells["fila"].split(":")[0]
    cells["peft"] = outcome(peft_adapter)[0] if patches["fila"] is not None else f"refused: no fila patch ({fila})"
    return cells


def markdown(rows: list[dict[str, str]]) -> list[str]:
    """The matrix as a Markdown table: ✓ for a pass, else the cell's kind, with the reasons below."""
    lines = ["| family | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    notes: dict[str, int] = {}
    for row in rows:
        marks = []
        for step in STEPS:
            cell = row[step]
            if cell == "pass":
                marks.append("✓")
                continue
            number = notes.setdefault(cell, len(notes) + 1)
            marks.append(f"{cell.split(':')[0]} [{number}]")
        lines.append(f"| {row['family']} | " + " | ".join(marks) + " |")
    lines.append("")
    lines += [f"[{number}] {cell}" + "  " for cell, number in notes.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(ARCHITECTURES))
    parser.add_argument("--out", type=Path, default=Path("bench/results/families-cpu.csv"))
    parser.add_argument("--doc", type=Path, default=None, help="rewrite this doc's matrix between its markers")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            start = time.perf_counter()
            cells = run_family(family, Path(tmp))
            rows.append({"family": family, **cells, "seconds": f"{time.perf_counter() - start:.1f}"})
            passed = sum(cells[s] == "pass" for s in STEPS)
            print(f"{family:12s} {passed:2d}/{len(STEPS)} pass  {rows[-1]['seconds']} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["family", *STEPS, "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    print("\n".join(table))
    if args.doc is not None:
        text = args.doc.read_text()
        head, _, rest = text.partition(MARKERS[0])
        _, _, tail = rest.partition(MARKERS[1])
        args.doc.write_text(f"{head}{MARKERS[0]}\n{chr(10).join(table)}\n{MARKERS[1]}{tail}")


if __name__ == "__main__":
    main()
