"""A benchmark's rows, written as CSV for the record and printed as a Markdown table for the docs."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    """`rows` (dicts with the same keys) as a CSV file at `path`, its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_markdown(header: list[str], lines: list[list[str]]) -> None:
    """A Markdown table of `lines` (cells already formatted) under `header`."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")
