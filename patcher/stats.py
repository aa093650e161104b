"""Key statistics for closed-form edits: E[k kᵀ] of each down-projection's input.

Sums are accumulated in fp32 with `kernels.second_moment` and stored with the token count,
so partial sums from several runs or ranks can be added before dividing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from patcher import kernels
from patcher.adapters import CausalLMAdapter
from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.progress import progress
from patcher.tokens import pad_id, right_padded

SUFFIX = ".second_moment"
Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


@dataclass
class SecondMoments:
    """Per-module fp32 sums of k kᵀ over `token_count` tokens."""

    sums: dict[str, torch.Tensor]
    token_count: int

    def mean(self, module: str) -> torch.Tensor:
        """E[k kᵀ] in float64, the form the solvers use."""
        if module not in self.sums:
            have = ", ".join(sorted(self.sums)) or "none"
            raise PatcherError(
                f"the statistics hold no second moment for {module} (they cover: {have}): "
                "recollect them with `patcher stats --layers ...` including that layer"
            )
        return self.sums[module].double() / max(self.token_count, 1)

    def save(self, path: str | Path) -> Path:
        tensors = {f"{name}{SUFFIX}": s.contiguous() for name, s in self.sums.items()}
        metadata = {"kind": "second-moment", "token_count": str(self.token_count)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SecondMoments:
        path = Path(path)
        if not path.is_file():
            raise PatcherError(f"statistics file {path} does not exist: create it with `patcher stats`")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                sums = {n[: -len(SUFFIX)]: f.get_tensor(n) for n in f.keys() if n.endswith(SUFFIX)}  # noqa: SIM118
        except Exception as err:
            raise PatcherError(f"{path} is not a readable statistics file: {err}") from None
        if metadata.get("kind") != "second-moment" or not sums:
            raise PatcherError(f"{path} holds no second-moment statistics: create it with `patcher stats`")
        for name, s in sums.items():
            if not torch.isfinite(s).all():
                raise PatcherError(f"{path}: the statistics of {name} hold NaN or inf values")
        return cls(sums, int(metadata["token_count"]))


class _StopForward(Exception):
    """Raised by a hook once the last needed layer ran: later layers would be wasted work."""


@torch.no_grad()
def collect_second_moments(
    adapter: CausalLMAdapter, batches: Iterable[Batch], layers: list[int], total: int | None = None
) -> SecondMoments:
    """Sum k kᵀ over the non-padding tokens of `batches` at each listed layer's down-projection.

    The forward pass stops after the deepest listed layer, so statistics for early layers
    cost less than a full forward pass.
    """
    names = [adapter.down_proj_name(layer) for layer in layers]
    sums = {name: torch.zeros(adapter.key_dim, adapter.key_dim) for name in names}
    state: dict[str, torch.Tensor] = {}

    def accumulate(name: str, is_last: bool):
        def hook(module, args):
            keys = args[0][state["mask"]]
            kernels.second_moment(keys, sums[name])
            if is_last:
                raise _StopForward

        return hook

    deepest = max(layers)
    handles = [
        adapter.down_proj(layer).register_forward_pre_hook(accumulate(name, layer == deepest))
        for layer, name in zip(layers, names, strict=True)
    ]
    device = next(adapter.model.parameters()).device
    tokens = 0
    try:
        for ids, mask in progress(batches, "statistics", total=total):
            state["mask"] = mask.bool().to(device)
            tokens += int(mask.sum())
            with contextlib.suppress(_StopForward):
                adapter.model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return SecondMoments({n: s.cpu() for n, s in sums.items()}, tokens)


def corpus_batches(tokenizer, lines: list[str], batch_size: int = 32, max_length: int = 256) -> Iterator[Batch]:
    """Tokenize corpus lines (truncated to `max_length`) into right-padded batches."""
    encoded = [tokenizer(line).input_ids[:max_length] for line in lines if line.strip()]
    for start in range(0, len(encoded), batch_size):
        yield right_padded(encoded[start : start + batch_size], pad_id(tokenizer))


def read_corpus(path: str | Path) -> list[str]:
    """The non-empty lines of a corpus text file."""
    path = Path(path)
    if not path.is_file():
        raise PatcherError(f"corpus file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise PatcherError(f"corpus file {path} is empty: statistics need text")
    return lines


def stats_cache_key(model_fingerprint: str, lines: list[str], layers: list[int]) -> str:
    """A key that changes when the model, the corpus or the layer set changes."""
    digest = hashlib.sha256(model_fingerprint.encode())
    digest.update(json.dumps(layers).encode())
    digest.update("\n".join(lines).encode())
    return digest.hexdigest()[:32]
