"""Statistics of each edited layer's MLP down-projection, collected over a corpus.

Second moments E[k kᵀ] of its input (what closed-form edits solve with) are accumulated in
fp32 with `kernels.second_moment`; per-sample diagonal Fisher information of its weight
(what Fisher-based methods weigh parameters by) with `kernels.fisher_diag`. Both are stored
as sums with their count, so partial sums from several runs or ranks can be added before dividing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from patcher import kernels
from patcher.adapters import CausalLMAdapter
from patcher.adapters.base import per_token
from patcher.errors import PatcherError
from patcher.formats.tensorfile import read_tensors, require_file, write_tensors
from patcher.models import trainable_only
from patcher.stats.resume import Batch, BatchRun, Checkpointer
from patcher.tokens import pad_id, right_padded

SUFFIX = ".second_moment"
FISHER_SUFFIX = ".fisher"


@dataclass
class SecondMoments:
    """Per-module fp32 sums of k kᵀ over `token_count` tokens, on the device they were collected on."""

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
        tensors = {f"{name}{SUFFIX}": s for name, s in self.sums.items()}
        return write_tensors(path, tensors, {"kind": "second-moment", "token_count": str(self.token_count)})

    @classmethod
    def load(cls, path: str | Path) -> SecondMoments:
        path = require_file(path, "statistics file", "create it with `patcher stats`")
        tensors, metadata = read_tensors(path, "statistics file")
        sums = {n[: -len(SUFFIX)]: t for n, t in tensors.items() if n.endswith(SUFFIX)}
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
    adapter: CausalLMAdapter,
    batches: Iterable[Batch],
    layers: list[int],
    total: int | None = None,
    checkpointer: Checkpointer | None = None,
) -> SecondMoments:
    """Sum k kᵀ over the non-padding tokens of `batches` at each listed layer's down-projection.

    The forward pass stops after the deepest listed layer, so statistics for early layers
    cost less than a full forward pass. A `checkpointer` resumes from and saves partial sums.
    """
    names = [adapter.down_proj_name(layer) for layer in layers]
    device = next(adapter.model.parameters()).device
    sums = {name: torch.zeros(adapter.key_dim, adapter.key_dim, device=device) for name in names}
    state: dict[str, torch.Tensor] = {}

    def accumulate(name: str, is_last: bool):
        def hook(module, args):
            keys = per_token(args[0], len(state["mask"]))[state["mask"]]
            kernels.second_moment(keys, sums[name], upper_only=True)
            if is_last:
                raise _StopForward

        return hook

    deepest = max(layers)
    handles = [
        adapter.down_proj(layer).register_forward_pre_hook(accumulate(name, layer == deepest))
        for layer, name in zip(layers, names, strict=True)
    ]
    run = BatchRun(batches, sums, checkpointer, "statistics", total)
    try:
        for ids, mask in run:
            state["mask"] = mask.bool().to(device)
            with contextlib.suppress(_StopForward):
                adapter.model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return SecondMoments({n: kernels.mirror_upper(s) for n, s in sums.items()}, run.done.tokens)


@dataclass
class FisherDiagonals:
    """Per-module fp32 sums over `sample_count` samples of each sample's squared loss gradient,
    in the weight's own layout."""

    sums: dict[str, torch.Tensor]
    sample_count: int  # what sums / sample_count averages over: samples, or batches for fisher-batch-mean
    kind: str = "fisher"  # or "fisher-batch-mean": squared batch-mean gradients (SSD's code)

    def save(self, path: str | Path) -> Path:
        tensors = {f"{name}{FISHER_SUFFIX}": s for name, s in self.sums.items()}
        return write_tensors(path, tensors, {"kind": self.kind, "sample_count": str(self.sample_count)})


def collect_fisher(
    adapter: CausalLMAdapter,
    batches: Iterable[Batch],
    layers: list[int],
    total: int | None = None,
    batch_mean: bool = False,
    checkpointer: Checkpointer | None = None,
) -> FisherDiagonals:
    """Σ_n (∂ℓ_n/∂W)² for each listed layer's down-projection weight W, exact per sample.

    ℓ_n is sample n's mean next-token NLL. The batch loss is the sum of the ℓ_n, so the
    gradient at each output position belongs to one sample; a hook pairs it with the
    module's saved input and `kernels.fisher_diag` squares each sample's gradient without
    materialising it. Only these weights require grad while collecting.

    `batch_mean` computes what SSD's public code does instead, Σ_k (∂ℓ̄_k/∂W)² with ℓ̄_k
    batch k's mean loss, counted in batches: sums / sample_count is SSD's importance
    (1/K) Σ_k (∂ℓ̄_k/∂W)² whatever the batch sizes, and the per-sample mean only when every
    gradient of a batch agrees. A `checkpointer` resumes from and saves partial sums.
    """
    model = adapter.model
    modules = {adapter.down_proj_name(layer): adapter.down_proj(layer) for layer in layers}
    device = next(model.parameters()).device
    sums = {name: torch.zeros(adapter.model_dim, adapter.key_dim, device=device) for name in modules}
    batch_sums = {name: torch.zeros_like(total_) for name, total_ in sums.items()}
    batch = {"size": 0}

    def track(name: str):
        def hook(module, args, output):
            inputs = per_token(args[0].detach(), batch["size"])

            def accumulate(grad: torch.Tensor) -> None:
                grad = per_token(grad, batch["size"])
                if batch_mean:  # the batch's summed gradient; squared once the batch is done
                    batch_sums[name] += torch.einsum("bto,bti->oi", grad.float(), inputs.float())
                else:
                    kernels.fisher_diag(inputs, grad, sums[name])

            output.register_hook(accumulate)

        return hook

    run = BatchRun(batches, sums, checkpointer, "fisher", total)
    handles = [module.register_forward_hook(track(name)) for name, module in modules.items()]
    try:
        with trainable_only(model, [module.weight for module in modules.values()]):
            for ids, mask in run:
                ids, mask = ids.to(device), mask.to(device)
                batch["size"] = len(ids)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                targets, counted = ids[:, 1:], mask[:, 1:].float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                per_sample = (nll * counted).sum(1) / counted.sum(1).clamp(min=1)
                per_sample.sum().backward()
                in_batch = int((counted.sum(1) > 0).sum())
                if batch_mean:
                    for name, summed in batch_sums.items():
                        sums[name] += (summed / max(in_batch, 1)).square()  # (Σ g / B_k)²
                        summed.zero_()
    finally:
        for handle in handles:
            handle.remove()
    kind, count = ("fisher-batch-mean", run.done.batches) if batch_mean else ("fisher", run.done.samples)
    return FisherDiagonals({name: adapter.to_param_layout(s) for name, s in sums.items()}, count, kind)


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
