"""L2: every parameter pulled toward its value after the previous task, λ/2·‖θ − θ*‖² added to the loss (the plain
"L2" baseline of Kirkpatrick et al., PNAS 2017: EWC with every Fisher weight 1). Written as CONTRIBUTING.md's worked
example of adding a method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ness.methods.base import ContinualMethod, register
from ness.validation import Rule, Validated, number


@dataclass(frozen=True)
class L2Config(Validated):
    """The pull's strength."""

    lam: float = 1.0
    """λ of λ/2·‖θ − θ*‖² (0: plain fine-tuning)."""

    RULES: ClassVar[dict[str, Rule]] = {"lam": number(at_least=0, fix="a negative λ rewards change")}


@register
class L2(ContinualMethod):
    """Fine-tuning whose gradient also gets λ(θ − θ*) (the penalty's gradient), θ* the weights after the last task."""

    name = "l2"
    config_class = L2Config
    distributed_ok = True  # the penalty's gradient is the same on every rank
    mapping_batches = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchor: dict[str, torch.Tensor] = {}  # θ* by parameter name; empty until task 0 ends

    def after_backward(self, t: int) -> None:
        for name, p in self.model.named_parameters():
            if p.grad is not None and name in self.anchor:
                p.grad.add_(p.detach() - self.anchor[name], alpha=self.config.lam)

    def on_end_task(self, t: int, batches: Any) -> None:
        self.anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "anchor": {n: a.cpu().clone() for n, a in self.anchor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = next(self.model.parameters()).device
        self.anchor = {n: a.to(device) for n, a in state["anchor"].items()}
