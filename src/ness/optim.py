"""Sharpness-aware minimisation (SAM, Foret et al., ICLR 2021) as a wrapper around any torch optimiser.

This is the variant the NESS code uses (METHODS_SPEC §2.2): one ascent step of radius ρ along the normalised
gradient of every parameter that has one, a second gradient there, then the base optimiser's step from the
original weights with that second gradient (weight decay and momentum are the base optimiser's).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SAM_EPS = 1e-16  # added to ‖g‖ as in the official code, so a zero gradient gives a zero perturbation


class SAM:
    """`SAM(base, rho).step(closure)`: closure zeroes the gradients, computes the loss, calls backward and
    returns the loss; it is evaluated twice per step (at w and at w + e)."""

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05) -> None:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f"SAM: rho must be a positive finite number, got {rho!r} (the NESS code uses 0.05)")
        self.base = base
        self.rho = float(rho)

    @property
    def param_groups(self) -> list[dict]:
        """The base optimiser's groups, so learning-rate schedules act on SAM transparently."""
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One SAM update; returns the loss at the unperturbed weights w."""
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.rho / (grad_norm + SAM_EPS)
        # e_p = ρ·g_p/‖g‖ with ‖g‖ over all parameters together: the steepest ascent within a ρ-ball.
        perturbations = [p.grad * scale for p in params]
        for p, e in zip(params, perturbations, strict=True):
            p.add_(e)
        with torch.enable_grad():
            closure()  # gradient at w + e
        for p, e in zip(params, perturbations, strict=True):
            p.sub_(e)
        self.base.step()
        return loss
