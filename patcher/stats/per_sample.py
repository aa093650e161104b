"""Per-sample diagonal Fisher of any module's parameters: Σ_n (∂ℓ_n/∂θ)², exact per sample.

`torch.func` vmaps one sample's gradient over a chunk of samples, so memory holds
`chunk_size` gradients at a time, never the whole data set's. This is the general path
(convolutions, batch norm, any layer); `patcher.stats.collect_fisher` is the fast path for
linear layers, which squares per-sample gradients without forming them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from patcher.progress import progress

# (call, *one sample) -> scalar loss; `call(**inputs)` runs the model on a batch of one.
SampleLoss = Callable[..., torch.Tensor]


def per_sample_fisher(
    model: torch.nn.Module,
    sample_loss: SampleLoss,
    data: tuple[torch.Tensor, ...],
    names: list[str] | None = None,
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Σ over the samples (rows of the `data` tensors) of each parameter's squared loss gradient.

    `names` limits the parameters (default: every floating-point parameter). The model
    should be in eval mode: batch norm then uses its running statistics, so one sample's
    loss does not depend on the others.
    """
    chosen = set(names) if names is not None else None
    params = {n: p.detach() for n, p in model.named_parameters() if chosen is None or n in chosen}
    if chosen is not None and len(params) != len(chosen):
        raise ValueError(f"the model has no parameters named {sorted(chosen - set(params))}")
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def loss(trained: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        def call(**inputs):
            return functional_call(model, ({**trained, **frozen}, buffers), kwargs=inputs)

        return sample_loss(call, *sample)

    gradients = vmap(grad(loss), in_dims=(None, *(0,) * len(data)))
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = len(data[0])
    with warnings.catch_warnings():  # vmap falls back to a loop for some kernels (CPU attention); it says so
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        for start in progress(range(0, count, chunk_size), "fisher", total=-(-count // chunk_size)):
            chunk = tuple(t[start : start + chunk_size] for t in data)
            for name, g in gradients(params, *chunk).items():
                sums[name] += g.float().square().sum(0)
    return sums


def classifier_loss(call, pixel_values: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one image."""
    return F.cross_entropy(call(pixel_values=pixel_values[None]).logits, label[None])


def lm_loss(call, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of one right-padded sequence.

    No attention mask reaches the model: under causal attention, tokens before the right
    padding never see it, and transformers' mask builder branches on the mask's values,
    which vmap cannot trace. The padded positions are left out of the loss.
    """
    logits = call(input_ids=input_ids[None]).logits[0, :-1]
    counted = attention_mask[1:].float()
    nll = F.cross_entropy(logits.float(), input_ids[1:], reduction="none")
    return (nll * counted).sum() / counted.sum().clamp(min=1)
