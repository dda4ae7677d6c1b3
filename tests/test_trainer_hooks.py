"""The hooks methods override (predict, training_loss, begin_step, training_step, after_step, preview_task,
data_tasks), mixed-task batches and joint training, each checked against an explicit computation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.data import Benchmark, Split, Task, iterate_mixed_batches
from ness.data.tasks import identity
from ness.methods import ContinualMethod, FineTune, Joint, StepProgress, build_method
from ness.models import MultiHeadNet, logits_by_task, shared_head_mlp
from ness.trainer import TrainConfig, run_continual, seed_everything, train_task
from test_trainer import blob_benchmark, new_model, small_config


# -- mixed batches and per-task logits -------------------------------------------------------------------------
def test_mixed_batches_cover_the_union_once_each_through_its_own_transform():
    a = Split(torch.arange(7, dtype=torch.float32)[:, None], torch.arange(7) % 2)
    b = Split(100 + torch.arange(5, dtype=torch.float32)[:, None], torch.arange(5) % 3)
    sources = [(0, a, lambda x: x), (3, b, lambda x: -x)]
    seen = []
    for x, y, tasks in iterate_mixed_batches(sources, 4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.shape[0] == y.shape[0] == tasks.shape[0] <= 4
        for value, label, task in zip(x[:, 0].tolist(), y.tolist(), tasks.tolist(), strict=True):
            raw = value if task == 0 else -value  # undo task 3's transform
            i = int(raw) if task == 0 else int(raw) - 100
            assert label == (i % 2 if task == 0 else i % 3)
            seen.append((task, i))
    assert sorted(seen) == [(0, i) for i in range(7)] + [(3, i) for i in range(5)]


def test_mixed_batches_follow_the_generator():
    split = Split(torch.arange(20, dtype=torch.float32)[:, None], torch.zeros(20, dtype=torch.int64))
    sources = [(0, split, lambda x: x), (1, split, lambda x: x)]

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        return [
            (t.tolist(), x.flatten().tolist())
            for x, _, t in iterate_mixed_batches(sources, 8, shuffle=True, generator=gen)
        ]

    assert order(1) == order(1) and order(1) != order(2)
    unshuffled = list(iterate_mixed_batches(sources, 40))
    assert unshuffled[0][2].tolist() == [0] * 20 + [1] * 20


def test_logits_by_task_are_each_rows_own_head_on_the_batch_features():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.ReLU())
    model = MultiHeadNet(backbone, 6, [2, 3, 4])
    x = torch.randn(9, 5)
    tasks = torch.tensor([2, 0, 2, 1, 0, 2, 1, 1, 0])
    features = backbone(x)  # the whole batch's BatchNorm statistics
    out = logits_by_task(model, x, tasks)
    assert sorted(torch.cat([rows for rows, _ in out]).tolist()) == list(range(9))
    for rows, logits in out:
        for k, i in enumerate(rows.tolist()):
            expected = model.task_heads[int(tasks[i])](features[i : i + 1])[0]
            torch.testing.assert_close(logits[k], expected)


def test_logits_by_task_without_heads_is_one_forward():
    torch.manual_seed(0)
    model = shared_head_mlp(4, (5,), 3)
    x = torch.randn(6, 4)
    ((rows, logits),) = logits_by_task(model, x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert rows.tolist() == list(range(6))
    torch.testing.assert_close(logits, model(x))


def test_mixed_training_loss_is_the_mean_cross_entropy_of_each_row_through_its_head():
    torch.manual_seed(1)
    model = MultiHeadNet(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 4, [2, 2])
    method = FineTune(model)
    x, y, tasks = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 0, 1, 1, 0])
    explicit = sum(-torch.log_softmax(model(x[i : i + 1], int(tasks[i])), dim=1)[0, y[i]] for i in range(5)) / 5
    torch.testing.assert_close(method.training_loss(0, x, y, tasks), explicit)


# -- the order and arguments of the hooks ------------------------------------------------------------------------
class Recorder(FineTune):
    """Fine-tuning that logs every hook call."""

    name = "finetune"

    def __init__(self, model):
        super().__init__(model)
        self.calls: list[tuple] = []

    def preview_task(self, t, batches):
        self.calls.append(("preview_task", t, torch.cat([x for x, _ in batches])))

    def trainable_parameters(self, t):
        self.calls.append(("trainable_parameters", t))
        return super().trainable_parameters(t)

    def begin_step(self, t, progress):
        self.calls.append(("begin_step", t, progress))

    def after_backward(self, t):
        self.calls.append(("after_backward", t))

    def after_step(self, t):
        self.calls.append(("after_step", t))


def test_hooks_are_called_in_order_with_the_steps_progress():
    bench = blob_benchmark(num_tasks=1, n_train=40)
    model = new_model(bench)
    method = Recorder(model)
    method.begin_task(0)
    config = small_config(epochs=3, batch_size=16, lr_schedule=False, momentum=0.0)
    train_task(model, method, 0, bench.tasks[0], config, seed_everything(0), progress=False)
    names = [c[0] for c in method.calls]
    assert names[:2] == ["preview_task", "trainable_parameters"]
    # The preview sees the task's training inputs, before any step.
    torch.testing.assert_close(method.calls[0][2], bench.tasks[0].train.inputs)
    steps = [c[2] for c in method.calls if c[0] == "begin_step"]
    batches = math.ceil(40 / 16)
    assert steps == [StepProgress(e, b, batches, 3) for e in range(3) for b in range(batches)]
    assert names[2:] == ["begin_step", "after_backward", "after_step"] * (3 * batches)


def test_hooks_set_on_an_instance_are_called_every_step_and_the_epoch_loss_is_the_steps_mean():
    """The trainer skips the base class's empty hooks: one set on the instance (not the class) still runs every step,
    with the batch as rows of the prepared split; the epoch's loss is the row-weighted mean of the step losses."""
    bench = blob_benchmark(num_tasks=1, n_train=40)
    model = new_model(bench)
    method = FineTune(model)
    assert not method.overrides("begin_step") and not method.overrides("on_step_rows")
    assert Recorder(new_model(bench)).overrides("begin_step") and not Recorder(model).overrides("step_context")
    seen: list[tuple] = []
    method.begin_step = lambda t, progress: seen.append(("begin_step", progress.batch))
    method.on_step_rows = lambda t, rows: seen.append(("rows", rows.index.numel(), rows.batch))
    losses: list[tuple[float, int]] = []
    step = method.training_step

    def training_step(t, x, y, optimizer, check_loss, tasks=None):
        loss = step(t, x, y, optimizer, check_loss, tasks)
        losses.append((loss.item(), x.shape[0]))
        assert seen[-1][2] is x  # the rows the hook got are the batch trained on
        return loss

    method.training_step = training_step
    assert method.overrides("begin_step") and method.overrides("on_step_rows")
    method.begin_task(0)
    config = small_config(epochs=1, batch_size=16, lr_schedule=False, momentum=0.0)
    task = dataclasses.replace(bench.tasks[0], transform=identity)  # deterministic: the split is prepared once
    log = train_task(model, method, 0, task, config, seed_everything(0), progress=False)
    expected = [(kind, n) for b, rows in enumerate((16, 16, 8)) for kind, n in (("begin_step", b), ("rows", rows))]
    assert [c[:2] for c in seen] == expected
    assert log["train_loss"] == pytest.approx(sum(v * n for v, n in losses) / 40, rel=1e-12)


def test_a_hook_patched_onto_the_base_class_is_called_every_step(monkeypatch):
    """`overrides` compares with ContinualMethod's hooks as defined: one patched onto the base class later (say, to
    log every method's steps) is not skipped."""
    bench = blob_benchmark(num_tasks=1, n_train=40)
    model = new_model(bench)
    steps: list[int] = []
    monkeypatch.setattr(ContinualMethod, "begin_step", lambda self, t, progress: steps.append(progress.batch))
    method = FineTune(model)
    assert method.overrides("begin_step")
    method.begin_task(0)
    config = small_config(epochs=1, batch_size=16, lr_schedule=False, momentum=0.0)
    train_task(model, method, 0, bench.tasks[0], config, seed_everything(0), progress=False)
    assert steps == [0, 1, 2]


def test_with_sam_the_epoch_loss_is_the_mean_loss_at_the_unperturbed_weights():
    """SAM checks two losses per step (at w, then at w + e) and returns the first: the epoch's loss sums those."""
    bench = blob_benchmark(num_tasks=1, n_train=40)
    model = new_model(bench)
    method = FineTune(model)
    returned: list[tuple[float, int]] = []
    checked: list[float] = []
    step = method.training_step

    def training_step(t, x, y, optimizer, check_loss, tasks=None):
        def check(loss):
            checked.append(loss.item())
            check_loss(loss)

        loss = step(t, x, y, optimizer, check, tasks)
        returned.append((loss.item(), x.shape[0]))
        return loss

    method.training_step = training_step
    method.begin_task(0)
    config = small_config(epochs=1, batch_size=16, lr_schedule=False, momentum=0.0, sam_rho=0.5)
    log = train_task(model, method, 0, bench.tasks[0], config, seed_everything(0), progress=False)
    assert len(checked) == 2 * len(returned) == 6 and checked[::2] == [v for v, _ in returned]
    assert checked[1::2] != checked[::2]  # the second evaluation's losses differ: summing them would be wrong
    assert log["train_loss"] == pytest.approx(sum(v * n for v, n in returned) / 40, rel=1e-12)


def test_step_progress_fractions():
    p = StepProgress(epoch=2, batch=3, batches_per_epoch=4, max_epochs=5)
    assert p.epoch_fraction == 0.75
    assert p.task_fraction == pytest.approx((2 + 0.75) / 5)


class ConstantPredictor(FineTune):
    """Evaluates every input as class 1, whatever the model computes."""

    name = "finetune"

    def predict(self, x, t):
        return torch.tensor([0.0, 1.0]).expand(x.shape[0], 2)

    def training_loss(self, t, x, y, tasks=None):
        return F.cross_entropy(self.model(x, t), y)


def test_evaluation_goes_through_the_methods_predict():
    bench = blob_benchmark(num_tasks=2)
    model = new_model(bench)
    result = run_continual(model, ConstantPredictor(model), bench, small_config(epochs=1), seed=0, progress=False)
    share_of_ones = [100.0 * float(task.test.labels.float().mean()) for task in bench.tasks]
    assert result["acc_matrix"][1] == pytest.approx(share_of_ones)


class BadDataTasks(FineTune):
    name = "finetune"

    def __init__(self, model, ids):
        super().__init__(model)
        self.ids = ids

    def data_tasks(self, t):
        return self.ids


@pytest.mark.parametrize("ids", [(), (1,), (0, 0), (0, 2)])
def test_data_tasks_must_name_the_task_and_earlier_ones_once(ids):
    bench = blob_benchmark(num_tasks=2)
    model = new_model(bench)
    method = BadDataTasks(model, ids)
    method.begin_task(0)
    with pytest.raises(ValueError, match=r"data_tasks\(0\) returned"):
        train_task(model, method, 0, bench.tasks[0], small_config(epochs=1), seed_everything(0), progress=False)


# -- joint training -------------------------------------------------------------------------------------------------
def test_joint_without_the_earlier_tasks_is_an_error():
    bench = blob_benchmark(num_tasks=2)
    model = new_model(bench)
    method = Joint(model)
    generator = seed_everything(0)
    method.begin_task(0)
    train_task(model, method, 0, bench.tasks[0], small_config(epochs=1), generator, progress=False)
    method.end_task(0, [])
    method.begin_task(1)
    with pytest.raises(ValueError, match="pass the 1 earlier tasks"):
        train_task(model, method, 1, bench.tasks[1], small_config(epochs=1), generator, progress=False)


def test_a_joint_epoch_is_sgd_on_the_union_each_row_through_its_own_head():
    """One epoch of joint training at task 1, batch = the whole union, equals one hand-written SGD step on the mean
    cross-entropy of all rows of tasks 0 and 1 (each through its own head); the unseen head 2 stays put."""
    bench = blob_benchmark(num_tasks=3, n_train=12)
    model = new_model(bench)
    reference = new_model(bench)
    method = Joint(model)
    method.begin_task(0)
    method.end_task(0, [])
    method.begin_task(1)
    config = TrainConfig(epochs=1, lr=0.5, batch_size=24, lr_schedule=False)
    train_task(model, method, 1, bench.tasks[1], config, seed_everything(0), progress=False, earlier=bench.tasks[:1])

    loss = (
        sum(
            F.cross_entropy(reference(task.transform(task.train.inputs), j), task.train.labels, reduction="sum")
            for j, task in enumerate(bench.tasks[:2])
        )
        / 24
    )
    grads = torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True)
    with torch.no_grad():
        for (name, p), g in zip(reference.named_parameters(), grads, strict=True):
            expected = p if g is None else p - 0.5 * g
            torch.testing.assert_close(model.get_parameter(name), expected, msg=name)
    torch.testing.assert_close(model.task_heads[2].weight, reference.task_heads[2].weight, rtol=0, atol=0)


def test_joint_validation_loss_is_the_mean_over_the_union(monkeypatch):
    import ness.trainer as trainer

    bench = blob_benchmark(num_tasks=2, n_val=10)
    bench = Benchmark(
        bench.name,
        (
            bench.tasks[0],
            Task(
                "b",
                2,
                bench.tasks[1].train,
                Split(bench.tasks[1].val.inputs[:6], bench.tasks[1].val.labels[:6]),
                bench.tasks[1].test,
                bench.tasks[1].transform,
            ),
        ),
        bench.input_shape,
        False,
        {},
    )
    model = new_model(bench)
    method = Joint(model)
    method.begin_task(0)
    method.end_task(0, [])
    method.begin_task(1)
    calls = []

    def fake_evaluate(model, t, split, task, batch_size, device, passes=1, order_seed=None, predict=None):
        calls.append((t, len(split)))
        return float(t + 1), 0.0  # loss 1 for task 0 (10 examples), 2 for task 1 (6 examples)

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    log = train_task(
        model, method, 1, bench.tasks[1], small_config(epochs=1), seed_everything(0), False, bench.tasks[:1]
    )
    assert calls == [(0, 10), (1, 6)]
    assert log["best_val_loss"] == pytest.approx((10 * 1.0 + 6 * 2.0) / 16)


def test_joint_keeps_what_fine_tuning_forgets():
    """Two tasks on one shared output with opposite labels on overlapping inputs are the worst case for fine-tuning;
    with a task-specific input cue, joint training fits both."""
    gen = torch.Generator().manual_seed(0)

    def split(t, n):
        x = torch.randn(n, 3, generator=gen)
        x[:, 2] = 2.0 * t - 1.0  # the cue telling the tasks apart
        y = ((x[:, 0] > 0) ^ bool(t)).long()
        return Split(x, y)

    tasks = tuple(Task(f"t{t}", 2, split(t, 200), split(t, 50), split(t, 100), lambda x: x) for t in range(2))
    bench = Benchmark("opposite", tasks, (3,), True, {})
    config = small_config(epochs=30)
    finals = {}
    for name in ("finetune", "joint"):
        torch.manual_seed(0)
        model = shared_head_mlp(3, (16,), 2)
        finals[name] = run_continual(model, build_method(name, model), bench, config, seed=0, progress=False)[
            "acc_matrix"
        ][1]
    assert finals["finetune"][0] < 30.0  # fine-tuning flipped task 0's answers
    assert min(finals["joint"]) > 90.0
