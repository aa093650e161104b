"""Grading a verification: recovery, retain ratio and perplexity change against the base in
the same format, the spec's gates, and the report that collects every format's verdict."""

from __future__ import annotations

from pathlib import Path

from patcher.spec import Gates


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


# Each gated figure and the direction in which it is worse.
WORSE = {
    "forget_accuracy": max,
    "paraphrase_accuracy": max,
    "recovery": max,
    "retain_accuracy": min,
    "retain_ratio": min,
    "perplexity": max,
    "perplexity_increase": max,
}


def worst_case(graded: dict[str, dict], gates: Gates) -> dict:
    """One row for a format graded several ways (per request and batched, say): every gated
    figure at its worst over them and the verdict on those, each way's own row under `batchings`."""
    row = dict(next(iter(graded.values())))
    for key, pick in WORSE.items():
        values = [way[key] for way in graded.values() if way.get(key) is not None]
        if values:
            row[key] = pick(values)
    row["batchings"] = graded
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
