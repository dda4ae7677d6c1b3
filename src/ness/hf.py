"""Continual fine-tuning with Hugging Face's `transformers.Trainer`: a task after another, NESS's hooks in their places.

`train_task(trainer, method, t)` trains task t through the Trainer: the method's bases are built (`begin_task`) and
what it trains is set before the Trainer makes its optimiser; `after_backward` runs once the gradients of an
optimiser step are accumulated (after the Trainer's clipping) and `after_step` (NESS's certified stability) after
every optimiser step, through a `TrainerCallback`; the end-of-task statistics read the task's training set through
the Trainer's own collator, whose attention mask keeps padding out of them (`ness.batches`). Needs the `hf` extra:
`pip install "ness-cl[hf]"`. Nothing in the rest of the package imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from ness import distributed
from ness.methods.base import ContinualMethod

_TRAINER_DRIVES = ("training_loss", "training_step", "begin_step")
TASK_FILE = "ness_task.json"
"""Written into each Trainer checkpoint of a task: which task it belongs to, checked when a task resumes from it."""
"""Hooks through which a method changes the loss or the step itself: the Trainer computes its own, so such a method
needs ness's trainer or an own loop."""


class ContinualCallback(TrainerCallback):
    """The method's step hooks at the Trainer's matching events: `after_backward(t)` before each optimiser step
    (the gradients accumulated over `gradient_accumulation_steps` micro-batches, and clipped), `after_step(t)`
    after it."""

    def __init__(self, method: ContinualMethod, t: int) -> None:
        self.method, self.task = method, t

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.method.after_backward(self.task)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.method.after_step(self.task)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            (checkpoint / TASK_FILE).write_text(json.dumps({"task": self.task, "tasks_done": self.method.tasks_done}))


def checkpoint_task(checkpoint: str | Path) -> int | None:
    """The task a Trainer checkpoint was saved in by `train_task`, or None for a checkpoint it did not write."""
    marker = Path(checkpoint) / TASK_FILE
    return json.loads(marker.read_text())["task"] if marker.is_file() else None


def check_trainer_method(method: ContinualMethod) -> None:
    """Raise when `method` cannot train through the Trainer: it changes the loss or the step, which the Trainer
    computes itself (HAT, OWM, DFGP, FS-DGPM), or its task hooks do not read mapping batches (`mapping_batches`)."""
    own = [hook for hook in _TRAINER_DRIVES if getattr(type(method), hook) is not getattr(ContinualMethod, hook)]
    if own:
        raise TypeError(
            f"{method.name} overrides {', '.join(own)}: it changes the loss or the optimiser step, which "
            "transformers.Trainer computes itself. Train it with ness's trainer (ness.trainer.run_continual) or an "
            "own loop"
        )
    if not method.mapping_batches:
        raise TypeError(
            f"{method.name} reads (inputs, labels) tensor batches at its task boundaries, not the Trainer's mapping "
            "batches (input_ids, attention_mask, ...); through the Trainer go NESS, l2 and finetune. Train it with "
            "ness's trainer (ness.trainer.run_continual) or an own loop"
        )


def train_task(
    trainer: Trainer,
    method: ContinualMethod,
    t: int,
    train_dataset: Dataset | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> TrainOutput:
    """Train task t (0, 1, ... in order) of `method` through `trainer` on `train_dataset` (default: the trainer's),
    then close the task with its statistics. `resume_from_checkpoint` continues an interrupted task from one of
    the Trainer's checkpoints: load the method's state after task t-1 first (e.g. `NESS.load_adapters`), so that
    task t's bases, which this call builds again, are the ones the checkpoint was trained with.

    The Trainer must make its own optimiser (no `optimizers=` at construction): it is made in `trainer.train()`,
    after the bases, over the parameters the method trains in task t, and dropped after the task."""
    check_trainer_method(method)
    if distributed.world_size() > 1 or trainer.args.world_size > 1:
        raise RuntimeError(
            f"train_task({t}): the Trainer runs on {trainer.args.world_size} processes; ness.hf trains in one process "
            "for now (its statistics pass would read a loader the Trainer already splits between the ranks). Train "
            "data-parallel with ness's trainer under torchrun (`torchrun ... -m ness run`)"
        )
    if trainer.optimizer is not None:
        raise ValueError(
            f"train_task({t}): the trainer already holds an optimiser, made before task {t}'s adapters existed, so "
            "it would not train them; build the Trainer without `optimizers=` and let it make its own (set "
            "`args.optim` and the learning-rate settings in TrainingArguments)"
        )
    if resume_from_checkpoint:
        _check_resumed_task(trainer, resume_from_checkpoint, t)
    dataset = trainer.train_dataset if train_dataset is None else train_dataset
    if dataset is None:
        raise ValueError(f"train_task({t}): no training set; pass train_dataset or build the Trainer with one")
    # The task's training set in order, without shuffling, through the Trainer's collator (padding and mask).
    statistics = trainer.get_eval_dataloader(dataset)
    if method.active_task != t:
        method.begin_task(t, statistics)
    method.trainable_parameters(t)  # requires_grad as the method trains task t: the Trainer's optimiser takes these
    trainer.train_dataset = dataset
    callback = ContinualCallback(method, t)
    trainer.add_callback(callback)
    try:
        output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        trainer.remove_callback(callback)
        trainer.optimizer, trainer.lr_scheduler = None, None  # task t+1 trains other parameters
    with torch.no_grad():
        method.end_task(t, statistics)
    return output


def _check_resumed_task(trainer: Trainer, checkpoint: str | bool, t: int) -> None:
    """Refuse to resume task t from a checkpoint of another task (one output_dir shared by the tasks, where True
    picks its last checkpoint), or from one `train_task` did not write."""
    path = get_last_checkpoint(trainer.args.output_dir) if checkpoint is True else checkpoint
    if path is None or not Path(path).is_dir():
        return  # the Trainer itself says that there is no checkpoint to resume from
    saved = checkpoint_task(path)
    if saved != t:
        found = (
            f"was saved in task {saved}" if saved is not None else f"holds no {TASK_FILE} (train_task did not save it)"
        )
        raise ValueError(
            f"train_task({t}, resume_from_checkpoint={checkpoint!r}): the checkpoint {path} {found}, so it cannot "
            f"continue task {t}: its weights and step belong elsewhere. Give each task its own output_dir and resume "
            f"from one of task {t}'s checkpoints"
        )
