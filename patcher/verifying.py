"""`patcher verify`: base and patched model in every format, graded against the spec's gates."""

from __future__ import annotations

from pathlib import Path

from patcher.models import detect_family
from patcher.spec import Spec
from patcher.verification.classifier import verify_classifier
from patcher.verification.lm import verify_lm
from patcher.verification.pipelines import verify_pipeline


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
    base, patched, formats = Path(base), Path(patched), formats or spec.formats
    family = detect_family(base) if spec.family == "auto" else spec.family
    if family == "t2i-unet":
        return verify_pipeline(base, patched, spec, formats)
    if family == "classifier":
        return verify_classifier(base, patched, spec, formats)
    return verify_lm(base, patched, spec, formats, artifacts)
