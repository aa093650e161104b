"""The verification matrix of a report, rendered as fixed-width text, Markdown or HTML.

One table in all three: the base, then each format (forget, paraphrase and retain
accuracy, retain ratio, recovery, perplexity and its change when verify measured them,
the gates' verdict), then each attack on the patched model.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

# (report key, text header, header elsewhere, text width)
ACCURACY_COLUMNS = (
    ("forget_accuracy", "forget", "forget", 8),
    ("paraphrase_accuracy", "paraphr.", "paraphrase", 10),
    ("retain_accuracy", "retain", "retain", 8),
    ("retain_ratio", "ratio", "retain ratio", 8),
    ("recovery", "recovery", "recovery", 10),
)
PERPLEXITY_COLUMNS = (("perplexity", "ppl", "ppl", 9), ("perplexity_increase", "ppl +", "ppl +", 8))


@dataclass(frozen=True)
class Row:
    label: str
    values: list[float | None]
    verdict: str  # "pass", "FAIL: reasons", or "" for the base
    passed: bool | None


def columns(report: dict) -> tuple[tuple[str, str, str, int], ...]:
    """The matrix's numeric columns: perplexity ones only when verify measured it."""
    return ACCURACY_COLUMNS + (PERPLEXITY_COLUMNS if "perplexity" in report["base"] else ())


def rows(report: dict) -> list[Row]:
    """The base, each format and each attack, in report order."""
    keys = [key for key, *_ in columns(report)]

    def verdict(row: dict) -> str:
        return "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])

    base = report["base"]
    shown = [Row("base", [base.get(k) for k in keys], "", None)]
    for name, row in report["formats"].items():
        shown.append(Row(name, [row.get(k) for k in keys], verdict(row), row["passed"]))
        for way, graded in row.get("batchings", {}).items():  # the worse of them is gated, above
            shown.append(Row(f"  {way}", [graded.get(k) for k in keys], "", None))
    for name, attack in report.get("attacks", {}).items():
        values = [attack.get(k) for k in keys]  # the figures the attack measures; blank elsewhere
        shown.append(Row(f"attack: {name}", values, verdict(attack), attack["passed"]))
    return shown


def as_text(report: dict) -> str:
    """A fixed-width table for the terminal."""
    spec = columns(report)
    header = f"{'format':<22}" + "".join(f"{text:>{width}}" for _, text, _, width in spec)
    lines = [header + "  result", "-" * (len(header) + 8)]
    for row in rows(report):
        cells = "".join(_text_cell(value, width) for value, (*_, width) in zip(row.values, spec, strict=True))
        lines.append(f"{row.label:<22}{cells}  {row.verdict or '-'}")
    return "\n".join(lines + attack_notes(report))


def attack_notes(report: dict) -> list[str]:
    """One line per attack: what it tried and with how much effort, and the figure it gates
    where that is not one of the table's columns."""
    shown = {key for key, *_ in columns(report)}
    notes = []
    for name, attack in report.get("attacks", {}).items():
        figure = gated_figure(attack)
        value = "" if figure in shown else f"; {figure} {attack[figure]:.3f} (gate {attack['max_' + figure]})"
        notes.append(f"attack {name}: {attack_note(attack)}{value}")
    return notes


def gated_figure(attack: dict) -> str:
    """The report key of the figure an attack row's gate bounds."""
    return attack.get("gated", "forget_accuracy")


def attack_note(attack: dict) -> str:
    """An attack row's description and budget."""
    budget = ", ".join(f"{key} {value}" for key, value in attack.get("budget", {}).items())
    return attack.get("description", "") + (f"; budget: {budget}" if budget else "")


def as_markdown(report: dict) -> list[str]:
    """A Markdown table, one line per list item."""
    spec = columns(report)
    lines = ["| format | " + " | ".join(name for *_, name, _ in spec) + " | gates |", "|---" * (len(spec) + 2) + "|"]
    for row in rows(report):
        verdict = row.verdict if row.passed in (True, None) else "**" + row.verdict.replace(": ", "**: ", 1)
        cells = " | ".join(_cell(value) for value in row.values)
        lines.append(f"| {row.label} | {cells} | {verdict or '–'} |")
    return lines


def as_html(report: dict) -> str:
    """An HTML table; verdicts carry the `pass` or `fail` class for the page's styles."""
    spec = columns(report)
    head = (
        "<tr><th>format</th>"
        + "".join(f"<th>{html.escape(name)}</th>" for *_, name, _ in spec)
        + "<th>gates</th></tr>"
    )
    body = []
    for row in rows(report):
        cells = "".join(f"<td>{_cell(value)}</td>" for value in row.values)
        kind = {True: "pass", False: "fail"}.get(row.passed)
        verdict = f'<span class="{kind}">{html.escape(row.verdict)}</span>' if kind else "–"
        body.append(f'<tr><td>{html.escape(row.label)}</td>{cells}<td style="text-align:left">{verdict}</td></tr>')
    notes = "".join(f"<p>{html.escape(note)}</p>" for note in attack_notes(report))
    return f"<table>{head}{''.join(body)}</table>{notes}"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _text_cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"
