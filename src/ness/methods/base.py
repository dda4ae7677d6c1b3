"""The hooks every continual-learning method offers; the trainer calls only these.

Per task t: `begin_task(t)`, `preview_task(t, batches)` with the task's training data, `trainable_parameters(t)`,
then for every batch `begin_step(t, progress)` and `training_step(...)`, and finally `end_task(t, batches)` with the
task's training data (`end_task(t, batches, last=True)` for a last task after which nothing continues, which lets a
method skip what only later tasks use). The default `training_step` is one optimiser step on `training_loss` with
`after_backward(t)` between backward and step and `after_step(t)` after it; evaluation calls `predict(x, t)`. A
method overrides only the hooks it needs and never sees the trainer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.batches import ModelInputs, model_inputs, tensors_of
from ness.data.tasks import BatchRows
from ness.models import call_model, head_parameters, logits_by_task, task_heads
from ness.models.heads import Forward
from ness.modules import all_finite
from ness.subspace import check_supported

Optimizer = Any  # a torch optimiser, or ness.optim.SAM: anything with step(closure), zero_grad and param_groups


@dataclass(frozen=True)
class StepProgress:
    """Where a training step lies in its task, for schedules inside a task (HAT's s, OWM's α)."""

    epoch: int
    """0-based epoch."""
    batch: int
    """0-based batch within the epoch."""
    batches_per_epoch: int
    max_epochs: int
    """The configured epoch budget (early stopping may end the task sooner)."""

    @property
    def epoch_fraction(self) -> float:
        """batch / batches_per_epoch, in [0, 1)."""
        return self.batch / self.batches_per_epoch

    @property
    def task_fraction(self) -> float:
        """(epoch + epoch_fraction) / max_epochs, in [0, 1)."""
        return (self.epoch + self.epoch_fraction) / self.max_epochs


class TaskOrderError(RuntimeError):
    """begin_task/end_task called out of sequence."""


def _matches(name: str, module: nn.Module, patterns: Sequence[str]) -> bool:
    """Whether a module-name glob of `patterns` matches `name` (a bare name also matches as its last component(s),
    as PEFT's target_modules do: 'q' matches 'blocks.0.attn.q'), or an entry equals the module's class name."""
    kind = type(module).__name__
    return any(
        kind == pattern or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")
        for pattern in patterns
    )


def matching_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules of `model` that an entry of `patterns` matches (see `adaptable_layers`), in order."""
    return [name for name, module in model.named_modules() if name and _matches(name, module, patterns)]


def check_patterns_match(model: nn.Module, patterns: Sequence[str], where: str) -> None:
    """A ValueError naming each entry of `patterns` that matches no module of the model (a misspelt name)."""
    for pattern in patterns:
        if not matching_modules(model, [pattern]):
            top = [name for name, _ in model.named_children()]
            raise ValueError(
                f"{where}: entry {pattern!r} matches no module of the model; entries are module-name globs, names "
                f"matched against the end of a module name, or class names (the model's top-level modules: {top})"
            )


def unreachable_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose parent never calls their forward, with why. nn.MultiheadAttention hands its out_proj's weight to
    F.multi_head_attention_forward itself, so no hook sees the layer's inputs and no adapter in its place would run."""
    return {
        f"{name}.out_proj" if name else "out_proj": f"it is the out_proj of nn.MultiheadAttention '{name}', which "
        "uses its weight directly and never calls its forward (nor does it call its packed q/k/v as layers)"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def adaptable_layers(
    model: nn.Module,
    exclude: Sequence[str] = (),
    targets: Sequence[str] | None = None,
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> dict[str, nn.Module]:
    """Every layer of one of `kinds` in `model`, in registration order, minus declared task heads and the layers
    whose forward is never called (`unreachable_layers`); with `targets` only those a target matches, then minus
    those `exclude` matches. Entries are module-name globs ('features.0', 'encoder.*'), bare names matched against
    the end of the module name ('q_proj'), or class names ('Conv2d')."""
    heads = task_heads(model)
    head_ids = {id(m) for m in heads.modules()} if heads is not None else set()
    unreachable = unreachable_layers(model)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or id(module) in head_ids or name in unreachable:
            continue
        if targets is not None and not _matches(name, module, targets):
            continue
        if _matches(name, module, exclude):
            continue
        chosen[name] = module
    return chosen


def subspace_layers(
    model: nn.Module,
    exclude: Sequence[str],
    method: str,
    targets: Sequence[str] | None = None,
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> list[str]:
    """Names of the layers a subspace method (NESS, GPM, ...) works on: `adaptable_layers`, each checked supported;
    an error when there is none, or when a target names no layer the method can work on."""
    names = [("nn." if k.__module__.startswith("torch.") else "transformers ") + k.__name__ for k in kinds]
    kind_names = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    check_patterns_match(model, exclude, f"{method}: exclude")
    unreachable = unreachable_layers(model)
    for target in targets or ():
        hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, m, [target])]
        if not hits:
            layers = list(adaptable_layers(model, (), None, kinds))
            raise ValueError(
                f"{method}: target {target!r} matches no module of the model; the layers it can adapt are {layers}"
            )
        reachable = [(n, m) for n, m in hits if n not in unreachable]
        if not reachable:
            why = "; ".join(f"'{n}': {unreachable[n]}" for n, _ in hits)
            raise ValueError(f"{method}: target {target!r} matches only layers it cannot adapt ({why})")
        if not any(isinstance(m, kinds) for _, m in reachable):
            found = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:5])
            raise ValueError(
                f"{method}: target {target!r} matches only {found}; {method} adapts {kind_names} layers (an "
                "embedding or a normalisation layer has no input rows to project: leave it out of the targets, or "
                "train it fully with modules_to_save where the method has it)"
            )
    layers = adaptable_layers(model, exclude, targets, kinds)
    for name, module in layers.items():
        check_supported(name, module)
    if not layers:
        raise ValueError(f"{method} found no {kind_names} layer to work on (after heads, targets and `exclude`)")
    return list(layers)


def weights_and_head(model: nn.Module, names: Iterable[str], t: int) -> list[nn.Parameter]:
    """The weights of the named layers and task t's head: what the projection methods train after task 0
    (BatchNorm and biases stay as task 0 left them)."""
    own_head, _ = head_parameters(model, t)
    return [model.get_submodule(name).weight for name in names] + own_head


@contextmanager
def watch_layer_inputs(
    model: nn.Module, names: Iterable[str], receive: Callable[[str, nn.Module, Tensor], None]
) -> Iterator[None]:
    """Inside the block the model is in eval mode and each named layer hands its input to `receive(name, layer, x)`
    just before it runs; on exit the hooks are removed and the mode restored, even after an error.

    One forward pass then gives every layer's input, as the statistics passes of the subspace methods need.
    """
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda layer, args, name=name: receive(name, layer, args[0])
        )
        for name in names
    ]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def task_inputs(batches: Iterable[Any], where: str) -> Iterator[ModelInputs]:
    """The model inputs of an iterable of `x`, `(x, y, ...)` or mapping batches (`ness.batches.model_inputs`),
    checked finite and non-empty."""
    seen = False
    for batch in batches:
        x = model_inputs(batch, where)
        if not all(all_finite(t) for t in tensors_of(x)):
            raise ValueError(f"{where}: a batch of inputs holds NaN or Inf; clean the data before training")
        seen = True
        yield x
    if not seen:
        raise ValueError(f"{where}: the task's loader yielded no batches; pass the task's training data")


METHODS: dict[str, type[ContinualMethod]] = {}
"""Every registered method by its `name`, in the order the package imported them."""


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator on a method where it is defined: it can then be built by name (`build_method`,
    `ness run --method NAME`). `ness.methods` imports every module of the package, so a new file is found."""
    name = vars(cls).get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a registered method sets its own `name` (the --method it answers to)")
    if not hasattr(cls, "config_class"):
        raise TypeError(f"{cls.__name__}: a registered method sets `config_class`, the dataclass of its settings")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"{cls.__name__}: the method name {name!r} is already {METHODS[name].__name__}'s")
    METHODS[name] = cls
    return cls


class ContinualMethod:
    """Base class: task bookkeeping and the default 'train everything' behaviour (fine-tuning)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    distributed_ok: ClassVar[bool | None] = None
    """Whether the method trains data-parallel (ness.distributed): its step uses the batch only through the mean
    gradient of its loss, computed with `training_loss` (DistributedDataParallel runs it as the forward pass whose
    gradients it averages), and its task-boundary passes give every rank the same result. Each method class declares
    it itself, True or False (with `distributed_reason`); one that does not (a subclass included: its step may differ
    from its parent's) is refused under torchrun until it does."""
    saves_adapters: ClassVar[bool] = False
    """Whether the method writes adapter files over a base model (`save_adapters(directory)`, `ness run
    --save-adapters`): NESS does."""
    distributed_reason: ClassVar[str] = ""
    """With distributed_ok False, why: what in its step depends on each rank's own rows."""
    mapping_batches: ClassVar[bool] = False
    """Whether its task hooks read mapping batches (a Hugging Face batch: input_ids, attention_mask, ...) and train
    through a plain loss on one task's data: what `ness.hf.train_task` needs. NESS, L2 and fine-tuning do."""
    final_task: int | None = None
    """The task ended with `end_task(t, batches, last=True)`, after which no task may begin; None while more may
    follow. (A class default too, so a method pickled in a checkpoint before this existed reads None.)"""

    def __init__(self, model: nn.Module, config: Any = None, forward: Forward = call_model) -> None:
        self.model = model
        self.config = self.config_class() if config is None else config
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.forward = forward
        self.tasks_done = 0
        self.active_task: int | None = None

    # -- the public hooks, with their order checked -------------------------------------------------
    def begin_task(self, t: int, batches: Iterable[Any] | None = None) -> None:
        """Prepare the model for task t (t = number of tasks finished so far). `batches`, the task's training data,
        is shown to `preview_task` for methods that look at the new task before training it (the trainer calls
        `preview_task` itself)."""
        if self.final_task is not None:
            raise TaskOrderError(
                f"begin_task({t}): task {self.final_task} was ended with end_task({self.final_task}, ..., last=True), "
                "the promise that no task follows, so the statistics later tasks need were not gathered; end the last "
                "task with last=False (run_continual(..., continuable=True)) when more tasks will follow"
            )
        if self.active_task is not None:
            raise TaskOrderError(
                f"begin_task({t}) while task {self.active_task} is open: call end_task({self.active_task}, ...) first"
            )
        if t != self.tasks_done:
            raise TaskOrderError(
                f"begin_task({t}) out of order: {self.tasks_done} task(s) finished, "
                f"so the next is task {self.tasks_done}"
            )
        self.active_task = t
        try:
            self.on_begin_task(t)
        except BaseException:
            self.active_task = None  # the task did not begin: begin_task(t) may be called again
            raise
        if batches is not None:
            self.preview_task(t, batches)

    def trainable_parameters(self, t: int) -> list[nn.Parameter]:
        """What the optimiser updates in task t; everything else gets requires_grad=False."""
        self._check_active(t, "trainable_parameters")
        params = self.task_parameters(t)
        ids = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
        return params

    def data_tasks(self, t: int) -> tuple[int, ...]:
        """The tasks whose training data task t trains on: (t,), or more for joint training."""
        return (t,)

    def preview_task(self, t: int, batches: Iterable[Any]) -> None:
        """Called once before task t's first step with its training data, for methods that look at the new task
        before training it (TRGP's trust regions); the batches are produced only if read."""

    def predict(self, x: Tensor, t: int) -> Tensor:
        """Task t's logits as the method evaluates them (HAT's task gates, TRGP's stored scales)."""
        return self.forward(self.model, x, t)

    def training_loss(self, t: int, x: Tensor, y: Tensor, tasks: Tensor | None = None) -> Tensor:
        """The mean loss of a batch of task t; with `tasks` (one task id per row, joint training), each row
        goes through its own task's head."""
        if tasks is None:
            return F.cross_entropy(self.predict(x, t), y)
        total = sum(
            F.cross_entropy(logits, y[rows], reduction="sum") for rows, logits in logits_by_task(self.model, x, tasks)
        )
        return total / y.shape[0]

    def begin_step(self, t: int, progress: StepProgress) -> None:
        """Called before every training step with its place in the task."""

    def on_step_rows(self, t: int, rows: BatchRows | None) -> None:
        """Called by the trainer before every training step (one process) with the batch as rows of the task's
        prepared training split (`BatchRows`; None when the batch is made otherwise). Only a shortcut: a method may
        take what depends on the inputs alone from products computed once for the split (NESS does); a loop that
        never calls this loses speed, not results."""

    def training_step(
        self,
        t: int,
        x: Tensor,
        y: Tensor,
        optimizer: Optimizer,
        check_loss: Callable[[Tensor], None],
        tasks: Tensor | None = None,
    ) -> Tensor:
        """One optimiser step on the batch; returns the loss before it. `check_loss` raises on a non-finite loss.

        The closure may be evaluated more than once (SAM evaluates it at w and at w + e)."""

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = self.training_loss(t, x, y, tasks)
            check_loss(loss)
            loss.backward()
            self.after_backward(t)
            return loss

        if self.overrides("step_context"):
            with self.step_context():
                loss = optimizer.step(closure)
        else:  # the base class's empty context, not entered every step
            loss = optimizer.step(closure)
        self.after_step(t)
        return loss

    def overrides(self, hook: str) -> bool:
        """Whether `hook` (a method of ContinualMethod) may do anything here: overridden by the class, set on the
        instance, or replaced on ContinualMethod itself since it was defined. The trainer skips the base class's empty
        hooks in its hot loop."""
        return hook in self.__dict__ or getattr(type(self), hook) is not _DEFINED_HOOKS[hook]

    @contextmanager
    def step_context(self) -> Iterator[None]:
        """What this default `training_step` runs its optimiser step in, where the gradients are zeroed and come from
        `training_loss` alone (GPM lets its layers deliver them projected there); nothing by default."""
        yield

    def after_backward(self, t: int) -> None:
        """Called between loss.backward() and optimizer.step(); gradient-projection methods act here."""

    def after_step(self, t: int) -> None:
        """Called after each optimiser step (HAT clamps its embeddings here)."""

    def save_adapters(self, directory: str | Path) -> Path:
        """Write the method's adapter files to `directory`: only methods with `saves_adapters` have any."""
        raise TypeError(f"{self.name} learns no adapters over a base model, so it has none to save")

    def end_task(self, t: int, batches: Iterable[Any], *, last: bool = False) -> None:
        """Close task t; `batches` is the task's training data (x or (x, y) batches). `last=True` promises that no
        task follows and nothing that needs task t's statistics will be saved: `on_end_last_task` then runs instead
        of `on_end_task` (a method may skip the pass that only later tasks use), and `begin_task` refuses afterwards."""
        self._check_active(t, "end_task")
        if last:
            self.on_end_last_task(t, batches)
        else:
            self.on_end_task(t, batches)
        self.active_task = None
        self.tasks_done += 1
        if last:
            self.final_task = t

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per-layer, per-task records for results files; empty for methods with nothing to report."""
        return []

    # -- what subclasses override ----------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        """Method-specific work at the start of task t."""

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """Method-specific work at the end of task t."""

    def on_end_last_task(self, t: int, batches: Iterable[Any]) -> None:
        """The end of task t under `end_task(t, batches, last=True)`: no task follows, so what only later tasks use
        may be skipped (NESS skips its statistics pass). Default: `on_end_task`, the full work."""
        self.on_end_task(t, batches)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """Default: every parameter except the heads of other tasks (they would get no gradient anyway)."""
        _, other_heads = head_parameters(self.model, t)
        other = {id(p) for p in other_heads}
        return [p for p in self.model.parameters() if id(p) not in other]

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the model's tensors and the method's bookkeeping."""
        return {
            "method": self.name,
            "tasks_done": self.tasks_done,
            "active_task": self.active_task,
            "final_task": self.final_task,
            "model": self.model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"state was saved by method {state.get('method')!r}, not {self.name!r}")
        self.tasks_done = int(state["tasks_done"])
        self.active_task = state["active_task"]
        self.final_task = state.get("final_task")  # absent from states saved before end_task(..., last=True) existed
        self.model.load_state_dict(state["model"])

    def _check_active(self, t: int, hook: str) -> None:
        if self.active_task != t:
            now = "no task is open" if self.active_task is None else f"task {self.active_task} is open"
            raise TaskOrderError(f"{hook}({t}) called but {now}: call begin_task({t}) first")


_DEFINED_HOOKS = {name: value for name, value in vars(ContinualMethod).items() if callable(value)}
"""ContinualMethod's own hooks as defined above: `overrides` compares against these, so a hook patched onto the base
class later counts as overridden."""


def labelled_batches(batches: Iterable[Any], where: str) -> Iterator[tuple[Tensor, Tensor]]:
    """The (inputs, labels) pairs of an iterable of `(x, y, ...)` batches, checked; methods that need the labels
    (a Fisher, a replay memory) read the task's data through this."""
    seen = False
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{where}: this method needs (inputs, labels) batches, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{where}: a batch must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(
                f"{where}: labels must be a 1-D integer tensor with one entry per input, got shape "
                f"{tuple(y.shape)} ({y.dtype}) for {x.shape[0]} inputs"
            )
        if not all_finite(x):
            raise ValueError(f"{where}: a batch of inputs holds NaN or Inf; clean the data before training")
        seen = True
        yield x, y
    if not seen:
        raise ValueError(f"{where}: the task's loader yielded no batches; pass the task's training data")


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Undo on exit any change a train-mode forward makes to the model's buffers (BatchNorm running statistics),
    so a pass that only reads gradients leaves the model as it found it."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
