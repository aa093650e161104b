"""`patcher verify`: erasure and retention of the base and of each format, and the gates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.hf import PROVENANCE_FILE, load_causal_lm
from patcher.formats.registry import get_target
from patcher.models import detect_family
from patcher.quantizers import dequantized_weight
from patcher.scoring import accuracy
from patcher.spec import Gates, Spec
from patcher.verification.perplexity import perplexity


def lm_metrics(model, tokenizer, spec: Spec) -> dict[str, float]:
    """Forget, paraphrase and retain accuracy (greedy, every target token) on the spec's facts,
    and perplexity on its held-out text when it names one."""
    if not spec.forget:
        raise PatcherError("the spec has no [[forget]] facts to verify")
    forget = [(f.prompt, f.target) for f in spec.forget]
    paraphrases = [(p, f.target) for f in spec.forget for p in f.paraphrases]
    retain = [(r.prompt, r.target) for r in spec.retain]
    metrics = {
        "forget_accuracy": accuracy(model, tokenizer, forget),
        "paraphrase_accuracy": accuracy(model, tokenizer, paraphrases),
        "retain_accuracy": accuracy(model, tokenizer, retain),
    }
    if spec.heldout is not None:
        metrics["perplexity"] = perplexity(model, tokenizer, heldout_text(spec))
    return metrics


def heldout_text(spec: Spec) -> str:
    if not spec.heldout.is_file():
        raise PatcherError(f"verify.heldout {spec.heldout} does not exist: give a text file the edit never saw")
    return spec.heldout.read_text()


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
    limit, paraphrase = gates.max_paraphrase_accuracy, row["paraphrase_accuracy"]
    if limit is not None and paraphrase is not None and paraphrase > limit:
        failures.append(f"paraphrase_accuracy {row['paraphrase_accuracy']:.3f} > {limit}")
    if row["recovery"] > gates.max_recovery:
        failures.append(f"recovery {row['recovery']:.3f} > {gates.max_recovery}")
    if row["retain_ratio"] < gates.min_retain_ratio:
        failures.append(f"retain_ratio {row['retain_ratio']:.3f} < {gates.min_retain_ratio}")
    limit, increase = gates.max_perplexity_increase, row.get("perplexity_increase")
    if limit is not None and increase is not None and increase > limit:
        failures.append(f"perplexity_increase {increase:.3f} > {limit}")
    return failures


def edit_kept(base_model, patched_model, edit_norms: dict[str, float]) -> dict[str, float]:
    """Per edited matrix, ‖Q(W+Δ) − Q(W)‖ / ‖Δ‖, with Q the quantizer the models were loaded with.

    1 means the format keeps the whole edit; near 0, quantization rounds it away.
    """
    if not isinstance(patched_model, torch.nn.Module):  # an onnxruntime graph: no modules to read
        return {}
    base_modules, patched_modules = dict(base_model.named_modules()), dict(patched_model.named_modules())
    kept = {}
    for param, norm in edit_norms.items():
        module = param.removesuffix(".weight")
        if module in base_modules and norm > 0 and _is_matmul(base_modules[module]):
            change = dequantized_weight(patched_modules[module]) - dequantized_weight(base_modules[module])
            kept[param] = change.norm().item() / norm
    return kept


def _is_matmul(module) -> bool:
    """Linear-like: a 2-D weight used as a matrix product (not an embedding table or a norm)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.ndim == 2 and not isinstance(module, torch.nn.Embedding)


def verify(
    base: str | Path,
    patched: str | Path,
    spec: Spec,
    formats: list[str] | None = None,
    artifacts: dict[str, Path] | None = None,
) -> dict:
    """Evaluate base and patched model in every format; the report docs/formats.md describes.

    A causal LM's format with an exported folder in `artifacts` is graded on that artifact
    as its consumer loads it; the others are quantized or exported from `patched` on load.
    """
    base, patched, formats = Path(base), Path(patched), formats or spec.formats
    family = detect_family(base) if spec.family == "auto" else spec.family
    if family == "t2i-unet":
        from patcher.verification.pipelines import verify_pipeline

        return verify_pipeline(base, patched, spec, formats)
    if family == "classifier":
        from patcher.verification.classifier import verify_classifier

        return verify_classifier(base, patched, spec, formats)
    targets = {name: get_target(name, "causal-lm", "verify") for name in formats}
    timings: dict[str, float] = {}
    provenance = read_provenance(patched)
    edited = sorted(json.loads(provenance.get("base", "{}")))
    full_base, full_patched = load_causal_lm(base), load_causal_lm(patched)
    base_params, patched_params = dict(full_base.named_parameters()), dict(full_patched.named_parameters())
    edit_norms = {p: (patched_params[p] - base_params[p]).norm().item() for p in edited if p in base_params}

    start = time.perf_counter()
    base_row = lm_metrics(full_base, tokenizer_of(base), spec)
    reference = lm_metrics(full_patched, tokenizer_of(patched), spec)
    timings["full_precision"] = round(time.perf_counter() - start, 3)
    rows = {}
    for name in formats:
        start = time.perf_counter()
        if name == "safetensors":
            row, base_in_format, quantized_base, quantized_patched = dict(reference), base_row, full_base, full_patched
        else:
            target = targets[name]
            quantized_base = target.load(base)
            if artifacts and name in artifacts:
                quantized_patched = target.load_artifact(artifacts[name])
            else:
                quantized_patched = target.load(patched)
            base_in_format = lm_metrics(quantized_base, tokenizer_of(base), spec)
            row = lm_metrics(quantized_patched, tokenizer_of(patched), spec)
        row["edit_kept"] = edit_kept(quantized_base, quantized_patched, edit_norms)
        rows[name] = graded_row(row, base_in_format, reference, base_row, spec.gates)
        timings[name] = round(time.perf_counter() - start, 3)
    return assemble_report(base, provenance.get("method", spec.method), rows, base_row, spec.gates, timings)


def graded_row(row: dict, base_in_format: dict, reference: dict, base_row: dict, gates: Gates) -> dict:
    """A format's metrics with recovery, retain ratio and the gates' verdict added."""
    row["base_in_format"] = base_in_format
    row["recovery"] = recovery(row["forget_accuracy"], reference["forget_accuracy"], base_row["forget_accuracy"])
    # Retention and perplexity compare with the base in the same format: what quantization
    # costs the unedited model is not the edit's doing (base_in_format reports it).
    base_retain = base_in_format["retain_accuracy"]
    row["retain_ratio"] = row["retain_accuracy"] / base_retain if base_retain > 0 else 0.0
    if "perplexity" in row:
        row["perplexity_increase"] = row["perplexity"] / base_in_format["perplexity"] - 1
    row["failures"] = gate_failures(row, gates)
    row["passed"] = not row["failures"]
    return row


def assemble_report(
    model: Path, method: str, rows: dict, base_row: dict, gates: Gates, timings: dict, attacks: dict | None = None
) -> dict:
    """The report dict: passed only when every format (and every attack) passes."""
    report = {
        "model": str(model),
        "method": method,
        "passed": all(row["passed"] for row in [*rows.values(), *(attacks or {}).values()]),
        "formats": rows,
        "base": {**base_row, "recovery": None, "passed": None},
        "gates": {k: v for k, v in vars(gates).items() if v is not None},
        "timings": timings,
    }
    if attacks is not None:
        report["attacks"] = attacks
    return report


def failures_by_format(report: dict) -> dict[str, list[str]]:
    """Each failing format (or attack) of a report, with its reasons."""
    rows = {**report["formats"], **report.get("attacks", {})}
    return {name: row["failures"] for name, row in rows.items() if not row["passed"]}


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def read_provenance(folder: Path) -> dict:
    """What `patcher apply` recorded about the patch that made `folder` ({} if none)."""
    path = folder / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(report: dict, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return Path(path)


def report_table(report: dict) -> str:
    """The verification matrix as a fixed-width text table."""
    base = report["base"]
    with_perplexity = "perplexity" in base
    header = f"{'format':<14}{'forget':>8}{'paraphr.':>10}{'retain':>8}{'ratio':>8}{'recovery':>10}"
    header += f"{'ppl':>9}{'ppl +':>8}" if with_perplexity else ""
    lines = [header + "  result", "-" * (len(header) + 8)]
    perplexity_cells = f"{_cell(base.get('perplexity'), 9)}{'':>8}" if with_perplexity else ""
    lines.append(
        f"{'base':<14}{_cell(base['forget_accuracy'], 8)}{_cell(base['paraphrase_accuracy'], 10)}"
        f"{_cell(base['retain_accuracy'], 8)}{'':>8}{'':>10}{perplexity_cells}  -"
    )
    for name, row in report["formats"].items():
        result = "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])
        perplexity_cells = (
            f"{_cell(row.get('perplexity'), 9)}{_cell(row.get('perplexity_increase'), 8)}" if with_perplexity else ""
        )
        lines.append(
            f"{name:<14}{_cell(row['forget_accuracy'], 8)}{_cell(row['paraphrase_accuracy'], 10)}"
            f"{_cell(row['retain_accuracy'], 8)}{_cell(row['retain_ratio'], 8)}{_cell(row['recovery'], 10)}"
            f"{perplexity_cells}  {result}"
        )
    if report.get("attacks"):
        lines.append("attacks (on the patched model in full precision):")
    for name, attack in report.get("attacks", {}).items():
        result = "pass" if attack["passed"] else "FAIL: " + "; ".join(attack["failures"])
        lines.append(f"{name:<14}{_cell(attack['forget_accuracy'], 8)}{'':>36}  {result}")
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"
