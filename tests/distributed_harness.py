"""Helpers for tests/test_distributed.py, run as a script under torchrun or spawned by the tests.

`python -m torch.distributed.run ... distributed_harness.py kill RANK STEP ARGS...` runs `ness ARGS...` on every
rank, except that rank RANK SIGKILLs itself before its STEP-th training step (counted from the start of the
process), as `kill -9` would: no `finally`, `atexit` or buffered write runs.

`gradient_worker(rank, world, init_file, out)` is the body of one of the processes the gradient-weighting test
spawns: it trains nothing, only checks GradientAverager against an explicit single-process gradient.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def kill_at_step(rank: int, step: int) -> None:
    """Make this process SIGKILL itself before its `step`-th training step when it is rank `rank`."""
    if int(os.environ["RANK"]) != rank:
        return
    import ness.trainer as trainer

    original, count = trainer.StepProgress, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    trainer.StepProgress = counted


class TwoHeads(nn.Module):
    """A trunk and one head per task; each row goes through its own task's head (as joint training does)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])

    def loss(self, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        total = sum(
            F.cross_entropy(head(features[tasks == i]), y[tasks == i], reduction="sum")
            for i, head in enumerate(self.heads)
            if (tasks == i).any()
        )
        return total / x.shape[0]


def global_gradients(model: TwoHeads, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor, passes: int) -> list:
    """The single-process reference: `passes` backward passes of the mean loss over the whole batch, accumulated
    (None for a parameter no row reaches)."""
    model.zero_grad(set_to_none=True)
    for _ in range(passes):
        model.loss(x, y, tasks).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def gradient_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Check, on every rank, that the averaged gradient of each shard's mean loss equals the single-process
    gradient of the global batch's mean loss, for unequal shards (3 rows on 2 ranks), an empty shard (1 row on 2
    ranks: rank 1 gets a zero-weighted placeholder), two accumulated backward passes in one step, and a head that
    only one rank's rows reach (rows 1 and 3 of task 1 all go to rank 1) or none does. Writes the largest
    difference."""
    from ness import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TwoHeads().double()
        worst = 0.0
        for tasks, passes in (([0, 0, 0], 1), ([0], 1), ([0, 1, 0, 1, 0, 0, 0], 2), ([0, 1, 0, 1], 1)):
            tasks = torch.tensor(tasks)
            x = torch.randn(tasks.numel(), 5, dtype=torch.float64)
            y = torch.randint(0, 3, (tasks.numel(),))
            expected = global_gradients(model, x, y, tasks, passes)
            part = distributed.shard(x, y, tasks)
            model.zero_grad(set_to_none=True)
            with distributed.GradientAverager(model.parameters()), distributed.training_step(model, part, (0,)):
                for _ in range(passes):
                    model.loss(part.x, part.y, part.tasks).backward()
            for p, g in zip(model.parameters(), expected, strict=True):
                # No rank's rows reach head 1 in the 1-row batch: its .grad stays None, as in one process.
                assert (p.grad is None) == (g is None)
                if g is not None:
                    assert torch.isfinite(p.grad).all()
                    worst = max(worst, float((p.grad - g).abs().max()))
        with open(f"{out}.{rank}", "w") as f:
            f.write(repr(worst))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] != "kill":
        raise SystemExit(f"usage: {sys.argv[0]} kill RANK STEP ARGS...")
    kill_at_step(int(sys.argv[2]), int(sys.argv[3]))
    from ness.cli import main

    sys.exit(main(sys.argv[4:]))
