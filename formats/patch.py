"""The patch file: weight deltas in safetensors, with the base model's fingerprints.

Tensors are named `<param>.delta` (dense, in the parameter's own layout) or
`<param>.lora_A` / `<param>.lora_B` (low rank, delta = B @ A). `__metadata__` holds string
values only: `patcher_version`, `method`, `spec` (JSON), `base` (JSON: param -> sha256 of
the base tensor's bytes), `base_dtypes` (JSON: param -> stored dtype), `tensors_sha256`
(JSON: patch tensor -> sha256 of its own bytes, so a corrupted file is refused),
`base_model` (the base's whole-model digest, `Checkpoint.model_digest`), `choices` (JSON:
what erase chose where the spec left it open, `describe_choices`) and `created`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.checkpoint import safetensors_header, tensor_sha256
from patcher.formats.tensorfile import read_tensors, require_file, write_tensors

SUFFIXES = (".delta", ".lora_A", ".lora_B")
REQUIRED_METADATA = ("patcher_version", "method", "spec", "base", "created")
JSON_METADATA = ("spec", "base", "base_dtypes", "tensors_sha256", "choices")
# A delta this many times its weight's norm is a corrupt patch or another model's, whatever
# the fingerprints say. Real edits stay far below it: MEMIT's default erase of the LM
# fixture, whose weights are small, moves one projection by 11 times its norm.
MAX_RELATIVE_DELTA = 1000.0
# The largest dense delta a low-rank pair may declare: 2^32 elements (16 GiB in fp32), far
# above any model's largest projection (Llama-3-70B's MLP: 2.3e8), so a corrupt header
# cannot make apply or inspect allocate terabytes.
MAX_DELTA_ELEMENTS = 2**32


@dataclass(frozen=True)
class LowRankDelta:
    """A delta stored as its factors, delta = b @ a, in the parameter's own layout."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)


class PatchError(PatcherError):
    """A patch file that cannot be read, or a patch that does not fit the model."""


@dataclass
class Patch:
    """Weight deltas for named parameters, plus what they were computed for."""

    tensors: dict[str, torch.Tensor]
    method: str
    spec: dict
    base: dict[str, str]
    base_dtypes: dict[str, str] = field(default_factory=dict)
    base_model: str = ""  # whole-model digest of the base; empty in patches from before it existed
    choices: dict = field(default_factory=dict)  # what erase chose itself: `describe_choices`
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    patcher_version: str = ""

    def __post_init__(self) -> None:
        if not self.patcher_version:
            from patcher import __version__

            self.patcher_version = __version__
        _check_tensors(self.tensors, self.base)

    @classmethod
    def from_deltas(
        cls,
        deltas: dict[str, torch.Tensor | LowRankDelta],
        method: str,
        spec: dict,
        base: dict[str, str],
        base_dtypes: dict[str, str] | None = None,
        base_model: str = "",
        choices: dict | None = None,
    ) -> Patch:
        """A patch of `<param>.delta` tensors, or `<param>.lora_A` / `.lora_B` pairs for low-rank deltas."""

        def stored(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float().contiguous().cpu()

        tensors = {}
        for name, delta in deltas.items():
            if isinstance(delta, LowRankDelta):
                tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = stored(delta.a), stored(delta.b)
            else:
                tensors[f"{name}.delta"] = stored(delta)
        return cls(tensors, method, spec, base, base_dtypes or {}, base_model, choices or {})

    @property
    def params(self) -> list[str]:
        """The parameter names this patch changes."""
        return sorted({name.rsplit(".", 1)[0] for name in self.tensors})

    def delta(self, param: str) -> torch.Tensor:
        """The dense fp32 delta of one parameter (B @ A for a low-rank entry)."""
        if f"{param}.delta" in self.tensors:
            return self.tensors[f"{param}.delta"]
        return self.tensors[f"{param}.lora_B"] @ self.tensors[f"{param}.lora_A"]

    def rank(self, param: str) -> int | None:
        """The stored rank of a low-rank entry; None for a dense delta."""
        lora_a = self.tensors.get(f"{param}.lora_A")
        return None if lora_a is None else lora_a.shape[0]

    def check_shape(self, param: str, tensor: torch.Tensor) -> None:
        """Refuse a tensor whose shape is not the delta's: a delta is never broadcast, even under --force."""
        if tuple(tensor.shape) != tuple(self.delta(param).shape):
            raise PatchError(
                f"{param} has shape {tuple(tensor.shape)} but the patch's delta has "
                f"{tuple(self.delta(param).shape)}: this patch was made for another model"
            )

    def check_base(self, param: str, tensor: torch.Tensor) -> None:
        """Refuse a base tensor whose fingerprint differs from the one the patch was made on.

        A tensor loaded in another dtype than stored is cast back first; upcasting is exact,
        so the bytes match when the values do.
        """
        self.check_shape(param, tensor)
        if not matches_fingerprint(tensor, self.base[param], self.base_dtypes.get(param)):
            raise PatchError(
                f"{param} differs from the base this patch was computed for "
                "(fingerprint mismatch): apply it to its own base model, or pass --force"
            )

    @torch.no_grad()
    def apply_to(self, model: torch.nn.Module, force: bool = False) -> torch.nn.Module:
        """Add every delta to the model's parameters in place; checks shapes and fingerprints first."""
        params = dict(model.named_parameters())
        missing = [p for p in self.params if p not in params]
        if missing:
            raise PatchError(f"the model has no parameter {missing[0]!r}: this patch is for another model")
        for name in self.params:
            if force:
                self.check_shape(name, params[name])
            else:
                self.check_base(name, params[name])
        for name in self.params:
            param = params[name]
            param.copy_(self.patched(name, param, force))
        return model

    def patched(self, param: str, tensor: torch.Tensor, force: bool = False) -> torch.Tensor:
        """`tensor` + the delta of `param`, in the tensor's dtype. Refuses, unless `force`, a
        result that is not finite there (an fp16 weight overflows past 65504) or a delta many
        times the weight: both mean a corrupt patch or one made for another model."""
        self.check_shape(param, tensor)
        delta = self.delta(param).to(tensor.device)
        updated = (tensor.float() + delta).to(tensor.dtype)
        problem = None
        weight_norm, delta_norm = tensor.float().norm().item(), delta.norm().item()
        if not torch.isfinite(updated).all():
            dtype, largest = str(tensor.dtype).removeprefix("torch."), delta.abs().max().item()
            problem = f"adding the patch to {param} gives inf or NaN in {dtype} (largest |delta| {largest:.3g})"
        elif weight_norm > 0 and delta_norm > MAX_RELATIVE_DELTA * weight_norm:
            problem = f"the patch's delta for {param} is {delta_norm / weight_norm:.3g} times the weight's norm"
        if problem and not force:
            raise PatchError(f"{problem}: the patch is corrupt or for another model (--force applies it anyway)")
        if problem:
            warnings.warn(f"--force: {problem}", stacklevel=2)
        return updated

    def metadata(self) -> dict[str, str]:
        return {
            "patcher_version": self.patcher_version,
            "method": self.method,
            "spec": json.dumps(self.spec, sort_keys=True),
            "base": json.dumps(self.base, sort_keys=True),
            "base_dtypes": json.dumps(self.base_dtypes, sort_keys=True),
            "base_model": self.base_model,
            "choices": json.dumps(self.choices, sort_keys=True),
            "tensors_sha256": json.dumps({n: tensor_sha256(t) for n, t in self.tensors.items()}, sort_keys=True),
            "created": self.created,
        }

    def save(self, path: str | Path) -> Path:
        """Write the patch atomically: a crash never leaves a partial file at `path`."""
        return write_tensors(path, self.tensors, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read and validate a patch file; any defect is a one-line PatchError."""
        path = require_file(path, "patch file", "", PatchError)
        _check_header(path)
        tensors, metadata = read_tensors(path, "patch file", PatchError)
        fields = _parse_metadata(path, metadata)
        digests = fields.pop("tensors_sha256")
        patch = cls(tensors=tensors, **fields)
        _check_digests(path, tensors, digests)
        return patch


def describe_choices(choices: dict) -> list[str]:
    """A line per choice erase made itself: `layers` (the layers edited, when the spec said
    "auto" or a list) and `calibration` (each rung's settings, whether it erased every fact
    and the share of the seen retain facts it kept; `chosen` indexes the rung kept)."""
    lines = []
    if "layers" in choices:
        lines.append(f"layers {', '.join(map(str, choices['layers']))}")
    trace = choices.get("calibration")
    if trace:
        rung = trace["rungs"][trace["chosen"]]
        settings = ", ".join(f"{key} {value:g}" for key, value in rung.items() if key not in ("erased", "kept"))
        lines.append(
            f"calibration rung {trace['chosen'] + 1} of {len(trace['rungs'])} ({settings}): it kept "
            f"{rung['kept']:.3f} of the {trace['seen_retain_facts']} retain facts erase sees "
            f"(gate {trace['retain_gate']:g})"
        )
    return lines


def matches_fingerprint(tensor: torch.Tensor, digest: str, stored_dtype: str | None) -> bool:
    """Whether `tensor`, cast back to the dtype it was stored in (upcasting is exact), has the
    fingerprint a patch recorded for its base."""
    if stored_dtype is not None:
        tensor = tensor.to(getattr(torch, stored_dtype))
    return tensor_sha256(tensor) == digest


class _DuplicateName(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateName(key)
        seen[key] = value
    return seen


def _check_header(path: Path) -> None:
    """What safetensors itself lets through or words vaguely: a header length past the end
    of the file, and a tensor name given twice (safetensors keeps the last silently)."""
    try:
        header, _ = safetensors_header(path)
    except ValueError as err:
        raise PatchError(f"{path} is not a readable patch file (truncated or corrupt?): {err}") from None
    try:
        json.loads(header, object_pairs_hook=_refuse_duplicates)
    except _DuplicateName as duplicate:
        raise PatchError(f"{path}: tensor {duplicate.args[0]!r} appears twice in the header") from None
    except ValueError:  # not JSON (or not UTF-8): safe_open names the defect
        pass


def _parse_metadata(path: Path, metadata: dict[str, str]) -> dict:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise PatchError(f"{path} lacks patch metadata {missing[0]!r}: it was not written by patcher")
    parsed: dict = {key: metadata[key] for key in ("patcher_version", "method", "created")}
    parsed["base_model"] = metadata.get("base_model", "")
    for key in JSON_METADATA:
        try:
            parsed[key] = json.loads(metadata.get(key, "{}"))
        except json.JSONDecodeError:
            raise PatchError(f"{path}: metadata {key!r} is not valid JSON") from None
        except RecursionError:
            raise PatchError(f"{path}: metadata {key!r} is nested too deeply to be a patch's") from None
        if not isinstance(parsed[key], dict):
            raise PatchError(f"{path}: metadata {key!r} must be a JSON object")
    for param, dtype in parsed["base_dtypes"].items():
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise PatchError(f"{path}: base_dtypes names {dtype!r} for {param!r}, which is not a torch dtype")
    return parsed


def _check_digests(path: Path, tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> None:
    """Each tensor's bytes against the digest written with it (patches from before digests have none)."""
    if not digests:
        return
    if set(digests) != set(tensors):
        raise PatchError(f"{path}: its tensors are not the ones it was written with (names differ from its digests)")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != digests[name]:
            raise PatchError(f"{path}: the bytes of {name} differ from its digest: the file is corrupt, recompute it")


def _check_tensors(tensors: dict[str, torch.Tensor], base: dict[str, str]) -> None:
    if not tensors:
        raise PatchError("the patch holds no tensors")
    for name, tensor in tensors.items():
        if not name.endswith(SUFFIXES):
            raise PatchError(f"patch tensor {name!r} must end in one of {', '.join(SUFFIXES)}")
        if not tensor.is_floating_point():
            raise PatchError(f"patch tensor {name!r} has dtype {tensor.dtype}; deltas are floating point")
        if not torch.isfinite(tensor).all():
            raise PatchError(f"patch tensor {name!r} holds NaN or inf values")
    for name in tensors:
        param, kind = name.rsplit(".", 1)
        if kind == "delta" and (f"{param}.lora_A" in tensors or f"{param}.lora_B" in tensors):
            raise PatchError(f"{param} has both a dense delta and a low-rank pair")
        if kind in ("lora_A", "lora_B"):
            other = f"{param}.lora_B" if kind == "lora_A" else f"{param}.lora_A"
            if other not in tensors:
                raise PatchError(f"{name} has no matching {other}")
        if param not in base:
            raise PatchError(f"the patch has no base fingerprint for {param}")
    for name, a in tensors.items():
        if name.endswith(".lora_A"):
            b = tensors[name[: -len("lora_A")] + "lora_B"]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise PatchError(f"{name}: lora_B @ lora_A shapes {tuple(b.shape)} x {tuple(a.shape)} do not chain")
            if a.shape[0] == 0:
                raise PatchError(f"{name} has rank 0: a low-rank pair must hold at least one factor")
            if b.shape[0] * a.shape[1] > MAX_DELTA_ELEMENTS:
                raise PatchError(
                    f"{name} declares a {b.shape[0]} x {a.shape[1]} delta, more than any model's matrix: "
                    "the file is corrupt"
                )
