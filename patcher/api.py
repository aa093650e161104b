"""The two public entry points that are more than a re-export: apply a patch, run a release.

`import patcher` exposes these beside `load_spec`, `erase`, `Patch`, `export` and `verify`
(see `patcher/__init__.py`); each takes paths or objects, as the CLI command of the same name.
"""

from __future__ import annotations

from pathlib import Path

from patcher.formats.hf import write_model_folder
from patcher.formats.outputs import check_output
from patcher.formats.patch import Patch
from patcher.releasing.run import Release, prepare, run_release


def apply(
    model: str | Path, patch: Patch | str | Path, out: str | Path, force: bool = False, overwrite: bool = False
) -> Path:
    """Write the model folder `model` with `patch` (a Patch or a patch file) applied to `out`;
    refuses a patch computed for another model unless `force`, and an `out` that overlaps
    `model` or exists (unless `overwrite` and patcher wrote it)."""
    check_output(out, [model], overwrite)
    if not isinstance(patch, Patch):
        patch = Patch.load(patch)
    return write_model_folder(model, out, patch, force)


def release(spec: str | Path, out: str | Path) -> Release:
    """Erase, export every format, verify each and write card and report to `out`, skipping
    stages a previous run finished; `Release.report` holds the verification report. A model
    with its own code is loaded only inside `patcher.remote_code(True)`."""
    return run_release(prepare(Path(spec), Path(out)))
