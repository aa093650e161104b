"""Text-to-image pipelines: concepts erased from the UNet's cross-attention projections."""

from __future__ import annotations

from patcher.adapters.unet import UNetAdapter, check_unet_pipeline
from patcher.families import Edit, Family, register
from patcher.methods import EditInputs
from patcher.models import load_pipeline
from patcher.spec import Spec
from patcher.verification.pipelines import verify_pipeline


class TextToImage(Family):
    name = "t2i-unet"
    paraphrase_note = "Verify prompts the edit never saw (the `paraphrase` column)."
    shows_images = True

    def edit(self, folder, spec, method, config, stats, robust_to) -> Edit:
        check_unet_pipeline(folder)
        adapter = UNetAdapter.from_pipeline(load_pipeline(folder))
        return Edit(method.run(EditInputs(adapter, None, spec, config, None, [])))

    def verify(self, base, patched, spec, formats, artifacts) -> dict:
        return verify_pipeline(base, patched, spec, formats)

    def erased_items(self, spec: Spec) -> list[str]:
        return [f"concept `{c['erase']}` → anchor `{c.get('anchor', '')}`" for c in spec.concepts]


register(TextToImage())
