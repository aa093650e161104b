"""SDXL end to end on the sdxl fixture: erase through both text encoders' embeddings, apply,
verify on generated images in every bitsandbytes format and against the inversion attack,
the diffusers LoRA loaded by the SDXL pipeline, and transformer pipelines refused."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)
from helpers import export_patched, pipeline_runs, reduced_spec, run_cli
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from patcher.fixtures.diffusion import write_tokenizer
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch

FORMATS = ("safetensors", "int8", "nf4", "fp4")


@pytest.fixture(scope="module")
def erased(sdxl_fixture, tmp_path_factory):
    """`erased(method)`: erase, apply and verify in every format once per method for this module;
    returns (patch path, patched folder, report, verify's exit code)."""
    return pipeline_runs(sdxl_fixture, tmp_path_factory, ",".join(FORMATS))


def test_fixture_is_a_stock_sdxl_pipeline(sdxl_fixture):
    pipe = DiffusionPipeline.from_pretrained(sdxl_fixture)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    assert pipe.unet.config.cross_attention_dim == sum(widths)  # the two encoders side by side
    assert pipe.unet.config.addition_embed_type == "text_time"  # pooled text and image size


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_sdxl_erasure_holds_in_every_format(erased, sdxl_fixture, method):
    patch_path, patched, report, returncode = erased(method)
    assert isinstance(DiffusionPipeline.from_pretrained(patched), StableDiffusionXLPipeline)
    unet = Checkpoint(sdxl_fixture)
    edited = [name for name in unet.names() if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert sorted(Patch.load(patch_path).params) == sorted(edited)
    assert report["base"]["forget_accuracy"] >= 0.9
    assert set(report["formats"]) == set(FORMATS)
    for fmt, row in report["formats"].items():
        assert row["forget_accuracy"] <= 0.1 and row["paraphrase_accuracy"] <= 0.1, fmt
    assert returncode == (0 if report["passed"] else 1)
    if method == "uce":
        assert all(row["retain_ratio"] >= 0.9 and row["passed"] for row in report["formats"].values())
        assert report["attacks"]["inversion"]["forget_accuracy"] >= 0.5  # as on SD 1.x: RECE's finding about UCE


@pytest.mark.xfail(
    strict=False,
    reason="RECE's rounds at the SD fixture's settings turn the preserved shapes of the SDXL fixture into "
    "squares or background (retain 0.396, attack 0.688; docs/methods.md, SDXL)",
)
def test_rece_on_sdxl_passes_every_gate(erased):
    report = erased("rece")[2]
    assert all(row["retain_ratio"] >= 0.9 for row in report["formats"].values())
    assert report["passed"]


def test_lora_export_loads_into_the_sdxl_pipeline(sdxl_fixture, erased, tmp_path):
    patch_path, lora = erased("uce")[0], tmp_path / "lora"
    export_patched(sdxl_fixture, patch_path, "diffusers-lora", lora)
    pipe = DiffusionPipeline.from_pretrained(sdxl_fixture)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = dict(pipe.unet.named_parameters())
    base, patch = Checkpoint(sdxl_fixture), Patch.load(patch_path)
    for param in patch.params:
        delta = patch.delta(param)
        error = (fused[param.removeprefix("unet/")].detach() - (base.tensor(param) + delta)).norm()
        assert error <= 0.05 * delta.norm(), param


def test_transformer_pipelines_are_refused_in_one_line(sdxl_fixture, tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    encoder = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=16, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
    )  # fmt: skip
    torch.manual_seed(0)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(encoder), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(encoder), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    ).save_pretrained(tmp_path / "sd3")  # fmt: skip
    out = tmp_path / "p.safetensors"
    result = run_cli("erase", str(tmp_path / "sd3"), "--spec", str(sdxl_fixture / "spec.toml"), "--out", str(out),
                     expect=2)  # fmt: skip
    assert "SD3Transformer2DModel" in result.stderr and "joint attention" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_onnx_export_of_sdxl_is_refused_in_one_line(sdxl_fixture, erased, tmp_path):
    out = tmp_path / "onnx"
    result = run_cli("export", str(sdxl_fixture), "--to", "onnx", "--patch", str(erased("uce")[0]), "--out", str(out),
                     expect=2)  # fmt: skip
    assert "SDXL" in result.stderr and "optimum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_the_prompt_embedding_attack_refuses_sdxl_in_one_line(erased, sdxl_fixture, tmp_path):
    patched = erased("uce")[1]
    spec = reduced_spec(sdxl_fixture, tmp_path)
    result = run_cli("verify", "--base", str(sdxl_fixture), "--patched", str(patched), "--spec", spec,
                     "--formats", "safetensors", "--attacks", "prompt_embedding", expect=2)  # fmt: skip
    assert result.stderr.count("\n") == 1 and "runs on SD 1.x/2.x pipelines" in result.stderr
