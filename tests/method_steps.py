"""Steps the method tests share: a few plain SGD steps through a method's hooks, and a tensor split into batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ness.models import call_model


def train(method, model, t, x, y, steps=5, lr=0.1):
    """`steps` SGD steps on (x, y) for task t: the method picks the parameters and acts after each backward."""
    optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(call_model(model, x, t), y).backward()
        method.after_backward(t)
        optimizer.step()


def batches(x, y, size):
    """(x, y) in consecutive batches of `size` (the last may be smaller), as a trainer would pass to end_task."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]
