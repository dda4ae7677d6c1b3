"""The task-incremental protocol (METHODS_SPEC §1.4) on a tiny synthetic benchmark, checked independently."""

from __future__ import annotations

import math

import pytest
import torch

import ness.trainer as trainer
from ness.data import Benchmark, Split, Task
from ness.methods import FineTune, build_method
from ness.models import call_model, multi_head_mlp
from ness.trainer import TrainConfig, run_continual, seed_everything, train_task

DIM = 10
HIDDEN = (32, 32)
ADAPTED_LAYERS = ("backbone.0", "backbone.2")  # the two hidden nn.Linear of multi_head_mlp; heads are excluded


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def blob_split(gen: torch.Generator, t: int, n: int, sep: float, flip_every: int = 0) -> Split:
    """n points of 2 Gaussian blobs at ±mean, the mean living on coordinates 3t..3t+2 (a different subspace per
    task), isotropic noise 0.3; with flip_every=k every k-th label is flipped (label noise)."""
    mean = torch.zeros(DIM)
    mean[3 * t : 3 * t + 3] = sep / math.sqrt(3)
    labels = torch.arange(n, dtype=torch.int64) % 2
    inputs = (1 - 2 * labels.float())[:, None] * mean + 0.3 * torch.randn(n, DIM, generator=gen)
    if flip_every:
        labels = labels.clone()
        labels[::flip_every] = 1 - labels[::flip_every]
    return Split(inputs, labels)


def blob_benchmark(
    num_tasks: int = 3,
    n_train: int = 80,
    n_val: int = 40,
    n_test: int = 60,
    sep: float = 2.0,
    test_flip_every: int = 0,
    seed: int = 0,
) -> Benchmark:
    gen = torch.Generator().manual_seed(seed)
    tasks = tuple(
        Task(
            f"blobs {t}",
            2,
            blob_split(gen, t, n_train, sep),
            blob_split(gen, t, n_val, sep),
            blob_split(gen, t, n_test, sep, test_flip_every),
            to_float,
        )
        for t in range(num_tasks)
    )
    return Benchmark("blobs", tasks, input_shape=(DIM,), shared_head=False, details={})


def small_config(**kw) -> TrainConfig:
    base = dict(
        epochs=12, lr=0.1, momentum=0.9, batch_size=16, test_batch_size=32, lr_patience=3, lr_factor=2.0, lr_min=1e-4
    )
    return TrainConfig(**{**base, **kw})


def new_model(bench: Benchmark, seed: int = 0):
    torch.manual_seed(seed)
    return multi_head_mlp(bench.input_dim, HIDDEN, [t.num_classes for t in bench.tasks])


def new_method(name: str, model):
    return build_method(name, model, {"eps1": 0.05, "transfer_rank": 0} if name == "ness" else {})


def own_test_accuracy(model, j: int, task: Task) -> float:
    """Accuracy (%) of head j on the whole test split in one forward pass: argmax of call_model vs labels."""
    with torch.no_grad():
        logits = call_model(model, task.transform(task.test.inputs), j)
    correct = 0
    for pred, label in zip(logits.argmax(dim=1).tolist(), task.test.labels.tolist(), strict=True):
        correct += int(pred == label)
    return 100.0 * correct / len(task.test)


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- run_continual end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return blob_benchmark()


@pytest.fixture(scope="module", params=["finetune", "ness"])
def outcome(request, bench):
    model = new_model(bench)
    method = new_method(request.param, model)
    result = run_continual(model, method, bench, small_config(), seed=3, progress=False)
    return request.param, model, result


def test_run_continual_matrix_shape_and_diagonal(outcome, bench):
    _, _, result = outcome
    r = result["acc_matrix"]
    t = len(bench)
    assert len(r) == t and all(len(row) == t for row in r)
    for i in range(t):
        assert r[i][i] > 70.0, f"task {i} learned to only {r[i][i]:.1f}% (chance is 50%)"
        for j in range(t):
            if j <= i:
                assert 0.0 <= r[i][j] <= 100.0
                # Accuracies on a 60-example test split are multiples of 100/60.
                assert r[i][j] * 60 / 100 == pytest.approx(round(r[i][j] * 60 / 100), abs=1e-9)


def test_run_continual_acc_bwt_match_explicit_loop(outcome, bench):
    _, _, result = outcome
    r = result["acc_matrix"]
    t = len(bench)
    acc = 0.0
    for j in range(t):
        acc += r[t - 1][j]
    acc /= t
    bwt = 0.0
    for j in range(t - 1):
        bwt += r[t - 1][j] - r[j][j]
    bwt /= t - 1
    assert result["acc"] == pytest.approx(acc, abs=1e-9)
    assert result["bwt"] == pytest.approx(bwt, abs=1e-9)


def test_run_continual_tasks_log(outcome, bench):
    _, _, result = outcome
    log = result["tasks"]
    assert len(log) == len(bench)
    for t, entry in enumerate(log):
        assert entry["task"] == t
        assert entry["name"] == bench.tasks[t].name
        assert 1 <= entry["epochs"] <= 12
        assert math.isfinite(entry["train_loss"])
        assert entry["best_val_loss"] is not None and math.isfinite(entry["best_val_loss"])
        for key in ("train_seconds", "boundary_seconds", "eval_seconds"):
            assert entry[key] >= 0


def test_run_continual_diagnostics(outcome, bench):
    name, _, result = outcome
    diagnostics = result["diagnostics"]
    if name == "finetune":
        assert diagnostics == []
        return
    expected = {(t, layer) for t in range(1, len(bench)) for layer in ADAPTED_LAYERS}
    assert len(diagnostics) == len(expected)  # exactly one record per (task ≥ 1, layer)
    assert {(d["task"], d["layer"]) for d in diagnostics} == expected
    for d in diagnostics:
        assert 0 <= d["rank"] <= d["d"]
        assert d["d"] == (DIM if d["layer"] == "backbone.0" else HIDDEN[0])


def test_last_row_is_test_accuracy(outcome, bench):
    _, model, result = outcome
    mine = [own_test_accuracy(model, j, task) for j, task in enumerate(bench.tasks)]
    assert result["acc_matrix"][-1] == pytest.approx(mine, abs=1e-9)


class RecordingFineTune(FineTune):
    """Fine-tuning that, at the start of task t, measures the test accuracy of tasks 0..t−1 itself: the model has
    not changed since the trainer filled row t−1 of R, so the two must agree."""

    def __init__(self, model, bench):
        super().__init__(model)
        self.bench = bench
        self.rows: dict[int, list[float]] = {}

    def on_begin_task(self, t):
        if t > 0:
            self.rows[t - 1] = [own_test_accuracy(self.model, j, self.bench.tasks[j]) for j in range(t)]


def test_every_row_is_test_accuracy_not_train_or_val():
    # Every 4th test label is flipped: test accuracy sits near 75% while train/val accuracy stays near 100%,
    # so using the wrong split would show.
    bench = blob_benchmark(test_flip_every=4)
    model = new_model(bench)
    method = RecordingFineTune(model, bench)
    result = run_continual(model, method, bench, small_config(), seed=5, progress=False)
    r = result["acc_matrix"]
    method.rows[len(bench) - 1] = [own_test_accuracy(model, j, task) for j, task in enumerate(bench.tasks)]
    for i in range(len(bench)):
        assert r[i][: i + 1] == pytest.approx(method.rows[i], abs=1e-9), f"row {i}"
    # The check discriminates: accuracy on the (clean) training split differs from R's last row.
    train_acc = []
    for j, task in enumerate(bench.tasks):
        with torch.no_grad():
            pred = call_model(model, task.transform(task.train.inputs), j).argmax(dim=1)
        train_acc.append(100.0 * float((pred == task.train.labels).double().mean()))
    assert all(abs(a - b) > 5 for a, b in zip(train_acc, r[-1], strict=True))


# -- the learning-rate schedule ----------------------------------------------------------------------------


class FakeValidation:
    """Stands in for trainer.evaluate: returns a scripted validation loss per epoch, improving for `best_epoch`
    epochs and never again, and snapshots the model and the optimiser's lr at each call."""

    def __init__(self, best_epoch: int, optimizers: list):
        self.best_epoch = best_epoch
        self.optimizers = optimizers
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.splits = []

    def __call__(self, model, t, split, task, batch_size, device, predict=None):
        epoch = len(self.snapshots) + 1
        self.snapshots.append(state_copy(model))
        self.lrs.append(self.optimizers[-1].param_groups[0]["lr"])
        self.splits.append(split)
        loss = 10.0 - epoch if epoch <= self.best_epoch else 100.0
        return loss, 0.0


@pytest.fixture
def scripted(monkeypatch):
    """(make_fake(best_epoch)) with torch.optim.SGD recording the optimisers the trainer builds."""
    optimizers: list[torch.optim.SGD] = []
    real_sgd = torch.optim.SGD

    class RecordingSGD(real_sgd):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)

    def make(best_epoch: int) -> FakeValidation:
        fake = FakeValidation(best_epoch, optimizers)
        monkeypatch.setattr(trainer, "evaluate", fake)
        return fake

    return make


def train_first_task(bench: Benchmark, config: TrainConfig, seed: int = 0):
    model = new_model(bench, seed)
    method = FineTune(model)
    method.begin_task(0)
    log = train_task(model, method, 0, bench.tasks[0], config, seed_everything(seed), progress=False)
    return model, log


@pytest.mark.parametrize(
    ("lr", "patience", "factor", "lr_min", "best_epoch", "cap", "epochs", "final_lr"),
    [
        # best at epoch 3; 3 bad epochs per halving: 0.1 → 0.05 → 0.025 → 0.0125 → 0.00625 < 0.01 stops
        # after 4 halvings = 12 bad epochs → 3 + 12 = 15 epochs.
        (0.1, 3, 2.0, 0.01, 3, 100, 15, 0.1 / 16),
        # lr reaching lr_min exactly does not stop (stop only when lr < lr_min): 0.5 → 0.25 → 0.125 → 0.0625
        # (= lr_min, go on) → 0.03125 stops: 4 reductions × 2 epochs after the best epoch 1 → 9 epochs.
        (0.5, 2, 2.0, 0.0625, 1, 100, 9, 0.03125),
        # factor 3, patience 1: 0.09 → 0.03 → 0.01 → 0.0033 < 0.005 stops: best epoch 2 + 3 → 5 epochs.
        (0.09, 1, 3.0, 0.005, 2, 100, 5, 0.09 / 27),
        # The epoch cap comes first: same as the first row but at most 7 epochs; one halving after epoch 6.
        (0.1, 3, 2.0, 0.01, 3, 7, 7, 0.05),
    ],
)
def test_lr_schedule_epochs_and_final_lr(
    scripted, bench, lr, patience, factor, lr_min, best_epoch, cap, epochs, final_lr
):
    fake = scripted(best_epoch)
    config = small_config(epochs=cap, lr=lr, lr_patience=patience, lr_factor=factor, lr_min=lr_min)
    _, log = train_first_task(bench, config)
    assert log["epochs"] == epochs
    assert len(fake.snapshots) == epochs  # one validation per epoch
    assert log["final_lr"] == pytest.approx(final_lr, rel=1e-12)
    assert log["best_val_loss"] == pytest.approx(10.0 - best_epoch)
    assert all(split is bench.tasks[0].val for split in fake.splits)  # the validation split, nothing else


def test_lr_schedule_optimizer_lr_per_epoch(scripted, bench):
    # lr 0.1, patience 3, factor 2, lr_min 0.01, best epoch 3: epochs 1..6 run at 0.1 (the decision after
    # epoch 6 halves it), 7..9 at 0.05, 10..12 at 0.025, 13..15 at 0.0125, then 0.00625 < 0.01 stops.
    fake = scripted(3)
    train_first_task(bench, small_config(epochs=100, lr=0.1, lr_patience=3, lr_factor=2.0, lr_min=0.01))
    expected = [0.1] * 6 + [0.05] * 3 + [0.025] * 3 + [0.0125] * 3
    assert fake.lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("best_epoch", [1, 4])
def test_lr_schedule_restores_best_validation_weights(scripted, bench, best_epoch):
    fake = scripted(best_epoch)
    model, log = train_first_task(bench, small_config(epochs=100, lr=0.05, lr_patience=2, lr_min=0.01))
    assert log["epochs"] > best_epoch
    final = state_copy(model)
    assert states_equal(final, fake.snapshots[best_epoch - 1])
    # ...and that is not just the last epoch's weights: training went on after the best epoch.
    assert not states_equal(final, fake.snapshots[-1])


def test_fixed_lr_runs_exactly_epochs(monkeypatch, bench):
    def no_validation(*args, **kwargs):
        raise AssertionError("lr_schedule=False must not evaluate on the validation split")

    monkeypatch.setattr(trainer, "evaluate", no_validation)
    task = bench.tasks[0]
    # An empty validation split is fine without the schedule.
    empty = Split(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.int64))
    task = Task(task.name, 2, task.train, empty, task.test, task.transform)
    steps = []

    class CountingFineTune(FineTune):
        def after_backward(self, t):
            steps.append(t)

    model = new_model(bench)
    method = CountingFineTune(model)
    method.begin_task(0)
    before = state_copy(model)
    config = small_config(epochs=4, lr_schedule=False, batch_size=16)
    log = train_task(model, method, 0, task, config, seed_everything(0), progress=False)
    assert log["epochs"] == 4
    assert len(steps) == 4 * math.ceil(len(task.train) / 16)  # 80 examples, batch 16 → 5 steps per epoch
    assert log["final_lr"] == config.lr
    assert log["best_val_loss"] is None
    assert not states_equal(before, state_copy(model))


# -- determinism -------------------------------------------------------------------------------------------


def run_once(bench: Benchmark, method_name: str, run_seed: int, config: TrainConfig):
    model = new_model(bench, init_seed := 0)
    assert init_seed == 0  # every run starts from the same initial weights; only the run seed varies
    result = run_continual(model, new_method(method_name, model), bench, config, run_seed, progress=False)
    return result, state_copy(model)


@pytest.mark.parametrize("method_name", ["finetune", "ness"])
def test_same_seed_same_result_different_seed_differs(method_name):
    # Overlapping blobs and a bigger test split: accuracies are far from 100%, so the data order (the run
    # seed) shows in R.
    bench = blob_benchmark(sep=0.5, n_test=300)
    config = small_config()
    (a, wa), (b, wb) = run_once(bench, method_name, 11, config), run_once(bench, method_name, 11, config)
    assert a["acc_matrix"] == b["acc_matrix"]
    assert [t["train_loss"] for t in a["tasks"]] == [t["train_loss"] for t in b["tasks"]]
    assert states_equal(wa, wb)
    others = [run_once(bench, method_name, seed, config) for seed in (12, 13, 14)]
    for c, wc in others:
        assert [t["train_loss"] for t in a["tasks"]] != [t["train_loss"] for t in c["tasks"]]
        assert not states_equal(wa, wc)
    assert any(a["acc_matrix"] != c["acc_matrix"] for c, _ in others)


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("lr", -1.0),
        ("lr", 0.0),
        ("lr", math.nan),
        ("lr", math.inf),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("lr_factor", 1.0),
        ("batch_size", 0),
        ("test_batch_size", 0),
        ("weight_decay", -1e-4),
        ("lr_min", -1.0),
        ("lr_patience", 0),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: got {value!r}; "):
        TrainConfig(**{field: value})


def test_train_config_accepts_boundaries():
    TrainConfig(epochs=1, lr=1e-9, momentum=0.0, lr_factor=1.0001, lr_min=0.0, lr_patience=1, weight_decay=0.0)


def test_task_labels_beyond_num_classes_rejected_at_construction():
    split = Split(torch.zeros(2, DIM), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        Task("bad", 2, split, split, split, to_float)


def test_labels_beyond_head_outputs_name_the_task(bench):
    # Task 1 claims 3 classes and uses label 2, but the model gives its head only 2 outputs.
    gen = torch.Generator().manual_seed(1)
    train = blob_split(gen, 1, 40, 2.0)
    labels = train.labels.clone()
    labels[0] = 2
    bad = Task("three-way", 3, Split(train.inputs, labels), train, train, to_float)
    bench2 = Benchmark("bad", (bench.tasks[0], bad), input_shape=(DIM,), shared_head=False, details={})
    model = multi_head_mlp(DIM, HIDDEN, [2, 2])
    with pytest.raises(ValueError, match=r"task 1 \('three-way'\)"):
        run_continual(model, FineTune(model), bench2, small_config(epochs=2), seed=0, progress=False)


def test_infinite_input_raises_floating_point_error_naming_task_and_epoch(bench):
    task1 = bench.tasks[1]
    inputs = task1.train.inputs.clone()
    inputs[5, 0] = math.inf
    bad = Task(task1.name, 2, Split(inputs, task1.train.labels), task1.val, task1.test, to_float)
    bench2 = Benchmark("inf", (bench.tasks[0], bad), input_shape=(DIM,), shared_head=False, details={})
    model = new_model(bench2)
    # batch_size 100 > 80: one batch per epoch, so the inf is in the very first step of task 1.
    with pytest.raises(FloatingPointError, match=r"task 1, epoch 0, step 0"):
        run_continual(model, FineTune(model), bench2, small_config(epochs=2, batch_size=100), seed=0, progress=False)


def test_huge_lr_raises_floating_point_error(bench):
    with pytest.raises(FloatingPointError, match=r"task 0, epoch \d+, step \d+: the loss is (nan|inf)"):
        train_first_task(bench, small_config(epochs=20, lr=1e30, lr_schedule=False))


def test_schedule_with_empty_validation_split_raises(bench):
    task = bench.tasks[0]
    empty = Split(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.int64))
    task = Task(task.name, 2, task.train, empty, task.test, task.transform)
    bench2 = Benchmark("noval", (task,), input_shape=(DIM,), shared_head=False, details={})
    model = multi_head_mlp(DIM, HIDDEN, [2])
    with pytest.raises(ValueError, match=r"task 0 .*validation"):
        run_continual(model, FineTune(model), bench2, small_config(lr_schedule=True), seed=0, progress=False)


# -- evaluation order and passes (batch-statistics BatchNorm makes accuracy depend on the batches) ----------------


class BatchStatNet(torch.nn.Module):
    """Logits depend on which examples share a batch: BatchNorm with batch statistics, as in the paper's nets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(DIM, 8, bias=False)
        self.bn = torch.nn.BatchNorm1d(8, track_running_stats=False)
        self.task_heads = torch.nn.ModuleList([torch.nn.Linear(8, 2, bias=False)])

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.task_heads[task](torch.relu(self.bn(self.fc(x))))


def accuracy_with_order(model, task: Task, batch_size: int, order: torch.Tensor) -> tuple[int, int]:
    """Correct predictions and count when the test split is read in `order`, batch by batch (explicit loop)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = model(task.transform(task.test.inputs[idx]), 0)
            correct += sum(
                int(p == y) for p, y in zip(logits.argmax(1).tolist(), task.test.labels[idx].tolist(), strict=True)
            )
    return correct, len(order)


def test_evaluate_passes_average_seeded_test_orders(bench):
    model = BatchStatNet().eval()
    task = bench.tasks[0]
    seed, passes, batch = 5, 3, 7
    correct = total = 0
    for p in range(passes):  # the documented order: torch.randperm seeded by seed·1_000_003 + p
        order = torch.randperm(len(task.test), generator=torch.Generator().manual_seed(seed * 1_000_003 + p))
        c, n = accuracy_with_order(model, task, batch, order)
        correct, total = correct + c, total + n
    _, acc = trainer.evaluate(model, 0, task.test, task, batch, "cpu", passes=passes, order_seed=seed)
    assert acc == pytest.approx(100.0 * correct / total)
    # Without a seed the split is read in order.
    c, n = accuracy_with_order(model, task, batch, torch.arange(len(task.test)))
    assert trainer.evaluate(model, 0, task.test, task, batch, "cpu")[1] == pytest.approx(100.0 * c / n)
    # Batch composition matters for this network, so the seeded orders are really used (not the file order).
    accs = {trainer.evaluate(model, 0, task.test, task, batch, "cpu", 1, s)[1] for s in range(6)}
    assert len(accs) > 1


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_the_models_mode_when_a_batch_fails(bench, training):
    model = new_model(bench).train(training)
    task = bench.tasks[0]
    seen = []

    def failing(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(model.training)
        raise RuntimeError("simulated failure in a predict batch")

    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.evaluate(model, 0, task.test, task, 16, "cpu", predict=failing)
    assert seen == [False]  # it ran in eval mode
    assert model.training is training and all(m.training is training for m in model.modules())


def test_run_continual_with_sam_trains_and_differs_from_sgd(bench):
    results = {}
    for rho in (0.0, 0.05):
        model = new_model(bench)
        method = new_method("ness", model)
        results[rho] = run_continual(model, method, bench, small_config(epochs=3, sam_rho=rho), seed=1, progress=False)
    for i in range(len(bench)):
        assert results[0.05]["acc_matrix"][i][i] > 70.0
    # Same seed and data order: only the SAM update differs, so the training losses must differ.
    losses = {rho: [log["train_loss"] for log in r["tasks"]] for rho, r in results.items()}
    assert all(a != b for a, b in zip(losses[0.0], losses[0.05], strict=True))


class TrainsNothingAfterTaskZero(FineTune):
    """A method that, from task 1 on, trains no parameter (as NESS with every layer at rank 0 and a shared head)."""

    def task_parameters(self, t: int) -> list[torch.nn.Parameter]:
        return super().task_parameters(t) if t == 0 else []


def test_a_task_with_nothing_to_train_is_evaluated_untrained_with_a_warning(bench, caplog):
    model = new_model(bench)
    method = TrainsNothingAfterTaskZero(model)
    with caplog.at_level("WARNING", logger="ness"):
        result = run_continual(model, method, bench, small_config(epochs=2), seed=3, progress=False)
    assert "task 1: finetune trains no parameter in it; the task is evaluated untrained" in caplog.text
    assert [log["epochs"] for log in result["tasks"]] == [2, 0, 0]
    assert result["tasks"][1]["train_loss"] is None
    assert not any(p.requires_grad for p in model.parameters())
    # Untrained heads 1 and 2: their accuracy is what the model gives, read here with an explicit argmax.
    for j, task in enumerate(bench.tasks):
        assert result["acc_matrix"][2][j] == pytest.approx(own_test_accuracy(model, j, task))


@pytest.mark.parametrize("on_host", [True, False])
def test_loss_monitor_sums_rows_and_names_the_first_non_finite_step(on_host):
    """The device path (no read per step) must report the same sum and the same first bad step as the host path."""
    losses, rows = [0.5, 1.25, 2.0], [10, 10, 3]
    monitor = trainer.LossMonitor(2, 4, 0.01, torch.device("cpu"), on_host=on_host)
    for loss, n in zip(losses, rows, strict=True):
        monitor.check(torch.tensor(loss))
        monitor.add(torch.tensor(loss), n)
    assert monitor.sum() == pytest.approx(0.5 * 10 + 1.25 * 10 + 2.0 * 3)

    monitor = trainer.LossMonitor(2, 4, 0.01, torch.device("cpu"), check_every=1000, on_host=on_host)
    with pytest.raises(FloatingPointError, match=r"task 2, epoch 4, step 3: .*now 0\.01"):
        for value in [1.0, 2.0, 3.0, math.nan, 4.0, math.inf]:
            monitor.check(torch.tensor(value))
            monitor.add(torch.tensor(value), 10)
        monitor.sum()  # the device path learns of it here at the latest


def test_loss_monitor_on_a_device_stops_within_check_every_steps():
    monitor = trainer.LossMonitor(0, 0, 0.1, torch.device("cpu"), check_every=4, on_host=False)
    seen = 0
    with pytest.raises(FloatingPointError, match="step 5:"):
        for value in [1.0] * 5 + [math.inf] + [1.0] * 10:
            monitor.check(torch.tensor(value))
            monitor.add(torch.tensor(value), 1)
            seen += 1
    assert seen == 7  # step 5 is bad; the check after step 7 (every 4th) finds it


def test_a_prepared_training_split_gives_the_same_batches_as_the_raw_one():
    from ness.data import iterate_batches
    from ness.data.tasks import PixelTransform, prepared_training_split

    g = torch.Generator().manual_seed(0)
    raw = Split(torch.randint(0, 256, (53, 12), generator=g, dtype=torch.uint8), torch.randint(0, 3, (53,)))
    task = Task("t", 3, raw, raw, raw, PixelTransform(255.0, 0.1, 0.3, permutation=torch.randperm(12, generator=g)))
    split, transform = prepared_training_split(task, "cpu")
    assert transform is not task.transform and split.inputs.dtype == torch.float32
    ours = list(iterate_batches(split, transform, 8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    theirs = list(iterate_batches(raw, task.transform, 8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert len(ours) == len(theirs) == 7
    for (x, y), (x_ref, y_ref) in zip(ours, theirs, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)

    # a transform that does not declare itself deterministic (an augmentation), or a copy over the limit: per batch
    augmenting = Task("t", 3, raw, raw, raw, lambda x: x.float() + torch.rand(x.shape))
    split, transform = prepared_training_split(augmenting, "cpu")
    assert split is raw and transform is augmenting.transform
    split, transform = prepared_training_split(task, "cpu", limit=53 * 12 * 4 - 1)
    assert split is raw and transform is task.transform


def test_the_prepared_copies_of_several_tasks_stay_within_one_budget():
    from ness.data.tasks import PixelTransform

    g = torch.Generator().manual_seed(2)
    tasks = [
        (j, Task(f"t{j}", 3, split, split, split, PixelTransform(255.0)))
        for j, split in enumerate(
            Split(torch.randint(0, 256, (10, 6), generator=g, dtype=torch.uint8), torch.randint(0, 3, (10,)))
            for _ in range(3)
        )
    ]
    one = 10 * 6 * 4  # bytes of one task's float32 copy
    sets = trainer.training_sets(tasks, "cpu", limit=2 * one)
    prepared = [split is not task.train for (_, split, _), (_, task) in zip(sets, tasks, strict=True)]
    assert prepared == [True, True, False]  # the third would pass the budget: transformed per batch
    assert [i for i, _, _ in sets] == [0, 1, 2]
