"""BatchNorm state as a value: read it, put it back, keep one per task.

NESS protects earlier tasks through the null spaces of Linear/Conv inputs; a BatchNorm layer between them changes
those inputs when its affine parameters or running statistics move. These helpers let a method freeze them or keep
one copy per task.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

BatchNormState = dict[str, dict[str, Tensor]]


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of `model` (1d/2d/3d, SyncBatchNorm), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def batchnorm_state(model: nn.Module) -> BatchNormState:
    """Copies of each BatchNorm layer's affine parameters and running statistics (the tensors it has)."""
    return {
        name: {
            key: value.detach().clone()
            for key, value in (*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False))
        }
        for name, layer in batchnorm_layers(model).items()
    }


@torch.no_grad()
def load_batchnorm_state(model: nn.Module, state: BatchNormState) -> None:
    """Write a `batchnorm_state` back into the model's own tensors (in place, so optimisers keep their references)."""
    layers = batchnorm_layers(model)
    if set(state) != set(layers):
        raise ValueError(f"BatchNorm state for layers {sorted(state)} does not fit the model's {sorted(layers)}")
    for name, tensors in state.items():
        own = dict((*layers[name].named_parameters(recurse=False), *layers[name].named_buffers(recurse=False)))
        for key, value in tensors.items():
            own[key].copy_(value)


def freeze_running_statistics(model: nn.Module) -> dict[str, float | None]:
    """Set momentum 0 on every BatchNorm that tracks running statistics, so a train-mode forward leaves them as they
    are (running ← (1 − 0)·running + 0·batch); returns the momenta it replaced, for `restore_momenta`."""
    replaced = {}
    for name, layer in batchnorm_layers(model).items():
        if layer.track_running_stats:
            replaced[name] = layer.momentum
            layer.momentum = 0.0
    return replaced


def restore_momenta(model: nn.Module, momenta: dict[str, float | None]) -> None:
    """Put back the momenta `freeze_running_statistics` replaced."""
    layers = batchnorm_layers(model)
    for name, momentum in momenta.items():
        layers[name].momentum = momentum


@contextmanager
def batchnorm_kept(model: nn.Module) -> Iterator[None]:
    """Undo on exit every change to the model's BatchNorm tensors (running statistics a train-mode forward moved)."""
    saved = batchnorm_state(model)
    try:
        yield
    finally:
        load_batchnorm_state(model, saved)


@contextmanager
def batchnorm_swapped(model: nn.Module, state: BatchNormState) -> Iterator[None]:
    """Inside the block the model's BatchNorm layers hold `state`; on exit their own values come back."""
    with batchnorm_kept(model):
        load_batchnorm_state(model, state)
        yield
