"""The ONNX exports as optimum loads them: `ORTModelForCausalLM.from_pretrained(folder).generate()`
and `ORTStableDiffusionPipeline.from_pretrained(folder)(prompt)`.

optimum-onnx runs in its own environment (`patcher.verification.optimum`); the test runs
where PATCHER_OPTIMUM_PYTHON names it, as in `.ci/run`.
"""

import json

import numpy as np
import pytest
from helpers import run_cli

from patcher.spec import load_spec
from patcher.verification.optimum import (
    OPTIMUM_PYTHON,
    optimum_draw,
    optimum_generate,
    optimum_python,
    pytorch_draw,
    pytorch_generate,
)

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


def test_optimum_draws_from_the_pipeline_exports_as_diffusers_does(diffusion_fixture, tmp_path):
    unet = json.loads((diffusion_fixture / "unet" / "config.json").read_text())
    size = unet["sample_size"]
    latents = np.random.default_rng(0).standard_normal((1, unet["in_channels"], size, size), dtype=np.float32)
    prompt, steps = "a red circle", 4
    expected = pytorch_draw(diffusion_fixture, prompt, latents, steps)
    for fmt in ("onnx", "onnx-int8"):
        run_cli("export", str(diffusion_fixture), "--to", fmt, "--out", str(tmp_path / fmt))
        loaded_as, image = optimum_draw(tmp_path / fmt, prompt, latents, steps)
        assert loaded_as == "ORTStableDiffusionPipeline" and image.shape == expected.shape
        if fmt == "onnx":
            assert np.abs(image - expected).max() < 1e-4, np.abs(image - expected).max()
        assert np.isfinite(image).all() and image.std() > 0.01  # an image, not a blank
