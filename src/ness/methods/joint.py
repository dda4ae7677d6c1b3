"""Joint training: task t trains on the data of tasks 0..t together (the usual upper bound of the comparison).

After the last task the model has seen every task's data at once, each example through its own task's head, which
is the multitask reference of the GPM-family tables. Earlier rows of the accuracy matrix are the joint models of
the first t+1 tasks, so ACC is the upper bound and BWT shows what a shared network loses or gains as tasks join.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ness.methods.base import ContinualMethod, register
from ness.models import task_heads
from ness.validation import Validated


@dataclass(frozen=True)
class JointConfig(Validated):
    """Joint training has no settings of its own; the optimiser and schedule come from the training config."""


@register
class Joint(ContinualMethod):
    """Cumulative joint training: the model continues from the previous task's weights on the union of tasks 0..t.

    Each step's batch mixes the tasks in proportion to their sizes; the validation loss of the lr schedule is the
    mean over all their validation examples. It keeps every task's data, so it is a reference, not a method."""

    name = "joint"
    config_class = JointConfig
    distributed_ok = True

    def data_tasks(self, t: int) -> tuple[int, ...]:
        return tuple(range(t + 1))

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """Every parameter except the heads of tasks not seen yet."""
        heads = task_heads(self.model)
        later = set() if heads is None else {id(p) for head in heads[t + 1 :] for p in head.parameters()}
        return [p for p in self.model.parameters() if id(p) not in later]
