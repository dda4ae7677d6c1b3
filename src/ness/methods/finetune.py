"""Fine-tuning: train every parameter on each task in turn, with no protection (the forgetting lower bound)."""

from __future__ import annotations

from dataclasses import dataclass

from ness.methods.base import ContinualMethod, register
from ness.validation import Validated


@dataclass(frozen=True)
class FineTuneConfig(Validated):
    """Fine-tuning has no settings of its own; the optimiser and schedule come from the training config."""


@register
class FineTune(ContinualMethod):
    """Plain sequential training: the base class's defaults, nothing more."""

    name = "finetune"
    config_class = FineTuneConfig
    distributed_ok = True
    mapping_batches = True
