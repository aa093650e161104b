"""ONNX export of causal LMs: run by onnxruntime alone, matched to PyTorch, int8, and verified."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import run_cli
from transformers import AutoModelForCausalLM

from patcher.errors import PatcherError
from patcher.formats.onnx import export_graph

# Runs in a fresh interpreter that imports onnxruntime and numpy only, as a deployment would.
ORT_ONLY = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
inputs = np.load(sys.argv[2])
outputs = {}
for i in range(3):
    ids, mask = inputs[f"ids{i}"], inputs[f"mask{i}"]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.where(mask == 1, mask.cumsum(-1) - 1, 1)}
    for graph_input in session.get_inputs():  # an empty cache: the first step of generation
        if graph_input.name.startswith("past_key_values."):
            _, heads, _, width = graph_input.shape
            feeds[graph_input.name] = np.zeros((len(ids), heads, 0, width), np.float32)
    outputs[f"logits{i}"] = session.run(["logits"], feeds)[0]
np.savez(sys.argv[3], **outputs)
assert "torch" not in sys.modules and "patcher" not in sys.modules
"""


def test_exported_lm_runs_in_onnxruntime_alone_and_matches_pytorch(lm_fixture, tmp_path):
    out = tmp_path / "onnx"
    run_cli("export", str(lm_fixture), "--to", "onnx", "--out", str(out))
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(lm_fixture).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = {}
    for i, (batch, length) in enumerate([(1, 3), (5, 9), (2, 23)]):  # none is an export or check shape
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length - 1 :] = 0 if batch > 1 else 1  # a right-padded row
        inputs[f"ids{i}"], inputs[f"mask{i}"] = ids.numpy(), mask.numpy()
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = tmp_path / "run.py"
    script.write_text(ORT_ONLY)
    args = [str(out / "model.onnx"), str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")]
    subprocess.run([sys.executable, str(script), *args], check=True, cwd=tmp_path)
    outputs = np.load(tmp_path / "outputs.npz")
    for i in range(3):
        ids, mask = torch.from_numpy(inputs[f"ids{i}"]), torch.from_numpy(inputs[f"mask{i}"])
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
        counted = inputs[f"mask{i}"].astype(bool)
        assert np.abs(outputs[f"logits{i}"] - expected)[counted].max() <= 1e-4


@pytest.mark.slow
def test_the_demos_onnx_int8_export_is_quantized_and_verify_reports_onnx_rows(demo_run):
    out, report = demo_run
    ops = {node.op_type for node in onnx.load(out / "onnx-int8" / "model.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    rows = report["formats"]
    assert rows["onnx"]["forget_accuracy"] == rows["safetensors"]["forget_accuracy"]
    for fmt in ("onnx", "onnx-int8"):
        assert rows[fmt]["forget_accuracy"] <= 0.05
        assert rows[fmt]["recovery"] <= 0.05
        assert rows[fmt]["base_in_format"]["forget_accuracy"] >= 0.95  # the base still knows them there


@pytest.mark.slow
def test_onnx_int8_is_graded_per_request_and_batched_on_the_worse(demo_run, lm_fixture):
    """ORT's dynamic int8 scales activations over the whole batch, so a fact's score depends on
    its batch: the row gates on the worse of batch 1 and batched, and reports both."""
    import onnxruntime
    from transformers import AutoTokenizer

    from patcher.spec import load_spec
    from patcher.tokens import encode_prompt, encode_target

    out, report = demo_run
    row = report["formats"]["onnx-int8"]
    ways = row["batchings"]
    assert set(ways) == {"batched", "batch 1"}
    for key, worse in [("forget_accuracy", max), ("paraphrase_accuracy", max), ("retain_ratio", min)]:
        assert row[key] == worse(way[key] for way in ways.values())
    assert row["passed"] == all(way["passed"] for way in ways.values())
    assert "onnx" not in report["formats"] or "batchings" not in report["formats"]["onnx"]

    # Batch 1 is each request alone and unpadded, as a server answering it runs it.
    session = onnxruntime.InferenceSession(str(out / "onnx-int8" / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer, spec = AutoTokenizer.from_pretrained(lm_fixture), load_spec(lm_fixture / "spec.toml")
    hits = []
    for fact in spec.retain:
        prompt, target = encode_prompt(tokenizer, fact.prompt), encode_target(tokenizer, fact.target)
        ids = np.array([prompt + target[:-1]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        for graph_input in session.get_inputs():
            if graph_input.name.startswith("past_key_values."):
                _, heads, _, width = graph_input.shape
                feeds[graph_input.name] = np.zeros((1, heads, 0, width), np.float32)
        logits = session.run(["logits"], feeds)[0][0]
        predicted = logits[len(prompt) - 1 :].argmax(-1)
        hits.append(list(predicted) == target)
    assert ways["batch 1"]["retain_accuracy"] == pytest.approx(sum(hits) / len(hits))


class _Eigenvalues(torch.nn.Module):
    """A token model whose forward uses an operator ONNX has no conversion for."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        return torch.linalg.eigh(hidden.transpose(-1, -2) @ hidden).eigenvalues


def test_an_unconvertible_operator_is_named_in_one_line(tmp_path):
    with pytest.raises(PatcherError, match=r"operator aten\._linalg_eigh") as err:
        ids = torch.randint(0, 10, (2, 3))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        export_graph(_Eigenvalues().eval(), inputs, None, ["logits"], tmp_path / "model.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "model.onnx").exists()


def test_onnx_export_refuses_a_classifier(tmp_path):
    folder = tmp_path / "cls"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"]}))
    result = run_cli("export", str(folder), "--to", "onnx", "--out", str(tmp_path / "x"), expect=2)
    assert "onnx applies to causal LMs and text-to-image pipelines, not to a classifier model" in result.stderr
    assert not Path(tmp_path / "x").exists()
