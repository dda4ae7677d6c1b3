"""Helpers for tests/test_distributed.py, run as a script under torchrun or spawned by the tests.

`python -m torch.distributed.run ... distributed_harness.py kill RANK STEP ARGS...` runs `ness ARGS...` on every
rank, except that rank RANK SIGKILLs itself before its STEP-th training step (counted from the start of the
process), as `kill -9` would: no `finally`, `atexit` or buffered write runs.

`gradient_worker(rank, world, init_file, out)` is the body of one of the processes the gradient-weighting test
spawns: it trains nothing, only checks `ness.distributed.DataParallel`'s steps against an explicit single-process
gradient. `trainer_worker` runs the trainer and counts what torch's DistributedDataParallel did.
"""

from __future__ import annotations

import gc
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

    original, count = trainer.epoch_batches, [0]

    def counted(*args, **kwargs):  # each training batch the trainer draws: one step
        for batch in original(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    trainer.epoch_batches = counted


def two_heads() -> nn.Module:
    """A trunk and one head per task, in float64; joint training sends each row through its own task's head."""
    from ness.models import MultiHeadNet

    torch.manual_seed(0)
    return MultiHeadNet(nn.Sequential(nn.Linear(5, 4), nn.Tanh()), 4, [3, 3], head_bias=True).double()


def global_gradients(method, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor, passes: int) -> list:
    """The single-process reference: `passes` backward passes of the mean loss over the whole batch, accumulated
    (None for a parameter no row reaches)."""
    method.model.zero_grad(set_to_none=True)
    for _ in range(passes):
        method.training_loss(0, x, y, tasks).backward()
    return [None if p.grad is None else p.grad.clone() for p in method.model.parameters()]


def gradient_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Check, on every rank, that the gradient a DataParallel step leaves from each shard's mean loss equals the
    single-process gradient of the global batch's mean loss, for unequal shards (3 rows on 2 ranks), an empty shard
    (1 row on 2 ranks: rank 1 gets a zero-weighted placeholder), two accumulated backward passes in one step, and a
    head that only one rank's rows reach (rows 1 and 3 of task 1 all go to rank 1) or none does, and a step with
    the trunk frozen between others that train it (DDP must wrap anew each time what trains changes). The loss is
    joint training's (each row through its own head, the heads applied outside the model's forward). A step that
    computes its loss without training_loss must raise. Writes the largest difference."""
    from ness import distributed
    from ness.methods import FineTune

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method = FineTune(two_heads())
        params = list(method.model.parameters())
        trunk = list(method.model.backbone.parameters())
        cases = []
        for tasks, passes, frozen in (
            ([0, 0, 0], 1, False),
            ([0], 1, False),
            ([0, 1, 0, 1, 0, 0, 0], 2, False),
            ([0, 1, 0, 1], 1, True),
            ([0, 1, 1], 1, False),
        ):
            tasks = torch.tensor(tasks)
            x = torch.randn(tasks.numel(), 5, dtype=torch.float64)
            y = torch.randint(0, 3, (tasks.numel(),))
            for p in trunk:
                p.requires_grad_(not frozen)
            cases.append((x, y, tasks, passes, frozen, global_gradients(method, x, y, tasks, passes)))
        # The references first: DDP counts a backward pass outside its forward as one of several it will average
        # together (its no_sync), so one between its steps would mark head 1 used on every rank.
        worst = 0.0
        with distributed.DataParallel(method, params) as data_parallel:
            wrapped, was_frozen = None, False
            for x, y, tasks, passes, frozen, expected in cases:
                for p in trunk:
                    p.requires_grad_(not frozen)
                part = distributed.shard(x, y, tasks)
                method.model.zero_grad(set_to_none=True)
                with data_parallel.step(part, (0,)):
                    for _ in range(passes):
                        method.training_loss(0, part.x, part.y, part.tasks).backward()
                assert (data_parallel.ddp is wrapped) == (wrapped is not None and frozen == was_frozen)
                wrapped, was_frozen = data_parallel.ddp, frozen
                for p, g in zip(params, expected, strict=True):
                    # No rank's rows reach head 1 in the 1-row batch: its .grad stays None, as in one process.
                    assert (p.grad is None) == (g is None)
                    if g is not None:
                        assert torch.isfinite(p.grad).all()
                        worst = max(worst, float((p.grad - g).abs().max()))
            # A step that calls the model itself bypasses DDP, which then averages nothing: an error on every rank.
            x, y, tasks, *_ = cases[0]
            part = distributed.shard(x, y, tasks)
            try:
                with data_parallel.step(part, (1,)):
                    F.cross_entropy(method.predict(part.x, 0), part.y).backward()
            except RuntimeError as err:
                assert "FineTune.training_step computed no loss with training_loss" in str(err), err
            else:
                raise AssertionError("a step without training_loss went through")
        with open(f"{out}.{rank}", "w") as f:
            f.write(repr(worst))
    finally:
        gc.collect()  # as ness.distributed.process_group: DDP wrappers freed while the group they hold exists
        dist.destroy_process_group()


def compiled_trainer_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """`trainer_worker` with TrainConfig.compile on aot_eager, also counting the compiled graphs' runs."""
    trainer_worker(rank, world, init_file, out, compiled=True)


def trainer_worker(rank: int, world: int, init_file: str, out: str, compiled: bool = False) -> None:
    """Run `ness.trainer.run_continual` with joint training (2 tasks of 11 rows, batch 4: last batches of 3 and 2
    rows; task 1 mixes both tasks' rows in each batch) on every rank, counting the forward passes of torch's
    DistributedDataParallel and the gradient buckets its reducer hands to a communication hook. Writes (steps, DDP
    forwards, buckets reduced, the largest difference of the trained weights from rank 0's; with `compiled`, the
    runs of the graphs torch.compile made of the training loss) as JSON."""
    import json

    from torch._dynamo import register_backend
    from torch._dynamo.backends.debugging import aot_eager
    from torch.nn.parallel import DistributedDataParallel

    from ness.data import Benchmark, Split, Task
    from ness.methods import Joint
    from ness.trainer import TrainConfig, run_continual

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counts = {"steps": 0, "forwards": 0, "buckets": 0, "graph_runs": 0}

        @register_backend(name="harness_counting")
        def counting_backend(graph, example_inputs):
            compiled_graph = aot_eager(graph, example_inputs)

            def run(*args):
                counts["graph_runs"] += 1
                return compiled_graph(*args)

            return run

        forward, register = DistributedDataParallel.forward, DistributedDataParallel.register_comm_hook

        def counted_forward(self, *args, **kwargs):
            counts["forwards"] += 1
            return forward(self, *args, **kwargs)

        def counted_register(self, state, hook):
            def counted_hook(state, bucket):
                counts["buckets"] += 1
                return hook(state, bucket)

            return register(self, state, counted_hook)

        DistributedDataParallel.forward = counted_forward
        DistributedDataParallel.register_comm_hook = counted_register
        method = Joint(two_heads())
        original_step = method.training_step

        def counted_step(*args, **kwargs):
            counts["steps"] += 1
            return original_step(*args, **kwargs)

        method.training_step = counted_step
        g = torch.Generator().manual_seed(1)

        def task(name: str) -> Task:
            splits = [Split(torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)) for _ in "tvs"]
            return Task(name, 3, *splits, lambda x: x.double())

        benchmark = Benchmark("tiny", (task("a"), task("b")), (5,), shared_head=False, details={})
        config = TrainConfig(
            epochs=2, batch_size=4, lr=0.1, lr_schedule=False, compile=compiled, compile_backend="harness_counting"
        )
        run_continual(method.model, method, benchmark, config, seed=1, progress=False)
        weights = torch.cat([p.detach().reshape(-1) for p in method.model.parameters()])
        reference = weights.clone()
        dist.broadcast(reference, src=0)
        counts["worst"] = float((weights - reference).abs().max())
        with open(f"{out}.{rank}", "w") as f:
            json.dump(counts, f)
    finally:
        gc.collect()  # as ness.distributed.process_group: DDP wrappers freed while the group they hold exists
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] != "kill":
        raise SystemExit(f"usage: {sys.argv[0]} kill RANK STEP ARGS...")
    kill_at_step(int(sys.argv[2]), int(sys.argv[3]))
    from ness.cli import main

    sys.exit(main(sys.argv[4:]))
