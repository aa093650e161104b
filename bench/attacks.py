"""The causal-LM methods against every attack on the LM fixture, at stated budgets.

    python bench/attacks.py [--methods memit,alphaedit,...] [--out bench/results/attacks-cpu.csv]

Each method erases the fixture's spec (plain, and MEMIT and AlphaEdit also with
`--robust-to int8,nf4,fp4`), the patch is applied, and each attack runs on the patched
model as `patcher verify --attacks` runs it: relearning at its default budget and at a
larger one, the soft-prompt attack and the probe. The base model is attacked too, as the reference
an attack must not damage. Prints a Markdown table (forget accuracy after the attack, the
gate's verdict at the spec's max_forget_accuracy) and writes it as CSV.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from tables import print_markdown, write_csv

from patcher.attacks import AttackInputs, run_attacks
from patcher.erasure import erase
from patcher.errors import PatcherError
from patcher.fixtures import build_fixture
from patcher.formats.hf import load_causal_lm, write_model_folder
from patcher.scoring import accuracy
from patcher.spec import load_spec
from patcher.verification.lm import tokenizer_of

ROBUST = ("int8", "nf4", "fp4")
RUNS = [
    ("memit", ()),
    ("memit", ROBUST),
    ("alphaedit", ()),
    ("alphaedit", ROBUST),
    ("fila", ()),
    ("ga", ()),
]
# (label, attack, its [attacks.<name>] table)
BUDGETS = [
    ("relearn (default)", "relearn", {}),
    ("relearn (100 steps, lr 3e-4)", "relearn", {"steps": 100, "lr": 3e-4}),
    ("soft_prompt (default)", "soft_prompt", {}),
    ("probe (default)", "probe", {}),
]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _verdict(row: dict) -> str:
    return "pass" if row["passed"] else "fail"


def attack_rows(label: str, model, base, tokenizer, spec, seconds: float | None) -> list[dict]:
    """One row per budget: the attack's figures on `model`."""
    forget = [(f.prompt, f.target) for f in spec.forget]
    before = accuracy(model, tokenizer, forget)
    rows = []
    for budget_label, name, table in BUDGETS:
        row = run_attacks(AttackInputs(base, model, tokenizer, spec), {name: table})[name]
        rows.append(
            {
                "model": label,
                "attack": budget_label,
                "forget_before": round(before, 3),
                "forget_after": round(row["forget_accuracy"], 3),
                "paraphrase_after": _rounded(row.get("paraphrase_accuracy")),
                "retain_after": _rounded(row.get("retain_accuracy")),
                "passed": row["passed"],
                "attack_s": round(row["seconds"], 1),
                "erase_s": None if seconds is None else round(seconds, 1),
            }
        )
        print(f"{label} / {budget_label}: forget {before:.3f} -> {row['forget_accuracy']:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(sorted({m for m, _ in RUNS})))
    parser.add_argument("--out", type=Path, default=Path("bench/results/attacks-cpu.csv"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    chosen = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fixture = build_fixture("lm", Path(tmp) / "lm")
        spec = load_spec(fixture / "spec.toml")
        base, tokenizer = load_causal_lm(fixture), tokenizer_of(fixture)
        rows += attack_rows("base (no patch)", base, base, tokenizer, spec, None)
        for method, robust_to in [run for run in RUNS if run[0] in chosen]:
            label = f"{method} --robust-to {','.join(robust_to)}" if robust_to else method
            start = time.perf_counter()
            try:
                patch = erase(spec, fixture, method=method, robust_to=robust_to)
            except PatcherError as error:
                print(f"{label}: {error}", flush=True)
                continue
            seconds = time.perf_counter() - start
            patched = write_model_folder(fixture, Path(tmp) / f"{method}-{len(robust_to)}", patch)
            rows += attack_rows(label, load_causal_lm(patched), base, tokenizer, spec, seconds)
    write_csv(args.out, rows)
    header = ["model", "attack", "forget before", "after", "paraphrase after", "retain after", "gate", "attack s"]
    figures = ("forget_before", "forget_after", "paraphrase_after", "retain_after")
    lines = [
        [r["model"], r["attack"], *map(_cell, (r[k] for k in figures)), _verdict(r), f"{r['attack_s']:.1f}"]
        for r in rows
    ]
    print_markdown(header, lines)


if __name__ == "__main__":
    main()
