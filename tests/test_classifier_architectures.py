"""Any `AutoModelForImageClassification` runs SSD, apply and verify: the classifier fixture's
ResNet, ViT and ConvNeXt, with random weights. ViT's checkpoint names its tensors otherwise
than its module tree does (transformers renames them on load), so its patch must use the
checkpoint's names."""

import json
import shutil

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from transformers import AutoModelForImageClassification

from patcher.fixtures.classifier import ARCHITECTURES, classifier_model
from patcher.formats.patch import Patch


def tensor_names(path) -> set[str]:
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ssd_apply_and_verify_run_on_any_image_classifier(arch, classifier_fixture, tmp_path):
    torch.manual_seed(0)
    folder, patch, patched = tmp_path / arch, tmp_path / "ssd.safetensors", tmp_path / "patched"
    classifier_model(arch).save_pretrained(folder)
    # The fixture's image processor, images and spec, with this model in place of its ResNet.
    for name in ("preprocessor_config.json", "spec.toml"):
        shutil.copy(classifier_fixture / name, folder / name)
    shutil.copytree(classifier_fixture / "data", folder / "data")
    spec = str(folder / "spec.toml")

    run_cli("erase", str(folder), "--spec", spec, "--out", str(patch))
    deltas = {name.removesuffix(".delta"): delta for name, delta in Patch.load(patch).tensors.items()}
    assert deltas and set(deltas) <= tensor_names(folder / "model.safetensors")
    run_cli("apply", str(folder), str(patch), "--out", str(patched))

    # SSD only dampens: every patched parameter, as transformers loads it, is no larger in
    # magnitude than the base's, and exactly the tensors the patch changes did (a dampened
    # zero, such as a fresh bias, stays zero).
    base = AutoModelForImageClassification.from_pretrained(folder).state_dict()
    after = AutoModelForImageClassification.from_pretrained(patched).state_dict()
    changed = 0
    for name, weight in base.items():
        assert (after[name].abs() <= weight.abs()).all(), name
        changed += not torch.equal(after[name], weight)
    assert changed == sum(bool(delta.any()) for delta in deltas.values()) > 0

    report_path = tmp_path / "report.json"
    args = ("verify", "--base", str(folder), "--patched", str(patched), "--spec", spec, "--report", str(report_path))
    result = run_cli(*args, expect=None)
    report = json.loads(report_path.read_text())
    assert result.returncode == (0 if report["passed"] else 1)
    assert set(report["formats"]) == {"safetensors"}
    assert 0.0 <= report["formats"]["safetensors"]["forget_accuracy"] <= 1.0
