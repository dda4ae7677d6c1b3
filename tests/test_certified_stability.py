"""Certified stability (NESSConfig.max_output_shift, Eq. 10 enforced): after training a new task, every earlier
input x of an adapted layer moves its output by ‖xᵀΔW‖² ≤ ε, checked over all those inputs one by one."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ness.data import Benchmark, Split, Task, split_mnist
from ness.methods import NESS, NESSConfig
from ness.models import multi_head_mlp
from ness.subspace import clip_spectral_norm
from ness.trainer import TrainConfig, run_continual


# -- the pure function ----------------------------------------------------------------------------------------
def test_clip_spectral_norm_lowers_only_the_singular_values_above_the_bound():
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    singular = torch.tensor([5.0, 2.0, 0.7, 0.1], dtype=torch.float64)
    matrix = q1 @ torch.diag(singular) @ q2.T
    expected = q1 @ torch.diag(torch.tensor([1.5, 1.5, 0.7, 0.1], dtype=torch.float64)) @ q2.T
    torch.testing.assert_close(clip_spectral_norm(matrix, 1.5), expected)
    # Already inside the ball: returned as is. At the exact tie (bound 5) the SVD's σ₁ may come out as 5 + 1 ulp,
    # so the matrix is rebuilt from its SVD: equal up to round-off only.
    assert torch.equal(clip_spectral_norm(matrix, 5.0 + 1e-9), matrix)
    torch.testing.assert_close(clip_spectral_norm(matrix, 5.0), matrix)
    torch.testing.assert_close(clip_spectral_norm(matrix, 0.0), torch.zeros_like(matrix))
    with pytest.raises(ValueError, match="bound must be ≥ 0"):
        clip_spectral_norm(matrix, -1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "1e-3"])
def test_max_output_shift_is_validated(bad):
    with pytest.raises(ValueError, match="max_output_shift"):
        NESSConfig(transfer_rank=0, max_output_shift=bad)


# -- the certificate on synthetic data -------------------------------------------------------------------------
DIM = 12


def low_rank_split(gen: torch.Generator, t: int, n: int) -> Split:
    """Inputs mostly in a task-specific 3-d subspace, plus a little isotropic noise: the earlier tasks' covariance
    then has small but non-zero singular values in every other direction (an approximate null space)."""
    labels = torch.arange(n) % 2
    basis = torch.zeros(3, DIM)
    basis[:, 3 * t : 3 * t + 3] = torch.eye(3)
    coefficients = torch.randn(n, 3, generator=gen) + 2.0 * (2.0 * labels.float() - 1.0)[:, None]
    return Split(coefficients @ basis + 0.05 * torch.randn(n, DIM, generator=gen), labels)


def synthetic_benchmark() -> Benchmark:
    gen = torch.Generator().manual_seed(0)
    tasks = tuple(
        Task(
            f"t{t}", 2, low_rank_split(gen, t, 200), low_rank_split(gen, t, 40), low_rank_split(gen, t, 40), lambda x: x
        )
        for t in range(2)
    )
    return Benchmark("low-rank", tasks, (DIM,), False, {})


def first_layer_shift(bench: Benchmark, memory: str, shift: float | None, eps1: float = 0.3) -> tuple[float, list]:
    """Train two tasks; return max over task 0's training inputs x of ‖xᵀΔW‖² for the first layer (ΔW = its weight
    change during task 1, computed from the weights), and the method's diagnostics."""
    torch.manual_seed(0)
    model = multi_head_mlp(DIM, (16,), [2, 2])
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=eps1, memory=memory, max_output_shift=shift))
    config = TrainConfig(epochs=15, lr=0.5, momentum=0.9, batch_size=16, lr_schedule=False)
    weights: list[torch.Tensor] = []

    original_end = method.end_task

    def end_task(t, batches, **options):
        original_end(t, batches, **options)
        weights.append(model.get_submodule(method.layer_names[0]).weight.detach().clone())

    method.end_task = end_task
    run_continual(model, method, bench, config, seed=0, progress=False)
    delta = weights[1] - weights[0]  # (o, d)
    old_inputs = bench.tasks[0].train.inputs
    worst = max(float((delta @ x).square().sum()) for x in old_inputs)  # one input at a time
    return worst, method.diagnostics()


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_every_earlier_input_moves_at_most_epsilon(memory):
    bench = synthetic_benchmark()
    unconstrained, _ = first_layer_shift(bench, memory, None)
    epsilon = unconstrained / 50
    assert epsilon > 0
    certified, diagnostics = first_layer_shift(bench, memory, epsilon)
    assert certified <= epsilon * (1 + 1e-5)
    # The constraint was active (the unconstrained run moved old outputs 50× more), and the record says so.
    first = next(r for r in diagnostics if r["layer"] == "backbone.0" and r["task"] == 1)
    assert first["certified_shift"] == pytest.approx(math.sqrt(epsilon))
    for record in diagnostics:
        if record.get("measured_max_shift") is not None:
            assert record["measured_max_shift"] <= record["certified_shift"] * (1 + 1e-5)
            assert record["eq8_bound"] <= record["certified_shift"] * (1 + 1e-5)


def test_without_the_option_nothing_is_clipped():
    bench = synthetic_benchmark()
    _, diagnostics = first_layer_shift(bench, "covariance", None)
    assert all(r.get("certified_shift") is None for r in diagnostics if "v_spectral_norm" in r)


# -- the bound is reached, not only respected ------------------------------------------------------------------
# The tests above check ‖xᵀΔW‖² ≤ ε: a clip to a tighter radius (ε/σ_max(U) for ε < 1, or any fraction of the
# bound) passes them all. These check that a V beyond the ball lands exactly on ‖V‖₂ = √ε/σ_max(U), with σ_max(U)
# recomputed here in numpy from the recorded inputs.
def kept_sigma_max(rows: np.ndarray, eps1: float) -> float:
    """σ_max(U) in numpy: the largest singular value of a layer's input rows (n, d) that is ≤ ε₁·‖rows‖_F (Eq. 5's
    Frobenius rule), counting the d − n zero singular values of a wide matrix."""
    rows = rows.astype(np.float64)
    sigma = np.linalg.svd(rows, compute_uv=False)
    sigma = np.concatenate([sigma, np.zeros(rows.shape[1] - sigma.size)])
    return float(sigma[sigma <= eps1 * np.linalg.norm(rows)].max())


def spectral_norm(matrix: torch.Tensor) -> float:
    return float(np.linalg.norm(matrix.detach().double().numpy(), ord=2))


def test_after_step_clips_v_onto_the_sqrt_epsilon_ball_of_each_layer():
    """V with singular values from 4× to ¼× each layer's √ε/σ_max(U): after the step those above the bound equal it
    and those below are unchanged. ε = 0.04, so √ε = 0.2 ≠ ε; two layers, each with its own σ_max(U)."""
    bench = synthetic_benchmark()
    eps1, epsilon = 0.3, 0.04
    torch.manual_seed(0)
    model = multi_head_mlp(DIM, (16, 8), [2, 2])
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=eps1, max_output_shift=epsilon))
    inputs = bench.tasks[0].train.inputs
    method.begin_task(0)
    method.end_task(0, [inputs[i : i + 50] for i in range(0, len(inputs), 50)])
    x = inputs.double().numpy()
    hidden = np.maximum(x @ model.backbone[0].weight.detach().double().numpy().T, 0.0)  # backbone.2's inputs
    method.begin_task(1)
    layer_rows = {"backbone.0": x, "backbone.2": hidden}
    assert set(method.active) == set(layer_rows)
    gen = torch.Generator().manual_seed(1)
    expected = {}
    for name, rows in layer_rows.items():
        bound = math.sqrt(epsilon) / kept_sigma_max(rows, eps1)
        v = method.active[name].adapter.V
        k = min(v.shape)
        left, _ = torch.linalg.qr(torch.randn(v.shape[0], k, generator=gen, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(v.shape[1], k, generator=gen, dtype=torch.float64))
        singular = bound * torch.linspace(4.0, 0.25, k, dtype=torch.float64)
        with torch.no_grad():
            v.copy_((left * singular) @ right.T)
        expected[name] = np.minimum(singular.numpy(), bound)
    method.after_step(1)
    for name, clipped in expected.items():
        got = np.linalg.svd(method.active[name].adapter.V.detach().double().numpy(), compute_uv=False)
        np.testing.assert_allclose(got, clipped, rtol=1e-5, err_msg=name)


def trained_first_layer_v(bench: Benchmark, shift: float | None) -> tuple[torch.Tensor, list]:
    """Task 1's V of the first layer after training two tasks, and the diagnostics."""
    torch.manual_seed(0)
    model = multi_head_mlp(DIM, (16,), [2, 2])
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.3, max_output_shift=shift))
    config = TrainConfig(epochs=15, lr=0.5, momentum=0.9, batch_size=16, lr_schedule=False)
    run_continual(model, method, bench, config, seed=0, progress=False)
    return method.task_deltas[0]["backbone.0"][1], method.diagnostics()


def test_a_clipped_layer_ends_the_task_on_the_bound():
    """ε set so that √ε/σ_max(U) is a tenth of the unconstrained run's ‖V‖₂: the constrained run ends with ‖V‖₂
    equal to √ε/σ_max(U), not below it."""
    bench = synthetic_benchmark()
    sigma_max = kept_sigma_max(bench.tasks[0].train.inputs.numpy(), 0.3)
    free, _ = trained_first_layer_v(bench, None)
    epsilon = (sigma_max * spectral_norm(free) / 10) ** 2
    assert abs(math.sqrt(epsilon) - epsilon) > 0.1 * epsilon  # ε far from 1: √ε and ε give different radii
    clipped, diagnostics = trained_first_layer_v(bench, epsilon)
    bound = math.sqrt(epsilon) / sigma_max
    assert spectral_norm(clipped) == pytest.approx(bound, rel=1e-5)
    record = next(r for r in diagnostics if r["layer"] == "backbone.0" and r["task"] == 1)
    assert record["sigma_max_U"] == pytest.approx(sigma_max, rel=1e-6)
    assert record["v_spectral_norm"] == pytest.approx(bound, rel=1e-5)


# -- the certificate on real MNIST ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_root() -> Path:
    root = os.environ.get("NESS_DATA_ROOT")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("NESS_DATA_ROOT does not point at a folder with mnist/; set it to test on the real files")
    return Path(root)


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_certificate_holds_on_real_mnist(mnist_root, memory):
    full = split_mnist(mnist_root, seed=0, train_per_task=300)
    bench = Benchmark(full.name, full.tasks[:2], full.input_shape, full.shared_head, full.details)
    torch.manual_seed(0)
    model = multi_head_mlp(bench.input_dim, (50,), [2, 2])
    epsilon = 1e-2  # unconstrained, these settings move some task-0 image by ‖xᵀΔW‖² ≈ 1.7e4 (measured)
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.1, memory=memory, max_output_shift=epsilon))
    layer = model.get_submodule(method.layer_names[0])
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.9, batch_size=32, lr_schedule=False)
    task0 = bench.tasks[0]
    before: list[torch.Tensor] = []
    original_begin = method.begin_task

    def begin_task(t):
        if t == 1:
            before.append(layer.weight.detach().clone())
        original_begin(t)

    method.begin_task = begin_task
    run_continual(model, method, bench, config, seed=0, progress=False)
    delta = layer.weight.detach() - before[0]
    assert delta.abs().max() > 0  # task 1 did change the layer
    inputs = task0.transform(task0.train.inputs)  # the layer's inputs: the flattened normalised images
    shifts = [float((delta @ x.flatten()).square().sum()) for x in inputs]
    assert max(shifts) <= epsilon * (1 + 1e-4)


# -- the figure ------------------------------------------------------------------------------------------------------
def test_stability_figure_draws_measured_and_bound_per_layer_and_the_certificate():
    from ness.plots import stability_figure

    rows = [
        {"task": t, "layer": layer, "rank": 3, "d": 8, "measured_max_shift": m, "eq8_bound": b, "certified_shift": 0.5}
        for t, layer, m, b in [(1, "a", 0.1, 0.4), (2, "a", 0.2, 0.5), (1, "b", 0.01, 0.3), (2, "b", 0.02, 0.3)]
    ]
    rows.append({"task": 1, "layer": "c", "rank": 0, "d": 8})  # frozen: no measurement, not drawn
    fig = stability_figure({"benchmark": "b", "method": "ness", "seed": 1, "diagnostics": rows})
    (ax,) = fig.axes
    lines = {(line.get_label(), tuple(line.get_ydata())) for line in ax.get_lines()}
    assert ("a", (0.1, 0.2)) in lines and ("b", (0.01, 0.02)) in lines
    assert any(y == (0.4, 0.5) for _, y in lines) and any(y == (0.3, 0.3) for _, y in lines)
    assert any(label == "certified √ε" and y == (0.5, 0.5) for label, y in lines)
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 5
    with pytest.raises(ValueError, match="no measured output shifts"):
        stability_figure({"benchmark": "b", "method": "ness", "seed": 1, "diagnostics": rows[-1:]})
