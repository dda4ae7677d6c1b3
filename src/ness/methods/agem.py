"""A-GEM: averaged gradient episodic memory (Chaudhry et al., ICLR 2019), METHODS_SPEC §10.

A few examples of every finished task are kept. At each step, g is the current task's gradient and g_ref the
gradient of the mean loss on a batch drawn from the memories; when they conflict (g·g_ref < 0), g loses its
component along g_ref, g ← g − (g·g_ref/‖g_ref‖²)·g_ref, so to first order the step does not raise the memory loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.methods.base import ContinualMethod, Forward, buffers_kept, labelled_batches, register
from ness.models import call_model
from ness.subspace import largest_keys
from ness.validation import Rule, Validated, count, integer


@dataclass(frozen=True)
class AGEMConfig(Validated):
    """A-GEM settings; memory_batch_size is the official 256 (METHODS_SPEC §10)."""

    memory_per_task: int = 200
    """Examples kept from each finished task (all of them when the task has fewer)."""
    memory_batch_size: int = 256
    """Memory examples drawn, without replacement, for each reference gradient (all when the memory is smaller)."""
    seed: int = 0
    """Seed of the choice of stored examples and of the memory batches."""

    RULES: ClassVar[dict[str, Rule]] = {
        "memory_per_task": count(fix="use the finetune method for no memory"),
        "memory_batch_size": count(fix="the official value is 256"),
        "seed": integer(at_least=0),
    }


@register
class AGEM(ContinualMethod):
    """A-GEM over the flattened gradient of all trainable parameters.

    These are the base class's: everything but the other tasks' heads. The official code projects the whole
    model's vector, old heads included; here old heads stay frozen, as in every other method of the library.
    """

    name = "agem"
    config_class = AGEMConfig
    distributed_ok = False
    distributed_reason = (
        "its step takes the memory's gradient with torch.autograd.grad, a second pass the gradient averaging "
        "would treat as a training pass"
    )

    def __init__(self, model: nn.Module, config: AGEMConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        # The union of the finished tasks' memories, on the CPU: inputs as the model takes them (float32),
        # labels, and the task each example belongs to.
        self.memory_inputs: Tensor | None = None
        self.memory_labels = torch.empty(0, dtype=torch.int64)
        self.memory_tasks = torch.empty(0, dtype=torch.int64)
        self._selection = torch.Generator().manual_seed(self.config.seed)  # which examples are stored
        self._sampling = torch.Generator().manual_seed(self.config.seed + 1)  # which are replayed per step
        self._evaluations = 0  # reference gradients computed in the current task
        self._projections = 0  # ... of which conflicted with g and were projected out
        self.records: list[dict[str, Any]] = []

    # -- hooks -----------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        self._evaluations = self._projections = 0

    def after_backward(self, t: int) -> None:
        """Project the gradient in .grad when it conflicts with the memories' gradient (tasks t ≥ 1).

        Under SAM this runs once per gradient evaluation (at w and at w + e), each with its own memory batch.
        """
        self._check_active(t, "after_backward")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.memory_inputs is None or not params:
            return
        reference = self.reference_gradient(params)
        self._evaluations += 1
        # g·g_ref and ‖g_ref‖² over the flattened vector, in float64; parameters the memory loss does not reach
        # have g_ref = 0 and parameters without .grad have g = 0, so both drop out of the sums.
        dot = torch.zeros((), dtype=torch.float64, device=params[0].device)
        norm2 = torch.zeros_like(dot)
        for p, r in zip(params, reference, strict=True):
            if r is None:
                continue
            norm2 += (r.double() ** 2).sum()
            if p.grad is not None:
                dot += (p.grad.double() * r.double()).sum()
        if not dot < 0:  # no conflict (or a NaN, which the trainer's loss check reports): g stays as it is
            return
        self._projections += 1
        # g ← g − (g·g_ref/‖g_ref‖²)·g_ref, parameter by parameter; afterwards g·g_ref = 0.
        coefficient = float(dot / norm2)
        with torch.no_grad():
            for p, r in zip(params, reference, strict=True):
                if r is None:  # g_ref = 0 here: g keeps its value
                    continue
                if p.grad is None:
                    p.grad = -coefficient * r
                else:
                    p.grad.sub_(coefficient * r)

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """Keep `memory_per_task` examples of task t, a uniform sample without replacement over its batches."""
        k = self.config.memory_per_task
        keys = torch.empty(0, dtype=torch.float64)
        inputs: Tensor | None = None
        labels = torch.empty(0, dtype=torch.int64)
        # Reservoir by random priorities: every example gets an independent uniform key and the k largest keys
        # win, which makes every k-subset equally likely. The overall top k lies within each batch's own top k,
        # so only those examples leave the device.
        for x, y in labelled_batches(batches, f"end_task({t})"):
            batch_keys = torch.rand(y.shape[0], generator=self._selection, dtype=torch.float64)
            batch_keys, x_top, y_top = largest_keys(batch_keys, k, x, y)
            keys = torch.cat([keys, batch_keys])
            x_top = x_top.detach().to("cpu", torch.float32)
            inputs = x_top if inputs is None else torch.cat([inputs, x_top])
            labels = torch.cat([labels, y_top.detach().to("cpu", torch.int64)])
            keys, inputs, labels = largest_keys(keys, k, inputs, labels)
        assert inputs is not None  # labelled_batches raises on an empty task
        tasks = torch.full_like(labels, t)
        self.memory_inputs = inputs if self.memory_inputs is None else torch.cat([self.memory_inputs, inputs])
        self.memory_labels = torch.cat([self.memory_labels, labels])
        self.memory_tasks = torch.cat([self.memory_tasks, tasks])
        self.records.append(
            {
                "task": t,
                "stored": labels.numel(),
                "memory_size": self.memory_labels.numel(),
                "reference_gradients": self._evaluations,
                "projected": self._projections,
                "projection_rate": self._projections / self._evaluations if self._evaluations else None,
            }
        )

    # -- the reference gradient ------------------------------------------------------------------------
    def reference_gradient(self, params: list[nn.Parameter]) -> list[Tensor | None]:
        """g_ref per parameter (None where the memory loss does not reach it) for a fresh memory batch.

        The loss is the mean cross-entropy over the batch, each example through its own task's head: per-task
        sums of CE divided by the batch size. Each task's examples are one forward pass, so a batch-statistics
        BatchNorm normalises them among themselves (the official code passes the whole batch at once). The model
        stays in its training mode, as in the official code; its buffers and .grad are left untouched.
        """
        assert self.memory_inputs is not None
        total = self.memory_labels.numel()
        chosen = torch.randperm(total, generator=self._sampling)[: min(self.config.memory_batch_size, total)]
        device = params[0].device
        with torch.enable_grad(), buffers_kept(self.model):
            loss = torch.zeros((), device=device)
            for task in self.memory_tasks[chosen].unique().tolist():
                rows = chosen[self.memory_tasks[chosen] == task]
                logits = self.forward(self.model, self.memory_inputs[rows].to(device), task)
                loss = loss + F.cross_entropy(logits, self.memory_labels[rows].to(device), reduction="sum")
            loss = loss / chosen.numel()
            if not loss.requires_grad:  # no trainable parameter lies on the memories' path
                return [None] * len(params)
            return list(torch.autograd.grad(loss, params, allow_unused=True))

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per task: examples stored from it, the memory's total size after it, and how many of the task's
        reference gradients conflicted with g (projection_rate = projected / reference_gradients)."""
        return [dict(r) for r in self.records]

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            config=asdict(self.config),
            memory_inputs=self.memory_inputs,
            memory_labels=self.memory_labels,
            memory_tasks=self.memory_tasks,
            selection_generator=self._selection.get_state(),
            sampling_generator=self._sampling.get_state(),
            counters=(self._evaluations, self._projections),
            records=self.diagnostics(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") != asdict(self.config):
            raise ValueError(f"saved AGEMConfig {state.get('config')} differs from this one {asdict(self.config)}")
        super().load_state_dict(state)
        self.memory_inputs = state["memory_inputs"]
        self.memory_labels = state["memory_labels"]
        self.memory_tasks = state["memory_tasks"]
        self._selection.set_state(state["selection_generator"])
        self._sampling.set_state(state["sampling_generator"])
        self._evaluations, self._projections = state["counters"]
        self.records = list(state["records"])
