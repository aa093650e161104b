"""Text-to-image erasure end to end on the diffusion fixture: erase, apply, verify on images,
export as a diffusers LoRA, and the bad inputs the CLI must refuse."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from helpers import export_patched, pipeline_runs, reduced_spec, run_cli
from safetensors.torch import load_file

from patcher.adapters.unet import UNetAdapter
from patcher.attacks.inversion import inverted_embeddings as attack_inversion
from patcher.fixtures.diffusion import SHAPES, colour_templates, shape_accuracy
from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch
from patcher.methods.uce import inverted_embeddings as method_inversion
from patcher.spec import dump_spec, load_spec
from patcher.verification.judge import ShapeJudge


def test_fixture_is_a_stock_pipeline_that_draws_its_shapes(diffusion_fixture):
    pipe = DiffusionPipeline.from_pretrained(diffusion_fixture)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    judge = ShapeJudge.load(diffusion_fixture / "judge")
    assert shape_accuracy(pipe, judge, images_per_prompt=2) >= 0.9
    adapter = UNetAdapter.from_pipeline(pipe)
    shapes = [s for s in SHAPES if s != "blank"]
    rows = torch.stack([adapter.concept_embeddings(s, colour_templates()[:1])[0] for s in shapes])
    unit = torch.nn.functional.normalize(rows, dim=-1)  # (shapes, positions from the shape on, width)
    cosines = torch.einsum("ipd,jqd->ijpq", unit, unit)[~torch.eye(len(shapes), dtype=torch.bool)]
    assert cosines.abs().max() < 0.2  # each shape in its own directions (a random CLIP encoder: ~0.99)
    spec = load_spec(diffusion_fixture / "spec.toml")
    assert spec.family == "t2i-unet" and spec.concepts and spec.preserve
    assert set(spec.templates) < set(spec.images.prompts)  # verify asks prompts the edit never saw


@pytest.fixture(scope="module")
def erased(diffusion_fixture, tmp_path_factory):
    """`erased(method)`: erase, apply and verify (safetensors) once per method for this module;
    returns (patch path, patched folder, report, verify's exit code)."""
    return pipeline_runs(diffusion_fixture, tmp_path_factory, "safetensors")


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_erasure_holds_on_generated_images(erased, method):
    _, patched, report, returncode = erased(method)
    assert isinstance(DiffusionPipeline.from_pretrained(patched), StableDiffusionPipeline)
    assert report["base"]["forget_accuracy"] >= 0.9
    row = report["formats"]["safetensors"]
    assert row["forget_accuracy"] <= 0.1 and row["paraphrase_accuracy"] <= 0.1  # unseen colour too
    attack = report["attacks"]["inversion"]["forget_accuracy"]
    assert report["passed"] == (row["passed"] and attack <= 0.2)
    assert returncode == (0 if report["passed"] else 1)
    if method == "uce":
        assert row["retain_ratio"] >= 0.9 and row["passed"]
        assert attack >= 0.5  # RECE's inversion regenerates what UCE erased, as RECE reports


@pytest.mark.xfail(
    strict=False,
    reason="issue 25: RECE's 120 rounds pass every gate on some builds of the diffusion fixture only "
    "(retain 0.708 on one build before the template's prefix rows were kept; 0.917 with attack 0.219 on another)",
)
def test_rece_with_the_fixture_spec_passes_every_gate(erased):
    report = erased("rece")[2]
    assert report["formats"]["safetensors"]["retain_ratio"] >= 0.9
    assert report["passed"]  # after 120 rounds (the fixture's spec) no c′ draws the circle


def test_verify_fails_a_patch_that_erases_nothing(diffusion_fixture, tmp_path):
    spec = reduced_spec(diffusion_fixture, tmp_path)
    unchanged = tmp_path / "unchanged"
    shutil.copytree(diffusion_fixture, unchanged)
    result = run_cli(
        "verify", "--base", str(diffusion_fixture), "--patched", str(unchanged), "--spec", spec,
        "--formats", "safetensors", "--json", expect=1,
    )  # fmt: skip
    assert "forget_accuracy" in json.loads(result.stdout)["formats"]["safetensors"]["failures"][0]


def test_lora_export_loaded_and_fused_by_diffusers_matches_the_dense_patch(diffusion_fixture, erased, tmp_path):
    patch_path, lora = erased("rece")[0], tmp_path / "lora"
    export_patched(diffusion_fixture, patch_path, "diffusers-lora", lora)
    factors = load_file(lora / "pytorch_lora_weights.safetensors")
    # One rank for every layer (zero-padded): older diffusers scale a layer by a shared alpha over its rank.
    assert len({tensor.shape[0] for name, tensor in factors.items() if "lora_A" in name}) == 1
    patch = Patch.load(patch_path)
    pipe = DiffusionPipeline.from_pretrained(diffusion_fixture)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = dict(pipe.unet.named_parameters())
    base = Checkpoint(diffusion_fixture)
    for param in patch.params:
        delta = patch.delta(param)
        name = param.removeprefix("unet/")
        error = (fused[name].detach() - (base.tensor(param) + delta)).norm()
        assert error <= 0.05 * delta.norm(), param


def test_pipeline_bad_input_is_one_line_and_exit_2(diffusion_fixture, tmp_path):
    raw = load_spec(diffusion_fixture / "spec.toml").raw
    raw["model"]["path"] = str(diffusion_fixture)
    cases = {
        "is the concept itself": [{"erase": "circle", "anchor": "circle"}],
        "the pipeline would truncate it": [{"erase": " ".join(["circle"] * 20), "anchor": "blank"}],
    }
    for message, concepts in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(dump_spec({**raw, "concept": concepts}))
        result = run_cli("erase", "--spec", str(path), "--out", str(tmp_path / "p.safetensors"), expect=2)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    no_cross_attention = tmp_path / "no-cross-attention"
    shutil.copytree(diffusion_fixture, no_cross_attention)
    config = UNet2DConditionModel.load_config(diffusion_fixture / "unet")
    plain = {"down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2, "mid_block_type": None}
    shutil.rmtree(no_cross_attention / "unet")
    UNet2DConditionModel.from_config({**config, **plain}).save_pretrained(no_cross_attention / "unet")
    result = run_cli("erase", str(no_cross_attention), "--spec", str(diffusion_fixture / "spec.toml"),
                     "--out", str(tmp_path / "p.safetensors"), expect=2)  # fmt: skip
    assert "no cross-attention" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.safetensors").exists()


def test_the_attack_inverts_what_the_edit_did(diffusion_fixture):
    """Independent: verify's attack from two UNets' weights equals RECE's c′ from M and G = Σ W₀ᵀW₀."""
    base = DiffusionPipeline.from_pretrained(diffusion_fixture).unet
    patched = DiffusionPipeline.from_pretrained(diffusion_fixture).unet
    g = torch.Generator().manual_seed(0)
    transform = torch.eye(64, dtype=torch.float64) + 0.1 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    gram = torch.zeros(64, 64, dtype=torch.float64)
    with torch.no_grad():
        for name, module in patched.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                w = module.weight.double()
                gram += w.T @ w
                module.weight.copy_((w @ transform).float())
    embeddings = torch.randn(2, 12, 64, generator=g)
    expected = method_inversion(transform, gram, embeddings.reshape(-1, 64).double(), 0.1)
    got = attack_inversion(base, patched, embeddings, 0.1).reshape(-1, 64).double()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
