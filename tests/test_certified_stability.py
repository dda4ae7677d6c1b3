"""Certified stability (NESSConfig.max_output_shift, Eq. 10 enforced): after training a new task, every earlier
input x of an adapted layer moves its output by ‖xᵀΔW‖² ≤ ε, checked over all those inputs one by one."""

from __future__ import annotations

import math
import os
from pathlib import Path

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
    assert torch.equal(clip_spectral_norm(matrix, 5.0), matrix)  # already inside the ball
    torch.testing.assert_close(clip_spectral_norm(matrix, 0.0), torch.zeros_like(matrix))
    with pytest.raises(ValueError, match="bound must be ≥ 0"):
        clip_spectral_norm(matrix, -1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "1e-3"])
def test_max_output_shift_is_validated(bad):
    with pytest.raises(ValueError, match="max_output_shift"):
        NESSConfig(max_output_shift=bad)


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
    method = NESS(model, NESSConfig(eps1=eps1, memory=memory, max_output_shift=shift))
    config = TrainConfig(epochs=15, lr=0.5, momentum=0.9, batch_size=16, lr_schedule=False)
    weights: list[torch.Tensor] = []

    original_end = method.end_task

    def end_task(t, batches):
        original_end(t, batches)
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
    method = NESS(model, NESSConfig(eps1=0.1, memory=memory, max_output_shift=epsilon))
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
