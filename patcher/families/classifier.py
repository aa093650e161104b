"""Image classifiers: classes forgotten by dampening the parameters that serve them."""

from __future__ import annotations

from patcher.families import Edit, Family, register
from patcher.methods import EditInputs
from patcher.models import in_checkpoint_names, load_classifier
from patcher.spec import Spec
from patcher.verification.classifier import verify_classifier


class Classifier(Family):
    name = "classifier"

    def edit(self, folder, spec, method, config, stats, robust_to) -> Edit:
        model = load_classifier(folder)
        return Edit(in_checkpoint_names(model, method.run(EditInputs(model, None, spec, config, None, []))))

    def verify(self, base, patched, spec, formats, artifacts) -> dict:
        return verify_classifier(base, patched, spec, formats)

    def erased_items(self, spec: Spec) -> list[str]:
        return [f"class {label}" for label in spec.forget_classes]


register(Classifier())
