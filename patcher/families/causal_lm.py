"""Causal language models: facts erased by closed-form or trained edits of MLP projections."""

from __future__ import annotations

from pathlib import Path

from patcher.adapters import CausalLMAdapter, causal_lm_adapter
from patcher.cache import cache_dir
from patcher.errors import PatcherError
from patcher.families import Edit, Family, register
from patcher.locate import locate
from patcher.methods import Deltas, EditInputs, calibration
from patcher.methods.lm_edit import auto_layers
from patcher.models import in_checkpoint_names, load_causal_lm, model_fingerprint
from patcher.quantizers import check_quantizable
from patcher.spec import ForgetFact, Spec
from patcher.stats import SecondMoments, collect_second_moments, corpus_batches, read_corpus, stats_cache_key
from patcher.tokens import check_fits_context
from patcher.verification.lm import verify_lm


def resolve_layers(
    spec_layers: str | list[int], adapter: CausalLMAdapter, tokenizer=None, facts: list[ForgetFact] | None = None
) -> list[int]:
    """The layers to edit. `auto`: from `patcher locate` on the forget facts when there are
    any, else the early-middle layers where MEMIT-style edits usually work."""
    if spec_layers != "auto":
        layers = list(spec_layers)
    elif facts:
        layers = locate(adapter, tokenizer, facts).edit_layers()
    else:
        layers = auto_layers(adapter.num_layers)
    if max(layers) >= adapter.num_layers:
        raise PatcherError(f"layer {max(layers)} does not exist: the model has {adapter.num_layers} layers")
    return layers


def cached_second_moments(folder: Path, adapter, tokenizer, corpus: Path | None, layers: list[int]) -> SecondMoments:
    """Statistics from the spec's corpus, computed once per (model, corpus, layers)."""
    if corpus is None:
        raise PatcherError("erase needs key statistics: pass --stats or set [stats] corpus in the spec")
    lines = read_corpus(corpus)
    path = cache_dir() / "stats" / f"{stats_cache_key(model_fingerprint(folder), lines, layers)}.safetensors"
    if path.is_file():
        return SecondMoments.load(path)
    stats = collect_second_moments(adapter, corpus_batches(tokenizer, lines), layers)
    stats.save(path)
    return stats


class CausalLM(Family):
    name = "causal-lm"
    grades_artifacts = True
    paraphrase_note = "Paraphrases of every forgotten prompt (the `paraphrase` column)."

    def edit(self, folder, spec, method, config, stats, robust_to) -> Edit:
        """Layers from the spec (or `locate`), key statistics from `stats` or the spec's
        corpus (cached), then the method, calibrated on the seen retain facts when it can be."""
        lm, tokenizer = load_causal_lm(folder)
        check_fits_context(tokenizer, lm.config, spec.fact_pairs())
        adapter = causal_lm_adapter(lm)
        for fmt in robust_to:
            check_quantizable(lm, fmt)
        layers = resolve_layers(spec.layers, adapter, tokenizer, spec.forget)
        if not method.needs_stats:
            moments = None
        elif stats is not None:
            moments = SecondMoments.load(stats)
        else:
            moments = cached_second_moments(folder, adapter, tokenizer, spec.corpus, layers)

        def edit_with(settings) -> Deltas:
            return method.run(EditInputs(adapter, tokenizer, spec, settings, moments, layers, robust_to))

        choices: dict = {"layers": layers}
        if method.calibrated and spec.retain and config.calibrate:
            deltas, trace = calibration.calibrated(spec, config, adapter, tokenizer, edit_with, robust_to)
            choices["calibration"] = trace
        else:
            deltas = edit_with(config)
        return Edit(in_checkpoint_names(lm, deltas), choices)

    def verify(self, base, patched, spec, formats, artifacts) -> dict:
        return verify_lm(base, patched, spec, formats, artifacts)

    def erased_items(self, spec: Spec) -> list[str]:
        return [f"`{f.prompt}` → `{f.target}` ({len(f.paraphrases)} paraphrases checked)" for f in spec.forget]


register(CausalLM())
