"""The ONNX export as optimum loads it: `ORTModelForCausalLM.from_pretrained(folder).generate()`.

optimum-onnx runs in its own environment (`patcher.verification.optimum`); the test runs
where PATCHER_OPTIMUM_PYTHON names it, as in `.ci/run`.
"""

import pytest

from patcher.spec import load_spec
from patcher.verification.optimum import OPTIMUM_PYTHON, optimum_generate, optimum_python, pytorch_generate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(optimum_python() is None, reason=f"{OPTIMUM_PYTHON} names no Python with optimum-onnx"),
]
NEW_TOKENS = 6


def test_optimum_generates_from_the_onnx_exports_as_pytorch_does(demo_run, lm_fixture):
    out, _ = demo_run
    spec = load_spec(lm_fixture / "spec.toml")
    prompts = [fact.prompt for fact in [*spec.forget[:3], *spec.retain[:3]]]
    expected = pytorch_generate(out / "safetensors", prompts, NEW_TOKENS)

    exact = optimum_generate(out / "onnx", prompts, NEW_TOKENS)
    assert exact["cache"]  # the past-key-values graph, not a full recomputation per token
    assert exact["alone"] == expected["alone"]
    assert exact["batch"] == expected["batch"]

    quantized = optimum_generate(out / "onnx-int8", prompts, NEW_TOKENS)
    assert quantized["cache"]
    assert [len(ids) for ids in quantized["alone"]] == [len(ids) for ids in expected["alone"]]
