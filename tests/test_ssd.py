"""Per-sample Fisher of any parameters, SSD's dampening, and SSD on the classifier fixture."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from torch import nn

from patcher.imagesets import ImageSet
from patcher.methods.ssd import SSDConfig, dampened
from patcher.stats.per_sample import classifier_loss, per_sample_fisher


class TinyConvNet(nn.Module):
    """Conv2d, batch norm and a linear head: the layer kinds a classifier's Fisher covers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.norm = nn.BatchNorm2d(5)
        self.head = nn.Linear(5 * 7 * 7, 4)

    def forward(self, pixel_values):
        hidden = F.relu(self.norm(self.conv(pixel_values)))
        return type("Out", (), {"logits": self.head(hidden.flatten(1))})


def test_per_sample_fisher_matches_float64_loop():
    torch.manual_seed(0)
    model = TinyConvNet().double()
    model.norm.running_mean.uniform_(-0.5, 0.5)
    model.norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    images, labels = torch.randn(11, 3, 7, 7, dtype=torch.float64), torch.randint(4, (11,))
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for image, label in zip(images, labels, strict=True):  # one backward pass per sample
        model.zero_grad()
        F.cross_entropy(model(image[None]).logits, label[None]).backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.square()
    fisher = per_sample_fisher(model, classifier_loss, (images, labels), chunk_size=4)
    assert set(fisher) == set(expected)
    for name, value in fisher.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-12)
    only_conv = per_sample_fisher(model, classifier_loss, (images, labels), names=["conv.weight"])
    assert list(only_conv) == ["conv.weight"]
    torch.testing.assert_close(only_conv["conv.weight"].double(), expected["conv.weight"], rtol=1e-5, atol=1e-12)


def test_dampening_selects_and_scales_by_the_fisher_ratio():
    theta = {"w": torch.tensor([2.0, 2.0, 2.0, 2.0]), "untouched": torch.ones(2)}
    forget = {"w": torch.tensor([30.0, 5.0, 100.0, 0.0]), "untouched": torch.ones(2)}
    full = {"w": torch.tensor([1.0, 1.0, 4.0, 1.0]), "untouched": torch.ones(2)}
    deltas = dampened(theta, forget, full, SSDConfig(ssd_alpha=10.0, ssd_lambda=1.0))
    # Entry 0: 30 > 10·1, β = 1/30; entry 2: 100 > 40, β = 4/100; entries 1 and 3 not selected.
    expected = torch.tensor([2 / 30 - 2, 0.0, 2 * 0.04 - 2, 0.0])
    torch.testing.assert_close(deltas["w"], expected)
    assert "untouched" not in deltas
    capped = dampened(theta, forget, full, SSDConfig(ssd_alpha=10.0, ssd_lambda=50.0))  # β = min(λ F_D/F_f, 1)
    torch.testing.assert_close(capped["w"], torch.tensor([0.0, 0.0, 0.0, 0.0]))


def test_classifier_fixture_is_accurate_and_loads_in_transformers(classifier_fixture):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(classifier_fixture).eval()
    assert model.config.num_labels >= 8
    test = ImageSet.load(classifier_fixture / "data" / "test.safetensors")
    with torch.no_grad():
        accuracy = (model(pixel_values=test.pixel_values).logits.argmax(-1) == test.labels).float().mean()
    assert accuracy >= 0.95
    processor = AutoImageProcessor.from_pretrained(classifier_fixture)
    image = ((test.pixel_values[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    processed = processor(images=image, return_tensors="pt", do_rescale=False).pixel_values
    torch.testing.assert_close(processed[0], test.pixel_values[0].clamp(-1, 1), atol=0.01, rtol=0)  # via uint8


def test_ssd_forgets_a_class_and_keeps_the_others(classifier_fixture, tmp_path):
    spec = str(classifier_fixture / "spec.toml")
    patch, patched = tmp_path / "ssd.safetensors", tmp_path / "patched"
    run_cli("erase", str(classifier_fixture), "--spec", spec, "--out", str(patch))
    run_cli("apply", str(classifier_fixture), str(patch), "--out", str(patched))
    report_path = tmp_path / "report.json"
    run_cli(
        "verify",
        "--base",
        str(classifier_fixture),
        "--patched",
        str(patched),
        "--spec",
        spec,
        "--report",
        str(report_path),
    )
    report = json.loads(report_path.read_text())
    assert report["base"]["forget_accuracy"] >= 0.95
    row = report["formats"]["safetensors"]
    assert row["forget_accuracy"] <= 0.05
    assert row["retain_ratio"] >= 0.95
    assert report["passed"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("ssd_alpha = 2.0", "ssd_alpha = 10.0"),  # SSD's default cannot select with one class in eight
        ('formats = ["safetensors"]', 'formats = ["safetensors", "nf4"]'),
    ],
)
def test_classifier_bad_input_is_one_line(classifier_fixture, tmp_path, change, message):
    text = (classifier_fixture / "spec.toml").read_text()
    assert change in text
    spec = tmp_path / "spec.toml"
    spec.write_text(text.replace(change, message).replace('"data/', f'"{classifier_fixture}/data/'))
    if "alpha" in message:
        args = ["erase", str(classifier_fixture), "--spec", str(spec), "--out", str(tmp_path / "p.safetensors")]
    else:
        args = ["verify", "--base", str(classifier_fixture), "--patched", str(classifier_fixture), "--spec", str(spec)]
    result = run_cli(*args, expect=2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("at most 8" in result.stderr) if "alpha" in message else ("nf4" in result.stderr)
    assert not (tmp_path / "p.safetensors").exists()


def test_stats_fisher_on_a_classifier_sums_every_parameter_over_the_image_set(classifier_fixture, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    images = tmp_path / "few.safetensors"
    data = ImageSet.load(classifier_fixture / "data" / "test.safetensors")
    ImageSet(data.pixel_values[:40], data.labels[:40]).save(images)
    out = tmp_path / "fisher.safetensors"
    result = run_cli("stats", str(classifier_fixture), "--corpus", str(images), "--kind", "fisher", "--out", str(out))
    assert "every parameter over 40 samples" in result.stdout
    model = AutoModelForImageClassification.from_pretrained(classifier_fixture).eval()
    expected = per_sample_fisher(model, classifier_loss, (data.pixel_values[:40], data.labels[:40]))
    with safe_open(out, "pt") as f:
        assert f.metadata()["sample_count"] == "40"
        assert {n.removesuffix(".fisher") for n in f.keys()} == set(expected)  # noqa: SIM118
        for name, value in expected.items():
            torch.testing.assert_close(f.get_tensor(f"{name}.fisher"), value, rtol=1e-5, atol=1e-8)
    wrong = run_cli("stats", str(classifier_fixture), "--corpus", str(images), "--out", str(tmp_path / "x"), expect=2)
    assert "use --kind fisher" in wrong.stderr and not (tmp_path / "x").exists()
