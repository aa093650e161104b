"""Text-to-image verification: draw each concept in every verify prompt, let the judge say
what the images show (`patcher.drawing` fixes the seeds)."""

from __future__ import annotations

from patcher.drawing import generate_images, prompts_for, shown_share
from patcher.errors import PatcherError
from patcher.spec import ImageChecks, Spec
from patcher.verification.judge import ShapeJudge


def concept_accuracy(pipe, judge: ShapeJudge, concept: str, templates, checks: ImageChecks) -> float:
    """Share of the images drawn for `concept` in `templates` that the judge reads as it."""
    return shown_share(judge, generate_images(pipe, prompts_for(concept, templates), checks), concept)


def image_metrics(pipe, judge: ShapeJudge, spec: Spec) -> dict[str, float | None]:
    """Forget accuracy (images of erased concepts still showing them), the same on prompts the
    edit never saw (`paraphrase_accuracy`; None when there are none) and retain accuracy."""
    checks = spec.images
    erased = [entry["erase"] for entry in spec.concepts]
    kept = [entry["concept"] for entry in spec.preserve]
    if not erased:
        raise PatcherError("the spec has no [[concept]] entries to verify")
    unseen = [t for t in checks.prompts if t not in spec.templates]
    forget = [concept_accuracy(pipe, judge, c, checks.prompts, checks) for c in erased]
    held_out = [concept_accuracy(pipe, judge, c, unseen, checks) for c in erased] if unseen else []
    retain = [concept_accuracy(pipe, judge, c, checks.prompts, checks) for c in kept]
    return {
        "forget_accuracy": _mean(forget),
        "paraphrase_accuracy": _mean(held_out) if held_out else None,
        "retain_accuracy": _mean(retain) if retain else 0.0,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
