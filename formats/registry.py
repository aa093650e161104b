"""Every shipped format, declared once per model family it applies to.

A `Target` says how one family ships in one format: how the artifact is exported, how
verify loads the model in that format, how a user loads the artifact (the model card's
line), and whether `--robust-to` can solve an edit to hold in it. Export, verify, release,
the model card and the CLI read these declarations and nothing else. Each module of
`patcher.formats` registers its own targets when imported; `targets()` imports them all,
so a new format is one new module in `formats/`.
"""

from __future__ import annotations

import importlib
import pkgutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patcher.errors import PatcherError
from patcher.formats.checkpoint import Checkpoint

if TYPE_CHECKING:
    from patcher.formats.patch import Patch

FAMILY_PLURALS = {"causal-lm": "causal LMs", "t2i-unet": "text-to-image pipelines", "classifier": "image classifiers"}


@dataclass(frozen=True)
class ExportOptions:
    force: bool = False  # apply the patch although the base fingerprints differ
    rank: int | None = None  # a LoRA export's rank (default: from the energy kept)


# (model folder, output folder, patch or None, options): writes the artifact at the output folder.
Exporter = Callable[[Path, Path, "Patch | None", ExportOptions], Any]
Loader = Callable[[Path], Any]


@dataclass(frozen=True)
class Target:
    """One format for one model family."""

    format: str
    family: str
    export: Exporter | None  # None: nothing is written; verify quantizes at load
    load: Loader | None = None  # a full-precision folder in this format, as verify grades it
    load_artifact: Loader | None = None  # an exported artifact, loaded by its own consumer
    snippet: str = ""  # how a user loads the artifact; {path} is its folder, {base} the base model
    robust: bool = False  # `--robust-to` can solve an edit to hold in it
    needs_patch: bool = False  # the artifact is the patch itself, as an adapter over the base
    # Its outputs for one request depend on the others in its batch (activation scales taken
    # over the whole batch): verify grades it per request (batch 1) and batched, on the worse.
    batch_dependent: bool = False


_TARGETS: dict[tuple[str, str], Target] = {}
_discovered = False


def register(*declared: Target) -> None:
    """Add targets; the first registration of a format fixes its place in every listing."""
    for target in declared:
        _TARGETS[(target.format, target.family)] = target


def targets() -> list[Target]:
    """Every registered target, after importing each module of `patcher.formats` once."""
    global _discovered
    if not _discovered:
        import patcher.formats as package

        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
        _discovered = True
    return list(_TARGETS.values())


def format_names(
    family: str | None = None, *, exported: bool | None = None, loaded: bool | None = None, robust: bool | None = None
) -> tuple[str, ...]:
    """Format names, in registration order, with a target that matches every filter given:
    for `family`, written by export, loadable by verify, accepted by `--robust-to`."""
    names = []
    for target in targets():
        if family is not None and target.family != family:
            continue
        if exported is not None and (target.export is not None) != exported:
            continue
        if loaded is not None and (target.load is not None) != loaded:
            continue
        if robust is not None and target.robust != robust:
            continue
        names.append(target.format)
    return tuple(dict.fromkeys(names))


def get_target(fmt: str, family: str, purpose: str = "export") -> Target:
    """The target of `fmt` for `family`, for `purpose` ("export": it writes an artifact;
    "verify": verify can load it); otherwise a one-line error naming what is supported."""
    exported = purpose == "export"

    def usable(target: Target) -> bool:
        return (target.export if exported else target.load) is not None

    def listed(of_family: str | None = None) -> tuple[str, ...]:
        return format_names(of_family, exported=True) if exported else format_names(of_family, loaded=True)

    if fmt not in listed():
        noun = "export format" if exported else "format"
        raise PatcherError(f"unknown {noun} {fmt!r}: supported formats: {', '.join(listed())}")
    target = _TARGETS.get((fmt, family))
    if target is None or not usable(target):
        holders = [t.family for t in targets() if t.format == fmt and usable(t)]
        kinds = " and ".join(FAMILY_PLURALS.get(f, f) for f in holders)
        here = ", ".join(listed(family)) or "none"
        raise PatcherError(f"{fmt} applies to {kinds}, not to a {family} model; for this model use {here}")
    return target


def whole_model(convert: Callable[[Path, Path], Any]) -> Exporter:
    """An exporter for formats that convert a full-precision folder: the patch, if any, is
    applied into a temporary folder first, so the converter sees exactly the shipped weights."""

    def export(source: Path, out: Path, patch: Patch | None, options: ExportOptions) -> None:
        if patch is None:  # write_model_folder scans a patched copy; the source is scanned here
            Checkpoint(source).refuse_non_finite()
            convert(source, out)
            return
        from patcher.formats.hf import write_model_folder

        with tempfile.TemporaryDirectory(prefix="patcher-export-") as tmp:
            convert(write_model_folder(source, Path(tmp) / "patched", patch, options.force), out)

    return export
