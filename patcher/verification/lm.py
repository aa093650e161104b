"""A causal LM's figures in verify: accuracy on the spec's facts, perplexity on held-out text,
how much of the edit a quantized format keeps, and the LM path of `verify`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from patcher.attacks import AttackInputs, run_spec_attacks
from patcher.errors import PatcherError
from patcher.formats.hf import load_causal_lm
from patcher.formats.registry import get_target
from patcher.models import remote_code_trusted
from patcher.quantizers import dequantized_weight
from patcher.scoring import accuracy
from patcher.spec import Spec
from patcher.tokens import check_fits_context
from patcher.verification.grading import assemble_report, graded_row, worst_case
from patcher.verification.perplexity import perplexity
from patcher.verification.report import read_provenance

# How verify batches a format's requests: as many as a pass takes, and one at a time, as a
# server that answers each request alone runs them (batch-dependent formats are graded both ways).
BATCHINGS = {"batched": None, "batch 1": 1}


def lm_metrics(model, tokenizer, spec: Spec, batch_size: int | None = None) -> dict[str, float]:
    """Forget, paraphrase and retain accuracy (greedy, every target token) on the spec's facts,
    and perplexity on its held-out text when it names one; `batch_size` requests per forward
    pass (default: scoring's and perplexity's own batches)."""
    batched = {} if batch_size is None else {"batch_size": batch_size}
    if not spec.forget:
        raise PatcherError("the spec has no [[forget]] facts to verify")
    forget = [(f.prompt, f.target) for f in spec.forget]
    paraphrases = [(p, f.target) for f in spec.forget for p in f.paraphrases]
    retain = [(r.prompt, r.target) for r in spec.retain]
    metrics = {
        "forget_accuracy": accuracy(model, tokenizer, forget, **batched),
        "paraphrase_accuracy": accuracy(model, tokenizer, paraphrases, **batched),
        "retain_accuracy": accuracy(model, tokenizer, retain, **batched),
    }
    if spec.heldout is not None:
        metrics["perplexity"] = perplexity(model, tokenizer, heldout_text(spec), **batched)
    return metrics


def heldout_text(spec: Spec) -> str:
    if not spec.heldout.is_file():
        raise PatcherError(f"verify.heldout {spec.heldout} does not exist: give a text file the edit never saw")
    return spec.heldout.read_text()


def edit_kept(base_model, patched_model, edit_norms: dict[str, float]) -> dict[str, float]:
    """Per edited matrix, ‖Q(W+Δ) − Q(W)‖ / ‖Δ‖, with Q the quantizer the models were loaded with.

    1 means the format keeps the whole edit; near 0, quantization rounds it away.
    """
    if not isinstance(patched_model, torch.nn.Module):  # an onnxruntime graph: no modules to read
        return {}
    base_modules, patched_modules = dict(base_model.named_modules()), dict(patched_model.named_modules())
    kept = {}
    for param, norm in edit_norms.items():
        module = param.removesuffix(".weight")
        if module in base_modules and norm > 0 and _is_matmul(base_modules[module]):
            change = dequantized_weight(patched_modules[module]) - dequantized_weight(base_modules[module])
            kept[param] = change.norm().item() / norm
    return kept


def _is_matmul(module) -> bool:
    """Linear-like: a 2-D weight used as a matrix product (not an embedding table or a norm)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.ndim == 2 and not isinstance(module, torch.nn.Embedding)


def tokenizer_of(folder: Path):
    """The folder's tokenizer, as transformers loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code_trusted())


def verify_lm(base: Path, patched: Path, spec: Spec, formats: list[str], artifacts: dict[str, Path] | None) -> dict:
    """Forget, paraphrase and retain accuracy (and perplexity) of base and patch in every
    format, then the spec's attacks on the full-precision patch.

    A format with an exported folder in `artifacts` is graded on that artifact as its
    consumer loads it; the others are quantized or exported from `patched` on load.
    """
    targets = {name: get_target(name, "causal-lm", "verify") for name in formats}
    timings: dict[str, float] = {}
    provenance = read_provenance(patched)
    edited = sorted(json.loads(provenance.get("base", "{}")))
    full_base, full_patched = load_causal_lm(base), load_causal_lm(patched)
    check_fits_context(tokenizer_of(base), full_base.config, spec.fact_pairs())
    base_params, patched_params = dict(full_base.named_parameters()), dict(full_patched.named_parameters())
    edit_norms = {p: (patched_params[p] - base_params[p]).norm().item() for p in edited if p in base_params}

    start = time.perf_counter()
    base_row = lm_metrics(full_base, tokenizer_of(base), spec)
    reference = lm_metrics(full_patched, tokenizer_of(patched), spec)
    timings["full_precision"] = round(time.perf_counter() - start, 3)
    rows = {}
    for name in formats:
        start = time.perf_counter()
        if name == "safetensors":
            models = full_base, full_patched
            graded = {"batched": graded_row(dict(reference), base_row, reference, base_row, spec.gates)}
        else:
            target = targets[name]
            artifact = (artifacts or {}).get(name)
            models = target.load(base), (target.load_artifact(artifact) if artifact else target.load(patched))
            graded = {}
            for way, size in BATCHINGS.items() if target.batch_dependent else [("batched", None)]:
                base_in_format = lm_metrics(models[0], tokenizer_of(base), spec, size)
                row = lm_metrics(models[1], tokenizer_of(patched), spec, size)
                graded[way] = graded_row(row, base_in_format, reference, base_row, spec.gates)
        rows[name] = worst_case(graded, spec.gates) if len(graded) > 1 else graded["batched"]
        rows[name]["edit_kept"] = edit_kept(*models, edit_norms)
        timings[name] = round(time.perf_counter() - start, 3)
    attacks = run_spec_attacks(AttackInputs(full_base, full_patched, tokenizer_of(patched), spec), timings)
    return assemble_report(base, provenance.get("method", spec.method), rows, base_row, spec.gates, timings, attacks)
