"""Tests of GPM and SGP: the subspace functions against explicit representation matrices R and their SVDs (the
official scripts' route), and the methods against the tests' own hooks, im2col loops and reference updates."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches as _batches
from method_steps import train
from ness.data import Benchmark, Split, Task
from ness.methods import FineTune, TaskOrderError
from ness.methods.gpm import GPM, GPMConfig, draw_samples
from ness.methods.sgp import SGP, SGPConfig
from ness.models import MultiHeadNet, call_model, multi_head_mlp, shared_head_mlp
from ness.subspace import (
    UnsupportedLayerError,
    energy_rank,
    grow_basis,
    importance_map,
    project_gradient,
    projected_norms,
    projection_matrix,
    residual_covariance,
    sgp_importance,
)
from ness.trainer import TrainConfig, run_continual

batches = functools.partial(_batches, size=10)

# ---------------------------------------------------------------------------------------------------------
# reference implementations: the official algorithms on explicit matrices
# ---------------------------------------------------------------------------------------------------------


def f_ref(x, alpha):
    """SGP's importance map, written out."""
    return (alpha + 1) * x / (alpha * x + x.max())


def svd(r):
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    return u, s


def reference_update(basis, importance, r_mat, eps, alpha=None):
    """The official update_GPM (alpha None) or update_SGP on an explicit R (d × n): SVDs of R, MMᵀR and R̂."""
    d = r_mat.shape[0]
    u, s = svd(r_mat)
    total = float((s**2).sum())
    if basis is None:
        ratios = [float(v) ** 2 / total for v in s]
        r, acc = 0, 0.0
        for ratio in ratios:  # np.sum(np.cumsum(ratio) < eps)
            acc += ratio
            r += acc < eps
        new_basis = u[:, :r]
        return new_basis, None if alpha is None else f_ref(s[:r], alpha)
    k = basis.shape[1]
    proj = basis @ basis.T @ r_mat
    uc, sc = svd(proj)
    along = torch.sqrt(((basis.T @ uc[:, :k]) ** 2) @ sc[:k] ** 2)
    u_hat, s_hat = svd(r_mat - proj)
    acc = (total - float((s_hat**2).sum())) / total
    r = 0
    for v in s_hat.tolist():
        if acc < eps:
            acc += v * v / total
            r += 1
        else:
            break
    new_basis = torch.cat([basis, u_hat[:, :r]], dim=1)[:, :d]
    if alpha is None:
        return new_basis, None
    lam = f_ref(torch.cat([along, s_hat[:r]]), alpha)
    lam[:k] = (lam[:k] + importance).clamp(0, 1)
    return new_basis, lam[: new_basis.shape[1]]


def spectrum_matrix(d, n, singular_values, seed):
    """R = U diag(s) Vᵀ with random orthonormal U (d×d) and V (n×len(s))."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=torch.float64))
    return u[:, : len(singular_values)] @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def proj(m):
    return m @ m.T


# ---------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("eps", "expected"), [(0.5, 0), (0.75, 1), (0.76, 2), (1.0, 3), (1.01, 4)])
def test_energy_rank_first_task_keeps_the_prefix_below_the_threshold(eps, expected):
    # energy fractions 1/2, 1/4, 1/8, 1/8: cumulative 0.5, 0.75, 0.875, 1 (exact in binary)
    assert energy_rank(torch.tensor([4.0, 2.0, 1.0, 1.0]), eps) == expected


@pytest.mark.parametrize(("eps", "expected"), [(0.5, 0), (0.75, 1), (0.76, 2), (0.875, 2), (0.9, 3), (1.5, 3)])
def test_energy_rank_later_task_counts_the_direction_that_reaches_the_threshold(eps, expected):
    # ‖R‖² = 8, residual energies 2, 1, 1: half is already captured, then 0.75, 0.875, 1
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0]), eps, total=8.0) == expected


def test_energy_rank_matches_the_official_loops_on_random_spectra():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        e = torch.rand(20, generator=g, dtype=torch.float64).pow(4).sort(descending=True).values
        eps = float(torch.rand((), generator=g, dtype=torch.float64)) * 0.5 + 0.5
        fractions = (e / e.sum()).tolist()
        first = sum(1 for k in range(len(fractions)) if sum(fractions[: k + 1]) < eps)
        assert energy_rank(e, eps) == first
        total = float(e.sum()) * 1.7  # 1/1.7 of the energy is new
        acc, later = (total - float(e.sum())) / total, 0
        while later < len(e) and acc < eps:
            acc += float(e[later]) / total
            later += 1
        assert energy_rank(e, eps, total=total) == later
    assert energy_rank(torch.zeros(4), 0.9) == 0
    assert energy_rank(torch.zeros(4), 0.9, total=0.0) == 0


def test_residual_covariance_is_the_covariance_of_the_explicit_residual():
    r_mat = spectrum_matrix(8, 20, [5, 3, 2, 1, 0.5, 0.2], seed=1)
    m, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    residual = r_mat - m @ m.T @ r_mat
    torch.testing.assert_close(residual_covariance(r_mat @ r_mat.T, m), residual @ residual.T)


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.97, 0.999])
def test_grow_basis_first_task_matches_the_svd_of_r(eps):
    r_mat = spectrum_matrix(10, 40, [6, 4, 3, 2, 1.5, 1, 0.5, 0.3, 0.1, 0.05], seed=3)
    update = grow_basis(None, r_mat @ r_mat.T, eps)
    expected, _ = reference_update(None, None, r_mat, eps)
    assert update.added == expected.shape[1] == update.basis.shape[1]
    torch.testing.assert_close(proj(update.basis), proj(expected), atol=1e-9, rtol=0)
    captured = float((r_mat.T @ expected).pow(2).sum() / r_mat.pow(2).sum())
    assert update.captured_before == 0.0
    assert math.isclose(update.captured, captured, rel_tol=1e-9)


@pytest.mark.parametrize("eps", [0.6, 0.9, 0.97])
def test_grow_basis_later_task_matches_the_svd_of_the_residual(eps):
    r0 = spectrum_matrix(10, 40, [6, 4, 3, 0.1], seed=4)
    r1 = spectrum_matrix(10, 40, [5, 3, 2, 1, 0.5, 0.2], seed=5)
    old = grow_basis(None, r0 @ r0.T, 0.99).basis
    update = grow_basis(old, r1 @ r1.T, eps)
    expected, _ = reference_update(old, None, r1, eps)
    assert update.basis.shape == expected.shape
    assert update.added == expected.shape[1] - old.shape[1] > 0
    torch.testing.assert_close(update.basis[:, : old.shape[1]], old)  # old columns kept, in place
    torch.testing.assert_close(proj(update.basis), proj(expected), atol=1e-9, rtol=0)
    before = float((r1.T @ old).pow(2).sum() / r1.pow(2).sum())
    assert math.isclose(update.captured_before, before, rel_tol=1e-9)
    assert update.captured >= eps - 1e-12


def test_grow_basis_keeps_only_directions_with_energy_and_stays_orthonormal():
    """ε_th > 1 (the +0.003 schedule after ~11 tasks): every direction with energy joins M, none without."""
    r0 = spectrum_matrix(8, 30, [3, 2, 1], seed=6)
    first = grow_basis(None, r0 @ r0.T, 1.2)
    assert first.added == 3
    r1 = spectrum_matrix(8, 30, [3, 2], seed=7)  # a generic 2-D subspace: 2 new directions
    second = grow_basis(first.basis, r1 @ r1.T, 1.2)
    assert second.added == 2
    m = second.basis
    torch.testing.assert_close(m.T @ m, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    assert math.isclose(second.captured, 1.0, rel_tol=1e-9)
    r2 = spectrum_matrix(8, 30, [1.0] * 8, seed=8)  # full rank: M fills R^d
    third = grow_basis(second.basis, r2 @ r2.T, 1.2)
    assert third.basis.shape == (8, 8) and third.added == 3
    again = grow_basis(third.basis, r2 @ r2.T, 1.2)
    assert again.added == 0 and again.basis.shape == (8, 8)


def test_projection_removes_exactly_the_span_or_scales_it():
    g = torch.Generator().manual_seed(9)
    m, _ = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))
    grad = torch.randn(5, 10, generator=g, dtype=torch.float64)
    projected = project_gradient(grad, projection_matrix(m))
    torch.testing.assert_close(projected @ m, torch.zeros(5, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    orthogonal = torch.randn(10, 3, generator=g, dtype=torch.float64)
    orthogonal = orthogonal - m @ (m.T @ orthogonal)
    torch.testing.assert_close(projected @ orthogonal, grad @ orthogonal)
    lam = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    scaled = project_gradient(grad, projection_matrix(m, lam))
    torch.testing.assert_close(scaled @ m, (grad @ m) * (1 - lam))  # G'm_j = (1 − λ_j) G m_j
    torch.testing.assert_close(scaled @ orthogonal, grad @ orthogonal)


def test_importance_map_hand_values():
    torch.testing.assert_close(importance_map(torch.tensor([3.0, 2.0]), 10.0), torch.tensor([1.0, 22 / 23]))
    torch.testing.assert_close(
        importance_map(torch.tensor([0.5, 0.05, 1.0]), 1.0), torch.tensor([1 / 1.5, 0.1 / 1.05, 1.0])
    )
    torch.testing.assert_close(importance_map(torch.tensor([2.0, 1.0]), 0.0), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(importance_map(torch.zeros(3), 10.0), torch.zeros(3))


def test_sgp_importances_on_a_hand_computed_3x3_example():
    """R = diag(...) keeps every basis vector on an axis, so each step can be done by hand (α = 1, ε_th = 0.999)."""

    def step(basis, lam, diagonal):
        r_mat = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        cov = r_mat @ r_mat.T
        update = grow_basis(basis, cov, 0.999)
        new_lam = sgp_importance(lam, projected_norms(update.basis, cov), 1.0)
        return update, new_lam

    # Task 0: s = (3, 0.3, 0.1), energy fractions 9/9.1, 9.09/9.1, 1 → r = 2; λ = f(3, 0.3) = (1, 0.6/3.3).
    t0, lam = step(None, None, [3.0, 0.3, 0.1])
    assert t0.added == 2
    torch.testing.assert_close(t0.basis.abs(), torch.eye(3, dtype=torch.float64)[:, :2])
    torch.testing.assert_close(lam, torch.tensor([1.0, 2 / 11], dtype=torch.float64))
    # Task 1 inside span(M): r = 0; a = (0.4, 0.1), f(a) = (1, 0.2/0.5); λ = clip(f(a) + λ) = (1, 2/11 + 2/5).
    t1, lam = step(t0.basis, lam, [0.4, 0.1, 0.0])
    assert t1.added == 0
    torch.testing.assert_close(lam, torch.tensor([1.0, 2 / 11 + 2 / 5], dtype=torch.float64))
    # Task 2: a = (0.5, 0.05), ŝ = (1); captured 0.2525/1.2525 < ε_th, one direction added.
    # f(0.5, 0.05, 1) = (1/1.5, 0.1/1.05, 1); the old two add to λ and clip: (1, 32/55 + 2/21), the new keeps 1.
    t2, lam = step(t1.basis, lam, [0.5, 0.05, 1.0])
    assert t2.added == 1
    torch.testing.assert_close(t2.basis.abs(), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([1.0, 32 / 55 + 2 / 21, 1.0], dtype=torch.float64))


def test_projected_norms_match_sgp_svd_formula_and_the_residual_singular_values():
    r0 = spectrum_matrix(9, 30, [4, 3, 2, 1], seed=10)
    r1 = spectrum_matrix(9, 30, [5, 3, 2, 1, 0.5], seed=11)
    old = grow_basis(None, r0 @ r0.T, 0.99).basis
    grown = grow_basis(old, r1 @ r1.T, 0.95).basis
    norms = projected_norms(grown, r1 @ r1.T)
    k = old.shape[1]
    p = old @ old.T @ r1
    uc, sc = svd(p)
    along = torch.sqrt(((old.T @ uc[:, :k]) ** 2) @ sc[:k] ** 2)  # SGP's importance_new_on_old
    torch.testing.assert_close(norms[:k], along, atol=1e-10, rtol=1e-8)
    _, s_hat = svd(r1 - p)
    torch.testing.assert_close(norms[k:], s_hat[: grown.shape[1] - k], atol=1e-10, rtol=1e-8)


def test_draw_samples_is_uniform_and_so_are_its_prefixes():
    data = torch.arange(10.0)[:, None]
    stream = [data[:4], data[4:7], data[7:]]
    g = torch.Generator().manual_seed(0)
    draws = 4000
    counts, firsts = torch.zeros(10), torch.zeros(10)
    for _ in range(draws):
        sample = draw_samples(stream, 4, g)[:, 0].long()
        assert sample.unique().numel() == 4
        counts[sample] += 1
        firsts[sample[0]] += 1
    assert (counts / draws - 0.4).abs().max() < 0.04
    assert (firsts / draws - 0.1).abs().max() < 0.03
    assert draw_samples(stream, 50, g).shape == (10, 1)  # fewer examples than asked: all of them


# ---------------------------------------------------------------------------------------------------------
# models, data and the tests' own view of the layers
# ---------------------------------------------------------------------------------------------------------


def mlp_model(seed, heads=(3, 3, 3)):
    torch.manual_seed(seed)
    return multi_head_mlp(12, [24, 20], heads)


def conv_model(seed, heads=(3, 3, 3)):
    """Conv2d (stride 2, padding 1) on 2×6×6 inputs → ReLU → Linear."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(36, 16, bias=False)
    )
    return MultiHeadNet(backbone, 16, heads)


def bn_model(seed, heads=(3, 3, 3)):
    """Conv → BatchNorm → ReLU → Linear with a bias → ReLU."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 16),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 16, heads)


def linear_model(seed, heads=(3, 3)):
    """No nonlinearity: low-rank task inputs stay low-rank in every layer."""
    torch.manual_seed(seed)
    return MultiHeadNet(nn.Sequential(nn.Linear(12, 24, bias=False), nn.Linear(24, 16, bias=False)), 16, heads)


MODELS = {"mlp": mlp_model, "conv": conv_model, "bn": bn_model}


def task_data(kind, task, n=32, seed=0):
    """Inputs concentrated on a few directions (decaying spectra), task-dependent."""
    g = torch.Generator().manual_seed(100 * seed + task)
    shape = (2, 6, 6) if kind in ("conv", "bn") else (12,)
    dim = math.prod(shape)
    mix = torch.randn(6, dim, generator=g) * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.3])[:, None]
    x = torch.randn(n, 6, generator=g) @ mix + 0.05 * torch.randn(n, dim, generator=g)
    return x.reshape(n, *shape), torch.randint(0, 3, (n,), generator=g)


@torch.no_grad()
def layer_inputs(model, names, x, t):
    """Each named layer's input in one eval-mode forward pass of x (the tests' own hooks)."""
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].clone()))
        for n in names
    ]
    was_training = model.training
    model.eval()
    try:
        call_model(model, x, t)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def representation(layer, inputs):
    """GPM's R (d × n): one column per input (Linear) or per (sample, output position) patch (Conv2d)."""
    x = inputs.double()
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    columns = []
    for b in range(x.shape[0]):
        for i in range(0, padded.shape[2] - kh + 1, sh):
            for j in range(0, padded.shape[3] - kw + 1, sw):
                columns.append(padded[b, :, i : i + kh, j : j + kw].reshape(-1))
    return torch.stack(columns, dim=1)


def representations(model, names, x, t, counts=None):
    inputs = layer_inputs(model, names, x, t)
    return {
        n: representation(model.get_submodule(n), inputs[n][: None if counts is None else counts[n]]) for n in names
    }


def records(method, task):
    return {r["layer"]: r for r in method.diagnostics() if r["task"] == task}


# ---------------------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "conv", "bn"])
@pytest.mark.parametrize("sgp", [False, True])
def test_memory_follows_the_official_updates_over_three_tasks(kind, sgp):
    """All samples drawn (samples ≥ N), so R is the whole task; thresholds per layer plus a 0.01 increment."""
    model = MODELS[kind](0)
    options = {"samples": 1000, "layer_thresholds": (0.9, 0.95), "threshold_increment": 0.01}
    method = SGP(model, SGPConfig(scale_coefficient=2.0, **options)) if sgp else GPM(model, GPMConfig(**options))
    names = method.layer_names
    expected = {n: (None, None) for n in names}
    for t in range(3):
        x, y = task_data(kind, t)
        method.begin_task(t)
        train(method, model, t, x, y)
        r_mats = representations(model, names, x, t)
        method.end_task(t, batches(x, y))
        rec = records(method, t)
        for i, n in enumerate(names):
            eps = (0.9, 0.95)[i] + 0.01 * t
            basis, lam = reference_update(*expected[n], r_mats[n], eps, 2.0 if sgp else None)
            expected[n] = (basis, lam)
            assert rec[n]["threshold"] == pytest.approx(eps)
            assert rec[n]["basis_size"] == basis.shape[1] == method.bases[n].shape[1], (t, n)
            assert rec[n]["d"] == r_mats[n].shape[0] and rec[n]["rows"] == r_mats[n].shape[1]
            torch.testing.assert_close(proj(method.bases[n]), proj(basis), atol=1e-6, rtol=0)
            captured = float((r_mats[n].T @ basis).pow(2).sum() / r_mats[n].pow(2).sum())
            assert rec[n]["energy_captured"] == pytest.approx(captured, rel=1e-6)
            if sgp:
                torch.testing.assert_close(method.importances[n], lam, atol=1e-6, rtol=0)
    grew = [records(method, 2)[n]["added"] for n in names]
    assert any(a > 0 for a in grew), "the test must exercise a later-task update that adds directions"


def test_layer_samples_take_the_first_samples_of_one_random_draw():
    model = mlp_model(0)
    method = GPM(model, GPMConfig(samples=12, layer_samples=(5, 12), threshold=0.9))
    names = method.layer_names
    x, y = task_data("mlp", 0)
    method.begin_task(0)
    train(method, model, 0, x, y)
    generator = torch.Generator()
    generator.set_state(method.state_dict()["generator"])
    drawn = draw_samples((b[0] for b in batches(x, y)), 12, generator)
    assert drawn.shape[0] == 12 and not torch.equal(drawn, x[:12])
    # The layers' inputs come from one forward pass over all 12 samples; layer ℓ keeps its first b_ℓ.
    r_mats = representations(model, names, drawn, 0, counts=dict(zip(names, (5, 12), strict=True)))
    method.end_task(0, batches(x, y))
    rec = records(method, 0)
    for n, b in zip(names, (5, 12), strict=True):
        assert r_mats[n].shape[1] == b and rec[n]["samples"] == b and rec[n]["rows"] == b
        basis, _ = reference_update(None, None, r_mats[n], 0.9)
        assert method.bases[n].shape[1] == basis.shape[1]
        torch.testing.assert_close(proj(method.bases[n]), proj(basis), atol=1e-6, rtol=0)


def test_samples_follow_the_torch_seed_at_construction():
    x, y = task_data("mlp", 0)
    bases = []
    for seed in (1, 1, 2):
        model = mlp_model(0)
        torch.manual_seed(seed)
        method = GPM(model, GPMConfig(samples=8, threshold=0.9))
        method.begin_task(0)
        method.end_task(0, batches(x, y))
        bases.append(proj(method.bases["backbone.0"]))
    torch.testing.assert_close(bases[0], bases[1])
    assert (bases[0] - bases[2]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mlp", "conv", "bn"])
def test_updates_leave_outputs_on_the_span_unchanged(kind):
    """W_new x = W_old x for every x in span(M), after many large SGD steps on a new task."""
    model = MODELS[kind](0)
    method = GPM(model, GPMConfig(samples=1000, threshold=0.9))
    x0, y0 = task_data(kind, 0)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    method.end_task(0, batches(x0, y0))
    before = {n: model.get_submodule(n).weight.detach().clone() for n in method.layer_names}
    method.begin_task(1)
    x1, y1 = task_data(kind, 1)
    train(method, model, 1, x1, y1, steps=30, lr=0.2)
    g = torch.Generator().manual_seed(0)
    for n in method.layer_names:
        w_old = before[n].double().reshape(before[n].shape[0], -1)
        w_new = model.get_submodule(n).weight.detach().double().reshape(w_old.shape)
        m = method.bases[n]
        assert 0 < m.shape[1] < m.shape[0], n
        inside = m @ torch.randn(m.shape[1], 50, generator=g, dtype=torch.float64)
        assert (w_new - w_old).norm() > 0.1, f"{n}: the new task must move the weights"
        torch.testing.assert_close(w_new @ inside, w_old @ inside, atol=1e-5 * float(inside.norm()), rtol=0)


def test_complete_span_keeps_the_old_task_outputs():
    """Task-0 inputs of rank 3 (plus 1e-6 noise) in a linear net: with ε_th = 1 every direction carrying more than
    round-off joins M, so task 1 cannot change task 0's outputs; without the projection it does."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(40, 3, generator=g) @ torch.randn(3, 12, generator=g) + 1e-6 * torch.randn(40, 12, generator=g)
    y0 = torch.randint(0, 3, (40,), generator=g)
    x1, y1 = 2 * torch.randn(40, 12, generator=g), torch.randint(0, 3, (40,), generator=g)
    changes = {}
    for project in (True, False):
        model = linear_model(0)
        method = GPM(model, GPMConfig(samples=1000, threshold=1.0, threshold_increment=0.0))
        method.begin_task(0)
        train(method, model, 0, x0, y0)
        method.end_task(0, batches(x0, y0))
        old = call_model(model, x0, 0).detach()
        method.begin_task(1)
        if not project:
            method.after_backward = lambda t: None
        train(method, model, 1, x1, y1, steps=30, lr=0.5)
        changes[project] = float((call_model(model, x0, 0).detach() - old).abs().max())
    assert changes[True] < 1e-4 and changes[False] > 0.1, changes


@pytest.mark.parametrize("sgp", [False, True])
def test_layer_gradients_are_projected_and_the_head_gradient_is_not(sgp):
    model = mlp_model(0)
    method = SGP(model, SGPConfig(samples=1000)) if sgp else GPM(model, GPMConfig(samples=1000))
    x0, y0 = task_data("mlp", 0)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    method.end_task(0, batches(x0, y0))
    method.begin_task(1)
    method.trainable_parameters(1)
    x1, y1 = task_data("mlp", 1)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(call_model(model, x1, 1), y1).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert set(raw) == {"backbone.0.weight", "backbone.2.weight", "task_heads.1.weight"}
    method.after_backward(1)
    for n in method.layer_names:
        g = raw[f"{n}.weight"].double()
        m = method.bases[n]
        lam = method.importances[n] if sgp else torch.ones(m.shape[1], dtype=torch.float64)
        if sgp:
            assert (lam < 1 - 1e-3).any(), "SGP must scale some direction only partly"
        expected = g - ((g @ m) * lam) @ m.T
        torch.testing.assert_close(model.get_submodule(n).weight.grad.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.task_heads[1].weight.grad, raw["task_heads.1.weight"], atol=0, rtol=0)


def test_task0_trains_everything_later_tasks_only_layer_weights_and_the_current_head():
    """After task 0: BatchNorm, the projected layer's bias and the excluded conv are frozen, old heads too."""
    model = bn_model(0)
    method = GPM(model, GPMConfig(samples=1000, exclude=("Conv2d",)))
    assert method.layer_names == ["backbone.4"]
    x0, y0 = task_data("bn", 0)
    method.begin_task(0)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(method, model, 0, x0, y0)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, first[n])}
    assert moved == {n for n, _ in model.named_parameters()} - {f"task_heads.{i}.weight" for i in (1, 2)}
    method.end_task(0, batches(x0, y0))
    assert "backbone.0" not in method.bases

    method.begin_task(1)
    params = method.trainable_parameters(1)
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert names == {"backbone.4.weight", "task_heads.1.weight"}
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x1, y1 = task_data("bn", 1)
    train(method, model, 1, x1, y1, steps=5, lr=0.5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names


def test_shared_output_layer_is_projected():
    """Permuted MNIST's net: no declared heads, the output layer is a projected layer like the others."""
    torch.manual_seed(0)
    model = shared_head_mlp(12, [24, 20], 3)
    method = GPM(model, GPMConfig(samples=1000, layer_thresholds=(0.95, 0.99, 0.99), threshold_increment=0.0))
    assert method.layer_names == ["0", "2", "4"]
    x0, y0 = task_data("mlp", 0)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    method.end_task(0, batches(x0, y0))
    assert method.bases["4"].shape[1] > 0
    method.begin_task(1)
    assert [id(p) for p in method.trainable_parameters(1)] == [id(model[i].weight) for i in (0, 2, 4)]
    assert [r["threshold"] for r in method.diagnostics()] == [0.95, 0.99, 0.99]


@pytest.mark.parametrize("sgp", [False, True])
def test_save_load_roundtrip_continues_identically(tmp_path, sgp):
    def build(seed):
        model = conv_model(0)
        torch.manual_seed(seed)  # the sample generator is seeded from here: the loaded state must override it
        config = SGPConfig(samples=16) if sgp else GPMConfig(samples=16)
        return model, (SGP if sgp else GPM)(model, config)

    model, method = build(0)
    x0, y0 = task_data("conv", 0)
    x1, y1 = task_data("conv", 1)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    method.end_task(0, batches(x0, y0))
    method.begin_task(1)
    train(method, model, 1, x1, y1, steps=2)
    torch.save(method.state_dict(), tmp_path / "state.pt")
    twin_model, twin = build(1)
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))

    for m, meth in ((model, method), (twin_model, twin)):
        train(meth, m, 1, x1, y1, steps=3, lr=0.5)  # projected steps need the rebuilt projectors
        meth.end_task(1, batches(x1, y1))  # the draw needs the restored generator
        meth.begin_task(2)
        x2, y2 = task_data("conv", 2)
        train(meth, m, 2, x2, y2, steps=2)
    for (n, p), p2 in zip(model.named_parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(p, p2, atol=0, rtol=0, msg=n)
    for n in method.layer_names:
        torch.testing.assert_close(method.bases[n], twin.bases[n], atol=0, rtol=0)
        if sgp:
            torch.testing.assert_close(method.importances[n], twin.importances[n], atol=0, rtol=0)
    assert method.diagnostics() == twin.diagnostics()


def test_load_state_dict_refuses_another_config_or_method():
    model = mlp_model(0)
    state = GPM(model, GPMConfig(samples=10)).state_dict()
    with pytest.raises(ValueError, match="differs"):
        GPM(mlp_model(0), GPMConfig(samples=11)).load_state_dict(state)
    with pytest.raises(ValueError, match="'gpm', not 'sgp'"):
        SGP(mlp_model(0), SGPConfig(samples=10)).load_state_dict(state)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 0.0}, r"GPMConfig\.threshold: got 0\.0; a finite number in \(0, 1\]"),
        ({"threshold": 1.5}, r"GPMConfig\.threshold: got 1\.5; a finite number in \(0, 1\]"),
        ({"threshold": float("nan")}, r"GPMConfig\.threshold: got nan"),
        ({"threshold": True}, r"GPMConfig\.threshold: got True"),
        ({"threshold_increment": -0.001}, r"GPMConfig\.threshold_increment: got -0\.001; a finite number ≥ 0"),
        ({"layer_thresholds": (0.9, 1.2)}, r"layer_thresholds: got \(0\.9, 1\.2\); a non-empty list, each a finite"),
        ({"layer_thresholds": ()}, r"GPMConfig\.layer_thresholds: got \(\); a non-empty list"),
        ({"samples": 0}, r"GPMConfig\.samples: got 0; an integer ≥ 1"),
        ({"samples": 2.5}, r"GPMConfig\.samples: got 2\.5; an integer ≥ 1"),
        ({"layer_samples": (10, 200)}, r"layer_samples: got \(10, 200\); entries of at most samples=125"),
        ({"layer_samples": (0, 5)}, r"GPMConfig\.layer_samples: got \(0, 5\); a non-empty list, each an integer ≥ 1"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        GPMConfig(**options)


def test_config_rejects_strings_for_lists_and_bad_alpha():
    with pytest.raises(TypeError, match=r"GPMConfig\.exclude: got 'backbone\.0'; a list of strings"):
        GPMConfig(exclude="backbone.0")
    with pytest.raises(ValueError, match=r"SGPConfig\.threshold: got 2\.0"):
        SGPConfig(threshold=2.0)
    with pytest.raises(ValueError, match=r"SGPConfig\.scale_coefficient: got -1\.0; a finite number ≥ 0"):
        SGPConfig(scale_coefficient=-1.0)
    assert GPMConfig(layer_samples=[5, 6]).layer_samples == (5, 6)


@pytest.mark.parametrize("field_name", ["layer_samples", "layer_thresholds"])
def test_per_layer_settings_must_match_the_layers(field_name):
    value = (5, 5, 5) if field_name == "layer_samples" else (0.9, 0.9, 0.9)
    with pytest.raises(ValueError, match=rf"{field_name} has 3 entries but the model has 2 projected layers "):
        GPM(mlp_model(0), GPMConfig(**{field_name: value}))


def test_unsupported_layer_is_named_and_can_be_excluded():
    model = MultiHeadNet(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 8)), 8, (3,))
    with pytest.raises(UnsupportedLayerError, match=r"backbone\.0"):
        GPM(model)
    assert GPM(model, GPMConfig(exclude=("backbone.0",))).layer_names == ["backbone.2"]
    with pytest.raises(ValueError, match=r"found no nn\.Linear or nn\.Conv2d layer"):
        GPM(model, GPMConfig(exclude=("backbone.*",)))


def test_task_hooks_must_come_in_order_and_end_task_needs_data():
    method = GPM(mlp_model(0))
    with pytest.raises(TaskOrderError):
        method.begin_task(1)
    method.begin_task(0)
    with pytest.raises(ValueError, match="yielded no batches"):
        method.end_task(0, [])
    x, _ = task_data("mlp", 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        method.end_task(0, [x * float("nan")])


def test_model_is_left_in_its_training_mode_and_state_is_copied():
    model = bn_model(0)
    method = GPM(model, GPMConfig(samples=1000))
    x, y = task_data("bn", 0)
    method.begin_task(0)
    model.train()
    method.end_task(0, batches(x, y))
    assert model.training
    state = method.state_dict()
    assert state["memory"]["bases"]["backbone.0"].device.type == "cpu"
    state["memory"]["bases"]["backbone.0"].zero_()
    assert method.bases["backbone.0"].abs().sum() > 0


def linear_rule_benchmark() -> Benchmark:
    """3 tasks on the same anisotropic Gaussian inputs, each labelled by its own random hyperplane: the shared
    backbone must change for each new rule, so plain fine-tuning forgets."""
    g = torch.Generator().manual_seed(0)

    def split(w, n):
        x = torch.randn(n, 10, generator=g) * torch.linspace(2, 0.2, 10)
        return Split(x, (x @ w > 0).long())

    tasks = []
    for t in range(3):
        w = torch.randn(10, generator=g)
        tasks.append(Task(f"rule {t}", 2, split(w, 120), split(w, 40), split(w, 200), lambda x: x.float()))
    return Benchmark("rules", tuple(tasks), input_shape=(10,), shared_head=False, details={})


def test_run_through_the_trainer_protects_the_first_task():
    bench = linear_rule_benchmark()
    config = TrainConfig(epochs=10, lr=0.1, batch_size=16, test_batch_size=32, lr_patience=3, lr_min=1e-4)
    first_task = {}
    for name in ("finetune", "gpm", "sgp"):
        torch.manual_seed(0)
        model = multi_head_mlp(10, (32, 32), [2, 2, 2])
        method = {"finetune": FineTune(model), "gpm": GPM(model), "sgp": SGP(model)}[name]
        out = run_continual(model, method, bench, config, seed=1, progress=False)
        acc = out["acc_matrix"]
        first_task[name] = (acc[0][0], acc[2][0])
        if name != "finetune":
            assert [(r["task"], r["layer"]) for r in out["diagnostics"]] == [
                (t, n) for t in range(3) for n in ("backbone.0", "backbone.2")
            ]
    before, after = first_task["finetune"]
    assert after < before - 10, first_task  # the benchmark does make fine-tuning forget
    for name in ("gpm", "sgp"):
        before, after = first_task[name]
        assert after >= before - 2, first_task


@pytest.mark.parametrize("k", [3, 5, 9])  # d = 10: factored below d/2, dense from it
@pytest.mark.parametrize("scaled", [False, True])
def test_gradient_projection_in_either_form_removes_each_direction_by_its_importance(k, scaled):
    from ness.subspace import GradientProjection, gradient_projection

    g = torch.Generator().manual_seed(k)
    m, _ = torch.linalg.qr(torch.randn(10, k, generator=g, dtype=torch.float64))
    lam = torch.rand(k, generator=g, dtype=torch.float64) if scaled else None
    grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
    expected = grad.clone()
    for j in range(k):  # G − Σ_j λ_j (G m_j) m_jᵀ, one direction at a time
        expected -= (1.0 if lam is None else float(lam[j])) * torch.outer(grad @ m[:, j], m[:, j])
    projection = gradient_projection(m, lam)
    assert (projection.dense is None) == (2 * k < 10)  # the cheaper form: 2·o·d·k against o·d²
    torch.testing.assert_close(projection(grad), expected)
    scaled_basis = m if lam is None else m * lam
    other = GradientProjection(m, lam, scaled_basis @ m.T if projection.dense is None else None)
    torch.testing.assert_close(other(grad), expected)  # the form not chosen gives the same step
    as_float = gradient_projection(m, lam, like=grad.float())
    assert as_float(grad.float()).dtype == torch.float32


def task1_on_a_five_dimensional_task0(build, g: torch.Generator, network=None):
    """(model, method) with task 1 open, after task 0 trained on 200 inputs spanning 5 of their 20 directions
    (so the first layer's basis has k < d/2 columns: the factored projection). `network()` builds the model (default:
    Linear 20-16, ReLU, Linear 16-4)."""
    torch.manual_seed(0)
    if network is None:
        model = torch.nn.Sequential(
            torch.nn.Linear(20, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False)
        )
    else:
        model = network()
    method = build(model)
    x0 = torch.randn(200, 5, generator=g) @ torch.randn(5, 20, generator=g)
    y0 = torch.randint(0, 4, (200,), generator=g)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    method.end_task(0, batches(x0, y0))
    method.begin_task(1)
    method.trainable_parameters(1)
    return model, method


@pytest.mark.parametrize("sgp", [False, True])
@pytest.mark.parametrize("extra", ["none", "two_calls", "weight_penalty"])
def test_the_factored_projection_of_a_training_step_equals_the_projected_gradient(sgp, extra):
    """A step on a basis of k < d/2 columns (the factored form): the gradient after `after_backward` is
    G − G·M diag(λ) Mᵀ of the whole gradient, with one call, two calls in one loss, or a loss term on the weight."""
    g = torch.Generator().manual_seed(11)
    model, method = task1_on_a_five_dimensional_task0(
        lambda m: SGP(m, SGPConfig(samples=200)) if sgp else GPM(m, GPMConfig(samples=200)), g
    )
    x1, y1 = torch.randn(2, 20, generator=g), torch.randint(0, 4, (2,), generator=g)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x1), y1)
    if extra == "two_calls":
        loss = loss + F.cross_entropy(model(x1.flip(0) * 0.5), y1)
    if extra == "weight_penalty":
        loss = loss + 0.1 * model[0].weight.square().sum()
    loss.backward()
    raw = {n: model.get_submodule(n).weight.grad.clone().double() for n in method.layer_names}
    method.after_backward(1)
    assert 0 < method.bases["0"].shape[1] < 10  # the factored form
    assert method._projectors["0"].dense is None
    for n in method.layer_names:
        basis = method.bases[n]
        lam = method.importances[n] if sgp else torch.ones(basis.shape[1], dtype=torch.float64)
        expected = raw[n] - ((raw[n] @ basis) * lam) @ basis.T
        torch.testing.assert_close(model.get_submodule(n).weight.grad.double(), expected, atol=1e-6, rtol=1e-5)


def test_a_backward_pass_zeroed_before_the_projection_does_not_leak_into_it():
    """A loop that runs a backward pass, zeroes it (a gradient only looked at) and then runs the real one: the
    projected gradient is G − G·M Mᵀ of the gradient that stays, at every step (a projection that recorded the
    layer's calls instead of reading G would have counted the discarded pass)."""
    g = torch.Generator().manual_seed(12)
    model, method = task1_on_a_five_dimensional_task0(lambda m: GPM(m, GPMConfig(samples=200)), g)
    m = method.bases["0"]
    for step in range(3):
        x, y = torch.randn(2, 20, generator=g), torch.randint(0, 4, (2,), generator=g)
        model.zero_grad(set_to_none=True)
        if step > 0:  # a pass whose gradient the loop throws away
            F.cross_entropy(model(torch.randn(2, 20, generator=g)), y).backward()
            model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        raw = model[0].weight.grad.clone().double()
        method.after_backward(1)
        torch.testing.assert_close(model[0].weight.grad.double(), raw - (raw @ m) @ m.T, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the input-side projection of the trainer's step (issue 15): δᵀ(x − x·M diag(λ) Mᵀ) instead of G − G·M diag(λ) Mᵀ
# ---------------------------------------------------------------------------------------------------------


def explicitly_projected(grad: torch.Tensor, basis: torch.Tensor, lam: torch.Tensor | None) -> torch.Tensor:
    """G − Σ_j λ_j (G m_j) m_jᵀ, one direction at a time, in float64."""
    grad, basis = grad.double(), basis.double()
    out = grad.clone()
    for j in range(basis.shape[1]):
        out -= (1.0 if lam is None else float(lam[j])) * torch.outer(grad @ basis[:, j], basis[:, j])
    return out


@pytest.mark.parametrize("scaled", [False, True])
def test_linear_with_projected_weight_gradient_projects_only_the_weight_gradient(scaled):
    from ness.subspace import gradient_projection, linear_with_projected_weight_gradient

    g = torch.Generator().manual_seed(21)
    d, o, k = 12, 7, 4
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    lam = torch.rand(k, generator=g, dtype=torch.float64) if scaled else None
    projection = gradient_projection(basis, lam, like=torch.zeros((), dtype=torch.float64))
    x = torch.randn(3, 5, d, generator=g, dtype=torch.float64)  # (batch, tokens, d): rows are the last dimension
    weight = torch.randn(o, d, generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64)
    target = torch.randn(3, 5, o, generator=g, dtype=torch.float64)
    grads = {}
    for form in ("plain", "input_side"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        delivered: list[torch.Tensor] = []
        out = (
            F.linear(*leaves)
            if form == "plain"
            else linear_with_projected_weight_gradient(*leaves, projection, delivered)
        )
        (out * target).sum().backward()
        grads[form] = (out.detach(), *(t.grad for t in leaves))
    (out_plain, gx, gw, gb), (out_side, gx_side, gw_side, gb_side) = grads["plain"], grads["input_side"]
    torch.testing.assert_close(out_side, out_plain, atol=0, rtol=0)
    torch.testing.assert_close(gx_side, gx)  # δ·W: unchanged
    torch.testing.assert_close(gb_side, gb)
    torch.testing.assert_close(gw_side, explicitly_projected(gw, basis, lam), atol=1e-12, rtol=1e-10)
    assert len(delivered) == 1  # the backward says what it gave the weight
    torch.testing.assert_close(delivered[0], gw_side, atol=0, rtol=0)


def test_the_input_side_form_is_taken_where_it_costs_fewer_multiply_adds():
    """Permuted MNIST's first layer (784 → 100, a basis of 80 columns): batch 10 projects from the inputs
    (2·10·784·80 + 2^20 ≤ 2·100·784·80), batch 200 projects the gradient; once chosen, the step keeps the choice.
    Its second layer (100 → 100, 31 columns) never gains enough to take the form: it keeps its own forward."""
    from ness.methods.gpm import InputSideProjection
    from ness.subspace import gradient_projection

    layer = nn.Linear(784, 100)
    basis = torch.linalg.qr(torch.randn(784, 80))[0]
    for rows, expected in ((10, True), (60, True), (200, False)):
        assert (2 * rows * 784 * 80 + 2**20 <= 2 * 100 * 784 * 80) == expected  # the closed form of the rule
        calls = InputSideProjection(layer, gradient_projection(basis, like=layer.weight))
        calls(torch.randn(rows, 784))
        assert calls.input_side is expected
        calls(torch.randn(1000 if expected else 1, 784))  # another call of the step follows the first one's form
        assert calls.input_side is expected
    assert InputSideProjection.can_be_cheaper(layer, gradient_projection(basis, like=layer.weight))
    hidden, hidden_basis = nn.Linear(100, 100), torch.linalg.qr(torch.randn(100, 31))[0]  # the second layer's shapes
    assert 2 * 100 * 31 + 2**20 > 2 * 100 * 100 * 31  # even one row saves less than 2^20 multiply-adds
    assert not InputSideProjection.can_be_cheaper(hidden, gradient_projection(hidden_basis, like=hidden.weight))
    with torch.no_grad():  # a call that trains nothing chooses nothing
        calls = InputSideProjection(layer, gradient_projection(basis, like=layer.weight))
        calls(torch.randn(10, 784))
    assert calls.input_side is None


class TwiceCalled(nn.Module):
    """One Linear layer called twice per forward pass (a shared layer), then an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(20, 16)
        self.out = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.shared(x)) + torch.relu(self.shared(0.5 * x.flip(0))))


@pytest.mark.parametrize("sgp", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_the_trainer_step_with_input_side_projection_equals_the_projected_step(monkeypatch, sgp, shared):
    """One `training_step` (the trainer's) whose layers take their weight gradients projected from their inputs
    gives the weights of an SGD step on G − G·M diag(λ) Mᵀ computed from the plain gradient direction by
    direction; the input-side form was really used, and the layers' own forward is back afterwards."""
    import ness.methods.gpm as gpm_module

    monkeypatch.setattr(gpm_module, "MIN_SAVED_MULTIPLY_ADDS", 0)  # small layers: the form wins on arithmetic
    used = []

    def spy(*args):
        used.append(args[1].shape)
        return linear_with_projected_weight_gradient(*args)

    from ness.subspace import linear_with_projected_weight_gradient

    monkeypatch.setattr(gpm_module, "linear_with_projected_weight_gradient", spy)
    g = torch.Generator().manual_seed(13)
    build = (lambda m: SGP(m, SGPConfig(samples=200))) if sgp else (lambda m: GPM(m, GPMConfig(samples=200)))
    model, method = task1_on_a_five_dimensional_task0(build, g, TwiceCalled if shared else None)
    params = method.trainable_parameters(1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(3, 20, generator=g), torch.randint(0, 4, (3,), generator=g)
    method.training_step(1, x, y, torch.optim.SGD(params, lr=0.1), lambda loss: None)
    assert used, "the step never took the input-side form"
    assert not any("forward" in module.__dict__ for module in model.modules())
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    trained = {id(p) for p in params}
    for n, p in model.named_parameters():
        if id(p) not in trained:
            continue
        layer = n.rsplit(".", 1)[0]
        grad = p.grad.double()
        if layer in method.layer_names and n.endswith("weight"):
            grad = explicitly_projected(grad, method.bases[layer], method.importances[layer] if sgp else None)
        torch.testing.assert_close(stepped[n].double(), start[n].double() - 0.1 * grad, atol=1e-6, rtol=1e-5)


def gpm_at_task1_with_a_batch(monkeypatch, seed: int):
    """(model, GPM with task 1 open and every layer taking the input-side form, x, y, SGD lr 0.1)."""
    import ness.methods.gpm as gpm_module

    monkeypatch.setattr(gpm_module, "MIN_SAVED_MULTIPLY_ADDS", 0)
    g = torch.Generator().manual_seed(seed)
    model, method = task1_on_a_five_dimensional_task0(lambda m: GPM(m, GPMConfig(samples=200)), g)
    x, y = torch.randn(3, 20, generator=g), torch.randint(0, 4, (3,), generator=g)
    return model, method, x, y, torch.optim.SGD(method.trainable_parameters(1), lr=0.1)


def test_a_step_that_raises_gives_the_layers_their_own_forward_back(monkeypatch):
    import ness.methods.gpm as gpm_module

    model, method, x, y, optimizer = gpm_at_task1_with_a_batch(monkeypatch, 14)

    def bad_loss(loss):
        assert isinstance(model[0].forward, gpm_module.InputSideProjection)  # installed during the step
        raise FloatingPointError("stop")

    with pytest.raises(FloatingPointError, match="stop"):
        method.training_step(1, x, y, optimizer, bad_loss)
    assert "forward" not in model[0].__dict__
    model.zero_grad(set_to_none=True)  # a user's own loop afterwards: after_backward projects the whole gradient
    (F.cross_entropy(model(x), y) + 0.1 * model[0].weight.square().sum()).backward()
    raw = model[0].weight.grad.clone()
    method.after_backward(1)
    torch.testing.assert_close(
        model[0].weight.grad.double(), explicitly_projected(raw, method.bases["0"], None), atol=1e-6, rtol=1e-5
    )


class TiedWeights(nn.Module):
    """A user's own autoencoder-like model: the encoder's weight is also used, transposed, by a decoding term that
    reaches the logits, so the weight gets gradient from two places: its own call and the tied use."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(20, 16, bias=False)
        self.readout = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(x))
        decoded = F.linear(h, self.encoder.weight.t())  # (n, 20): the tied decoder
        return self.readout(h) + decoded[:, :4]


@pytest.mark.parametrize("sgp", [False, True])
def test_a_weight_also_used_outside_its_layer_call_gets_the_whole_gradient_projected(monkeypatch, sgp):
    """Weight tying inside a user's model: the layer's own call delivers its part projected from the inputs, and the
    tied use's part must be projected too (once: SGP's scaled projection applied twice would be wrong)."""
    import ness.methods.gpm as gpm_module

    monkeypatch.setattr(gpm_module, "MIN_SAVED_MULTIPLY_ADDS", 0)
    g = torch.Generator().manual_seed(15)
    build = (lambda m: SGP(m, SGPConfig(samples=200))) if sgp else (lambda m: GPM(m, GPMConfig(samples=200)))
    model, method = task1_on_a_five_dimensional_task0(build, g, TiedWeights)
    params = method.trainable_parameters(1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(3, 20, generator=g), torch.randint(0, 4, (3,), generator=g)
    method.training_step(1, x, y, torch.optim.SGD(params, lr=0.1), lambda loss: None)
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert method._input_side["encoder"].layer is model.encoder  # the encoder took the input-side form

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        layer = n.rsplit(".", 1)[0]
        lam = method.importances[layer] if sgp else None
        grad = explicitly_projected(p.grad, method.bases[layer], lam)
        torch.testing.assert_close(stepped[n].double(), start[n].double() - 0.1 * grad, atol=1e-6, rtol=1e-5)


# the input side's projected rows, made once for the trainer's prepared split (issue 15)
# ---------------------------------------------------------------------------------------------------------


def explicit_sgd_step(model, method, params, start, x, y, sgp) -> dict[str, torch.Tensor]:
    """The weights after one SGD step (lr 0.1) on the plain gradient projected direction by direction."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    trained, expected = {id(p) for p in params}, {}
    for n, p in model.named_parameters():
        if id(p) not in trained:
            continue
        layer, grad = n.rsplit(".", 1)[0], p.grad.double()
        if layer in method.layer_names and n.endswith("weight"):
            grad = explicitly_projected(grad, method.bases[layer], method.importances[layer] if sgp else None)
        expected[n] = start[n].double() - 0.1 * grad
    return expected


@pytest.mark.parametrize("sgp", [False, True])
def test_the_step_batch_takes_its_projected_rows_from_the_split_projected_once(monkeypatch, sgp):
    """Batches drawn as rows of one split and announced with `on_step_rows` (as the trainer does): each step gives
    the weights of an SGD step on the gradient projected direction by direction, the first layer's projected rows
    come from the split projected once for all three steps, and the step really used them."""
    import ness.methods.gpm as gpm_module
    from ness.data.tasks import BatchRows

    monkeypatch.setattr(gpm_module, "MIN_SAVED_MULTIPLY_ADDS", 0)
    made, given = [], []
    original_split = gpm_module.InputSideProjection._projected_split
    monkeypatch.setattr(
        gpm_module.InputSideProjection,
        "_projected_split",
        lambda self, source: made.append(source.shape[0]) or original_split(self, source),
    )
    original_linear = gpm_module.linear_with_projected_weight_gradient
    monkeypatch.setattr(
        gpm_module,
        "linear_with_projected_weight_gradient",
        lambda *args: given.append(args[-1] is not None) or original_linear(*args),
    )
    g = torch.Generator().manual_seed(16)
    build = (lambda m: SGP(m, SGPConfig(samples=200))) if sgp else (lambda m: GPM(m, GPMConfig(samples=200)))
    model, method = task1_on_a_five_dimensional_task0(build, g)
    params = method.trainable_parameters(1)
    split = torch.randn(30, 20, generator=g)
    for index in ([3, 7, 0, 29], [1, 2, 3, 4], [29, 28, 27, 26]):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        rows = BatchRows(split, torch.tensor(index))
        method.on_step_rows(1, rows)
        y = torch.randint(0, 4, (4,), generator=g)
        method.training_step(1, rows.batch, y, torch.optim.SGD(params, lr=0.1), lambda loss: None)
        stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = explicit_sgd_step(model, method, params, start, rows.batch, y, sgp)
        for n, want in expected.items():
            torch.testing.assert_close(stepped[n].double(), want, atol=1e-6, rtol=1e-5, msg=n)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(stepped[n])
    assert made == [30]  # once, for the whole split, and read by every later step
    assert given[0::2] == [True] * 3  # the first layer of each step took rows of the projected split
    assert given[1::2] == [False] * 3  # the second layer's input is no split's batch: it projects its own rows


@pytest.mark.parametrize(
    "what", ["a copy of the batch", "the batch changed in place", "the split changed in place", "no step rows"]
)
def test_anything_but_the_very_batch_drawn_projects_its_own_rows(what):
    from ness.data.tasks import BatchRows, StepRows
    from ness.methods.gpm import InputSideProjection
    from ness.subspace import gradient_projection

    g = torch.Generator().manual_seed(17)
    layer, basis = nn.Linear(20, 8), torch.linalg.qr(torch.randn(20, 5, generator=g))[0]
    holder = StepRows()
    calls = InputSideProjection(layer, gradient_projection(basis, like=layer.weight), holder)
    split = torch.randn(30, 20, generator=g)
    holder.rows = BatchRows(split, torch.tensor([4, 9, 2]))
    x = holder.rows.batch
    drawn = calls.projected_batch(x)
    torch.testing.assert_close(drawn, x - x @ basis @ basis.T)
    if what == "a copy of the batch":
        x = x.clone()
    elif what == "the batch changed in place":
        x.add_(1.0)
    elif what == "the split changed in place":
        split.mul_(2.0)
    else:
        holder.rows = None
    assert calls.projected_batch(x) is None


def test_the_projected_split_is_made_again_when_m_changes_and_never_pickled():
    import pickle

    from ness.data.tasks import BatchRows, StepRows
    from ness.methods.gpm import InputSideProjection
    from ness.subspace import gradient_projection

    g = torch.Generator().manual_seed(18)
    layer, basis = nn.Linear(20, 8), torch.linalg.qr(torch.randn(20, 5, generator=g))[0]
    holder = StepRows()
    calls = InputSideProjection(layer, gradient_projection(basis, like=layer.weight), holder)
    split = torch.randn(30, 20, generator=g)
    holder.rows = BatchRows(split, torch.tensor([1, 5]))
    calls.projected_batch(holder.rows.batch)
    with torch.no_grad():
        calls.projection.basis.copy_(torch.linalg.qr(torch.randn(20, 5, generator=g))[0])  # M changed in place
    x, m = holder.rows.batch, calls.projection.basis
    torch.testing.assert_close(calls.projected_batch(x), x - x @ m @ m.T)
    copy = pickle.loads(pickle.dumps(calls))
    assert copy.split_products._made is None and copy.step_rows.rows is None


def test_a_gpm_pickled_before_the_step_rows_existed_still_trains(monkeypatch):
    """A checkpoint of an earlier version: a GPM without step rows, whose layers' step forwards lack them."""
    import pickle

    _, method, x, y, optimizer = gpm_at_task1_with_a_batch(monkeypatch, 19)
    method.training_step(1, x, y, optimizer, lambda loss: None)  # builds the layers' step forwards
    del method.__dict__["_step_rows"]
    for calls in method._input_side.values():
        del calls.__dict__["step_rows"], calls.__dict__["split_products"]
    old = pickle.loads(pickle.dumps(method))
    params = old.trainable_parameters(1)
    start = {n: p.detach().clone() for n, p in old.model.named_parameters()}
    old.training_step(1, x, y, torch.optim.SGD(params, lr=0.1), lambda loss: None)
    stepped = {n: p.detach().clone() for n, p in old.model.named_parameters()}
    for n, want in explicit_sgd_step(old.model, old, params, start, x, y, False).items():
        torch.testing.assert_close(stepped[n].double(), want, atol=1e-6, rtol=1e-5, msg=n)


def test_the_trainer_s_epoch_with_the_projected_split_gives_the_weights_of_the_ordinary_path(monkeypatch):
    """`train_task` announces each batch's rows: task 1's epochs give the weights they give when every step projects
    its own rows, and the split is projected once for the task (its 60 prepared rows, the first layer's)."""
    import ness.methods.gpm as gpm_module
    from ness.data.tasks import identity
    from ness.trainer import train_task

    def task(seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        inputs = torch.randn(70, 784, generator=g)
        labels = torch.randint(0, 10, (70,), generator=g)
        held_out = Split(inputs[60:], labels[60:])
        return Task(f"t{seed}", 10, Split(inputs[:60], labels[:60]), held_out, held_out, identity)

    def trained(with_split: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
        made = []
        original = gpm_module.InputSideProjection._projected_split
        if with_split:
            monkeypatch.setattr(
                gpm_module.InputSideProjection,
                "_projected_split",
                lambda self, source: made.append(source.shape[0]) or original(self, source),
            )
        else:
            monkeypatch.setattr(gpm_module.InputSideProjection, "projected_batch", lambda self, x: None)
        torch.manual_seed(0)
        model = shared_head_mlp(784, (100,), 10)
        method = GPM(model, GPMConfig(samples=60, threshold=0.9))
        config = TrainConfig(epochs=2, lr=0.05, batch_size=10, lr_schedule=False)
        for t in (0, 1):
            method.begin_task(t)
            train_task(model, method, t, task(t), config, torch.Generator().manual_seed(t), progress=False)
            if t == 1:
                assert "0" in method._input_side  # the first layer took the input-side form (784 → 100 at batch 10)
            method.end_task(t, [(task(t).train.inputs,)])
        assert method._step_rows.rows is None and not method._input_side  # the split and its projection let go
        monkeypatch.undo()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, made

    (with_split, made), (without, not_made) = trained(True), trained(False)
    assert made == [60] and not_made == []
    for name, value in without.items():
        torch.testing.assert_close(with_split[name], value, rtol=1e-5, atol=1e-6, msg=name)
