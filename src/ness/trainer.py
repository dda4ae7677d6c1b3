"""Task-incremental training: the protocol of METHODS_SPEC §1.4, calling only the method's hooks."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ness import distributed
from ness.data import Benchmark, Split, Task, iterate_batches, iterate_mixed_batches
from ness.data.tasks import (
    PREPARED_BYTES_LIMIT,
    BatchRows,
    identity,
    iterate_prepared_batches,
    prepared_training_split,
)
from ness.methods import ContinualMethod, StepProgress
from ness.metrics import average_accuracy, backward_transfer
from ness.models import call_model
from ness.modules import instance_attribute
from ness.optim import SAM
from ness.validation import Rule, Validated, choice, count, flag, number

log = logging.getLogger(__name__)

SAM_TASKS: tuple[str, ...] = ("all", "first")


def is_device(value: Any) -> bool:
    """A string torch reads as a device ('cpu', 'cuda', 'cuda:1', 'mps')."""
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return isinstance(value, str)


def is_compile_backend(value: Any) -> bool:
    """A backend name torch.compile knows ('inductor', 'aot_eager', ...); the list is read only for other names
    than 'inductor' (reading it imports torch._dynamo, about a second)."""
    return value == "inductor" or (isinstance(value, str) and value in torch.compiler.list_backends(exclude_tags=()))


@dataclass(frozen=True)
class TrainConfig(Validated):
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
    compile: bool = False
    """Run the method's training loss (forward and loss; AOTAutograd compiles its backward too) through
    torch.compile while a task trains; the optimiser step, the method's hooks, evaluation and the statistics passes
    stay eager (`CompiledLoss`). Meant for GPUs: on the CPU the compiled step was measured 1.2–1.3× slower than eager
    for the MNIST MLP at batch 10 (BENCHMARKS.md, issue 15). Each task compiles anew, and its end resets
    torch.compile's caches in the whole process."""
    compile_backend: str = "inductor"
    """The torch.compile backend with `compile`: 'inductor' generates kernels; 'aot_eager' traces forward and
    backward without generating code (quick: to check that a method's step compiles)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "epochs": count(fix="the most epochs per task"),
        "lr": number(above=0),
        "batch_size": count(),
        "test_batch_size": count(),
        "momentum": number(at_least=0, below=1),
        "weight_decay": number(at_least=0),
        "lr_schedule": flag(),
        "lr_min": number(at_least=0),
        "lr_patience": count(),
        "lr_factor": number(above=1),
        "sam_rho": number(at_least=0, fix="0: no SAM"),
        "sam_tasks": choice(SAM_TASKS),
        "eval_passes": count(),
        "drop_last": flag(),
        "device": Rule(is_device, "a torch device name such as 'cpu', 'cuda' or 'cuda:1'"),
        "compile": flag(fix="true runs the training loss through torch.compile; meant for GPUs"),
        "compile_backend": Rule(
            is_compile_backend,
            "a torch.compile backend name",
            "'inductor' (the default) or 'aot_eager'; torch.compiler.list_backends() names the others",
        ),
    }


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """Deterministic kernels only (an error where an op has none) and cuDNN without autotuning: with the seeds
    that every run sets, the same command then gives the same numbers on a GPU as well as on the CPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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
    try:  # the model's mode is restored even when a batch fails: a caller that catches the error trains on
        for p in range(passes):
            generator = None if order_seed is None else torch.Generator().manual_seed(order_seed * 1_000_003 + p)
            for x, y in iterate_batches(
                split, task.transform, batch_size, shuffle=generator is not None, generator=generator, device=device
            ):
                logits = predict(x, t)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                n += y.numel()
    finally:
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


@dataclass
class TaskLoop:
    """Where the open task's training stands between two epochs; an epoch checkpoint saves it whole."""

    optimizer: Any
    lr: float
    patience: int
    epochs_done: int = 0
    best_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    train_loss: float = math.nan
    finished: bool = False
    """Training is over (epoch budget spent, or lr fell below lr_min): what remains is the task's end."""
    train_seconds: float = 0.0
    preview_seconds: float = 0.0
    """The method's look at the task before training (TRGP's trust regions): boundary time."""


EpochHook = Callable[[TaskLoop, dict[str, Any]], None]


COMPILER_MODULES: tuple[str, ...] = ("torch._dynamo.", "torch._functorch.", "torch._inductor.")


def from_compiler(error: BaseException) -> bool:
    """Whether torch.compile raised `error`: dynamo's own errors (tracing, a backend's failure), or a RuntimeError
    raised inside AOTAutograd's or inductor's code (a compiled backward asked for a second-order gradient) and not
    an out-of-memory error. Errors of the traced code itself reach dynamo's frame-evaluation wrapper only."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    if isinstance(error, (TorchDynamoException, FailOnRecompileLimitHit)):
        return True
    if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
        return False
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(COMPILER_MODULES) and module != "torch._dynamo.eval_frame":
            return True
        tb = tb.tb_next
    return False


class CompiledLoss:
    """A method's `training_loss` through torch.compile for one task (`TrainConfig.compile`).

    `installed()` puts it in place, as an instance attribute over the class's method, for a block of training steps
    and removes it afterwards, even after an error (so a checkpoint between epochs pickles the method without it);
    the method's hooks (after_backward, after_step) and the optimiser step stay eager, and so do evaluation and the
    statistics passes, which never call `training_loss`. `close()` ends the task: it resets torch.compile's caches
    (those of every compiled function in the process). Without that reset, compiling the same code task after task
    piles up recompilations: NESS's new adapters change the shapes and the task id and the method's Python state
    change the guards, so one recompilation per task; measured with torch 2.13, from task 8 of a 10-task NESS run
    dynamo hit its recompile limit (8) and ran the loss eagerly, with only a logged warning."""

    def __init__(self, method: ContinualMethod, t: int, backend: str) -> None:
        self.method, self.t, self.backend = method, t, backend
        self.calls, self.warned = 0, False
        with self._explained():
            self._compiled = torch.compile(method.training_loss, backend=backend)

    def _loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self._compiled(*args, **kwargs)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Inside the block `method.training_loss` is the compiled loss; an instance's own `training_loss`
        attribute, if it had one, is put back on exit. A block of steps that never called it (a method whose own
        training_step computes its loss otherwise) logs a warning, once."""
        calls = self.calls
        with instance_attribute(self.method, "training_loss", self._loss), self._explained():
            yield
        if self.calls == calls and not self.warned:
            self.warned = True
            log.warning(
                "task %d: compile=True compiles nothing for %s: its training_step does not compute its loss with "
                "training_loss, so its steps run eagerly",
                self.t,
                self.method.name,
            )

    @contextmanager
    def _explained(self) -> Iterator[None]:
        """torch.compile's errors (`from_compiler`) re-raised saying where they came from and how to train without
        compiling; the method's, the model's and the data's own errors pass unchanged."""
        try:
            yield
        except Exception as error:
            if not from_compiler(error):
                raise
            lines = str(error).strip().splitlines()
            first = lines[0].rstrip(".") if lines else ""
            raise RuntimeError(
                f"task {self.t}: torch.compile (backend {self.backend!r}) failed on {self.method.name}'s training "
                f"step: {type(error).__name__}: {first}. Train without compiling: --set "
                "compile=false (TrainConfig(compile=False)); with inductor, --set compile_backend=aot_eager tells a "
                "code-generation failure from a tracing one"
            ) from error

    def close(self) -> None:
        """End of the task: torch.compile's caches are reset (see the class's docstring)."""
        torch.compiler.reset()


def train_task(
    model: nn.Module,
    method: ContinualMethod,
    t: int,
    task: Task,
    config: TrainConfig,
    generator: torch.Generator,
    progress: bool = True,
    earlier: Sequence[Task] = (),
    loop: TaskLoop | None = None,
    after_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train task t with the method's trainable parameters; returns what happened (epochs, lr, losses).

    `earlier` holds tasks 0..t−1, needed only by methods that train on earlier tasks' data (joint training).
    `loop` continues a task from a checkpoint (its optimiser, lr schedule and epochs done); `after_epoch(loop,
    record)` is called after every epoch with the epoch's figures (to checkpoint or log them).
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
    rows = sum(len(source.train) for _, source in sources)
    batches_per_epoch = rows // config.batch_size if config.drop_last else math.ceil(rows / config.batch_size)
    if batches_per_epoch == 0:
        raise ValueError(
            f"task {t}: {rows} training rows make no full batch of {config.batch_size} with drop_last; lower "
            "batch_size or turn drop_last off"
        )
    if loop is None:
        started = time.perf_counter()
        method.preview_task(
            t, iterate_batches(task.train, task.transform, config.test_batch_size, device=config.device)
        )
        params = method.trainable_parameters(t)
        if params:
            loop = TaskLoop(build_optimizer(params, config, t), config.lr, config.lr_patience)
        else:  # e.g. NESS with every layer at rank 0 and one shared output: the task is evaluated as it stands
            log.warning("task %d: %s trains no parameter in it; the task is evaluated untrained", t, method.name)
            loop = TaskLoop(None, config.lr, config.lr_patience, finished=True)
        loop.preview_seconds = time.perf_counter() - started
    bar = tqdm(
        total=config.epochs, initial=loop.epochs_done, desc=f"task {t}", leave=False, disable=not progress, unit="ep"
    )
    model.train()
    trained = [p for group in loop.optimizer.param_groups for p in group["params"]] if loop.optimizer else []
    sets = training_sets(sources, config.device) if not loop.finished else []
    compiled = CompiledLoss(method, t, config.compile_backend) if config.compile and not loop.finished else None
    try:
        with bar, distributed.DataParallel(method, trained) as data_parallel:  # several processes: DDP runs the steps
            while not loop.finished:
                started = time.perf_counter()
                with compiled.installed() if compiled is not None else nullcontext():
                    record = train_epoch(
                        method, t, sources, sets, config, generator, loop, batches_per_epoch, data_parallel
                    )
                loop.train_seconds += time.perf_counter() - started
                if after_epoch is not None:
                    after_epoch(loop, record)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "val_loss", "lr")})
    finally:
        if compiled is not None:
            compiled.close()
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    return {
        "epochs": loop.epochs_done,
        "final_lr": loop.lr,
        "train_loss": loop.train_loss if loop.epochs_done else None,
        "best_val_loss": loop.best_loss if loop.best_state is not None else None,
        "train_seconds": loop.train_seconds,
        "preview_seconds": loop.preview_seconds,
    }


class LossMonitor:
    """An epoch's training loss: its sum over rows, and a stop at the first non-finite loss naming its step.

    On the CPU each loss is read as it comes (a read costs nothing there) and a bad one stops the run before its
    backward pass. On an accelerator, reading it would wait for the device every step, so the sum and the first
    bad step stay on the device and are read every `check_every` steps and at the end of the epoch."""

    def __init__(
        self, t: int, epoch: int, lr: float, device: torch.device, check_every: int = 200, on_host: bool | None = None
    ) -> None:
        self.where, self.lr, self.check_every = (t, epoch), lr, check_every
        self.on_host = device.type == "cpu" if on_host is None else on_host
        self.total: float | torch.Tensor = 0.0 if self.on_host else torch.zeros((), device=device)
        self.first_bad: torch.Tensor | None = None if self.on_host else torch.full((), -1, device=device)
        self.step, self.rows = 0, 0
        self._read: tuple[torch.Tensor, float] | None = None  # the last loss `check` read on the host, and its value

    def check(self, loss: torch.Tensor) -> None:
        """`check_loss` of a training step: the loss of step `self.step` before its backward pass."""
        if self.on_host:
            value = loss.item()
            self._read = (loss, value)  # `add` of the same loss reads it from here
            if not math.isfinite(value):
                self._stop(self.step, value)
        else:  # the first step whose loss is not finite, without leaving the device
            bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
            self.first_bad = torch.where(bad, self.step, self.first_bad)

    def add(self, loss: torch.Tensor, rows: int) -> None:
        """Count the step's loss over its `rows` (once per step, after it) and move to the next step."""
        self.rows += rows
        if self.on_host:
            read, self._read = self._read, None
            self.total += (read[1] if read is not None and read[0] is loss else loss.item()) * rows
        else:
            self.total = self.total + loss.detach() * rows
            if (self.step + 1) % self.check_every == 0:
                self.raise_if_bad()
        self.step += 1

    def raise_if_bad(self) -> None:
        if self.first_bad is not None and int(self.first_bad) >= 0:
            self._stop(int(self.first_bad), float("nan"))

    def sum(self) -> float:
        """The epoch's summed loss (one read of the device)."""
        self.raise_if_bad()
        return float(self.total)

    def _stop(self, step: int, value: float) -> None:
        t, epoch = self.where
        raise FloatingPointError(
            f"task {t}, epoch {epoch}, step {step}: the loss is {value}; "
            f"lower the learning rate (now {self.lr:g}) or check the inputs"
        )


def train_epoch(
    method: ContinualMethod,
    t: int,
    sources: list[tuple[int, Task]],
    sets: list[TrainingSet],
    config: TrainConfig,
    generator: torch.Generator,
    loop: TaskLoop,
    batches_per_epoch: int,
    data_parallel: distributed.DataParallel,
) -> dict[str, Any]:
    """One epoch of task t (its batches drawn from `sets`), then the lr schedule's step on `sources`' validation
    data; updates `loop` and returns the epoch's figures. With several processes each rank trains on its shard of
    every batch, in `data_parallel`'s steps."""
    epoch, lr = loop.epochs_done, loop.lr
    monitor = LossMonitor(t, epoch, lr, torch.device(config.device))
    single = not distributed.active()
    # hooks the method leaves as the base class's no-ops are not called (nor their arguments made) every step
    begin_step = method.overrides("begin_step")
    step_rows = single and method.overrides("on_step_rows")
    for step, (x, y, tasks, rows) in enumerate(epoch_batches(sets, config, generator, step_rows)):
        if begin_step:
            method.begin_step(t, StepProgress(epoch, step, batches_per_epoch, config.epochs))
        if single:  # one process: the whole batch, no per-step context
            if step_rows:
                method.on_step_rows(t, rows)
            loss = method.training_step(t, x, y, loop.optimizer, monitor.check, tasks)
            monitor.add(loss, x.shape[0])
            continue
        part = distributed.shard(x, y, tasks)  # several processes: this rank's rows of the global batch
        with data_parallel.step(part, (t, epoch, step)):
            loss = method.training_step(t, part.x, part.y, loop.optimizer, monitor.check, part.tasks)
        monitor.add(loss, part.rows)
    total, count = distributed.sum_over_ranks([monitor.sum(), monitor.rows])
    loop.epochs_done, loop.train_loss = epoch + 1, total / count
    record: dict[str, Any] = {"task": t, "epoch": epoch, "loss": loop.train_loss, "lr": lr}
    if config.lr_schedule:
        val_loss = validation_loss(method, sources, config)
        record["val_loss"] = val_loss
        if val_loss < loop.best_loss:
            loop.best_loss, loop.patience = val_loss, config.lr_patience
            loop.best_state = copy.deepcopy(method.model.state_dict())
        else:
            loop.patience -= 1
            if loop.patience <= 0:
                loop.lr /= config.lr_factor
                loop.patience = config.lr_patience
                loop.finished = loop.lr < config.lr_min
                for group in loop.optimizer.param_groups:
                    group["lr"] = loop.lr
    loop.finished = loop.finished or loop.epochs_done >= config.epochs
    return record


TrainingSet = tuple[int, Split, Callable[[torch.Tensor], torch.Tensor]]
"""(task id, training split, its transform): what an epoch's batches are drawn from."""


def training_sets(
    sources: Sequence[tuple[int, Task]], device: str, limit: int = PREPARED_BYTES_LIMIT
) -> list[TrainingSet]:
    """Each source's training split, transformed once on `device` where it can be (`prepared_training_split`), the
    prepared copies of all sources together within `limit` bytes (joint training holds every task's)."""
    sets: list[TrainingSet] = []
    for i, task in sources:
        split, transform = prepared_training_split(task, device, limit)
        if split is not task.train:
            limit -= split.inputs.element_size() * split.inputs.numel()
        sets.append((i, split, transform))
    return sets


def on_device(tensor: torch.Tensor, device: str) -> bool:
    """Whether `tensor` lies where `.to(device)` would put it (so that moving it is a no-op)."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return tensor.device == target


def epoch_batches(
    sets: list[TrainingSet], config: TrainConfig, generator: torch.Generator, with_rows: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, BatchRows | None]]:
    """One epoch of shuffled training batches: (x, y, None, rows) from one task, where `rows` (`BatchRows`) says
    which rows of its prepared split x is (None when the split is transformed per batch, or without `with_rows`), and
    (x, y, task ids, None) from several; with drop_last, without the last batch when it is smaller than batch_size."""
    batches: Iterator[tuple[torch.Tensor, ...]]
    if len(sets) > 1:
        batches = (
            (x, y, tasks, None)
            for x, y, tasks in iterate_mixed_batches(
                sets, config.batch_size, shuffle=True, generator=generator, device=config.device
            )
        )
    elif with_rows and sets[0][2] is identity and on_device(sets[0][1].inputs, config.device):
        batches = (
            (x, y, None, rows)
            for x, y, rows in iterate_prepared_batches(sets[0][1], config.batch_size, shuffle=True, generator=generator)
        )
    else:
        _, split, transform = sets[0]
        batches = (
            (x, y, None, None)
            for x, y in iterate_batches(
                split, transform, config.batch_size, shuffle=True, generator=generator, device=config.device
            )
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


@dataclass
class RunState:
    """Everything a run carries from one epoch to the next: a checkpoint saves it whole, with the RNG states."""

    method: ContinualMethod
    """The method, holding the model, its bases, statistics and memories."""
    generator: torch.Generator
    """Draws the training data's order."""
    acc_matrix: list[list[float]]
    tasks_log: list[dict[str, Any]] = field(default_factory=list)
    tasks_done: int = 0
    """Tasks trained, ended and evaluated."""
    loop: TaskLoop | None = None
    """The open task's training between two epochs; None between tasks."""
    extras: dict[str, Any] = field(default_factory=dict)
    """What observers keep across a resume (the model after task 0, for adapter files)."""


class RunObserver:
    """Called by `run_continual` after every epoch and every task: checkpoints and logs plug in here."""

    def epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        """`record`: task, epoch, loss, lr (and val_loss with the lr schedule) of the epoch just trained."""

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        """`record`: the task's log (epochs, losses, seconds) and `acc`, its row of the accuracy matrix."""


def new_run_state(method: ContinualMethod, benchmark: Benchmark, seed: int) -> RunState:
    """A run before its first task: seeds every RNG (Python, NumPy, torch) and the data order."""
    n = len(benchmark)
    return RunState(method, seed_everything(seed), [[0.0] * n for _ in range(n)])


def run_continual(
    model: nn.Module,
    method: ContinualMethod,
    benchmark: Benchmark,
    config: TrainConfig,
    seed: int,
    progress: bool = True,
    observers: Sequence[RunObserver] = (),
    state: RunState | None = None,
    continuable: bool = True,
) -> dict[str, Any]:
    """Learn the benchmark's tasks in order; `R[i][j]` = test accuracy on task j after task i (%).

    `state` continues a run from a checkpoint (its method must be `method`); without it the run starts from task 0
    with every RNG seeded by `seed`. Observers see every epoch and task end (ness.checkpoint.Checkpointer).
    `continuable=False` ends the last task with `end_task(..., last=True)`: the method then skips what only later
    tasks or saved adapters use (NESS's statistics pass over the task's training set), and cannot go on or save
    adapters afterwards; the results are the same."""
    if state is None:
        state = new_run_state(method, benchmark, seed)
    elif state.method is not method:
        raise ValueError("run_continual: the state to continue holds another method object than `method`")
    if len(state.acc_matrix) != len(benchmark):
        raise ValueError(
            f"the run to continue has {len(state.acc_matrix)} tasks but the benchmark has {len(benchmark)}"
        )
    model.to(config.device)
    for t in range(state.tasks_done, len(benchmark)):
        task = benchmark.tasks[t]
        start = time.perf_counter()
        if state.loop is None:
            method.begin_task(t)
        begun = time.perf_counter()

        def after_epoch(loop: TaskLoop, record: dict[str, Any]) -> None:
            state.loop = loop
            for observer in observers:
                observer.epoch_end(state, record)

        task_log = train_task(
            model, method, t, task, config, state.generator, progress, benchmark.tasks[:t], state.loop, after_epoch
        )
        trained = time.perf_counter()
        # The statistics pass runs at the evaluation batch size, as the official code does (64).
        method.end_task(
            t,
            iterate_batches(task.train, task.transform, config.test_batch_size, device=config.device),
            last=not continuable and t == len(benchmark) - 1,
        )
        ended = time.perf_counter()
        row = state.acc_matrix[t]
        for j in range(t + 1):
            prev = benchmark.tasks[j]
            _, row[j] = evaluate(
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
        task_log.update(
            task=t,
            name=task.name,
            boundary_seconds=(begun - start) + task_log.pop("preview_seconds") + (ended - trained),
            eval_seconds=time.perf_counter() - ended,
        )
        state.tasks_log.append(task_log)
        state.tasks_done, state.loop = t + 1, None
        log.info("  [%s] after task %d: %s", method.name, t, " ".join(f"{a:5.1f}" for a in row[: t + 1]))
        for observer in observers:
            observer.task_end(state, {**task_log, "acc": row[: t + 1]})
    return {
        "acc_matrix": state.acc_matrix,
        "acc": average_accuracy(state.acc_matrix),
        "bwt": backward_transfer(state.acc_matrix),
        "tasks": state.tasks_log,
        "diagnostics": method.diagnostics(),
    }
