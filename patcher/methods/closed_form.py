"""The settings MEMIT and AlphaEdit share, as one config both extend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from patcher.methods.lm_edit import TargetHparams
from patcher.methods.rounds import DEFAULT_MARGIN, DEFAULT_ROUNDS
from patcher.settings import setting


@dataclass(frozen=True)
class ClosedFormConfig:
    """The [erase] keys MEMIT and AlphaEdit share: the target-value search, the protected
    retain keys, the rounds of erase-and-check and the calibration on the retain facts."""

    # The config field that weighs what the statistics preserve; calibration raises it.
    preservation: ClassVar[str]

    steps: int = setting(TargetHparams.steps, "target search: optimisation steps per fact")
    lr: float = setting(TargetHparams.lr, "target search: Adam's learning rate")
    kl_factor: float = setting(
        TargetHparams.kl_factor, "target search: weight of the KL term on the prompt 'SUBJECT is a'"
    )
    clamp_norm: float = setting(TargetHparams.clamp_norm, "target search: largest change, times the value's norm")
    context_templates: int = setting(TargetHparams.context_templates, "target search: sampled prefixes per fact")
    retain_weight: float = setting(1.0, "weight of ‖Δk‖² at every token of the seen retain prompts (0: off)")
    rounds: int = setting(DEFAULT_ROUNDS, "erase, check, erase the survivors again: at most this many rounds")
    margin: float = setting(DEFAULT_MARGIN, "erased = the target trails another token by this many nats")
    calibrate: bool = setting(True, "try gentler settings until the seen retain facts hold the retain gate")

    def target(self) -> TargetHparams:
        """The target-value search these settings ask for."""
        return TargetHparams(
            steps=self.steps,
            lr=self.lr,
            kl_factor=self.kl_factor,
            clamp_norm=self.clamp_norm,
            context_templates=self.context_templates,
            margin=self.margin,
        )
