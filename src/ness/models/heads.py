"""Task-incremental heads: a model declares its per-task heads as an nn.ModuleList named `task_heads`.

Methods never adapt or project declared heads, and the trainer calls such a model as `model(x, task)`.
A model without `task_heads` (one output shared by every task, as in Permuted MNIST) is called as `model(x)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Forward = Callable[[nn.Module, Any, int], Tensor]
"""How a method calls the model for task t: `call_model` (heads, mapping batches) or any f(model, x, t)."""


class MultiHeadNet(nn.Module):
    """A backbone producing features, and one linear head per task (`task_heads[t]`)."""

    def __init__(
        self, backbone: nn.Module, feature_dim: int, classes_per_task: Sequence[int], head_bias: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_heads = nn.ModuleList(nn.Linear(feature_dim, n, bias=head_bias) for n in classes_per_task)

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.task_heads[task](self.backbone(x))


def task_heads(model: nn.Module) -> nn.ModuleList | None:
    """The model's declared per-task heads, or None for a single shared output."""
    # a registered submodule sits in `_modules`: read it there, without nn.Module's slow failing attribute lookup
    heads = model._modules.get("task_heads")
    if heads is None and (hasattr(type(model), "task_heads") or "task_heads" in vars(model)):  # a property, say
        heads = model.task_heads
    return heads if isinstance(heads, nn.ModuleList) else None


def call_model(model: nn.Module, x: Tensor | Mapping[str, Any], task: int) -> Tensor:
    """Logits of task `task`: through its own head when the model declares heads. A mapping batch (a Hugging Face
    model's input_ids, attention_mask, ...) is passed as keyword arguments, and an output's `logits` returned."""
    if isinstance(x, Mapping):
        try:
            inspect.signature(model.forward).bind(**x)
        except TypeError as error:
            raise TypeError(
                f"a mapping batch is passed to the model as keyword arguments (a Hugging Face batch), but "
                f"{type(model).__name__}.forward does not take its keys {sorted(x)} ({error}); give tensor or "
                "(inputs, labels) batches, or keys the forward takes"
            ) from None
        out = model(**x)
        return getattr(out, "logits", out)
    heads = task_heads(model)
    if heads is None:
        return model(x)
    if not 0 <= task < len(heads):
        raise IndexError(f"task {task} has no head: the model declares {len(heads)} task heads")
    return model(x, task)


def head_parameters(model: nn.Module, task: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters of head `task`, parameters of every other head); both empty without declared heads."""
    heads = task_heads(model)
    if heads is None:
        return [], []
    own = list(heads[task].parameters())
    own_ids = {id(p) for p in own}
    return own, [p for p in heads.parameters() if id(p) not in own_ids]


def logits_by_task(model: nn.Module, x: Tensor, tasks: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(row indices, logits) per task in `tasks` (one task id per input row), from one forward pass of the whole
    batch, so batch-statistics BatchNorm sees the batch together. Task i's rows go through head i, applied to the
    features the heads receive (the input of the first row's head); every head must take the same features, as
    in MultiHeadNet. A model without declared heads gives one entry for all rows."""
    heads = task_heads(model)
    if heads is None:
        return [(torch.arange(x.shape[0], device=x.device), model(x))]
    captured: list[Tensor] = []
    first = int(tasks[0])
    handle = heads[first].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        call_model(model, x, first)
    finally:
        handle.remove()
    features = captured[0]
    out = []
    for task in tasks.unique().tolist():
        rows = (tasks == task).nonzero().flatten()
        out.append((rows, heads[task](features[rows])))
    return out
