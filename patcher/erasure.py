"""`patcher erase` as a library call: spec + model -> patch file."""

from __future__ import annotations

from pathlib import Path

from patcher.errors import PatcherError
from patcher.families import Edit, check_method_fits, family_of
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch
from patcher.methods import get_method, robust_methods
from patcher.methods.robust import Robustness
from patcher.models import resolve_model_dir
from patcher.spec import Spec


def model_dir_for(spec: Spec, model: str | Path | None) -> Path:
    """The model a command works on: the MODEL argument, else the spec's [model] path."""
    ref = model if model is not None else spec.model_path
    if ref is None:
        raise PatcherError("no model given: pass MODEL or set [model] path in the spec")
    if model is None and not Path(str(ref)).is_absolute() and (spec.folder / str(ref)).exists():
        ref = spec.folder / str(ref)
    return resolve_model_dir(ref)


def erase(
    spec: Spec,
    model: str | Path | None = None,
    method: str | None = None,
    stats: str | Path | None = None,
    robust_to: tuple[str, ...] = (),
) -> Patch:
    """Compute the patch that erases the spec's forget facts from the model.

    `robust_to` names quantized formats in which the erasure must hold too. A model with its
    own code is loaded only inside `patcher.remote_code(True)`.
    """
    folder = model_dir_for(spec, model)
    family = family_of(spec, folder)
    chosen = get_method(method or spec.method)  # every check before any work
    check_method_fits(family, chosen.name, folder)
    config = chosen.configure(spec.method_settings)
    if robust_to:
        Robustness(tuple(robust_to))
        if not chosen.robust:
            raise PatcherError(f"--robust-to works with {', '.join(robust_methods())}, not {chosen.name}")
    stats_path = None if stats is None else Path(stats)
    edit = family.edit(folder, spec, chosen, config, stats_path, tuple(robust_to))
    return _patch(folder, edit, chosen.name, spec)


def _patch(folder: Path, edit: Edit, method_name: str, spec: Spec) -> Patch:
    """The patch of the edit, with the fingerprints and stored dtypes of the base tensors."""
    checkpoint = Checkpoint(folder)
    deltas = edit.deltas
    dtypes = {name: str(checkpoint.tensor(name).dtype).removeprefix("torch.") for name in deltas}
    fingerprints = checkpoint.fingerprints(deltas)
    digest = checkpoint.model_digest()
    return Patch.from_deltas(deltas, method_name, spec.raw, fingerprints, dtypes, digest, edit.choices)
