"""SAM against the update written out by hand on quadratics, and the trainer's choice of optimiser per task."""

from __future__ import annotations

import math

import pytest
import torch

from ness.optim import SAM
from ness.trainer import TrainConfig, build_optimizer

# f(a, b) = ½ aᵀA a + ½ (b·c)² − pᵀa : two parameters, so ‖g‖ must be taken over both together.
A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
P = torch.tensor([1.0, -2.0], dtype=torch.float64)
C = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)


def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * a @ A @ a + 0.5 * (b @ C) ** 2 - P @ a


def grads_by_hand(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∇_a f = A a − p, ∇_b f = (b·c) c."""
    return A @ a - P, (b @ C) * C


def make_params(a0, b0):
    return torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())


def closure_for(optimizer, a, b, calls: list[int]):
    def closure():
        calls.append(1)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(a, b)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sam_step_matches_hand_formula(weight_decay):
    a0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    b0 = torch.tensor([0.2, -0.3, 0.7], dtype=torch.float64)
    lr, rho = 0.1, 0.05
    a, b = make_params(a0, b0)
    sam = SAM(torch.optim.SGD([a, b], lr=lr, weight_decay=weight_decay), rho)
    calls: list[int] = []
    loss = sam.step(closure_for(sam, a, b, calls))
    # By hand: g = ∇f(w0); e = ρ g/‖g‖ (norm over both tensors); w1 = w0 − lr (∇f(w0 + e) + wd·w0).
    ga, gb = grads_by_hand(a0, b0)
    norm = math.sqrt(float(ga @ ga + gb @ gb))
    ea, eb = rho * ga / norm, rho * gb / norm
    ga2, gb2 = grads_by_hand(a0 + ea, b0 + eb)
    torch.testing.assert_close(a.detach(), a0 - lr * (ga2 + weight_decay * a0))
    torch.testing.assert_close(b.detach(), b0 - lr * (gb2 + weight_decay * b0))
    assert len(calls) == 2  # two forward/backward passes per step
    torch.testing.assert_close(loss.detach(), loss_of(a0, b0))  # the loss at w, not at w + e


def test_sam_two_steps_with_momentum_match_explicit_loop():
    a0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    b0 = torch.tensor([0.2, -0.3, 0.7], dtype=torch.float64)
    lr, rho, m = 0.05, 0.1, 0.9
    a, b = make_params(a0, b0)
    sam = SAM(torch.optim.SGD([a, b], lr=lr, momentum=m), rho)
    for _ in range(2):
        sam.step(closure_for(sam, a, b, []))
    wa, wb = a0.clone(), b0.clone()
    buf_a = buf_b = None
    for _ in range(2):
        ga, gb = grads_by_hand(wa, wb)
        norm = math.sqrt(float(ga @ ga + gb @ gb))
        ga2, gb2 = grads_by_hand(wa + rho * ga / norm, wb + rho * gb / norm)
        buf_a = ga2 if buf_a is None else m * buf_a + ga2  # torch SGD: first buffer = gradient, no dampening
        buf_b = gb2 if buf_b is None else m * buf_b + gb2
        wa, wb = wa - lr * buf_a, wb - lr * buf_b
    torch.testing.assert_close(a.detach(), wa)
    torch.testing.assert_close(b.detach(), wb)


def test_sam_leaves_parameters_without_gradient_alone_and_zero_gradient_is_finite():
    used = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # at the minimum of ½‖w‖²: g = 0
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    sam = SAM(torch.optim.SGD([used, unused], lr=0.1), rho=0.05)

    def closure():
        sam.zero_grad()
        loss = 0.5 * (used**2).sum()
        loss.backward()
        return loss

    sam.step(closure)
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(used.detach(), torch.zeros(2, dtype=torch.float64))  # e = 0, not NaN


@pytest.mark.parametrize("rho", [0, -0.1, math.nan, math.inf])
def test_sam_rejects_bad_rho(rho):
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="rho"):
        SAM(torch.optim.SGD([p], lr=0.1), rho)


def test_sam_param_groups_share_the_base_learning_rate():
    p = torch.nn.Parameter(torch.zeros(1))
    base = torch.optim.SGD([p], lr=0.1)
    sam = SAM(base, 0.05)
    for group in sam.param_groups:
        group["lr"] = 0.01  # what the trainer's lr schedule does
    assert base.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    ("rho", "tasks", "expected"),
    [
        (0.0, "all", ["SGD", "SGD", "SGD"]),
        (0.05, "all", ["SAM", "SAM", "SAM"]),
        (0.05, "first", ["SAM", "SGD", "SGD"]),  # the official NESS code: SAM in task 1 only
    ],
)
def test_build_optimizer_per_task(rho, tasks, expected):
    config = TrainConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, sam_rho=rho, sam_tasks=tasks)
    kinds = []
    for t in range(3):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = build_optimizer([p], config, t)
        kinds.append(type(opt).__name__)
        base = opt.base if isinstance(opt, SAM) else opt
        group = base.param_groups[0]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
        if isinstance(opt, SAM):
            assert opt.rho == rho
    assert kinds == expected


@pytest.mark.parametrize("bad", [{"sam_rho": -1.0}, {"sam_rho": math.nan}, {"sam_tasks": "last"}, {"eval_passes": 0}])
def test_train_config_rejects_bad_sam_and_eval_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)
