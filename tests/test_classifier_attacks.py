"""Attacks on a patched classifier: relearning brings a class back from a gradient-ascent
patch, the membership test tells memorised images from unseen ones, neither fires on the
base, and `verify --attacks all` gates both."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli

from patcher.attacks import ATTACKS, AttackInputs, run_attacks
from patcher.imagesets import ImageSet, top1_accuracy
from patcher.models import load_classifier
from patcher.spec import load_spec


@pytest.fixture(scope="module")
def classifier(classifier_fixture):
    """The fixture's base classifier, its spec and its training images."""
    spec = load_spec(classifier_fixture / "spec.toml")
    return load_classifier(classifier_fixture), spec, ImageSet.load(spec.stats_data)


def trained(model, images: ImageSet, labels: torch.Tensor, steps: int, lr: float, sign: float = 1.0):
    """A copy of `model` after `steps` SGD steps of `sign` × cross-entropy on `images` with `labels`."""
    copy_ = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(copy_.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(images), (64,), generator=generator)
        loss = sign * F.cross_entropy(copy_(pixel_values=images.pixel_values[batch]).logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return copy_.eval()


def test_relearning_brings_a_class_back_from_a_gradient_ascent_patch(classifier):
    base, spec, train = classifier
    forget = train.of_classes(spec.forget_classes)
    # A shallow erasure: gradient ascent on the forget class's training images.
    weak = trained(base, forget, forget.labels, steps=30, lr=1e-3, sign=-1.0)
    test = ImageSet.load(spec.eval_data)
    assert top1_accuracy(weak, test.of_classes(spec.forget_classes)) <= 0.05
    attack = ATTACKS["relearn_classes"]
    row = attack.run(AttackInputs(base, weak, None, spec), attack.budget())
    assert row["forget_accuracy"] >= 0.5 and row["images"] == len(train) - len(forget)


def test_relearning_keeps_the_bases_retained_classes(classifier):
    base, spec, _ = classifier
    attack = ATTACKS["relearn_classes"]
    row = attack.run(AttackInputs(base, base, None, spec), attack.budget())
    assert row["retain_accuracy"] >= 0.95


def test_membership_tells_memorised_images_from_unseen_ones(classifier, tmp_path):
    base, spec, train = classifier
    # Noise images no model could generalise to: trained on 40 labelled with the forget class
    # among 40 labelled otherwise, it can only remember them; 40 more of that label are unseen.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((120, *train.pixel_values.shape[1:]), generator=generator)
    forget = spec.forget_classes[0]
    labels = torch.full((120,), forget)
    labels[40:80] = (forget + torch.randint(1, 8, (40,), generator=generator)) % 8
    memorised = trained(base, ImageSet(noise[:80], labels[:80]), labels[:80], steps=200, lr=0.05)
    members, unseen = ImageSet(noise[:40], labels[:40]), ImageSet(noise[80:], labels[80:])
    data = dataclasses.replace(spec, stats_data=members.save(tmp_path / "train.safetensors"),
                               eval_data=unseen.save(tmp_path / "test.safetensors"))  # fmt: skip
    row = run_attacks(AttackInputs(base, memorised, None, data), {"membership": {}})["membership"]
    assert row["membership_advantage"] > 0.5
    assert row["failures"] == [f"membership_advantage {row['membership_advantage']:.3f} > 0.25"]

    # The reference AUC: the share of (member, unseen) pairs where the member's loss is lower.
    with torch.no_grad():
        losses = [F.cross_entropy(memorised(pixel_values=s.pixel_values).logits, s.labels, reduction="none")
                  for s in (members, unseen)]  # fmt: skip
    expected = (losses[0][:, None] < losses[1][None, :]).double().mean().item()
    assert row["membership_auc"] == pytest.approx(expected, abs=1e-9)


def test_membership_does_not_fire_on_the_base(classifier):
    base, spec, _ = classifier
    rows = run_attacks(AttackInputs(base, base, None, spec), {"membership": {}})
    assert rows["membership"]["membership_advantage"] <= 0.25 and rows["membership"]["passed"]


def test_verify_attacks_all_prints_each_row_and_exits_1_on_a_failed_gate(classifier_fixture, tmp_path):
    folder = tmp_path / "classifier"
    shutil.copytree(classifier_fixture, folder)
    spec, patch, patched = folder / "spec.toml", tmp_path / "ssd.safetensors", tmp_path / "patched"
    run_cli("erase", str(folder), "--spec", str(spec), "--out", str(patch))
    run_cli("apply", str(folder), str(patch), "--out", str(patched))
    args = ["verify", "--base", str(folder), "--patched", str(patched), "--spec", str(spec), "--attacks", "all"]
    result = run_cli(*args, "--report", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["attacks"]) == {"membership", "relearn_classes"} and report["passed"]
    assert report["attacks"]["relearn_classes"]["budget"] == dataclasses.asdict(ATTACKS["relearn_classes"].budget())
    assert "attack: relearn_classes" in result.stdout and "attack: membership" in result.stdout
    assert "(gate 0.25)" in result.stdout  # the gated figure, not a column of the table, is in the notes

    # The same patch against a membership gate nothing passes: exit 1, and only that row fails.
    spec.write_text(spec.read_text() + "\n[attacks.membership]\nmax_membership_advantage = 0.0\n")
    report = json.loads(run_cli(*args, "--json", expect=1).stdout)
    assert report["attacks"]["membership"]["failures"][0].startswith("membership_advantage ")
    assert report["formats"]["safetensors"]["passed"] and report["attacks"]["relearn_classes"]["passed"]


def test_a_classifier_release_runs_the_specs_attacks_and_plots_them(classifier_fixture, tmp_path):
    folder = tmp_path / "classifier"
    shutil.copytree(classifier_fixture, folder)
    spec = folder / "spec.toml"
    spec.write_text(spec.read_text() + "\n[attacks.membership]\n\n[attacks.relearn_classes]\nsteps = 20\n")
    run_cli("release", str(spec), "--out", str(tmp_path / "release"))
    report = json.loads((tmp_path / "release" / "report.json").read_text())
    assert report["attacks"]["relearn_classes"]["budget"]["steps"] == 20 and report["passed"]
    card = (tmp_path / "release" / "README.md").read_text()
    assert f"membership advantage {report['attacks']['membership']['membership_advantage']:.3f} after it, pass" in card
    page = (tmp_path / "release" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # accuracy, recovery and the attacks, each against its gate
