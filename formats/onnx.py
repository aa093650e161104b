"""ONNX export of causal LMs, checked in onnxruntime against PyTorch, and ORT's dynamic int8.

The graph is a decoder with a KV cache in optimum's layout, so optimum's
`ORTModelForCausalLM.from_pretrained(folder).generate()` runs it as exported:
(input_ids, attention_mask, position_ids, past_key_values.{i}.key/value) -> (logits,
present.{i}.key/value), dynamic in batch, new tokens and past length (a first step feeds a
past of length 0). It is exported by torch's dynamo exporter (onnxscript) and only written
once onnxruntime has run it on fresh inputs of shapes other than the export's, in one pass
and in two steps through the cache, and matched PyTorch within `LM_TOLERANCE`; `onnx-int8`
then quantizes that checked graph with onnxruntime's `quantize_dynamic` (int8 weights,
activations quantized at run time).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.registry import Target, register, whole_model
from patcher.models import remote_code_trusted

ONNX_FORMATS = ("onnx", "onnx-int8")
ONNX_FILE = "model.onnx"
# Largest logit difference, fp32, relative to the largest |logit| (at least 1): float
# rounding grows with the logits' scale, which a model's own scaling sets.
LM_TOLERANCE = 1e-4
CHECK_SHAPES = ((1, 5), (3, 11), (2, 17))  # (batch, sequence): none is the export's
EXPORT_SHAPE = (2, 7)  # (batch, sequence), of which EXPORT_PAST tokens come through the cache
EXPORT_PAST = 4
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights keep them in a side file (protobuf's 2 GB cap)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's past and present key/value names, layer by layer: optimum's names."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


class _DecoderWithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past (key, value) per layer) -> (logits, then
    each layer's present key and value): one decoding step as a pure function of tensors,
    the cache object that transformers threads between steps rebuilt from them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 names the cache `cache`, earlier versions `past_key_values`.
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self.takes_positions = "position_ids" in parameters  # Bloom's ALiBi has no positions

    def forward(self, input_ids, attention_mask, position_ids, past) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, (key, value) in enumerate(past):
            cache.update(key, value, layer)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, self.cache_keyword: cache}
        if self.takes_positions:
            inputs["position_ids"] = position_ids
        out = self.model(**inputs, use_cache=True)
        present = out[self.cache_keyword]
        return (out.logits, *(t for layer in present.layers for t in (layer.keys, layer.values)))


def positions(mask: torch.Tensor, past: int) -> torch.Tensor:
    """Each new token's position from the attention mask (past and new tokens): what
    optimum and transformers' `generate` feed, so left-padded rows count from their first token."""
    counted = mask.long().cumsum(-1) - 1
    return counted.masked_fill(mask == 0, 1)[:, past:]


def empty_past(shapes: list[tuple[int, ...]], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A past of length 0 for each layer, as a first decoding step feeds it."""
    empty = [torch.zeros(batch, heads, 0, width) for heads, width in shapes]
    return [(tensor, tensor) for tensor in empty]


class OnnxCausalLM:
    """An exported LM run by onnxruntime, called like a transformers model (`.logits` out):
    one pass over the whole sequence, with an empty past."""

    device = torch.device("cpu")

    def __init__(self, path: str | Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.past_shapes = [(i.shape[1], i.shape[3]) for i in past[::2]]  # (heads, head width) per layer

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past=None) -> SimpleNamespace:
        """Logits (and `presents`, the cache after these tokens) for new tokens after `past`."""
        past = past if past is not None else empty_past(self.past_shapes, len(input_ids))
        feeds = {
            "input_ids": input_ids.cpu().numpy(),
            "attention_mask": attention_mask.cpu().numpy(),
            "position_ids": positions(attention_mask, past[0][0].shape[2]).cpu().numpy(),
        }
        feeds.update(zip(self.past_names, (t.numpy() for pair in past for t in pair), strict=True))
        logits, *present = (torch.from_numpy(t) for t in self.session.run(None, feeds))
        return SimpleNamespace(logits=logits, presents=list(zip(present[::2], present[1::2], strict=True)))


def export_onnx(source: str | Path, fmt: str, out: str | Path) -> dict[str, float]:
    """Export the causal LM in `source` to `out` as `fmt` (onnx or onnx-int8), with its config
    and tokenizer; returns the largest logit difference to PyTorch over the checked shapes."""
    from transformers import AutoModelForCausalLM

    if fmt not in ONNX_FORMATS:
        raise PatcherError(f"unknown ONNX format {fmt!r}: use one of {', '.join(ONNX_FORMATS)}")
    source = Path(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=remote_code_trusted()).eval()
    with atomic_path(out, is_dir=True) as tmp:
        graph = tmp / ONNX_FILE
        decoder = _DecoderWithPast(model).eval()
        inputs = _export_inputs(decoder, model.config.vocab_size)
        dynamic = torch.export.Dim.DYNAMIC
        axes = {0: dynamic, 1: dynamic}
        shapes = {**dict.fromkeys(("input_ids", "attention_mask", "position_ids"), axes)}
        shapes["past"] = [({0: dynamic, 2: dynamic}, {0: dynamic, 2: dynamic}) for _ in inputs["past"]]
        past_names, present_names = cache_names(len(inputs["past"]))
        names = ["input_ids", "attention_mask", "position_ids", *past_names]
        export_graph(decoder, inputs, shapes, ["logits", *present_names], graph, names)
        difference = max_difference(model, OnnxCausalLM(graph), model.config.vocab_size)
        if difference > LM_TOLERANCE:
            raise PatcherError(
                f"the ONNX graph of {source} differs from PyTorch by {difference:.2e} of the largest logit "
                f"(tolerance {LM_TOLERANCE:.0e}): not written"
            )
        if fmt == "onnx-int8":
            quantize_int8(graph)
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
    return {"max_abs_difference": difference}


def _portable_tokenizer_class(config: Path) -> None:
    """Name a tokenizers-backed tokenizer by the class every transformers version knows.

    transformers 5 saves it as `TokenizersBackend`, a name transformers 4 cannot load, and
    optimum's ONNX classes run on transformers 4; `PreTrainedTokenizerFast` is the same
    class in 5 (an alias) and its own name in 4, where it also returns `token_type_ids`,
    which a causal LM's `generate` refuses, unless the config names the model's inputs.
    """
    if not config.is_file():
        return
    settings = json.loads(config.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        settings.setdefault("model_input_names", ["input_ids", "attention_mask"])
        config.write_text(json.dumps(settings, indent=2) + "\n")


def export_graph(
    module: torch.nn.Module,
    inputs: dict,
    dynamic: dict | None,
    outputs: list[str],
    path: Path,
    input_names: list[str] | None = None,
) -> None:
    """torch.onnx.export (dynamo) of `module(**inputs)` with the `dynamic` axes, saved to
    `path` (external data for large weights); one line naming the operator when the
    exporter cannot convert one. `input_names` name the flattened inputs (default: the keys)."""
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    # The exporter logs each optional operator library it does not find (torchvision, ...).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        # The exporter narrates each step and notes inputs that share an axis.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name")
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch-internal
            program = torch.onnx.export(
                module,
                (),
                kwargs=inputs,
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=input_names or list(inputs),
                output_names=outputs,
            )
        program.save(str(path), external_data=large)
    except Exception as err:
        raise PatcherError(f"torch's ONNX exporter cannot convert this model: {_culprit(err)}") from None


def _culprit(err: Exception) -> str:
    """The operator an export failure names, else the error's first line."""
    text = f"{err}\n{err.__cause__ or ''}"  # torch.export's own reason is the cause
    operator = re.search(r"(aten::[\w.]+|aten\.[\w.]+|torch\.ops\.[\w.]+)", text)
    if operator:
        return f"no ONNX conversion for operator {operator.group(1)}"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _export_inputs(decoder: _DecoderWithPast, vocab_size: int) -> dict:
    """Example inputs for the export: EXPORT_PAST tokens already in the cache (from the model
    itself, so each layer's cache has its real shape) and the rest of EXPORT_SHAPE new."""
    ids = torch.randint(0, vocab_size, EXPORT_SHAPE)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        _, *present = decoder(ids[:, :EXPORT_PAST], mask[:, :EXPORT_PAST], positions(mask[:, :EXPORT_PAST], 0), [])
    past = list(zip(present[::2], present[1::2], strict=True))
    return {"input_ids": ids[:, EXPORT_PAST:], "attention_mask": mask, "position_ids": positions(mask, EXPORT_PAST),
            "past": past}  # fmt: skip


def max_difference(model: torch.nn.Module, graph: OnnxCausalLM, vocab_size: int, seed: int = 0) -> float:
    """Largest |logit| difference between PyTorch (one pass, no cache) and onnxruntime on
    random inputs of `CHECK_SHAPES`, each with its last row right-padded, at the positions
    that count, over the largest |logit| when that exceeds 1. onnxruntime runs each input
    twice: in one pass, and as generation does, all but the last two tokens first and
    those two through the cache that pass returned."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, length in CHECK_SHAPES:
        ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, length // 2 :] = 0
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        counted = mask.bool()
        scale = max(1.0, expected[counted].abs().max().item())
        split = length - 2
        first = graph(ids[:, :split], mask[:, :split])
        second = graph(ids[:, split:], mask, first.presents)
        stepped = torch.cat([first.logits, second.logits], dim=1)
        for logits in (graph(ids, mask).logits, stepped):
            worst = max(worst, (logits - expected)[counted].abs().max().item() / scale)
    return worst


def quantize_int8(graph: Path) -> None:
    """Replace `graph` by onnxruntime's dynamic int8 quantization of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(prefix="patcher-onnx-int8-") as tmp:
        quantized = Path(tmp) / ONNX_FILE
        root.setLevel(logging.ERROR)  # ORT suggests its pre-processing script, on the root logger
        try:
            quantize_dynamic(graph, quantized, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        for stale in graph.parent.glob(f"{ONNX_FILE}*"):  # the graph and any external data
            stale.unlink()
        shutil.move(quantized, graph)


def load_onnx_lm(folder: str | Path, fmt: str) -> OnnxCausalLM:
    """The causal LM in the full-precision `folder`, exported to `fmt` and loaded in onnxruntime."""
    with tempfile.TemporaryDirectory(prefix="patcher-onnx-") as tmp:
        exported = Path(tmp) / fmt
        export_onnx(folder, fmt, exported)
        return OnnxCausalLM(exported / ONNX_FILE)  # the session holds the weights once created


def _lm_target(fmt: str) -> Target:
    note = "with a KV cache" if fmt == "onnx" else "ORT dynamic int8, with a KV cache"
    return Target(
        fmt,
        "causal-lm",
        whole_model(lambda source, out: export_onnx(source, fmt, out)),
        load=lambda folder: load_onnx_lm(folder, fmt),
        load_artifact=lambda folder: OnnxCausalLM(folder / ONNX_FILE),
        snippet=f'optimum.onnxruntime.ORTModelForCausalLM.from_pretrained("{{path}}")  # {note}',
        batch_dependent=fmt == "onnx-int8",  # ORT's dynamic int8 scales each activation over the batch
    )


register(*map(_lm_target, ONNX_FORMATS))
