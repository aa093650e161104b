"""`patcher verify`: base and patched model in every format, graded against the spec's gates."""

from __future__ import annotations

from pathlib import Path

from patcher.families import family_of
from patcher.spec import Spec


def verify(
    base: str | Path,
    patched: str | Path,
    spec: Spec,
    formats: list[str] | None = None,
    artifacts: dict[str, Path] | None = None,
) -> dict:
    """Evaluate base and patched model in every format; the report docs/formats.md describes.

    `artifacts` maps a causal LM's format to its exported folder, graded as its consumer
    loads it; other formats are quantized or exported from `patched` on load.
    """
    base, patched = Path(base), Path(patched)
    return family_of(spec, base).verify(base, patched, spec, formats or spec.formats, artifacts)
