"""DFGP: Data-augmented Flatness-aware Gradient Projection (Yang et al., ICCV 2023), METHODS_SPEC §6.

GPM's memory and projection, unchanged, with each training step made sharpness-aware twice over: the mixup
coefficients λ climb the loss (adversarial mixup, an ascent in data space) and the weights are perturbed by SAM (an
ascent in weight space) before the descent gradient is taken, then projected as in GPM. Per batch (x, y):

    x_mix = (1 − λ)⊙x + λ⊙x_π,  λ_i ~ Beta(α, α), π a random permutation
    L(w, λ) = CE(f(x), y) + w_mix·[mean(1 − λ)·CE(f(x_mix), y) + mean(λ)·CE(f(x_mix), y_π)]
    λ ← clamp(λ + ρ_λ·∇_λL/‖∇_λL‖, 0, 1),  e = ρ·∇_wL/‖∇_wL‖,  w ← w − η·Proj(∇_wL(w + e, λ))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.methods.base import Forward, Optimizer, register
from ness.methods.gpm import GPM, GPMConfig
from ness.models import call_model
from ness.optim import SAM, SAM_EPS
from ness.validation import Rule, flag, number


@dataclass(frozen=True)
class DFGPConfig(GPMConfig):
    """DFGP settings: GPM's (with a constant threshold) plus the two ascents; defaults are the official CIFAR-100
    logs' (METHODS_SPEC §6)."""

    threshold: float = 0.95
    """Constant ε_th (§6: 0.95 CIFAR-100 and 5-datasets, 0.97 miniImageNet)."""
    threshold_increment: float = 0.0
    """DFGP keeps ε_th constant (§6)."""
    mixup_alpha: float = 20.0
    """α of λ_i ~ Beta(α, α), > 0 (§6: 20 CIFAR-100 and miniImageNet, 1 5-datasets); large α keeps λ near 1/2."""
    mixup_weight: float = 0.1
    """w_mix, ≥ 0, the weight of the mixup loss (§6: 0.1 CIFAR-100, 1e-4 5-datasets, 0.01 miniImageNet);
    0 turns the mixup off and leaves GPM with SAM (NESS's `main_dfgp_*_sam.py`)."""
    rho: float = 0.05
    """SAM radius ρ of the weight perturbation, > 0 (§6: 0.05)."""
    lambda_rho: float = 0.05
    """Step ρ_λ of the normalised ascent on λ, ≥ 0 (§6: 0.05, hard-coded in the official scripts); 0 is plain mixup."""
    swapped_label_weights: bool = False
    """Official behaviour (§6): the label weights are swapped against the image weights, so y gets mean(λ) and y_π
    mean(1 − λ) although x has weight 1 − λ in x_mix. False (fixed) gives y mean(1 − λ) and y_π mean(λ)."""

    RULES: ClassVar[dict[str, Rule]] = {
        **GPMConfig.RULES,
        "mixup_alpha": number(above=0, fix="DFGP uses 20, or 1 on 5-datasets"),
        "mixup_weight": number(at_least=0, fix="DFGP uses 0.1, 0.01 or 1e-4; 0: no mixup"),
        "rho": number(above=0, fix="DFGP uses 0.05"),
        "lambda_rho": number(at_least=0, fix="DFGP uses 0.05; 0: no ascent on λ"),
        "swapped_label_weights": flag(),
    }


def mix_inputs(x: Tensor, permutation: Tensor, lam: Tensor) -> Tensor:
    """x_mix = (1 − λ)⊙x + λ⊙x_π, with λ_i scaling every feature of example i."""
    lam = lam.view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
    return (1 - lam) * x + lam * x[permutation]


def mixup_loss(logits: Tensor, y: Tensor, y_permuted: Tensor, lam: Tensor, swapped: bool = False) -> Tensor:
    """mean(1 − λ)·CE(logits, y) + mean(λ)·CE(logits, y_π), CE mean-reduced, so only the mean of λ matters;
    `swapped` gives y the weight mean(λ) and y_π mean(1 − λ), as the official code does."""
    weight_y, weight_permuted = (lam.mean(), (1 - lam).mean()) if swapped else ((1 - lam).mean(), lam.mean())
    return weight_y * F.cross_entropy(logits, y) + weight_permuted * F.cross_entropy(logits, y_permuted)


def ascend_lambda(lam: Tensor, grad: Tensor, step: float) -> Tensor:
    """One normalised ascent step on the mixup coefficients, kept in [0, 1]: clamp(λ + ρ_λ·g/‖g‖, 0, 1)."""
    return (lam + step * grad / (torch.linalg.vector_norm(grad) + SAM_EPS)).clamp(0, 1)


STEP_FIELDS = ("mean_loss", "mean_mixup_ce", "mean_lambda_drawn", "mean_lambda_adversarial", "mean_lambda_shift")


@register
class DFGP(GPM):
    """GPM trained with adversarial mixup and SAM.

    The trainer's optimiser must be a plain one (TrainConfig.sam_rho = 0): DFGP wraps it in its own SAM of radius
    `rho`. The perturbation covers every parameter the optimiser trains (after task 0 the projected weights and the
    current head; the official code also perturbs BatchNorm, whose gradient it then zeroes). The two forward passes
    (x, x_mix) are separate, so BatchNorm sees each batch on its own, as in the official code. The loss a step
    returns is L at w with the drawn λ. λ and π come from a NumPy generator seeded from torch's global one at
    construction (the official code uses np.random), saved with the state.
    """

    name = "dfgp"
    config_class = DFGPConfig
    distributed_ok = False
    distributed_reason = (
        "its step draws mixup pairs within each rank's rows and ascends λ on them with torch.autograd.grad"
    )

    def __init__(self, model: nn.Module, config: DFGPConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self._mixup_generator = np.random.Generator(np.random.PCG64(int(torch.randint(2**62, ()))))
        self.step_records: list[dict[str, Any]] = []
        self._steps, self._sums = 0, None  # the open task's step count and summed STEP_FIELDS

    # -- one step --------------------------------------------------------------------------------------
    def draw_mixup(self, n: int) -> tuple[Tensor, Tensor]:
        """λ ~ Beta(α, α) (float32, one per example) and a random permutation π of the n examples."""
        lam = self._mixup_generator.beta(self.config.mixup_alpha, self.config.mixup_alpha, size=n)
        permutation = self._mixup_generator.permutation(n)
        return torch.from_numpy(lam.astype(np.float32)), torch.from_numpy(permutation)

    def dfgp_loss(self, t: int, x: Tensor, y: Tensor, lam: Tensor, permutation: Tensor) -> tuple[Tensor, Tensor]:
        """(L, the mixup term's cross-entropy part): the gradient reaches λ only through x_mix, since the label
        weights use λ detached."""
        clean = self.training_loss(t, x, y)
        mixed = mixup_loss(
            self.predict(mix_inputs(x, permutation, lam), t),
            y,
            y[permutation],
            lam.detach(),
            self.config.swapped_label_weights,
        )
        return clean + self.config.mixup_weight * mixed, mixed.detach()

    def training_step(
        self,
        t: int,
        x: Tensor,
        y: Tensor,
        optimizer: Optimizer,
        check_loss: Callable[[Tensor], None],
        tasks: Tensor | None = None,
    ) -> Tensor:
        """λ and weight ascent at w (unprojected gradient), the descent gradient at (w + e, λ_adv), projected, and
        the optimiser's step from w."""
        if isinstance(optimizer, SAM):
            raise ValueError("dfgp applies its own SAM (DFGPConfig.rho): train it with TrainConfig.sam_rho = 0")
        if tasks is not None:
            raise ValueError("dfgp mixes examples of one task: it cannot train on several tasks' data at once")
        mixup = self.draw_mixup(x.shape[0]) if self.config.mixup_weight > 0 else None
        drawn, permutation = (None, None) if mixup is None else (mixup[0].to(x.device), mixup[1].to(x.device))
        adversarial, first_mixed = drawn, []

        def closure() -> Tensor:
            nonlocal adversarial
            optimizer.zero_grad(set_to_none=True)
            ascent = not first_mixed  # the first call, at w: ascend λ and leave the gradient unprojected for SAM's e
            if adversarial is None:
                loss, mixed = self.training_loss(t, x, y), None
            else:
                lam = adversarial.detach().requires_grad_(ascent)
                loss, mixed = self.dfgp_loss(t, x, y, lam, permutation)
            check_loss(loss)
            loss.backward()
            if not ascent:
                self.after_backward(t)  # the descent gradient at (w + e, λ_adv), projected
                return loss
            first_mixed.append(mixed)
            if adversarial is not None:
                adversarial = ascend_lambda(lam.detach(), lam.grad, self.config.lambda_rho)
            return loss

        loss = SAM(optimizer, self.config.rho).step(closure)
        self.after_step(t)
        loss = loss.detach()
        self._accumulate(loss, drawn, adversarial, first_mixed[0])
        return loss

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _accumulate(self, loss: Tensor, drawn: Tensor | None, adversarial: Tensor | None, mixed: Tensor | None) -> None:
        """Add the step's numbers to the task's sums on the device (no synchronisation per step)."""
        values = [loss]
        if drawn is not None and adversarial is not None and mixed is not None:
            values += [mixed, drawn.mean(), adversarial.mean(), (adversarial - drawn).abs().mean()]
        step = torch.stack(values).double()
        self._steps += 1
        self._sums = step if self._sums is None else self._sums + step

    def on_begin_task(self, t: int) -> None:
        super().on_begin_task(t)
        self._steps, self._sums = 0, None

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        super().on_end_task(t, batches)
        means = [] if self._sums is None else (self._sums / self._steps).tolist()
        means += [math.nan] * (len(STEP_FIELDS) - len(means))
        self.step_records.append(
            {"task": t, "layer": None, "steps": self._steps, **dict(zip(STEP_FIELDS, means, strict=True))}
        )

    def diagnostics(self) -> list[dict[str, Any]]:
        """GPM's per-(task, layer) memory records, then one per task (layer None) on its steps: the mean loss L,
        the mean mixup cross-entropy, and the mean λ drawn, after the ascent, and the mean |Δλ| of the ascent."""
        return super().diagnostics() + [dict(r) for r in self.step_records]

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            mixup_generator=self._mixup_generator.bit_generator.state,
            step_records=[dict(r) for r in self.step_records],
            step_sums=(self._steps, None if self._sums is None else self._sums.cpu()),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._mixup_generator.bit_generator.state = state["mixup_generator"]
        self.step_records = [dict(r) for r in state["step_records"]]
        self._steps, sums = state["step_sums"]
        self._sums = None if sums is None else sums.to(next(self.model.parameters()).device)
