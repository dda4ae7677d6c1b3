"""Continual-learning methods. Adding one: one file with a `@register`ed ContinualMethod subclass (CONTRIBUTING.md)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ness.methods.agem import AGEM, AGEMConfig
from ness.methods.base import METHODS, ContinualMethod, StepProgress, TaskOrderError, adaptable_layers
from ness.methods.dfgp import DFGP, DFGPConfig
from ness.methods.ewc import EWC, EWCConfig
from ness.methods.finetune import FineTune, FineTuneConfig
from ness.methods.fsdgpm import FSDGPM, FSDGPMConfig
from ness.methods.gpm import GPM, GPMConfig
from ness.methods.hat import HAT, HATConfig
from ness.methods.joint import Joint, JointConfig
from ness.methods.ness import NESS, NESSConfig
from ness.methods.owm import OWM, OWMConfig
from ness.methods.sgp import SGP, SGPConfig
from ness.methods.trgp import TRGP, TRGPConfig

# Every module of the package is imported, so a method's own file, with `@register` on its class, is all it takes.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_method(name: str, model: nn.Module, options: dict[str, Any] | None = None) -> ContinualMethod:
    """The method called `name` on `model`, its config built from `options` (field → value)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(model, cls.config_class(**(options or {})))


__all__ = [
    "AGEM",
    "DFGP",
    "EWC",
    "FSDGPM",
    "GPM",
    "HAT",
    "METHODS",
    "NESS",
    "OWM",
    "SGP",
    "TRGP",
    "AGEMConfig",
    "ContinualMethod",
    "DFGPConfig",
    "EWCConfig",
    "FSDGPMConfig",
    "FineTune",
    "FineTuneConfig",
    "GPMConfig",
    "HATConfig",
    "Joint",
    "JointConfig",
    "NESSConfig",
    "OWMConfig",
    "SGPConfig",
    "StepProgress",
    "TRGPConfig",
    "TaskOrderError",
    "adaptable_layers",
    "build_method",
]
