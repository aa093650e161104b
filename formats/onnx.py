"""ONNX export of causal LMs, checked in onnxruntime against PyTorch, and ORT's dynamic int8.

The graph maps (input_ids, attention_mask) to logits, with dynamic batch and sequence and
no KV cache, exported by torch's dynamo exporter (onnxscript). An export is only written
once onnxruntime has run it on fresh inputs of shapes other than the export's and matched
PyTorch within `LM_TOLERANCE`; `onnx-int8` then quantizes that checked graph with
onnxruntime's `quantize_dynamic` (int8 weights, activations quantized at run time).
"""

from __future__ import annotations

import contextlib
import io
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
CHECK_SHAPES = ((1, 5), (3, 11), (2, 17))  # (batch, sequence): none is the export's (2, 7)
EXPORT_SHAPE = (2, 7)
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights keep them in a side file (protobuf's 2 GB cap)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


class _LogitsOnly(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, without the cache objects ONNX cannot carry."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class OnnxCausalLM:
    """An exported LM run by onnxruntime, called like a transformers model (`.logits` out)."""

    device = torch.device("cpu")

    def __init__(self, path: str | Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feeds)[0]))


def export_onnx(source: str | Path, fmt: str, out: str | Path) -> dict[str, float]:
    """Export the causal LM in `source` to `out` as `fmt` (onnx or onnx-int8), with its config
    and tokenizer; returns the largest logit difference to PyTorch over the checked shapes."""
    from transformers import AutoModelForCausalLM

    if fmt not in ONNX_FORMATS:
        raise PatcherError(f"unknown ONNX format {fmt!r}: use one of {', '.join(ONNX_FORMATS)}")
    source = Path(source)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=remote_code_trusted()).eval()
    with atomic_path(out, is_dir=True) as tmp:
        graph = tmp / ONNX_FILE
        ids = torch.randint(0, model.config.vocab_size, EXPORT_SHAPE)
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        axes = {0: batch, 1: sequence}
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        export_graph(_LogitsOnly(model).eval(), inputs, dict.fromkeys(inputs, axes), "logits", graph)
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
    return {"max_abs_difference": difference}


def export_graph(
    module: torch.nn.Module, inputs: dict[str, torch.Tensor], dynamic: dict | None, output: str, path: Path
) -> None:
    """torch.onnx.export (dynamo) of `module(**inputs)` with the `dynamic` axes, saved to
    `path` (external data for large weights); one line naming the operator when the
    exporter cannot convert one."""
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
                input_names=list(inputs),
                output_names=[output],
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


def max_difference(model: torch.nn.Module, graph: OnnxCausalLM, vocab_size: int, seed: int = 0) -> float:
    """Largest |logit| difference between PyTorch and onnxruntime on random inputs of
    `CHECK_SHAPES`, each with its last row right-padded, at the positions that count, over
    the largest |logit| when that exceeds 1."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, length in CHECK_SHAPES:
        ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, length // 2 :] = 0
        with torch.no_grad():
            expected = _LogitsOnly(model)(ids, mask)
        counted = mask.bool()
        scale = max(1.0, expected[counted].abs().max().item())
        worst = max(worst, (graph(ids, mask).logits - expected)[counted].abs().max().item() / scale)
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
    note = "input_ids, attention_mask -> logits" if fmt == "onnx" else "ORT dynamic int8"
    return Target(
        fmt,
        "causal-lm",
        whole_model(lambda source, out: export_onnx(source, fmt, out)),
        load=lambda folder: load_onnx_lm(folder, fmt),
        load_artifact=lambda folder: OnnxCausalLM(folder / ONNX_FILE),
        snippet=f'onnxruntime.InferenceSession("{{path}}/{ONNX_FILE}")  # {note}',
        batch_dependent=fmt == "onnx-int8",  # ORT's dynamic int8 scales each activation over the batch
    )


register(*map(_lm_target, ONNX_FORMATS))
