"""Every method against every attack on a fixture, at stated budgets.

    python bench/attacks.py [--methods memit,alphaedit,...] [--out bench/results/attacks-cpu.csv]
    python bench/attacks.py --family classifier [--out bench/results/attacks-classifier-cpu.csv]
    python bench/attacks.py --family diffusion [--out bench/results/attacks-diffusion-cpu.csv]

On the LM fixture, each method erases the fixture's spec (plain, and MEMIT and AlphaEdit
also with `--robust-to int8,nf4,fp4`), the patch is applied, and each attack runs on the
patched model as `patcher verify --attacks` runs it: relearning at its default budget and
at a larger one, the soft-prompt attack and the probe. On the classifier fixture, SSD at
the spec's settings and at a milder α, and gradient ascent as a reference erasure, meet
relearning on the retained classes (default and larger budgets) and the membership test.
On the diffusion fixture, UCE and RECE (at the spec's 120 rounds and at 40) meet the
inversion and the tuned prompt embedding (default and larger budgets), judged on the
spec's 4 prompts × 8 seeds. The base model is attacked too, as the reference an attack must not damage. Prints a
Markdown table (the figures after the attack, the gate's verdict) and writes it as CSV.
"""

from __future__ import annotations

import argparse
import dataclasses
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
# (label, spec overrides of [erase]) for SSD on the classifier fixture
CLASSIFIER_RUNS = [("ssd (spec: ssd_alpha 2)", {}), ("ssd, ssd_alpha 5", {"ssd_alpha": 5.0})]
# (label, attack, its [attacks.<name>] table)
CLASSIFIER_BUDGETS = [
    ("relearn_classes (default)", "relearn_classes", {}),
    ("relearn_classes (100 steps)", "relearn_classes", {"steps": 100}),
    ("membership (default)", "membership", {}),
]
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


def _table_lines(rows: list[dict], figures: tuple[str, ...]) -> list[list[str]]:
    """Each row's model, attack, `figures`, verdict and attack seconds, as table cells."""
    return [[r["model"], r["attack"], *map(_cell, (r[k] for k in figures)), _verdict(r), f"{r['attack_s']:.1f}"]
            for r in rows]  # fmt: skip


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


def classifier_rows(label: str, model, base, spec, before: float) -> list[dict]:
    """One row per classifier attack budget: its figures on `model`."""
    rows = []
    for budget_label, name, table in CLASSIFIER_BUDGETS:
        row = run_attacks(AttackInputs(base, model, None, spec), {name: table})[name]
        rows.append(
            {
                "model": label,
                "attack": budget_label,
                "forget_before": round(before, 3),
                "forget_after": _rounded(row.get("forget_accuracy")),
                "retain_after": _rounded(row.get("retain_accuracy")),
                "membership_advantage": _rounded(row.get("membership_advantage")),
                "base_membership_advantage": _rounded(row.get("base_membership_advantage")),
                "passed": row["passed"],
                "attack_s": round(row["seconds"], 1),
            }
        )
        print(f"{label} / {budget_label}: {row['gated']} {row[row['gated']]:.3f}", flush=True)
    return rows


GA_LABEL = "gradient ascent, 30 SGD steps at lr 1e-3 (reference)"


def _gradient_ascent(model, images, steps: int = 30, lr: float = 1e-3):
    """A copy of `model` after `steps` SGD steps up the cross-entropy of `images` (64 a step)."""
    import copy

    import torch
    import torch.nn.functional as F

    ascended = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(ascended.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(images), (64,), generator=generator)
        loss = -F.cross_entropy(ascended(pixel_values=images.pixel_values[batch]).logits, images.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return ascended.eval()


def run_classifier(tmp: Path) -> tuple[list[dict], list[str], list[list[str]]]:
    """SSD on the classifier fixture against relearning and membership inference."""
    from patcher.imagesets import ImageSet, top1_accuracy
    from patcher.models import load_classifier

    fixture = build_fixture("classifier", tmp / "classifier")
    spec = load_spec(fixture / "spec.toml")
    forget = ImageSet.load(spec.eval_data).of_classes(spec.forget_classes)
    base = load_classifier(fixture)
    rows = classifier_rows("base (no patch)", base, base, spec, top1_accuracy(base, forget))
    # The reference a relearning attack must catch: gradient ascent on the forget class's
    # training images (not a patcher method), which zeroes it while keeping the others.
    ascended = _gradient_ascent(base, ImageSet.load(spec.stats_data).of_classes(spec.forget_classes))
    rows += classifier_rows(GA_LABEL, ascended, base, spec, top1_accuracy(ascended, forget))
    for index, (label, overrides) in enumerate(CLASSIFIER_RUNS):
        run_spec = dataclasses.replace(spec, method_settings={**spec.method_settings, **overrides})
        patched = load_classifier(write_model_folder(fixture, tmp / f"ssd-{index}", erase(run_spec, fixture)))
        rows += classifier_rows(label, patched, base, spec, top1_accuracy(patched, forget))
    header = ["model", "attack", "forget before", "forget after", "retain after", "membership adv.", "gate"]
    header.append("attack s")
    figures = ("forget_before", "forget_after", "retain_after", "membership_advantage")
    lines = _table_lines(rows, figures)
    return rows, header, lines


# (label, method, spec overrides of [erase]) on the diffusion fixture
DIFFUSION_RUNS = [
    ("uce", "uce", {}),
    ("rece (spec: 120 rounds)", "rece", {}),
    ("rece, 40 rounds", "rece", {"rece_rounds": 40}),
]
DIFFUSION_BUDGETS = [
    ("inversion (default)", "inversion", {}),
    ("prompt_embedding (default)", "prompt_embedding", {}),
    ("prompt_embedding (200 steps)", "prompt_embedding", {"steps": 200}),
]


def run_diffusion(tmp: Path) -> tuple[list[dict], list[str], list[list[str]]]:
    """UCE and RECE on the diffusion fixture against the pipeline attacks."""
    from patcher.models import load_pipeline
    from patcher.verification.images import image_metrics
    from patcher.verification.judge import ShapeJudge

    fixture = build_fixture("diffusion", tmp / "diffusion")
    spec = load_spec(fixture / "spec.toml")
    judge = ShapeJudge.load(fixture / "judge")
    base = load_pipeline(fixture)
    models = [("base (no patch)", base, None)]
    for index, (label, method, overrides) in enumerate(DIFFUSION_RUNS):
        run_spec = dataclasses.replace(spec, method_settings={**spec.method_settings, **overrides})
        start = time.perf_counter()
        patch = erase(run_spec, fixture, method=method)
        seconds = time.perf_counter() - start
        models.append((label, load_pipeline(write_model_folder(fixture, tmp / f"{method}-{index}", patch)), seconds))
    rows = []
    for label, pipe, seconds in models:
        before = image_metrics(pipe, judge, spec)
        for budget_label, name, table in DIFFUSION_BUDGETS:
            row = run_attacks(AttackInputs(base, pipe, None, spec, judge), {name: table})[name]
            rows.append(
                {
                    "model": label,
                    "attack": budget_label,
                    "forget_before": round(before["forget_accuracy"], 3),
                    "retain_before": round(before["retain_accuracy"], 3),
                    "forget_after": round(row["forget_accuracy"], 3),
                    "passed": row["passed"],
                    "attack_s": round(row["seconds"], 1),
                    "erase_s": None if seconds is None else round(seconds, 1),
                }
            )
            print(f"{label} / {budget_label}: forget {before['forget_accuracy']:.3f} -> {row['forget_accuracy']:.3f}")
    header = ["model", "attack", "forget before", "retain before", "forget after", "gate", "attack s"]
    figures = ("forget_before", "retain_before", "forget_after")
    lines = _table_lines(rows, figures)
    return rows, header, lines


def run_lm(tmp: Path, chosen: list[str]) -> tuple[list[dict], list[str], list[list[str]]]:
    """Every chosen causal-LM method on the LM fixture against every LM attack budget."""
    rows = []
    fixture = build_fixture("lm", tmp / "lm")
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
        patched = write_model_folder(fixture, tmp / f"{method}-{len(robust_to)}", patch)
        rows += attack_rows(label, load_causal_lm(patched), base, tokenizer, spec, seconds)
    header = ["model", "attack", "forget before", "after", "paraphrase after", "retain after", "gate", "attack s"]
    figures = ("forget_before", "forget_after", "paraphrase_after", "retain_after")
    lines = _table_lines(rows, figures)
    return rows, header, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("lm", "classifier", "diffusion"), default="lm")
    parser.add_argument("--methods", default=",".join(sorted({m for m, _ in RUNS})), help="LM methods to run")
    parser.add_argument("--out", type=Path, help="CSV (default: bench/results/attacks[-classifier]-cpu.csv)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        if args.family == "lm":
            rows, header, lines = run_lm(Path(tmp), args.methods.split(","))
        elif args.family == "classifier":
            rows, header, lines = run_classifier(Path(tmp))
        else:
            rows, header, lines = run_diffusion(Path(tmp))
    suffix = "" if args.family == "lm" else f"-{args.family}"
    write_csv(args.out or Path(f"bench/results/attacks{suffix}-cpu.csv"), rows)
    print_markdown(header, lines)


if __name__ == "__main__":
    main()
