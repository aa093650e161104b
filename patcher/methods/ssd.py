"""SSD: Selective Synaptic Dampening (Foster et al., 2024).

Two Fisher passes, no training: a parameter that matters far more to the forget data than
to the full data (F_f > α F_D, mean per-sample diagonal Fisher) is dampened by
β = min(λ F_D / F_f, 1), so θ′ = β θ. The public code squares each mini-batch's mean
gradient; here both Fishers are exact per sample (`patcher.stats.per_sample`).

With exact Fishers the full data's mean includes the forget samples, so F_f / F_D never
exceeds N / n_f (full over forget sample count): SSD's default α = 10, tuned on squared
batch means (where gradients of different samples cancel), selects nothing once the forget
set is more than a tenth of the data. The spec sets α for its data; erase says the bound.

Classifiers forget `[[forget_class]]` labels, with `[stats] data` as the full data; causal
LMs forget the `[[forget]]` facts (prompt and target), with the spec's corpus plus those
facts as the full data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patcher.adapters import CausalLMAdapter
from patcher.errors import PatcherError
from patcher.imagesets import ImageSet
from patcher.methods import Deltas, EditInputs, register
from patcher.settings import setting
from patcher.stats import read_corpus
from patcher.stats.per_sample import SampleLoss, classifier_loss, lm_loss, per_sample_fisher
from patcher.tokens import pad_id, right_padded


@dataclass(frozen=True)
class SSDConfig:
    """SSD's [erase] keys; the defaults are SSD's published ResNet setting."""

    ssd_alpha: float = setting(10.0, "α: dampen the parameters whose forget Fisher exceeds α × the full data's")
    ssd_lambda: float = setting(1.0, "λ: dampening factor β = min(λ F_full / F_forget, 1)")


def dampened(
    params: dict[str, torch.Tensor],
    forget: dict[str, torch.Tensor],
    full: dict[str, torch.Tensor],
    hp: SSDConfig = SSDConfig(),
) -> Deltas:
    """θ′ − θ for every parameter with at least one selected entry; inputs are mean Fishers."""
    deltas = {}
    for name, theta in params.items():
        f, d = forget[name].double(), full[name].double()
        selected = f > hp.ssd_alpha * d
        if not selected.any():
            continue
        beta = torch.where(selected, (hp.ssd_lambda * d / f.clamp(min=1e-30)).clamp(max=1.0), 1.0)
        deltas[name] = (theta.double() * (beta - 1)).to(theta.dtype)
    return deltas


def _classifier_data(inputs: EditInputs) -> tuple[SampleLoss, tuple, tuple]:
    spec = inputs.spec
    if not spec.forget_classes:
        raise PatcherError("ssd on a classifier needs [[forget_class]] entries in the spec")
    if spec.stats_data is None:
        raise PatcherError("ssd on a classifier needs its training images: set [stats] data in the spec")
    full = ImageSet.load(spec.stats_data)
    forget = full.of_classes(spec.forget_classes)
    if not len(forget):
        raise PatcherError(f"{spec.stats_data} has no images of the forget classes {spec.forget_classes}")
    return classifier_loss, (forget.pixel_values, forget.labels), (full.pixel_values, full.labels)


def _lm_data(inputs: EditInputs) -> tuple[SampleLoss, tuple, tuple]:
    spec, tokenizer = inputs.spec, inputs.tokenizer
    if not spec.forget:
        raise PatcherError("ssd on a causal LM needs [[forget]] facts in the spec")
    if spec.corpus is None:
        raise PatcherError("ssd on a causal LM needs the full data: set [stats] corpus in the spec")
    facts = [f"{fact.prompt} {fact.target}" for fact in spec.forget]
    lines = read_corpus(spec.corpus) + facts

    def encoded(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return right_padded([tokenizer(t).input_ids for t in texts], pad_id(tokenizer))

    return lm_loss, encoded(facts), encoded(lines)


@register("ssd", SSDConfig, ("causal-lm", "classifier"))
def ssd(inputs: EditInputs) -> Deltas:
    """Dampen the parameters the forget data depends on far more than the full data does."""
    is_lm = isinstance(inputs.adapter, CausalLMAdapter)
    model = inputs.adapter.model if is_lm else inputs.adapter
    loss, forget, full = _lm_data(inputs) if is_lm else _classifier_data(inputs)
    hp: SSDConfig = inputs.config
    model.eval()
    forget_fisher = per_sample_fisher(model, loss, forget)
    full_fisher = per_sample_fisher(model, loss, full)
    n_forget, n_full = len(forget[0]), len(full[0])
    params = {n: p.detach() for n, p in model.named_parameters()}
    deltas = dampened(
        params,
        {n: s / n_forget for n, s in forget_fisher.items()},
        {n: s / n_full for n, s in full_fisher.items()},
        hp,
    )
    if not deltas:
        # The full data contains the forget data, so F_D ≥ (n_f / N) F_f entry by entry.
        raise PatcherError(
            f"ssd selected no parameter at ssd_alpha = {hp.ssd_alpha}: with exact per-sample Fishers "
            f"F_forget / F_full is at most {n_full / n_forget:.2f} (full / forget sample count); "
            "set [erase] ssd_alpha below that"
        )
    return deltas
