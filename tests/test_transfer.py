"""Transfer adapters (NESSConfig.transfer_rank): each task's own Ū·A in the directions its inputs need outside U,
acting only when that task is predicted. Checked against explicit eigendecompositions, weights and forward passes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches
from ness import NESS, NESSConfig, NullSpaceAdapter, TrainingLoopError
from ness.adapters import low_rank_shift
from ness.subspace import input_covariance, layer_input_rows, transfer_directions

IN, HIDDEN, OUT = 10, 12, 3


# -- the directions ---------------------------------------------------------------------------------------------------
def test_transfer_directions_are_the_top_eigenvectors_of_the_inputs_outside_u():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 8, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))[0]
    c = x.T @ x
    found = transfer_directions(c, u, 2)
    # By hand with NumPy: project the rows outside span(U), then their top-2 right singular vectors.
    outside = x.numpy() - x.numpy() @ u.numpy() @ u.numpy().T
    _, s, vt = np.linalg.svd(outside, full_matrices=False)
    expected = vt[:2].T
    np.testing.assert_allclose(np.abs(found.basis.numpy().T @ expected), np.eye(2), atol=1e-8)  # same up to sign
    assert float((u.T @ found.basis).abs().max()) < 1e-10  # outside span(U)
    total = float((x**2).sum())
    assert found.outside_share == pytest.approx(float((s**2).sum()) / total, rel=1e-10)
    assert found.captured_share == pytest.approx(float((s[:2] ** 2).sum()) / total, rel=1e-10)


def test_inputs_inside_u_leave_no_transfer_direction():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]
    x = torch.randn(50, 2, generator=g, dtype=torch.float64) @ u.T  # every row lies in span(U)
    found = transfer_directions(x.T @ x, u, 4)
    assert found.basis.shape == (6, 0) and found.outside_share < 1e-12
    assert transfer_directions(torch.zeros(6, 6, dtype=torch.float64), u, 4).basis.shape == (6, 0)


# -- the adapter ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merged_path", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv", "linear_bias"])
def test_the_transfer_term_adds_its_weights_and_acts_only_while_enabled(kind, merged_path, monkeypatch):
    torch.manual_seed(0)
    bias = kind == "linear_bias"
    layer = nn.Conv2d(2, 4, 3, padding=1) if kind == "conv" else nn.Linear(6, 4, bias=bias)
    d = 18 if kind == "conv" else 6
    u = torch.linalg.qr(torch.randn(d + bias, 2))[0]
    ubar = torch.linalg.qr(torch.randn(d + bias, 3))[0]
    adapter = NullSpaceAdapter(layer, u, adapt_bias=bias)
    adapter.add_transfer(ubar)
    with torch.no_grad():
        adapter.V.normal_()
        adapter.A.normal_()
    monkeypatch.setattr(NullSpaceAdapter, "_merged_path_is_cheaper", lambda self, x, terms=None, rows=None: merged_path)
    x = torch.randn(5, 2, 7, 7) if kind == "conv" else torch.randn(5, 6)
    with torch.no_grad():
        shared = (u @ adapter.V).T  # (o, d[+1]) in PyTorch's layout
        own = (ubar @ adapter.A).T
        for terms, delta in ((True, shared + own), (False, shared)):
            adapter.transfer_enabled = terms
            weight, b = layer.weight.reshape(4, -1) + delta[:, :d], layer.bias
            if bias:
                b = b + delta[:, d]
            if kind == "conv":
                expected = F.conv2d(x, weight.reshape(layer.weight.shape), b, padding=1)
            else:
                expected = F.linear(x, weight, b)
            torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-5)
        # The hook path for a finished task's term: the same shift as the adapter's own.
        adapter.transfer_enabled = True
        shift = low_rank_shift(layer, x, ubar, adapter.A, bias)
        adapter.transfer_enabled = False
        torch.testing.assert_close(adapter(x) + shift, adapter.__class__.forward(adapter, x) + shift)


# -- NESS with transfer adapters --------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def task(t: int, n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t's inputs: strong in its own 3 input directions (overlapping its neighbours'), weak elsewhere."""
    g = torch.Generator().manual_seed(t)
    scales = torch.full((IN,), 0.05)
    scales[2 * t : 2 * t + 3] = 2.0
    x = torch.randn(n, IN, generator=g) * scales
    return x, (x[:, 2 * t] > 0).long() + (x[:, 2 * t + 1] > 0).long()


def train(method: NESS, model: nn.Module, t: int, only_transfer: bool = False, steps: int = 40) -> None:
    params = method.trainable_parameters(t)
    if only_transfer:
        params = [p for layer in method.active.values() for p in [layer.adapter.A] if p is not None]
    optimizer = torch.optim.SGD(params, lr=0.2)
    x, y = task(t)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def finish(method: NESS, model: nn.Module, t: int, **kw) -> None:
    x, y = task(t)
    method.begin_task(t, batches(x, y, 32))
    train(method, model, t, **kw)
    method.end_task(t, batches(x, y, 32))


def test_preview_chooses_each_layers_directions_from_the_new_tasks_inputs_outside_u():
    model = mlp()
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=4))
    finish(method, model, 0)
    x1, y1 = task(1)
    method.begin_task(1, batches(x1, y1, 32))
    first = method.active["0"].adapter
    u = first.U.double()
    covariance = input_covariance(x1)  # the first layer sees the raw inputs
    expected = transfer_directions(covariance, u, 4).basis
    torch.testing.assert_close(
        first.transfer_basis.double().abs(), expected.abs().to(torch.float32).double(), atol=1e-5, rtol=0
    )
    # The second layer's directions come from task 1's hidden activations, by hand.
    hidden = torch.relu(x1 @ model[0].base.weight.T + model[0].base.bias).double()
    second = method.active["2"].adapter
    expected2 = transfer_directions(hidden.T @ hidden, second.U.double(), 4).basis
    torch.testing.assert_close(second.transfer_basis.double().abs(), expected2.abs(), atol=1e-5, rtol=0)
    record = next(r for r in method.records if r["task"] == 1 and r["layer"] == "0")
    # Task 0's strong directions are the only ones outside U here: 3 of them, fewer than k = 4.
    assert record["transfer_rank"] == expected.shape[1] == 3
    assert 0 < record["transfer_energy"] <= record["new_energy_outside_U"] <= 1


def test_without_the_tasks_data_trainable_parameters_refuses_and_says_what_to_do():
    model = mlp()
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=4))
    finish(method, model, 0)
    method.begin_task(1)
    with pytest.raises(TrainingLoopError, match=r"call method.begin_task\(1, loader\)"):
        method.trainable_parameters(1)
    method.preview_task(1, batches(*task(1), 32))
    assert any(p is method.active["0"].adapter.A for p in method.trainable_parameters(1))


def test_an_earlier_task_never_sees_a_later_tasks_transfer_adapter():
    model = mlp()
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=4))
    finish(method, model, 0)
    x0, _ = task(0)
    with torch.no_grad():
        before = method.predict(x0, 0).clone()
    x1, y1 = task(1)
    method.begin_task(1, batches(x1, y1, 32))
    with torch.no_grad():
        start = method.predict(x1, 1).clone()
    train(method, model, 1, only_transfer=True)  # only the A's train: the shared weights stay
    with torch.no_grad():
        assert torch.equal(method.predict(x0, 0), before)  # task 0 mid-task: the open transfer is off for it
        assert not torch.allclose(method.predict(x1, 1), start)
        open_outputs = method.predict(x1, 1).clone()
    method.end_task(1, batches(x1, y1, 32))
    with torch.no_grad():
        assert torch.equal(method.predict(x0, 0), before)
        assert torch.equal(model(x0), before)  # the model alone is the shared model
        # Task 1 after its end: the merged shared W plus its own term through a hook, the same function.
        torch.testing.assert_close(method.predict(x1, 1), open_outputs, rtol=1e-5, atol=1e-6)
    assert set(method.transfers[1]) == {"0", "2"} and method.transfers[0] == {}


def test_the_statistics_pass_sees_each_task_as_it_is_predicted():
    model = mlp()
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=4))
    finish(method, model, 0)
    before = method.covariances["2"].clone()
    finish(method, model, 1)
    x1, _ = task(1)
    captured = []
    handle = model[2].register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        method.predict(x1, 1)  # the hidden activations of task 1 with its own transfer term
    handle.remove()
    hidden = layer_input_rows(model[2], captured[0]).double()
    torch.testing.assert_close(method.covariances["2"] - before, hidden.T @ hidden, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        without = torch.relu(model[0](x1)).double()
    assert not torch.allclose(hidden, without)  # the transfer term did change what the second layer sees


def test_a_layer_at_rank_zero_still_gets_its_transfer_adapter():
    model = mlp()
    method = NESS(model, NESSConfig(eps1=1e-9, transfer_rank=3))  # no direction is quiet enough: every rank is 0
    finish(method, model, 0)
    x1, y1 = task(1)
    method.begin_task(1, batches(x1, y1, 32))
    roles = {r.module: r for r in method.layer_roles(1)}
    assert roles["0"].reason == "transfer" and roles["0"].trainable == 3 * HIDDEN
    assert method.active["0"].adapter.rank == 0
    train(method, model, 1)
    method.end_task(1, batches(x1, y1, 32))
    assert method.task_deltas == [{}]  # nothing shared changed
    with torch.no_grad():
        assert float((method.predict(x1, 1) - model(x1)).abs().max()) > 0  # task 1 learnt through its own term


def test_state_dict_round_trip_keeps_every_tasks_function_mid_task_and_between_tasks():
    model = mlp()
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=4))
    finish(method, model, 0)
    finish(method, model, 1)
    x2, y2 = task(2)
    method.begin_task(2, batches(x2, y2, 32))
    train(method, model, 2, steps=10)
    for moment in ("mid_task", "between_tasks"):
        if moment == "between_tasks":
            method.end_task(2, batches(x2, y2, 32))
        restored = NESS(mlp(), NESSConfig(eps1=0.05, transfer_rank=4))
        restored.load_state_dict(copy.deepcopy(method.state_dict()))
        with torch.no_grad():
            for j in range(3):
                xj, _ = task(j)
                torch.testing.assert_close(restored.predict(xj, j), method.predict(xj, j), rtol=0, atol=0)
    assert restored.transfers[2].keys() == {"0", "2"}


def test_transfer_rank_must_be_a_count():
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"NESSConfig\.transfer_rank: got .*; an integer ≥ 0"):
            NESSConfig(transfer_rank=bad)


def test_the_trainer_evaluates_every_task_through_its_own_transfer_adapter():
    """run_continual with NESSConfig's defaults: each R[T-1][j] is task j's accuracy as `predict(x, j)` gives it
    (by hand), which differs from the shared model's own for a task whose adapter did work."""
    from ness.data import Benchmark, Split, Task
    from ness.models import multi_head_mlp
    from ness.trainer import TrainConfig, run_continual

    def split(t: int, n: int, seed: int) -> Split:
        x, _ = task(t, n)
        g = torch.Generator().manual_seed(seed)
        x = x + 0.01 * torch.randn(x.shape, generator=g)
        return Split(x, (x[:, 2 * t] > 0).long())

    tasks = tuple(Task(f"t{t}", 2, split(t, 96, 1), split(t, 32, 2), split(t, 64, 3), lambda v: v) for t in range(3))
    bench = Benchmark("ness-transfer", tasks, input_shape=(IN,), shared_head=False, details={})
    torch.manual_seed(0)
    model = multi_head_mlp(IN, [HIDDEN, HIDDEN], [2, 2, 2])
    method = NESS(model, NESSConfig())
    config = TrainConfig(epochs=5, lr=0.2, batch_size=16, lr_schedule=False)
    result = run_continual(model, method, bench, config, seed=0, progress=False)
    differs = False
    with torch.no_grad():
        for j, t in enumerate(tasks):
            own = 100 * float((method.predict(t.test.inputs, j).argmax(1) == t.test.labels).float().mean())
            shared = model(t.test.inputs, j).argmax(1)
            assert result["acc_matrix"][2][j] == pytest.approx(own)
            differs |= not torch.equal(method.predict(t.test.inputs, j).argmax(1), shared) and j > 0
    assert differs
    assert next(r["transfer_rank"] for r in method.diagnostics() if r["task"] == 1) > 0


def test_a_task_trained_without_its_data_reaching_preview_is_told_at_end_task(caplog):
    model = mlp()
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=4))
    finish(method, model, 0)
    method.begin_task(1)  # no data: the loop builds its optimiser from requires_grad instead of trainable_parameters
    x1, y1 = task(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        optimizer.step()
    with caplog.at_level("WARNING", logger="ness"):
        method.end_task(1, batches(x1, y1, 32))
    assert "task 1: trained without its transfer adapter" in caplog.text
    assert method.transfers[1] == {}
