"""output_budget: each task's change to every recorded earlier input's output, summed, is held to β times their output
energy. Checked against explicit computations: a bisection for the projection, an explicit sum over the inputs for
the predicted change, and the constraint after every step of a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches
from ness import NESS, NESSConfig, TrainingLoopError
from ness.subspace import old_output_energy, output_change, project_to_output_budget


def bisection_projection(v: np.ndarray, sigma: np.ndarray, budget: float) -> np.ndarray:
    """The KKT solution by bisection on μ: rows vᵢ/(1 + μσᵢ²) with Σσᵢ²‖·‖² = budget (an independent solver)."""
    w, n = sigma**2, (v**2).sum(axis=1)
    lo, hi = 0.0, 1.0
    while (w * n / (1 + hi * w) ** 2).sum() > budget:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (w * n / (1 + mid * w) ** 2).sum() > budget else (lo, mid)
    return v / (1 + hi * w)[:, None]


@pytest.mark.parametrize("share", [0.5, 1e-3, 1e-9])
def test_the_projection_is_the_kkt_point_a_bisection_finds(share):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(40, 6, generator=g, dtype=torch.float64)
    sigma = torch.logspace(-3, 2, 40, dtype=torch.float64) * torch.rand(40, generator=g, dtype=torch.float64)
    budget = share * float(((sigma**2)[:, None] * v**2).sum())
    projected = project_to_output_budget(v, sigma, budget)
    expected = bisection_projection(v.numpy(), sigma.numpy(), budget)
    np.testing.assert_allclose(projected.numpy(), expected, rtol=1e-7, atol=1e-12)
    assert abs(output_change(projected, sigma) / budget - 1) < 1e-9  # on the boundary
    # It is the nearest point: any other feasible point on the segment towards 0 is farther.
    assert float((projected - v).norm()) <= float((v * (budget / output_change(v, sigma)) ** 0.5 - v).norm())


def test_a_v_inside_the_budget_is_untouched_and_bad_budgets_are_refused():
    v, sigma = torch.ones(3, 2), torch.tensor([1.0, 2.0, 3.0])
    assert project_to_output_budget(v, sigma, 100.0) is v
    assert torch.equal(project_to_output_budget(v, torch.tensor([0.0, 2.0, 3.0]), 0.0)[0], v[0])
    with pytest.raises(ValueError, match="budget must be ≥ 0"):
        project_to_output_budget(v, sigma, float("nan"))
    for bad in (0, -1e-3, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match=r"NESSConfig\.output_budget: got .*; a finite number > 0, or None"):
            NESSConfig(transfer_rank=0, output_budget=bad)


def task(t: int, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    scales = torch.logspace(0, -1.5, 12)  # anisotropic inputs: some directions carry much more than others
    x = torch.randn(n, 12, generator=g) * scales.roll(3 * t)
    return x, (x[:, t] > 0).long()


@pytest.mark.parametrize("adapt_bias", [False, True])
def test_the_constraint_holds_after_every_step_and_the_predicted_change_is_the_measured_one(adapt_bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16, bias=adapt_bias), nn.ReLU(), nn.Linear(16, 2, bias=adapt_bias))
    beta = 1e-3
    method = NESS(
        model, NESSConfig(transfer_rank=0, threshold="rank", rank=12, output_budget=beta, adapt_bias=adapt_bias)
    )
    x0, y0 = task(0)
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(model(x0), y0).backward()
        optimizer.step()
    method.end_task(0, batches(x0, y0, 32))
    first = model[0]
    rows0 = torch.cat([x0, torch.ones(len(x0), 1)], 1) if adapt_bias else x0
    weight0 = (torch.cat([first.weight, first.bias[:, None]], 1) if adapt_bias else first.weight).detach().clone()
    old_energy = float(((rows0.double() @ weight0.detach().double().T) ** 2).sum())  # Σ‖x̃ᵀW̃‖², by hand

    method.begin_task(1)
    layer = method.active["0"]
    assert layer.budget == pytest.approx(beta * old_energy, rel=1e-9)
    assert old_output_energy(method.covariances["0"], first, adapt_bias) == pytest.approx(old_energy, rel=1e-9)
    x1, y1 = task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.5)
    reached = False
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        optimizer.step()
        method.after_step(1)
        for active in method.active.values():
            change = output_change(active.adapter.V, active.kept_singular_values)
            assert change <= active.budget * (1 + 1e-9)
            reached |= change >= active.budget * (1 - 1e-5)
    assert reached  # the budget binds: without it the task would move the old outputs further
    # The predicted change, Σ‖x̃ᵀUV‖² from the covariance alone, is the sum over the recorded inputs, by hand.
    delta = layer.adapter.U.double() @ layer.adapter.V.detach().double()
    measured = float(((rows0.double() @ delta) ** 2).sum())
    assert output_change(layer.adapter.V, layer.kept_singular_values) == pytest.approx(measured, rel=1e-6)
    method.end_task(1, batches(x1, y1, 32))
    record = next(r for r in method.diagnostics() if r["layer"] == "0")
    assert record["predicted_output_change"] == pytest.approx(measured, rel=1e-6)
    assert record["output_budget"] == pytest.approx(beta * old_energy, rel=1e-9)
    # What the merged layer does to task 0's inputs: the same change, within the budget.
    merged = torch.cat([model[0].weight, model[0].bias[:, None]], 1) if adapt_bias else model[0].weight
    after = float(((rows0.double() @ (merged.detach().double() - weight0.detach().double()).T) ** 2).sum())
    assert after == pytest.approx(measured, rel=1e-4) and after <= beta * old_energy * (1 + 1e-5)


def test_a_loop_that_skips_after_step_is_refused_at_end_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    method = NESS(model, NESSConfig(transfer_rank=0, threshold="rank", rank=12, output_budget=1e-4))
    x0, y0 = task(0)
    method.begin_task(0)
    method.end_task(0, batches(x0, y0, 32))
    method.begin_task(1)
    x1, y1 = task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        optimizer.step()
    with pytest.raises(TrainingLoopError, match=r"0: the old inputs' output change .* > its budget"):
        method.end_task(1, batches(x1, y1, 32))
    method.after_step(1)
    method.end_task(1, batches(x1, y1, 32))


def test_the_budget_survives_save_and_load_mid_task(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    method = NESS(model, NESSConfig(transfer_rank=0, threshold="rank", rank=12, output_budget=1e-4))
    x0, y0 = task(0)
    method.begin_task(0)
    method.end_task(0, batches(x0, y0, 32))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    method.begin_task(1)
    budgets = {name: layer.budget for name, layer in method.active.items()}
    state = method.state_dict()
    method.save_adapters(tmp_path / "adapters")

    fresh = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    restored = NESS(fresh, NESSConfig(transfer_rank=0, threshold="rank", rank=12, output_budget=1e-4))
    restored.load_state_dict(state)
    plain = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    plain.load_state_dict(base)
    loaded = NESS.load_adapters(plain, tmp_path / "adapters")
    for other in (restored, loaded):
        assert {name: layer.budget for name, layer in other.active.items()} == budgets
        assert all(b is not None for b in budgets.values())
