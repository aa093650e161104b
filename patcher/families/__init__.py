"""Model families, registered by name: what erase, verify and release do differently for a
causal LM, a text-to-image pipeline and an image classifier.

A family is one module that subclasses `Family` and registers an instance; the formats it
ships register their targets under its name in `patcher/formats/registry.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from patcher.errors import PatcherError
from patcher.methods import METHODS, Deltas, Method
from patcher.models import detect_family
from patcher.spec import Spec


@dataclass
class Edit:
    """A family's edit: the weight deltas, and what erase chose where the spec left it open
    (the patch's `choices` metadata: `patcher.formats.patch.describe_choices`)."""

    deltas: Deltas
    choices: dict = field(default_factory=dict)


class Family(ABC):
    """One kind of model: which methods edit it, how erase runs a method on it, how verify
    grades it, and what a release says about it."""

    name: str
    # Whether verify grades exported folders as their consumers load them (else it
    # quantizes or exports from the patched full-precision model on load).
    grades_artifacts: bool = False
    # What the card says the `paraphrase` column measured; empty when the family has none.
    paraphrase_note: str = ""
    # Whether the HTML report shows images before and after.
    shows_images: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        """The registered methods that declare they edit this family."""
        return tuple(name for name, method in METHODS.items() if self.name in method.families)

    @abstractmethod
    def edit(
        self,
        folder: Path,
        spec: Spec,
        method: Method,
        config: object,
        stats: Path | None,
        robust_to: tuple[str, ...],
    ) -> Edit:
        """Load the model in `folder` and run `method` with `config` (its settings) on it:
        the weight deltas of the patch, named as the checkpoint files name the tensors
        (`patcher.models.in_checkpoint_names`), and the choices made on the way."""

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


# Importing every module of this package registers its families: a new family is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
