"""`patcher verify`: base and patched model in every format, graded against the spec's gates."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from patcher.attacks import chosen_attacks
from patcher.errors import PatcherError
from patcher.families import family_of
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import matches_fingerprint
from patcher.spec import Spec
from patcher.verification.report import read_provenance


def verify(
    base: str | Path,
    patched: str | Path,
    spec: Spec,
    formats: list[str] | None = None,
    artifacts: dict[str, Path] | None = None,
    force: bool = False,
    attacks: list[str] | None = None,
) -> dict:
    """Evaluate base and patched model in every format, then run the attacks; the report
    docs/formats.md describes.

    `artifacts` maps a causal LM's format to its exported folder, graded as its consumer
    loads it; other formats are quantized or exported from `patched` on load. A patched
    folder that `patcher apply` made from another base is refused unless `force`, and the
    report then records it (`base_mismatch`).
    """
    base, patched = Path(base), Path(patched)
    mismatch = base_mismatch(base, patched)
    if mismatch is not None:
        message = f"{patched} was patched from another model than {base} ({mismatch} differs)"
        if not force:
            raise PatcherError(f"{message}: pass the model it was patched from as --base, or --force")
        warnings.warn(f"--force: {message}", stacklevel=2)
    family = family_of(spec, base)
    spec = dataclasses.replace(spec, attacks=chosen_attacks(spec, family.name, attacks))
    report = family.verify(base, patched, spec, formats or spec.formats, artifacts)
    if mismatch is not None:
        report["base_mismatch"] = mismatch
    return report


def base_mismatch(base: Path, patched: Path) -> str | None:
    """The first edited tensor whose fingerprint in `base` is not the one the patch that made
    `patched` recorded (its `patcher.json`); None when all match or nothing is recorded."""
    provenance = read_provenance(patched)
    fingerprints = json.loads(provenance.get("base", "{}"))
    if not fingerprints:
        return None
    dtypes = json.loads(provenance.get("base_dtypes", "{}"))
    checkpoint = Checkpoint(base)
    for name, digest in fingerprints.items():
        if name not in checkpoint.shard_of:
            return name
        if not matches_fingerprint(checkpoint.tensor(name), digest, dtypes.get(name)):
            return name
    return None
