"""ONNX export of text-to-image pipelines: text encoder, UNet and VAE decoder graphs, run by
onnxruntime alone and matched to PyTorch; int8; SDXL refused in one line."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import erase_with_cli, run_cli
from test_uce import sd_pipeline, sdxl_pipeline

from patcher.errors import PatcherError
from patcher.formats.onnx_pipeline import TOLERANCES, export_pipeline_onnx

# A deployment's view: onnxruntime and numpy only. Text encoder -> UNet, and the VAE decoder.
ORT_ONLY = """
import sys
import numpy as np
import onnxruntime
folder, inputs = sys.argv[1], np.load(sys.argv[2])
def run(component, **feeds):
    session = onnxruntime.InferenceSession(f"{folder}/{component}/model.onnx", providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]
hidden = run("text_encoder", input_ids=inputs["input_ids"])
predicted = run("unet", sample=inputs["sample"], timestep=inputs["timestep"], encoder_hidden_states=hidden)
image = run("vae_decoder", latent_sample=inputs["sample"])
np.savez(sys.argv[3], hidden=hidden, predicted=predicted, image=image)
assert "torch" not in sys.modules and "patcher" not in sys.modules
"""


def run_onnx_pipeline_alone(folder, inputs: dict[str, torch.Tensor], tmp_path) -> dict[str, np.ndarray]:
    """Outputs of the exported graphs on `inputs`, computed in a fresh interpreter without torch."""
    np.savez(tmp_path / "inputs.npz", **{name: value.numpy() for name, value in inputs.items()})
    script = tmp_path / "run.py"
    script.write_text(ORT_ONLY)
    args = [str(folder), str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")]
    subprocess.run([sys.executable, str(script), *args], check=True, cwd=tmp_path)
    return dict(np.load(tmp_path / "outputs.npz"))


@torch.no_grad()
def pytorch_outputs(pipe, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    hidden = pipe.text_encoder(inputs["input_ids"]).last_hidden_state
    predicted = pipe.unet(inputs["sample"], inputs["timestep"], hidden).sample
    image = pipe.vae.decode(inputs["sample"]).sample
    return {"hidden": hidden.numpy(), "predicted": predicted.numpy(), "image": image.numpy()}


@pytest.mark.slow
def test_patched_fixture_pipeline_runs_in_onnxruntime_alone_and_matches_pytorch(diffusion_fixture, tmp_path):
    patch, patched, exported = tmp_path / "uce.safetensors", tmp_path / "patched", tmp_path / "onnx"
    erase_with_cli(diffusion_fixture, "uce", patch)
    run_cli("apply", str(diffusion_fixture), str(patch), "--out", str(patched))
    run_cli("export", str(diffusion_fixture), "--to", "onnx", "--patch", str(patch), "--out", str(exported))
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert (exported / component / "model.onnx").is_file() and (exported / component / "config.json").is_file()
    assert (exported / "tokenizer" / "vocab.json").is_file() and (exported / "model_index.json").is_file()

    pipe = DiffusionPipeline.from_pretrained(patched)
    prompts = ["a red circle on grey", "a blue square on grey", "a yellow cross on grey", "a green circle on grey"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    size = 2 * pipe.unet.config.sample_size  # batch 4 and twice the side: neither the export's nor the check's
    generator = torch.Generator().manual_seed(3)
    inputs = {
        "input_ids": torch.tensor(ids),
        "sample": torch.randn(4, pipe.unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([999, 500, 20, 1]),
    }
    got, expected = run_onnx_pipeline_alone(exported, inputs, tmp_path), pytorch_outputs(pipe, inputs)
    for output, component in (("hidden", "text_encoder"), ("predicted", "unet"), ("image", "vae_decoder")):
        assert np.abs(got[output] - expected[output]).max() <= TOLERANCES[component]

    base = pytorch_outputs(DiffusionPipeline.from_pretrained(diffusion_fixture), inputs)
    circle = np.abs(got["predicted"][0] - base["predicted"][0]).max()  # the patch is in the exported UNet
    assert circle > 100 * TOLERANCES["unet"]


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_sd_shaped_pipelines_export_within_tolerance_and_int8_quantizes_text_encoder_and_unet(family, tmp_path):
    folder = tmp_path / "pipe"
    sd_pipeline(tmp_path, 24 if family == "sd15" else 32, linear_projection=family == "sd21").save_pretrained(folder)
    differences = export_pipeline_onnx(folder, "onnx-int8", tmp_path / "int8")
    assert all(differences[component] <= tolerance for component, tolerance in TOLERANCES.items())

    def ops(component: str) -> set[str]:
        return {node.op_type for node in onnx.load(tmp_path / "int8" / component / "model.onnx").graph.node}

    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops("text_encoder") & ops("unet")
    assert "DynamicQuantizeLinear" not in ops("vae_decoder")


def test_sdxl_pipeline_onnx_export_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "sdxl"
    sdxl_pipeline(tmp_path).save_pretrained(folder)
    with pytest.raises(PatcherError, match="SD 1.x/2.x") as err:
        export_pipeline_onnx(folder, "onnx", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
