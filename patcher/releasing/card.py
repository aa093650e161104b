"""The release's model card (README.md): base and fingerprint, what was erased, method and
hyperparameters, the verification matrix with recovery per format, the attacks tried, and
how to load each artifact with its own library."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from patcher.formats.patch import Patch, describe_choices
from patcher.formats.registry import get_target
from patcher.verification import matrix
from patcher.verification.grading import failures_by_format

if TYPE_CHECKING:
    from patcher.releasing.run import Release


def erased_items(release: Release) -> list[str]:
    """One line per erased fact, concept or class."""
    return release.family.erased_items(release.spec)


def attacks(release: Release) -> list[str]:
    """What was tried to bring the erased knowledge back, and what came back."""
    report = release.report
    quantized = [f for f in report["formats"] if f != "safetensors"]
    lines = [
        f"- Quantization and re-export, a known way to undo an erasure: {', '.join(quantized) or 'none'}. "
        "`recovery` is the share of the erased knowledge that comes back in each (0: none, 1: all)."
    ]
    if release.family.paraphrase_note:
        lines.append(f"- {release.family.paraphrase_note}")
    for name, attack in report.get("attacks", {}).items():
        verdict = "pass" if attack["passed"] else "**FAIL**: " + "; ".join(attack["failures"])
        figure = matrix.gated_figure(attack)
        lines.append(f"- `{name}` attack ({matrix.attack_note(attack)}): "
                     f"{figure.replace('_', ' ')} {attack[figure]:.3f} after it, {verdict}.")  # fmt: skip
    if release.robust_to:
        lines.append(f"- The edit was solved to hold under {', '.join(release.robust_to)} (`--robust-to`).")
    return lines


def load_line(release: Release, fmt: str, artifact: Path) -> str:
    """The line of code that loads the artifact of `fmt` with its own library."""
    snippet = get_target(fmt, release.family.name).snippet
    return snippet.format(path=artifact.relative_to(release.out), base=release.base)


def model_card(release: Release) -> str:
    """The README.md of the release folder."""
    spec, report = release.spec, release.report
    verdict = "passed every gate" if report["passed"] else "FAILED: " + ", ".join(failures_by_format(report))
    settings = spec.method_settings.items()
    hparams = ", ".join(f"`{k} = {v}`" for k, v in sorted(settings)) or "the method's defaults"
    loading = [f"- `{fmt}`: `{load_line(release, fmt, path)}`" for fmt, path in release.artifacts.items()]
    lines = [
        f"# {release.base.name}, patched: {len(erased_items(release))} item(s) erased with {spec.method}",
        "",
        f"Release verdict: **{verdict}**. Machine-readable: `report.json`; with plots: `report.html`.",
        "",
        "## Base model",
        "",
        f"- `{release.base}` ({release.family.name})",
        f"- fingerprint (sha256 over every weight tensor): `{report.get('base_fingerprint', 'not recorded')}`",
        "",
        "## What was erased",
        "",
        *(f"- {item}" for item in erased_items(release)),
        "",
        "## Method",
        "",
        f"- `{spec.method}` with {hparams}; layers `{spec.layers}`.",
        *(f"- Erase chose {line}." for line in describe_choices(Patch.load(release.patch_path).choices)),
        f"- Patch: `{release.patch_path.name}` (weight deltas with the base tensors' fingerprints).",
        "",
        "## Verification",
        "",
        f"Gates: {', '.join(f'{k} {v}' for k, v in report['gates'].items())}.",
        "",
        *matrix.as_markdown(report),
        "",
        "## Attacks tried",
        "",
        *attacks(release),
        "",
        "## Loading the artifacts",
        "",
        "From this folder, each with its own library (no patcher needed):",
        "",
        *loading,
        "",
    ]
    return "\n".join(lines)
