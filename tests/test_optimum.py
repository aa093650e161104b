"""The ONNX export as optimum loads it: `ORTModelForCausalLM.from_pretrained(folder).generate()`.

optimum-onnx pins transformers below 5, so it runs in its own environment: `.ci/run` builds
one and names its Python in PATCHER_OPTIMUM_PYTHON; the export is made here, by patcher.
"""

import json
import os
import subprocess

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.spec import load_spec

OPTIMUM_PYTHON = os.environ.get("PATCHER_OPTIMUM_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not OPTIMUM_PYTHON, reason="PATCHER_OPTIMUM_PYTHON names no Python with optimum-onnx (.ci/run makes one)"
    ),
]
NEW_TOKENS = 6

# Greedy generation with optimum's defaults, one prompt at a time and as one left-padded batch.
GENERATE = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
folder, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
alone = [model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=new_tokens, do_sample=False)[0].tolist()
         for p in prompts]
batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=new_tokens,
                       do_sample=False)[:, -new_tokens:].tolist()
print(json.dumps({"alone": alone, "batch": batch, "cache": model.can_use_cache}))
"""


def optimum_generate(folder, prompts: list[str]) -> dict:
    command = [OPTIMUM_PYTHON, "-c", GENERATE, str(folder), json.dumps(prompts), str(NEW_TOKENS)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_optimum_generates_from_the_onnx_exports_as_pytorch_does(demo_run, lm_fixture):
    out, _ = demo_run
    spec = load_spec(lm_fixture / "spec.toml")
    prompts = [fact.prompt for fact in [*spec.forget[:3], *spec.retain[:3]]]
    model = AutoModelForCausalLM.from_pretrained(out / "safetensors").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "safetensors", padding_side="left")
    expected = [
        model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        for p in prompts
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    expected_batch = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, -NEW_TOKENS:].tolist()

    exact = optimum_generate(out / "onnx", prompts)
    assert exact["cache"]  # the past-key-values graph, not a full recomputation per token
    assert exact["alone"] == expected
    assert exact["batch"] == expected_batch

    quantized = optimum_generate(out / "onnx-int8", prompts)
    assert quantized["cache"]
    assert [len(ids) for ids in quantized["alone"]] == [len(ids) for ids in expected]
