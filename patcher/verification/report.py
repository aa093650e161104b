"""`patcher verify`: erasure and retention of the base and of each format, and the gates."""

from __future__ import annotations

import json
import time
from pathlib import Path

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.hf import PROVENANCE_FILE
from patcher.formats.quantized import dequantized_weight
from patcher.spec import Gates, Spec
from patcher.verification.facts import accuracy
from patcher.verification.formats import check_formats, load_format, load_full_precision


def fact_metrics(model, tokenizer, spec: Spec) -> dict[str, float]:
    """Forget, paraphrase and retain accuracy (greedy, every target token) on the spec's facts."""
    if not spec.forget:
        raise PatcherError("the spec has no [[forget]] facts to verify")
    forget = [(f.prompt, f.target) for f in spec.forget]
    paraphrases = [(p, f.target) for f in spec.forget for p in f.paraphrases]
    retain = [(r.prompt, r.target) for r in spec.retain]
    return {
        "forget_accuracy": accuracy(model, tokenizer, forget),
        "paraphrase_accuracy": accuracy(model, tokenizer, paraphrases),
        "retain_accuracy": accuracy(model, tokenizer, retain),
    }


def recovery(format_forget: float, patched_forget: float, base_forget: float) -> float:
    """Share of the erased knowledge that comes back in a format, clipped to [0, 1].

    1 when the full-precision patch erased nothing: there is nothing to recover from.
    """
    erased = base_forget - patched_forget
    if erased <= 0:
        return 1.0
    return min(max((format_forget - patched_forget) / erased, 0.0), 1.0)


def gate_failures(row: dict, gates: Gates) -> list[str]:
    """Human-readable reasons a format fails the spec's gates; empty when it passes."""
    failures = []
    if row["forget_accuracy"] > gates.max_forget_accuracy:
        failures.append(f"forget_accuracy {row['forget_accuracy']:.3f} > {gates.max_forget_accuracy}")
    limit = gates.max_paraphrase_accuracy
    if limit is not None and row["paraphrase_accuracy"] > limit:
        failures.append(f"paraphrase_accuracy {row['paraphrase_accuracy']:.3f} > {limit}")
    if row["recovery"] > gates.max_recovery:
        failures.append(f"recovery {row['recovery']:.3f} > {gates.max_recovery}")
    if row["retain_ratio"] < gates.min_retain_ratio:
        failures.append(f"retain_ratio {row['retain_ratio']:.3f} < {gates.min_retain_ratio}")
    return failures


def edit_kept(base_model, patched_model, edit_norms: dict[str, float]) -> dict[str, float]:
    """Per edited matrix, ‖Q(W+Δ) − Q(W)‖ / ‖Δ‖, with Q the quantizer the models were loaded with.

    1 means the format keeps the whole edit; near 0, quantization rounds it away.
    """
    base_modules, patched_modules = dict(base_model.named_modules()), dict(patched_model.named_modules())
    kept = {}
    for param, norm in edit_norms.items():
        module = param.removesuffix(".weight")
        if module in base_modules and norm > 0:
            change = dequantized_weight(patched_modules[module]) - dequantized_weight(base_modules[module])
            kept[param] = change.norm().item() / norm
    return kept


def verify(base: Path, patched: Path, spec: Spec, formats: list[str] | None = None) -> dict:
    """Evaluate base and patched model in every format; the report of DESIGN.md section 4."""
    formats = formats or spec.formats
    check_formats(formats)
    timings: dict[str, float] = {}
    provenance = _provenance(patched)
    edited = sorted(json.loads(provenance.get("base", "{}")))
    full_base, full_patched = load_full_precision(base), load_full_precision(patched)
    base_params, patched_params = dict(full_base.named_parameters()), dict(full_patched.named_parameters())
    edit_norms = {p: (patched_params[p] - base_params[p]).norm().item() for p in edited if p in base_params}

    start = time.perf_counter()
    base_row = fact_metrics(full_base, tokenizer_of(base), spec)
    reference = fact_metrics(full_patched, tokenizer_of(patched), spec)
    timings["full_precision"] = round(time.perf_counter() - start, 3)
    rows = {}
    for name in formats:
        start = time.perf_counter()
        if name == "safetensors":
            row, base_in_format, quantized_base, quantized_patched = dict(reference), base_row, full_base, full_patched
        else:
            quantized_base, quantized_patched = load_format(name, base), load_format(name, patched)
            base_in_format = fact_metrics(quantized_base, tokenizer_of(base), spec)
            row = fact_metrics(quantized_patched, tokenizer_of(patched), spec)
        row["edit_kept"] = edit_kept(quantized_base, quantized_patched, edit_norms)
        row["base_in_format"] = base_in_format
        row["recovery"] = recovery(row["forget_accuracy"], reference["forget_accuracy"], base_row["forget_accuracy"])
        base_retain = base_row["retain_accuracy"]
        row["retain_ratio"] = row["retain_accuracy"] / base_retain if base_retain > 0 else 0.0
        row["failures"] = gate_failures(row, spec.gates)
        row["passed"] = not row["failures"]
        rows[name] = row
        timings[name] = round(time.perf_counter() - start, 3)
    return {
        "model": str(base),
        "method": provenance.get("method", spec.method),
        "passed": all(row["passed"] for row in rows.values()),
        "formats": rows,
        "base": {**base_row, "recovery": None, "passed": None},
        "gates": {k: v for k, v in vars(spec.gates).items() if v is not None},
        "timings": timings,
    }


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _provenance(folder: Path) -> dict:
    path = folder / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(report: dict, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return Path(path)


def report_table(report: dict) -> str:
    """The verification matrix as a fixed-width text table."""
    header = f"{'format':<14}{'forget':>8}{'paraphr.':>10}{'retain':>8}{'ratio':>8}{'recovery':>10}  result"
    lines = [header, "-" * len(header)]
    base = report["base"]
    lines.append(
        f"{'base':<14}{base['forget_accuracy']:>8.3f}{base['paraphrase_accuracy']:>10.3f}"
        f"{base['retain_accuracy']:>8.3f}{'':>8}{'':>10}  -"
    )
    for name, row in report["formats"].items():
        result = "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])
        lines.append(
            f"{name:<14}{row['forget_accuracy']:>8.3f}{row['paraphrase_accuracy']:>10.3f}"
            f"{row['retain_accuracy']:>8.3f}{row['retain_ratio']:>8.3f}{row['recovery']:>10.3f}  {result}"
        )
    return "\n".join(lines)
