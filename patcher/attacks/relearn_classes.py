"""Relearning for classifiers: fine-tune on the classes the patch kept, then test the forgotten ones.

An erasure that only pushed the forget class's images off their label, as gradient ascent
does, is often shallow: ordinary training on the other classes restores the shared features
(and batch-norm statistics) the class was recognised by, and its accuracy comes back. The
attack trains a copy of the patched classifier on the training images of every retained
class (`[stats] data`) for a fixed budget, then scores the test images (`[verify] data`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.attacks import AttackInputs, register
from patcher.errors import PatcherError
from patcher.imagesets import ImageSet, top1_accuracy, train_and_test_sets
from patcher.settings import setting


@dataclass(frozen=True)
class ClassRelearnBudget:
    """The classifier relearning attack's [attacks.relearn_classes] keys."""

    steps: int = setting(50, "AdamW steps of full fine-tuning, the model in training mode", minimum=0)
    lr: float = setting(1e-3, "AdamW's learning rate", minimum=0)
    batch_size: int = setting(64, "retained-class training images per step, drawn with replacement", minimum=1)
    seed: int = setting(0, "seed of the image draws")


def trained_on_images(model, images: ImageSet, budget: ClassRelearnBudget):
    """A copy of `model` after `budget.steps` AdamW steps of cross-entropy on `images`."""
    attacker = copy.deepcopy(model).float().train()
    optimizer = torch.optim.AdamW(attacker.parameters(), lr=budget.lr)
    generator = torch.Generator().manual_seed(budget.seed)
    for _ in range(budget.steps):
        batch = torch.randint(len(images), (budget.batch_size,), generator=generator)
        logits = attacker(pixel_values=images.pixel_values[batch].to(attacker.device)).logits
        loss = F.cross_entropy(logits, images.labels[batch].to(attacker.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return attacker.eval()


@register(
    "relearn_classes",
    ClassRelearnBudget,
    ("classifier",),
    "fine-tuning on the retained classes' training images, then the forget classes' test images",
)
def relearn_classes(inputs: AttackInputs, budget: ClassRelearnBudget) -> dict:
    spec = inputs.spec
    train, test = train_and_test_sets(spec, "the relearn_classes attack")
    retained = train.of_classes(spec.forget_classes, keep=False)
    if not len(retained):
        raise PatcherError("the relearn_classes attack needs training images of the retained classes in [stats] data")
    attacker = trained_on_images(inputs.patched, retained, budget)
    return {
        "forget_accuracy": top1_accuracy(attacker, test.of_classes(spec.forget_classes)),
        "paraphrase_accuracy": None,
        "retain_accuracy": top1_accuracy(attacker, test.of_classes(spec.forget_classes, keep=False)),
        "images": len(retained),
    }
