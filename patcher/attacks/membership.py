"""Membership inference for classifiers: can the patched model still tell the images it was
trained on from unseen ones of the same class?

After an erasure that worked like retraining without the class, the forget class's training
images (members) and its test images (non-members) are two samples of the same unseen
population: their losses are alike. A patch that marks its training images instead, by
remembering them or by pushing exactly them away (the "Streisand effect" of many unlearning
methods), lets a loss threshold tell them apart. The attack scores every member and
non-member by the patched model's loss on its true label; the gated figure is the AUC's
distance from chance, |2·AUC − 1|: 0 when a threshold does no better than a coin, 1 when it
separates the two perfectly. The base's figure is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.attacks import AttackInputs, register
from patcher.errors import PatcherError
from patcher.imagesets import ImageSet, logits_of, train_and_test_sets
from patcher.settings import setting


@dataclass(frozen=True)
class MembershipBudget:
    """The membership attack's [attacks.membership] keys."""

    members: int = setting(500, "at most this many training images of the forget classes, the first ones", minimum=1)


def losses(model, images: ImageSet) -> torch.Tensor:
    """Each image's cross-entropy on its label."""
    return F.cross_entropy(logits_of(model, images), images.labels, reduction="none")


def loss_auc(members: torch.Tensor, non_members: torch.Tensor) -> float:
    """The probability that a random member has a lower loss than a random non-member (ties
    count half): the ROC AUC of the loss-threshold attack."""
    gaps = non_members[None, :] - members[:, None]
    return ((gaps > 0).double().mean() + 0.5 * (gaps == 0).double().mean()).item()


def advantage(model, members: ImageSet, non_members: ImageSet) -> tuple[float, float]:
    """The loss AUC of members against non-members, and its distance from chance |2·AUC − 1|."""
    auc = loss_auc(losses(model, members), losses(model, non_members))
    return auc, abs(2 * auc - 1)


@register(
    "membership",
    MembershipBudget,
    ("classifier",),
    "a loss threshold telling the forget classes' training images from their test images",
    gated="membership_advantage",
    default_limit=0.25,
)
def membership(inputs: AttackInputs, budget: MembershipBudget) -> dict:
    spec = inputs.spec
    train, test = train_and_test_sets(spec, "the membership attack")
    forget_train, non_members = train.of_classes(spec.forget_classes), test.of_classes(spec.forget_classes)
    if not len(forget_train) or not len(non_members):
        raise PatcherError("the membership attack needs forget-class images in both [stats] data and [verify] data")
    members = ImageSet(forget_train.pixel_values[: budget.members], forget_train.labels[: budget.members])
    auc, gap = advantage(inputs.patched, members, non_members)
    return {
        "membership_auc": auc,
        "membership_advantage": gap,
        "base_membership_advantage": advantage(inputs.base, members, non_members)[1],
        "members": len(members),
        "non_members": len(non_members),
    }
