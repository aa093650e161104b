"""`patcher erase` as a library call: spec + model -> patch file."""

from __future__ import annotations

from pathlib import Path

from patcher.adapters import CausalLMAdapter, causal_lm_adapter
from patcher.adapters.unet import UNetAdapter
from patcher.cache import cache_dir
from patcher.errors import PatcherError
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch
from patcher.locate import locate
from patcher.methods import EditInputs, calibration, get_method
from patcher.methods.lm_edit import auto_layers
from patcher.methods.robust import Robustness
from patcher.models import (
    detect_family,
    load_causal_lm,
    load_classifier,
    load_pipeline,
    model_fingerprint,
    resolve_model_dir,
)
from patcher.spec import ForgetFact, Spec
from patcher.stats import (
    SecondMoments,
    collect_second_moments,
    corpus_batches,
    read_corpus,
    stats_cache_key,
)

ROBUST_METHODS = calibration.METHODS
PIPELINE_METHODS = ("uce", "rece")
CLASSIFIER_METHODS = ("ssd",)
# Methods that read data through the spec instead of the key statistics.
STATISTICS_FREE_METHODS = ("ssd", "fila")


def model_dir_for(spec: Spec, model: str | Path | None, trust_remote_code: bool = False) -> Path:
    """The model a command works on: the MODEL argument, else the spec's [model] path."""
    ref = model if model is not None else spec.model_path
    if ref is None:
        raise PatcherError("no model given: pass MODEL or set [model] path in the spec")
    if model is None and not Path(str(ref)).is_absolute() and (spec.folder / str(ref)).exists():
        ref = spec.folder / str(ref)
    return resolve_model_dir(ref, trust_remote_code)


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


def erase(
    spec: Spec,
    model: str | Path | None = None,
    method: str | None = None,
    stats: str | Path | None = None,
    trust_remote_code: bool = False,
    robust_to: tuple[str, ...] = (),
) -> Patch:
    """Compute the patch that erases the spec's forget facts from the model.

    `robust_to` names quantized formats in which the erasure must hold too.
    """
    folder = model_dir_for(spec, model, trust_remote_code)
    family = detect_family(folder) if spec.family == "auto" else spec.family
    method_name = method or spec.method
    edit = get_method(method_name)
    _check_method_fits(method_name, family, folder)
    if robust_to:
        Robustness(tuple(robust_to))  # validate the names before any work
        if method_name not in ROBUST_METHODS:
            raise PatcherError(f"--robust-to works with {', '.join(ROBUST_METHODS)}, not {method_name}")
    if family == "classifier":
        deltas = edit(EditInputs(load_classifier(folder, trust_remote_code), None, spec, None, []))
        return _patch(folder, deltas, method_name, spec)
    if family == "t2i-unet":
        adapter = UNetAdapter.from_pipeline(load_pipeline(folder))
        deltas = edit(EditInputs(adapter, None, spec, None, []))
        return _patch(folder, deltas, method_name, spec)
    lm, tokenizer = load_causal_lm(folder, trust_remote_code=trust_remote_code)
    adapter = causal_lm_adapter(lm)
    layers = resolve_layers(spec.layers, adapter, tokenizer, spec.forget)
    if method_name in STATISTICS_FREE_METHODS:
        moments = None
    elif stats is not None:
        moments = SecondMoments.load(stats)
    else:
        moments = cached_second_moments(folder, adapter, tokenizer, spec.corpus, layers)

    def edit_with(edit_spec: Spec):
        return edit(EditInputs(adapter, tokenizer, edit_spec, moments, layers, tuple(robust_to)))

    if method_name in calibration.METHODS and spec.retain and spec.hparams.get("calibrate", True):
        deltas = calibration.calibrated(spec, method_name, adapter, tokenizer, edit_with, tuple(robust_to))
    else:
        deltas = edit_with(spec)
    return _patch(folder, deltas, method_name, spec)


def _check_method_fits(method_name: str, family: str, folder: Path) -> None:
    """A one-line error when the method cannot edit this family of model."""
    fits = {
        "t2i-unet": method_name in PIPELINE_METHODS,
        "classifier": method_name in CLASSIFIER_METHODS,
        "causal-lm": method_name not in PIPELINE_METHODS,
    }
    if not fits.get(family, False):
        raise PatcherError(
            f"{method_name} cannot edit {folder}, a {family} model: {', '.join(PIPELINE_METHODS)} edit "
            f"text-to-image pipelines, {', '.join(CLASSIFIER_METHODS)} image classifiers (and causal LMs), "
            "the other methods causal LMs"
        )


def _patch(folder: Path, deltas: dict, method_name: str, spec: Spec) -> Patch:
    """The patch of `deltas`, with the fingerprints and stored dtypes of the base tensors."""
    checkpoint = Checkpoint(folder)
    dtypes = {name: str(checkpoint.tensor(name).dtype).removeprefix("torch.") for name in deltas}
    return Patch.from_deltas(deltas, method_name, spec.raw, checkpoint.fingerprints(deltas), dtypes)
