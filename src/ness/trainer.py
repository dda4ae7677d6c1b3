"""Task-incremental training: the protocol of METHODS_SPEC §1.4, calling only the method's hooks."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ness.data import Benchmark, Split, Task, iterate_batches, iterate_mixed_batches
from ness.methods import ContinualMethod, StepProgress
from ness.metrics import average_accuracy, backward_transfer
from ness.models import call_model
from ness.optim import SAM

SAM_TASKS: tuple[str, ...] = ("all", "first")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule per task; defaults are the GPM-family protocol (METHODS_SPEC §1.4)."""

    epochs: int = 200
    """Maximum epochs per task."""
    lr: float = 0.01
    """Initial SGD learning rate of every task (a fresh optimiser per task)."""
    batch_size: int = 64
    test_batch_size: int = 64
    momentum: float = 0.0
    """0 in the GPM family; 0.9 for NESS-SGDm."""
    weight_decay: float = 0.0
    lr_schedule: bool = True
    """True: divide lr by lr_factor after lr_patience epochs without a better validation loss, stop when
    lr < lr_min, and restore the best-validation weights. False: a fixed lr for `epochs` (GPM Permuted MNIST)."""
    lr_min: float = 1e-5
    lr_patience: int = 6
    lr_factor: float = 2.0
    sam_rho: float = 0.0
    """SAM radius ρ (0: no SAM). NESS-SAM uses 0.05 (METHODS_SPEC §2.2)."""
    sam_tasks: Literal["all", "first"] = "all"
    """Tasks that use SAM: 'all', or 'first' as the official NESS code (its later tasks call only the plain step)."""
    eval_passes: int = 1
    """Test passes averaged per accuracy entry. With batch-statistics BatchNorm the accuracy depends on which
    images share a batch; each pass uses its own seeded test order (TRGP averages 10 passes)."""
    drop_last: bool = False
    """Skip each epoch's last training batch when it is smaller than batch_size: a 1-row batch breaks train-mode
    BatchNorm with running statistics ('--network mlp_bn' sets it)."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "batch_size": self.batch_size >= 1,
            "test_batch_size": self.test_batch_size >= 1,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "lr_min": self.lr_min >= 0,
            "lr_patience": self.lr_patience >= 1,
            "lr_factor": self.lr_factor > 1,
            "sam_rho": self.sam_rho >= 0 and math.isfinite(self.sam_rho),
            "sam_tasks": self.sam_tasks in SAM_TASKS,
            "eval_passes": isinstance(self.eval_passes, int) and self.eval_passes >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"TrainConfig: invalid {values} (epochs/batch sizes/eval_passes ≥ 1, lr > 0, momentum in "
                f"[0, 1), weight_decay ≥ 0, lr_patience ≥ 1, lr_factor > 1, sam_rho ≥ 0, sam_tasks in {SAM_TASKS})"
            )


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_labels(model: nn.Module, t: int, task: Task, device: str) -> None:
    """Labels must lie in 0..num_classes−1 and fit the outputs the model gives for task t."""
    x, _ = next(iterate_batches(task.train, task.transform, 2, device=device))
    with torch.no_grad():
        outputs = call_model(model, x, t).shape[-1]
    for split_name in ("train", "val", "test"):
        labels = getattr(task, split_name).labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= min(outputs, task.num_classes)):
            raise ValueError(
                f"task {t} ('{task.name}'), {split_name} split: labels span {int(labels.min())}..{int(labels.max())} "
                f"but the task has {task.num_classes} classes and the model gives {outputs} outputs for it; "
                "labels must be task-local, 0..num_classes−1"
            )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    t: int,
    split: Split,
    task: Task,
    batch_size: int,
    device: str,
    passes: int = 1,
    order_seed: int | None = None,
    predict: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) of task t's head on `split` in eval mode, averaged over `passes`.

    Without `order_seed` the split is read in order; with it, pass p reads it in the order of
    torch.randperm seeded by (order_seed, p), so runs are repeatable yet batches mix as in the official code.
    `predict(x, t)` gives the logits (a method's `predict`); by default the model is called directly.
    """
    if predict is None:

        def predict(x: torch.Tensor, task: int) -> torch.Tensor:
            return call_model(model, x, task)

    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for p in range(passes):
        generator = None if order_seed is None else torch.Generator().manual_seed(order_seed * 1_000_003 + p)
        for x, y in iterate_batches(
            split, task.transform, batch_size, shuffle=generator is not None, generator=generator, device=device
        ):
            logits = predict(x, t)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += y.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError(f"task {t} ('{task.name}'): cannot evaluate on an empty split")
    return loss_sum / n, 100.0 * correct / n


def build_optimizer(params: Iterable[nn.Parameter], config: TrainConfig, t: int) -> torch.optim.Optimizer | SAM:
    """SGD with the config's momentum and weight decay, wrapped in SAM where the config asks for it in task t."""
    sgd = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.sam_rho > 0 and (config.sam_tasks == "all" or t == 0):
        return SAM(sgd, config.sam_rho)
    return sgd


def training_tasks(method: ContinualMethod, t: int, task: Task, earlier: Sequence[Task]) -> list[tuple[int, Task]]:
    """(task id, task) of every task whose data task t trains on, as the method asks; checked."""
    ids = method.data_tasks(t)
    if t not in ids or any(not 0 <= i <= t for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(
            f"{method.name}.data_tasks({t}) returned {ids}: it must contain task {t} and only tasks 0..{t}, once each"
        )
    if any(i < t for i in ids) and len(earlier) < t:
        raise ValueError(
            f"{method.name} trains task {t} on earlier tasks' data {ids}: pass the {t} earlier tasks to train_task"
        )
    return [(i, task if i == t else earlier[i]) for i in ids]


def train_task(
    model: nn.Module,
    method: ContinualMethod,
    t: int,
    task: Task,
    config: TrainConfig,
    generator: torch.Generator,
    progress: bool = True,
    earlier: Sequence[Task] = (),
) -> dict[str, Any]:
    """Train task t with the method's trainable parameters; returns what happened (epochs, lr, losses).

    `earlier` holds tasks 0..t−1, needed only by methods that train on earlier tasks' data (joint training).
    """
    sources = training_tasks(method, t, task, earlier)
    for i, source in sources:
        if len(source.train) == 0:
            raise ValueError(f"task {i} ('{source.name}') has no training data")
        if config.lr_schedule and len(source.val) == 0:
            raise ValueError(
                f"task {i} ('{source.name}') has no validation data, which lr_schedule=True needs; "
                "set a validation fraction > 0 or turn the schedule off"
            )
        check_labels(model, i, source, config.device)
    method.preview_task(t, iterate_batches(task.train, task.transform, config.test_batch_size, device=config.device))
    lr = config.lr
    optimizer = build_optimizer(method.trainable_parameters(t), config, t)
    best_loss, best_state, patience = math.inf, None, config.lr_patience
    epochs_run, train_loss = 0, math.nan
    rows = sum(len(source.train) for _, source in sources)
    batches_per_epoch = rows // config.batch_size if config.drop_last else math.ceil(rows / config.batch_size)
    if batches_per_epoch == 0:
        raise ValueError(
            f"task {t}: {rows} training rows make no full batch of {config.batch_size} with drop_last; lower "
            "batch_size or turn drop_last off"
        )
    bar = tqdm(range(config.epochs), desc=f"task {t}", leave=False, disable=not progress, unit="ep")
    model.train()
    for epoch in bar:
        total, count = 0.0, 0
        for step, (x, y, tasks) in enumerate(epoch_batches(sources, config, generator)):

            def check_loss(loss: torch.Tensor, step: int = step, epoch: int = epoch, lr: float = lr) -> None:
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"task {t}, epoch {epoch}, step {step}: the loss is {loss.item()}; "
                        f"lower the learning rate (now {lr:g}) or check the inputs"
                    )

            method.begin_step(t, StepProgress(epoch, step, batches_per_epoch, config.epochs))
            loss = method.training_step(t, x, y, optimizer, check_loss, tasks)
            total, count = total + loss.item() * y.numel(), count + y.numel()
        epochs_run, train_loss = epoch + 1, total / count
        postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2g}"}
        if config.lr_schedule:
            val_loss = validation_loss(method, sources, config)
            postfix["val"] = f"{val_loss:.3f}"
            if val_loss < best_loss:
                best_loss, patience = val_loss, config.lr_patience
                best_state = copy.deepcopy(model.state_dict())
            else:
                patience -= 1
                if patience <= 0:
                    lr /= config.lr_factor
                    if lr < config.lr_min:
                        break
                    patience = config.lr_patience
                    for group in optimizer.param_groups:
                        group["lr"] = lr
        bar.set_postfix(postfix)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "epochs": epochs_run,
        "final_lr": lr,
        "train_loss": train_loss,
        "best_val_loss": best_loss if best_state is not None else None,
    }


def epoch_batches(
    sources: list[tuple[int, Task]], config: TrainConfig, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """One epoch of shuffled training batches: (x, y, None) from one task, (x, y, task ids) from several; with
    drop_last, without the last batch when it is smaller than batch_size."""
    if len(sources) == 1:
        _, task = sources[0]
        batches: Iterator[tuple[torch.Tensor, ...]] = (
            (x, y, None)
            for x, y in iterate_batches(
                task.train, task.transform, config.batch_size, shuffle=True, generator=generator, device=config.device
            )
        )
    else:
        batches = iterate_mixed_batches(
            [(i, task.train, task.transform) for i, task in sources],
            config.batch_size,
            shuffle=True,
            generator=generator,
            device=config.device,
        )
    for batch in batches:
        if not (config.drop_last and batch[0].shape[0] < config.batch_size):
            yield batch  # type: ignore[misc]


def validation_loss(method: ContinualMethod, sources: list[tuple[int, Task]], config: TrainConfig) -> float:
    """Mean validation cross-entropy over the examples of the tasks being trained, each through its own head."""
    loss_sum, n = 0.0, 0
    for i, task in sources:
        loss, _ = evaluate(
            method.model, i, task.val, task, config.test_batch_size, config.device, predict=method.predict
        )
        loss_sum, n = loss_sum + loss * len(task.val), n + len(task.val)
    return loss_sum / n


def run_continual(
    model: nn.Module,
    method: ContinualMethod,
    benchmark: Benchmark,
    config: TrainConfig,
    seed: int,
    progress: bool = True,
    after_task: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Learn the benchmark's tasks in order; R[i][j] = test accuracy on task j after task i (%).

    `after_task(t)` is called once task t has ended and been evaluated (to save the model at that point)."""
    generator = seed_everything(seed)
    model.to(config.device)
    n = len(benchmark)
    acc_matrix = [[0.0] * n for _ in range(n)]
    tasks_log = []
    for t, task in enumerate(benchmark.tasks):
        start = time.perf_counter()
        method.begin_task(t)
        begun = time.perf_counter()
        log = train_task(model, method, t, task, config, generator, progress, benchmark.tasks[:t])
        trained = time.perf_counter()
        # The statistics pass runs at the evaluation batch size, as the official code does (64).
        method.end_task(t, iterate_batches(task.train, task.transform, config.test_batch_size, device=config.device))
        ended = time.perf_counter()
        for j in range(t + 1):
            prev = benchmark.tasks[j]
            _, acc_matrix[t][j] = evaluate(
                model,
                j,
                prev.test,
                prev,
                config.test_batch_size,
                config.device,
                config.eval_passes,
                seed,
                method.predict,
            )
        log.update(
            task=t,
            name=task.name,
            train_seconds=trained - begun,
            boundary_seconds=(begun - start) + (ended - trained),
            eval_seconds=time.perf_counter() - ended,
        )
        tasks_log.append(log)
        if progress:
            row = " ".join(f"{a:5.1f}" for a in acc_matrix[t][: t + 1])
            tqdm.write(f"  [{method.name}] after task {t}: {row}")
        if after_task is not None:
            after_task(t)
    return {
        "acc_matrix": acc_matrix,
        "acc": average_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "tasks": tasks_log,
        "diagnostics": method.diagnostics(),
    }
