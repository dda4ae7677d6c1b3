"""SGP: Scaled Gradient Projection (Saha & Roy, AAAI 2023), METHODS_SPEC §4.

GPM's memory M plus an importance λ_j ∈ [0, 1] per basis vector, from how strongly the tasks' representations use
it. Later tasks' gradients become G − G·M diag(λ) Mᵀ: important directions are blocked as in GPM, less important
ones stay partly trainable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ness.methods.base import Forward, register
from ness.methods.gpm import GPM, GPMConfig
from ness.models import call_model
from ness.subspace import GradientProjection, MemoryUpdate, gradient_projection, projected_norms, sgp_importance
from ness.validation import Rule, number


@dataclass(frozen=True)
class SGPConfig(GPMConfig):
    """SGP settings: GPM's, plus α; defaults are the official CIFAR-100 script's (METHODS_SPEC §4)."""

    scale_coefficient: float = 10.0
    """α of the importance map f(x) = (α+1)·x / (α·x + max x), ≥ 0: larger α pushes every λ towards 1 (GPM)."""

    RULES: ClassVar[dict[str, Rule]] = {
        **GPMConfig.RULES,
        "scale_coefficient": number(at_least=0, fix="SGP uses 10"),
    }


@register
class SGP(GPM):
    """GPM whose projection is scaled by per-direction importances λ."""

    name = "sgp"
    config_class = SGPConfig
    distributed_ok = True

    def __init__(self, model: nn.Module, config: SGPConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.importances: dict[str, Tensor] = {}  # λ_ℓ, one per column of M_ℓ

    def update_memory(self, name: str, covariance: Tensor, threshold: float) -> MemoryUpdate:
        update = super().update_memory(name, covariance, threshold)
        # x_j = ‖Rᵀm_j‖ for every column of the grown M: a_j for the old columns, ŝ_j for the added ones.
        norms = projected_norms(update.basis, covariance.to(update.basis))
        self.importances[name] = sgp_importance(self.importances.get(name), norms, self.config.scale_coefficient)
        return update

    def projector(self, name: str, like: Tensor | None = None) -> GradientProjection:
        """P_ℓ = M diag(λ) Mᵀ."""
        return gradient_projection(self.bases[name], self.importances[name], like=like)

    def memory_record(self, name: str) -> dict[str, Any]:
        importance = self.importances[name]
        if importance.numel() == 0:
            return {"importance_min": math.nan, "importance_mean": math.nan}
        return {"importance_min": float(importance.min()), "importance_mean": float(importance.mean())}

    def memory_state(self) -> dict[str, Any]:
        return {
            **super().memory_state(),
            "importances": {name: v.to("cpu", copy=True) for name, v in self.importances.items()},
        }

    def load_memory_state(self, memory: dict[str, Any]) -> None:
        super().load_memory_state(memory)
        self.importances = {name: v.to(self.bases[name].device) for name, v in memory["importances"].items()}
