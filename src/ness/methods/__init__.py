"""Continual-learning methods. Adding one: write one file with a ContinualMethod subclass, add one line below."""

from __future__ import annotations

from typing import Any

from torch import nn

from ness.methods.agem import AGEM, AGEMConfig
from ness.methods.base import ContinualMethod, StepProgress, TaskOrderError, adaptable_layers
from ness.methods.ewc import EWC, EWCConfig
from ness.methods.finetune import FineTune, FineTuneConfig
from ness.methods.gpm import GPM, GPMConfig
from ness.methods.joint import Joint, JointConfig
from ness.methods.ness import NESS, NESSConfig
from ness.methods.sgp import SGP, SGPConfig

METHODS: dict[str, type[ContinualMethod]] = {
    "ness": NESS,
    "finetune": FineTune,
    "gpm": GPM,
    "sgp": SGP,
    "ewc": EWC,
    "agem": AGEM,
    "joint": Joint,
}


def build_method(name: str, model: nn.Module, options: dict[str, Any] | None = None) -> ContinualMethod:
    """The method called `name` on `model`, its config built from `options` (field → value)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(model, cls.config_class(**(options or {})))


__all__ = [
    "AGEM",
    "EWC",
    "GPM",
    "METHODS",
    "NESS",
    "SGP",
    "AGEMConfig",
    "ContinualMethod",
    "EWCConfig",
    "FineTune",
    "FineTuneConfig",
    "GPMConfig",
    "Joint",
    "JointConfig",
    "NESSConfig",
    "SGPConfig",
    "StepProgress",
    "TaskOrderError",
    "adaptable_layers",
    "build_method",
]
