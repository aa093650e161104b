"""Model families, registered by name: what erase, verify and release do differently for a
causal LM, a text-to-image pipeline and an image classifier.

A family is one module that subclasses `Family` and registers an instance; the formats it
ships register their targets under its name in `patcher/formats/registry.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from patcher.errors import PatcherError
from patcher.models import detect_family
from patcher.spec import Spec

if TYPE_CHECKING:
    from patcher.methods import Deltas


class Family(ABC):
    """One kind of model: which methods edit it, how erase runs a method on it, how verify
    grades it, and what a release says about it."""

    name: str
    methods: tuple[str, ...]  # the methods that edit this family
    # Whether verify grades exported folders as their consumers load them (else it
    # quantizes or exports from the patched full-precision model on load).
    grades_artifacts: bool = False
    # What the card says the `paraphrase` column measured; empty when the family has none.
    paraphrase_note: str = ""
    # Whether the HTML report shows images before and after.
    shows_images: bool = False

    @abstractmethod
    def edit(
        self,
        folder: Path,
        spec: Spec,
        method: str,
        stats: Path | None,
        trust_remote_code: bool,
        robust_to: tuple[str, ...],
    ) -> Deltas:
        """Load the model in `folder` and run `method` on it: the weight deltas of the patch."""

    @abstractmethod
    def verify(
        self, base: Path, patched: Path, spec: Spec, formats: list[str], artifacts: dict[str, Path] | None
    ) -> dict:
        """Base and patched model in every format, graded against the spec's gates."""

    @abstractmethod
    def erased_items(self, spec: Spec) -> list[str]:
        """One line per erased fact, concept or class, for the model card."""


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` to the registry under its name (the spec's `[model] family`)."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise PatcherError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(spec: Spec, folder: Path) -> Family:
    """The spec's `[model] family`, or the one detected from the model folder for `auto`."""
    declared = spec.family
    return get_family(detect_family(folder) if declared == "auto" else declared)


def check_method_fits(family: Family, method: str, folder: Path) -> None:
    """A one-line error when `method` cannot edit this family of model."""
    if method not in family.methods:
        editors = "; ".join(f"{', '.join(f.methods)} edit {f.name} models" for f in FAMILIES.values())
        raise PatcherError(f"{method} cannot edit {folder}, a {family.name} model: {editors}")


# Importing the family modules registers them.
from patcher.families import causal_lm, classifier, text_to_image  # noqa: E402,F401
