"""What a user's own training loop gets from NESS in the traps of issue 13, on real data (scikit-learn's 8×8 digits,
5 tasks of 2 digits, a 64-100-100 MLP; 20 epochs of SGD, lr 0.05, momentum 0.9, batch 16, per task).

Each scenario prints ACC/BWT and R[t][t] (how well each task learnt), or the error NESS raised. Run it against two
versions of the library (PYTHONPATH=old/src, then this one) to compare what changed:

    python benchmarks/user_loop_traps.py

Scenarios: own heads in a ModuleList `heads` with exclude=['heads.*'] / modules_to_save=['heads'] / declared as
`task_heads`; one shared classifier with global labels, excluded / adapted; an optimiser made once before task 0
(with and without trainable_parameters); certified stability (ε = 1e-3) in a loop that never calls after_step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from ness import NESS, NESSConfig
from ness.metrics import average_accuracy, backward_transfer

TASKS, EPOCHS, LR, BATCH = 5, 20, 0.05, 16


def digit_tasks() -> list[dict[str, torch.Tensor]]:
    """Digits 2t and 2t+1 per task, a fixed 75/25 train/test split; labels global (2t, 2t+1)."""
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    tasks = []
    for t in range(TASKS):
        keep = (y == 2 * t) | (y == 2 * t + 1)
        xt, yt = x[keep], y[keep]
        cut = int(0.75 * len(yt))
        tasks.append({"x": xt[:cut], "y": yt[:cut], "x_test": xt[cut:], "y_test": yt[cut:]})
    return tasks


class HeadsNet(nn.Module):
    """64-100-100 MLP with a BatchNorm; per-task 2-way heads in a ModuleList named `heads_name`."""

    def __init__(self, heads_name: str) -> None:
        super().__init__()
        self.heads_name = heads_name
        self.features = nn.Sequential(
            nn.Linear(64, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU()
        )
        setattr(self, heads_name, nn.ModuleList(nn.Linear(100, 2) for _ in range(TASKS)))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return getattr(self, self.heads_name)[task](self.features(x))


class SharedNet(nn.Module):
    """The same MLP with one classifier over all 10 digits (global labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(64, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU()
        )
        self.classifier = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.classifier(self.features(x))


def local(model: nn.Module, t: int, y: torch.Tensor) -> torch.Tensor:
    """Labels as the model's outputs for task t expect them: task-local for per-task heads, global otherwise."""
    return y - 2 * t if isinstance(model, HeadsNet) else y


def run(
    build: Callable[[], nn.Module],
    config: NESSConfig | None,
    optimizer_for: Callable[[NESS, int], torch.optim.Optimizer],
    after_step: bool = True,
) -> str:
    """Train the 5 tasks with NESS in a plain loop; the accuracy matrix's ACC/BWT, or the error raised."""
    if config is None:
        return "not available in this version"
    torch.manual_seed(1)
    model = build()
    tasks = digit_tasks()
    method = NESS(model, config, forward=lambda m, x, t: m(x, t))
    acc = [[0.0] * TASKS for _ in range(TASKS)]
    x0 = tasks[0]["x"]
    first_before, shift = None, math.nan
    try:
        for t, task in enumerate(tasks):
            method.begin_task(t)
            optimizer = optimizer_for(method, t)
            model.train()
            g = torch.Generator().manual_seed(t)
            for _ in range(EPOCHS):
                for rows in torch.randperm(len(task["y"]), generator=g).split(BATCH):
                    if len(rows) < 2:
                        continue
                    loss = F.cross_entropy(model(task["x"][rows], t), local(model, t, task["y"][rows]))
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if after_step:
                        method.after_step(t)
            if t == 1:
                first = model.features[0]
                first_before = (first.base if hasattr(first, "base") else first).weight.detach().clone()
            method.end_task(t, [(task["x"][i : i + 64], task["y"][i : i + 64]) for i in range(0, len(task["y"]), 64)])
            if t == 1 and first_before is not None:
                delta = (model.features[0].weight - first_before).detach().double()
                shift = float(((x0.double() @ delta.T).norm(dim=1) ** 2).max())
            model.eval()
            with torch.no_grad():
                for j in range(t + 1):
                    logits = model(tasks[j]["x_test"], j)
                    if not isinstance(model, HeadsNet):  # task-incremental: the argmax over the task's two digits
                        logits = logits[:, 2 * j : 2 * j + 2]
                    acc[t][j] = 100 * float((logits.argmax(1) == tasks[j]["y_test"] - 2 * j).float().mean())
    except Exception as err:
        return f"{type(err).__name__} at task {t}: {str(err)[:200]}"
    v_norm = max((r.get("v_spectral_norm") or 0.0) for r in method.diagnostics()) if method.diagnostics() else math.nan
    diagonal = " ".join(f"{acc[t][t]:.0f}" for t in range(TASKS))
    return (
        f"ACC {average_accuracy(acc):.1f} BWT {backward_transfer(acc):.1f}; R[t][t] {diagonal}; task 0 after 4: "
        f"{acc[-1][0]:.1f}; max ‖V‖₂ {v_norm:.3g}; first layer's task-1 shift on task-0 inputs {shift:.3g}"
    )


def fresh_optimizer(method: NESS, t: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(method.trainable_parameters(t), lr=LR, momentum=0.9)


def with_own_head(method: NESS, t: int) -> torch.optim.Optimizer:
    """The user passes the task's head by hand besides NESS's parameters."""
    params = method.trainable_parameters(t) + list(method.model.heads[t].parameters())
    return torch.optim.SGD(list({id(p): p for p in params}.values()), lr=LR, momentum=0.9)


def once_before_task0(call_trainable_parameters: bool) -> Callable[[NESS, int], torch.optim.Optimizer]:
    made: dict[str, torch.optim.Optimizer] = {}

    def optimizer_for(method: NESS, t: int) -> torch.optim.Optimizer:
        if call_trainable_parameters:
            method.trainable_parameters(t)
        if "sgd" not in made:
            made["sgd"] = torch.optim.SGD(method.model.parameters(), lr=LR, momentum=0.9)
        return made["sgd"]

    return optimizer_for


def config(**kw) -> NESSConfig | None:
    error: TypeError | None = None
    # transfer_rank=0: the setting issue 13 measured (transfer adapters came with issue 14; older versions lack it)
    for extra in ({"transfer_rank": 0}, {}):
        try:
            return NESSConfig(eps1=0.05, **extra, **kw)
        except TypeError as err:  # an option this version of the library does not have
            error = err
    print(f"  (not in this version: {error})")
    return None


def own_heads() -> nn.Module:
    return HeadsNet("heads")


def declared_heads() -> nn.Module:
    return HeadsNet("task_heads")


SCENARIOS = {
    "1. own heads `heads`, exclude=['heads.*'], heads passed by hand": lambda: run(
        own_heads, config(exclude=["heads.*"]), with_own_head
    ),
    "1. own heads `heads`, modules_to_save=['heads']": lambda: run(
        own_heads, config(modules_to_save=["heads"]), fresh_optimizer
    ),
    "1. the same heads declared as `task_heads`": lambda: run(declared_heads, config(), fresh_optimizer),
    "1. shared classifier, exclude=['classifier'] (the old README)": lambda: run(
        SharedNet, config(exclude=["classifier"]), fresh_optimizer
    ),
    "1. shared classifier, adapted (the README now)": lambda: run(SharedNet, config(), fresh_optimizer),
    "2. optimiser made once before task 0, trainable_parameters called": lambda: run(
        declared_heads, config(), once_before_task0(True)
    ),
    "2. optimiser made once before task 0, trainable_parameters never called": lambda: run(
        declared_heads, config(), once_before_task0(False)
    ),
    "6. max_output_shift=1e-3, after_step never called": lambda: run(
        declared_heads, config(max_output_shift=1e-3), fresh_optimizer, after_step=False
    ),
    "6. max_output_shift=1e-3, after_step after every step": lambda: run(
        declared_heads, config(max_output_shift=1e-3), fresh_optimizer
    ),
}

if __name__ == "__main__":
    for name, scenario in SCENARIOS.items():
        print(f"{name}:\n  {scenario()}", flush=True)
