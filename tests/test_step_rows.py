"""A NESS adapter reading the trainer's step batch (rows of a fixed, prepared split) takes x·Wᵀ + b and x·[U Ū] from
products computed once for the whole split.

Checked against explicit computations: the output and the gradients of V and A equal F.linear(x, W, b) + x·U·V +
x·Ū·A written out; the products are made once and reused across steps, and made again when U, W or the split changes
in place; anything that is not the very batch the trainer drew, with the batch and the split unchanged since (a copy,
an in-place change of either, a hook on the layer, a trained W), takes the ordinary path; the trainer's epoch gives
the V's of one without the products; a pickled method carries neither the split nor the products.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.adapters import NullSpaceAdapter
from ness.data.tasks import BatchRows, Split, StepRows, Task, identity
from ness.methods import NESS, NESSConfig
from ness.models import shared_head_mlp
from ness.trainer import TrainConfig, train_task


def adapter_and_rows(bias: bool = True, adapt_bias: bool = False) -> tuple[NullSpaceAdapter, torch.Tensor, StepRows]:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias)
    layer.requires_grad_(False)
    q = torch.linalg.qr(torch.randn(7 if adapt_bias else 6, 7, generator=g))[0]  # with the bias row: (d+1) rows
    adapter = NullSpaceAdapter(layer, q[:, :2].contiguous(), adapt_bias=adapt_bias)
    adapter.add_transfer(q[:, 2:3].contiguous())
    with torch.no_grad():
        adapter.V.normal_(generator=g)
        adapter.A.normal_(generator=g)
    adapter.step_rows = StepRows()
    return adapter, torch.randn(30, 6, generator=g), adapter.step_rows


def draw(holder: StepRows, source: torch.Tensor, index: list[int]) -> torch.Tensor:
    """What the trainer does for a prepared split: x = source[index], announced as the step's rows."""
    holder.rows = BatchRows(source, torch.tensor(index))
    return holder.rows.batch


def explicit(adapter: NullSpaceAdapter, x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, W, b) + x̃·U·V + x̃·Ū·A, with x̃ = [x, 1] when the adapter has the bias row."""
    layer = adapter.base
    rows = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1) if adapter.adapt_bias else x
    return (
        F.linear(x, layer.weight, layer.bias) + rows @ adapter.U @ adapter.V + rows @ adapter.transfer_basis @ adapter.A
    )


def grads(adapter: NullSpaceAdapter, out: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    adapter.V.grad = adapter.A.grad = None
    ((out - target) ** 2).sum().backward()
    return [adapter.V.grad.clone(), adapter.A.grad.clone()]


def counted(monkeypatch) -> list[int]:
    made = []
    original = NullSpaceAdapter._products_of

    def spy(self, source, basis):
        made.append(source.shape[0])
        return original(self, source, basis)

    monkeypatch.setattr(NullSpaceAdapter, "_products_of", spy)
    return made


@pytest.mark.parametrize(("bias", "adapt_bias"), [(True, False), (False, False), (True, True)])
def test_the_step_batch_output_and_gradients_equal_the_explicit_layer(monkeypatch, bias, adapt_bias):
    adapter, source, holder = adapter_and_rows(bias, adapt_bias)
    made = counted(monkeypatch)
    target = torch.randn(5, 4)
    for index in ([3, 7, 0, 29, 12], [1, 2, 3, 4, 5], [29, 28, 27, 26, 25]):
        x = draw(holder, source, index)
        out = adapter(x)
        torch.testing.assert_close(out, explicit(adapter, x), rtol=1e-5, atol=1e-5)
        for got, want in zip(grads(adapter, out, target), grads(adapter, explicit(adapter, x), target), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert made == [30]  # made once, for the whole split, and reused by every later step


def test_products_are_made_again_when_u_w_or_the_split_change_in_place(monkeypatch):
    adapter, source, holder = adapter_and_rows()
    made = counted(monkeypatch)
    for change in (lambda: adapter.U.mul_(-1), lambda: adapter.base.weight.add_(0.5), lambda: source.mul_(2)):
        with torch.no_grad():
            change()
        x = draw(holder, source, [4, 9, 2])
        torch.testing.assert_close(adapter(x), explicit(adapter, x), rtol=1e-5, atol=1e-5)
    assert len(made) == 3


@pytest.mark.parametrize(
    "what",
    [
        "a copy of the batch",
        "the batch changed in place",
        "the split changed in place after the draw",
        "a hook on the layer",
        "a W that trains",
        "no step rows",
    ],
)
def test_anything_but_the_very_batch_drawn_takes_the_ordinary_path(monkeypatch, what):
    adapter, source, holder = adapter_and_rows()
    made = counted(monkeypatch)
    x = draw(holder, source, [5, 6, 7])
    seen = []
    if what == "a copy of the batch":
        x = x.clone()
    elif what == "the batch changed in place":
        x.add_(1.0)
    elif what == "the split changed in place after the draw":
        source.mul_(3.0)  # the products would be made from the new split, which x no longer matches
    elif what == "a hook on the layer":
        adapter.base.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    elif what == "a W that trains":
        adapter.base.weight.requires_grad_(True)
    else:
        holder.rows = None
    torch.testing.assert_close(adapter(x), explicit(adapter, x), rtol=1e-5, atol=1e-5)
    assert made == []
    if what == "a hook on the layer":
        assert seen == [torch.Size([3, 4])]  # the user's hook still ran


def tiny_task(seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(60, 12, generator=g)

    def split(n: int) -> Split:
        return Split(inputs[:n], torch.randint(0, 3, (n,), generator=g))

    return Task(f"t{seed}", 3, split(60), split(10), split(10), identity)


def trained_v(monkeypatch, use_products: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
    made = counted(monkeypatch)
    if not use_products:
        monkeypatch.setattr(NullSpaceAdapter, "_batch_products", lambda self, x, basis: None)
    torch.manual_seed(0)
    model = shared_head_mlp(12, (8,), 3)
    method = NESS(model, NESSConfig(rank=6, transfer_rank=2))
    config = TrainConfig(epochs=2, lr=0.1, batch_size=8, lr_schedule=False)
    tasks = [tiny_task(0), tiny_task(1)]
    for t, task in enumerate(tasks):
        method.begin_task(t, [(task.train.inputs,)])
        train_task(model, method, t, task, config, torch.Generator().manual_seed(t), progress=False)
        if t == 1:
            trained = {name: layer.adapter.V.detach().clone() for name, layer in method.active.items()}
            trained |= {f"{name}.A": layer.adapter.A.detach().clone() for name, layer in method.active.items()}
            assert len(trained) == 4  # both layers hold V and a transfer A
            assert method._step_rows.rows is not None
        method.end_task(t, [(task.train.inputs,)])
    assert method._step_rows.rows is None  # the split is let go with the task
    monkeypatch.undo()
    return trained, made


def test_the_trainer_s_epochs_give_the_v_s_of_the_ordinary_path(monkeypatch):
    with_products, made = trained_v(monkeypatch, True)
    without, not_made = trained_v(monkeypatch, False)
    assert made == [60] and not_made == []  # task 1's first layer, once for the task's 60 prepared rows
    assert with_products.keys() == without.keys()
    for name, value in without.items():
        torch.testing.assert_close(with_products[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_pickled_method_carries_neither_the_split_nor_the_products():
    adapter, source, holder = adapter_and_rows()
    adapter(draw(holder, source, [1, 2]))
    assert adapter._split_products._made is not None
    copy = pickle.loads(pickle.dumps(adapter))
    assert copy._split_products._made is None and copy.step_rows.rows is None
    x = draw(copy.step_rows, source, [1, 2])
    torch.testing.assert_close(copy(x), explicit(copy, x), rtol=1e-5, atol=1e-5)


def test_an_own_loop_that_passes_its_rows_trains_the_same_v(monkeypatch):
    """The guide's own loop: batches drawn as `BatchRows` of one tensor (here an inference tensor, which has no
    version counter) and passed through `on_step_rows`."""
    made = counted(monkeypatch)
    trained = []
    for passes_rows in (True, False):
        torch.manual_seed(0)
        model = shared_head_mlp(12, (8,), 3)
        method = NESS(model, NESSConfig(rank=6, transfer_rank=0))
        tasks = [tiny_task(0), tiny_task(1)]
        with torch.inference_mode():  # features made without autograd: inference tensors, without version counters
            inputs = [task.train.inputs.clone() for task in tasks]
        for t, task in enumerate(tasks):
            method.begin_task(t)
            optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.1)
            for idx in torch.randperm(60, generator=torch.Generator().manual_seed(t)).split(8):
                rows = BatchRows(inputs[t], idx)
                if passes_rows:
                    method.on_step_rows(t, rows)
                optimizer.zero_grad()
                F.cross_entropy(method.predict(rows.batch, t), task.train.labels[idx]).backward()
                optimizer.step()
            if t == 1:
                trained.append({name: layer.adapter.V.detach().clone() for name, layer in method.active.items()})
            method.end_task(t, [(task.train.inputs,)])
        if passes_rows:
            assert made == [60]  # task 1's first layer, once
    for name, value in trained[1].items():
        torch.testing.assert_close(trained[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
