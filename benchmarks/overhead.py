"""The training loop's cost against a bare PyTorch loop, per step, in one process on the same batches.

Permuted MNIST's protocol (GPM): MLP 784-100-100-10 with one shared output, SGD lr 0.01, batch 10. On one epoch of
`--images` training images of task 0 (and task 1 for NESS), it times per step:
  * bare: the data transformed once, then per step index a batch, zero_grad, forward, cross-entropy, backward, SGD
    step: the limit a library loop can reach;
  * trainer, finetune: `ness.trainer.train_task` with fine-tuning in task 0;
  * trainer, ness: `train_task` with NESS in task 1 (its adapters), for the paper's settings (Frobenius ε₁ 0.03, no
    transfer adapter: the old preset) and for NESSConfig's defaults (energy rule, transfer adapters); the paper
    settings also over the protocol's 5 epochs, where what the trainer does once per task weighs as in a real run;
  * own loop, ness: the bare loop on the model with NESS's task-1 adapters (`after_step` after each step);
  * trainer, gpm: GPM's plain step (task 0) and its projected step (task 1) in three forms (`gpm_steps`), the
    chosen one and the plain one also over the protocol's 5 epochs;
  * own loop, adapters at fixed ranks (`RANK_SETS`: the issue's, and those a full default run produces), whose
    step costs N·d·r more multiply-adds per layer than the bare loop's: the floor of the low-rank path;
  * functional floors of the trainer's paths, the least code their arithmetic needs (no modules, hooks or trainer):
    NESS's with the first layer's products made once (timed) at the paper setting's task-1 ranks, over one epoch
    and five (`products_floor_step`), and the same arithmetic over five epochs in one-expression nn.Modules (the
    module floor: what adapters with no checks at all would cost, in a model of modules as the bare loop's is);
    GPM's plain and projected steps, the first layer's rows from the split projected once (`gpm_floor_steps`);
and each one's ratio to the bare loop (GPM's projected rows are to be read against GPM's own plain step). `--whole`
also prints two floors of the issue's whole paper-preset run (`whole_run_floors`): every step at the bare loop's
cost, and tasks 1-9 at the functional floor of that run's ranks; both plus the statistics' matrix products (Σxxᵀ per
layer over each finished task).

`--compile` times instead `train_task` eager against `TrainConfig.compile` (on `--backend`, on `--device`), for
fine-tuning in task 0 and NESS's defaults in task 1: two epochs each, the per-step time from the second epoch (the
first compiles) and the compile time as the first epoch's excess over the second. The compile caches of inductor
start empty (a temporary TORCHINDUCTOR_CACHE_DIR unless one is set): the first repeat compiles from scratch, later
ones may read inductor's on-disk cache, as a later task or run of the same shapes does.

Usage: python benchmarks/overhead.py [--images 20000] [--repeats 3] [--threads 1] [--whole] [--json OUT.json]
       python benchmarks/overhead.py --compile [--backend inductor] [--device cuda] [--images ...] [--repeats ...]
(real MNIST from $NESS_DATA_ROOT; without it, random images of the same shapes)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ness.adapters import NullSpaceAdapter
from ness.data import Benchmark, DataError, Split, Task, build_benchmark
from ness.data.mnist import MNIST_MEAN, MNIST_STD
from ness.data.tasks import PixelTransform
from ness.methods import FineTune
from ness.methods.gpm import GPM, GPMConfig
from ness.methods.ness import NESS, NESSConfig
from ness.models import shared_head_mlp
from ness.subspace import (
    CovarianceSum,
    GradientProjection,
    gradient_projection,
    projection_matrix,
)
from ness.trainer import TrainConfig, train_task

CONFIG = TrainConfig(epochs=1, lr=0.01, batch_size=10, test_batch_size=64, lr_schedule=False)
NESS_SETTINGS = {
    "ness (paper rule: Frobenius ε₁ 0.03, no transfer)": {"eps1": 0.03, "transfer_rank": 0},
    "ness (defaults: energy δ 1e-3, transfer 100)": {},
}


PROTOCOL_EPOCHS_ROW = next(iter(NESS_SETTINGS))
"""The setting also timed over the paper protocol's 5 epochs per task: what the trainer does once per task (the
first layer's products over the split) then weighs per step as in a real run, a fifth of the one-epoch rows'."""


def permuted_tasks(images: int) -> Benchmark:
    """Two Permuted MNIST tasks of `images` training images (real files if found, else random of MNIST's shape)."""
    try:
        return build_benchmark("permuted_mnist", seed=1, num_tasks=2, train_per_task=images, pc_valid=0.1)
    except DataError:  # no MNIST files here: the timing needs only the shapes
        g = torch.Generator().manual_seed(0)
        transform = PixelTransform(255.0, MNIST_MEAN, MNIST_STD)

        def split(n: int) -> Split:
            return Split(torch.randint(0, 256, (n, 784), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,)))

        tasks = tuple(Task(f"random {t}", 10, split(images), split(100), split(100), transform) for t in range(2))
        return Benchmark("permuted_mnist (random pixels)", tasks, (784,), True, {})


def network() -> nn.Module:
    torch.manual_seed(0)
    return shared_head_mlp(784, (100, 100), 10)


def bare_loop(model: nn.Module, params: list[nn.Parameter], task: Task, after_step: Callable[[], None]) -> float:
    """Seconds per step of the plainest loop over task's training images (transformed once, indexed per batch)."""
    x, y = task.transform(task.train.inputs), task.train.labels
    optimizer = torch.optim.SGD(params, lr=CONFIG.lr)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    batches = order.split(CONFIG.batch_size)
    model.train()
    started = time.perf_counter()
    for idx in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        after_step()
    return (time.perf_counter() - started) / len(batches)


def trainer_step(method, t: int, task: Task, epochs: int = 1) -> float:
    """Seconds per step of `epochs` epochs of `train_task` (the method's own hooks, the trainer's bookkeeping, and
    what it does once per task, such as NESS's first-layer products, spread over the steps)."""
    steps = epochs * -(-len(task.train) // CONFIG.batch_size)
    config = dataclasses.replace(CONFIG, epochs=epochs)
    log = train_task(method.model, method, t, task, config, torch.Generator().manual_seed(t), progress=False)
    return log["train_seconds"] / steps


def ness_at_task1(bench: Benchmark, options: dict, device: str = "cpu") -> NESS:
    """NESS after one epoch of task 0, ready to begin task 1 (its adapters are built from task 0's statistics)."""
    model = network().to(device)
    method = NESS(model, NESSConfig(**options))
    method.begin_task(0)
    config = dataclasses.replace(CONFIG, device=device)
    train_task(model, method, 0, bench.tasks[0], config, torch.Generator().manual_seed(0), progress=False)
    task = bench.tasks[0]
    rows = range(0, len(task.train), 64)
    method.end_task(0, [(task.transform(task.train.inputs[i : i + 64]).to(device),) for i in rows])
    return method


ISSUE_RUN_RANKS = "the issue's run's mean over tasks 1-9: 628 / 14 / 55, no transfer"
"""The issue's whole run (Frobenius ε₁ 0.03, transfer_rank 0, seed 2) keeps ranks 696→587 / 47→0 / 69→46 in tasks
1-9 (its results.json); their means."""
RANK_SETS = {
    "the issue's ranks 126/0/10, no transfer": ((126, 0), (0, 0), (10, 0)),
    "a default run's task 1: 316+100 / 6+94 / 15+85": ((316, 100), (6, 94), (15, 85)),
    "a default run's mean over tasks 1-9: 84+100 / 2+98 / 8+92": ((84, 100), (2, 98), (8, 92)),
    ISSUE_RUN_RANKS: ((628, 0), (14, 0), (55, 0)),
}
"""(rank of U, transfer rank) per layer: the ranks a Permuted MNIST paper-preset run produces (results.json)."""


def adapters_at_ranks(ranks: tuple[tuple[int, int], ...]) -> nn.Module:
    """The MLP with a NullSpaceAdapter of the given (r, transfer rank) on each Linear layer, random orthonormal U
    and Ū, and V, A at small random values (the step's cost depends on the shapes only)."""
    model, g = network(), torch.Generator().manual_seed(1)
    for index, (rank, transfer) in zip((0, 2, 4), ranks, strict=True):
        layer = model[index]
        basis = torch.linalg.qr(torch.randn(layer.in_features, rank + transfer, generator=g))[0]
        adapter = NullSpaceAdapter(layer, basis[:, :rank])
        if transfer:
            adapter.add_transfer(basis[:, rank:])
        for p in adapter.parameters(recurse=False):
            p.data.normal_(0, 1e-3, generator=g)
        layer.weight.requires_grad_(False)
        model[index] = adapter
    return model


GPM_MEMORY = GPMConfig(samples=300, layer_thresholds=(0.95, 0.99, 0.99), threshold_increment=0.0)
"""GPM's Permuted MNIST memory (the paper preset's)."""


def gpm_steps(bench: Benchmark) -> dict[str, float]:
    """GPM's trainer step in task 0 (plain) and in task 1 (projected, with the bases task 0 left): as GPM chooses
    (per layer: from the inputs, factored or dense), with every gradient projected after the backward pass in the
    cheaper of the factored and dense forms (before the input-side form), and with the dense d×d P everywhere (before
    the factored one); both also over the protocol's 5 epochs; and the functional floors of both (`gpm_floor_steps`)."""
    task0, task1 = bench.tasks
    method = GPM(network(), GPM_MEMORY)
    method.begin_task(0)
    times = {"trainer, gpm task 0 (plain step)": trainer_step(method, 0, task0)}
    batches = [
        (task0.transform(task0.train.inputs[i : i + 64]), task0.train.labels[i : i + 64]) for i in range(0, 640, 64)
    ]
    method.end_task(0, batches)
    sizes = "/".join(str(basis.shape[1]) for basis in method.bases.values())
    after_task0 = copy.deepcopy(method.state_dict())
    method.begin_task(1)
    plain, projected = gpm_floor_steps(method, task1)
    times["functional floor, gpm plain step (weights after task 0)"] = plain
    times[f"functional floor, gpm task 1 (bases {sizes}), projected step"] = projected
    for form in ("chosen", "after backward", "dense"):
        method.load_state_dict(copy.deepcopy(after_task0))
        method.begin_task(1)
        method.input_side_projection = form == "chosen"
        if form == "dense":
            method._projectors = {
                name: GradientProjection(p.basis, p.importance, projection_matrix(method.bases[name]).to(p.basis))
                for name, p in method._projectors.items()
            }
        times[f"trainer, gpm task 1 (bases {sizes}), {form} projection"] = trainer_step(method, 1, task1)
    # the protocol's 5 epochs (GPM's Permuted MNIST schedule), where the split projected once per task weighs a fifth
    method.load_state_dict(copy.deepcopy(after_task0))
    del method.input_side_projection  # GPM's own choice again (the loop above set it on the instance)
    method.begin_task(1)
    key = f"trainer, gpm task 1 (bases {sizes}), chosen projection, the protocol's 5 epochs"
    times[key] = trainer_step(method, 1, task1, epochs=5)
    plain_method = GPM(network(), GPM_MEMORY)
    plain_method.begin_task(0)
    times["trainer, gpm task 0 (plain step), the protocol's 5 epochs"] = trainer_step(plain_method, 0, task0, epochs=5)
    return times


def functional_step(ranks: tuple[tuple[int, int], ...], task: Task) -> float:
    """Seconds per step of the least code the adapters' arithmetic needs: per layer F.linear with the frozen W plus
    one torch.addmm(out, x @ [U Ū], [V; A]), no modules, on the same batches; the floor of the low-rank path."""
    model, g = network(), torch.Generator().manual_seed(1)
    weights = [model[i].weight.detach() for i in (0, 2, 4)]
    bases, factors = [], []
    for weight, (rank, transfer) in zip(weights, ranks, strict=True):
        bases.append(torch.linalg.qr(torch.randn(weight.shape[1], rank + transfer, generator=g))[0].contiguous())
        factors.append((torch.randn(rank + transfer, weight.shape[0], generator=g) * 1e-3).requires_grad_())
    x, y = task.transform(task.train.inputs), task.train.labels
    optimizer = torch.optim.SGD(factors, lr=CONFIG.lr)
    batches = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(CONFIG.batch_size)
    started = time.perf_counter()
    for idx in batches:
        optimizer.zero_grad(set_to_none=True)
        h = x[idx]
        for i, (weight, basis, factor) in enumerate(zip(weights, bases, factors, strict=True)):
            h = torch.addmm(F.linear(h, weight), h @ basis, factor)
            h = torch.relu(h) if i < 2 else h
        F.cross_entropy(h, y[idx]).backward()
        optimizer.step()
    return (time.perf_counter() - started) / len(batches)


class ProductRowsLayer(nn.Module):
    """The first layer of `products_floor_step`'s module form: called on a batch's row index, addmm of the split's
    frozen products [x·Wᵀ, x·U] at those rows with V."""

    def __init__(self, products: torch.Tensor, outputs: int, factor: torch.Tensor) -> None:
        super().__init__()
        self.products, self.outputs, self.factor = products, outputs, factor

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.products.index_select(0, index)
        return torch.addmm(rows[:, : self.outputs], rows[:, self.outputs :], self.factor)


class LowRankLayer(nn.Module):
    """A hidden layer of `products_floor_step`'s module form: F.linear with the frozen W plus addmm(·, x·U, V)."""

    def __init__(self, weight: torch.Tensor, basis: torch.Tensor, factor: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.basis, self.factor = weight, basis, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(F.linear(x, self.weight), x @ self.basis, self.factor)


def products_floor_step(method: NESS, task: Task, epochs: int, modules: bool = False) -> float:
    """Seconds per step of the least code NESS's trainer path needs at `method`'s ranks and bases (task 1 open): the
    first layer's products [x·Wᵀ, x·U] over the task's split made once (timed), then per step one row read and one
    addmm in the first layer and F.linear + addmm(·, x·U, V) in the others, `epochs` epochs. Against the bare loop it
    is the floor of `train_task` for NESS: the products' cost over one epoch is that of x·U per step. Without
    `modules`, bare tensor code; with it, the same arithmetic in an nn.Sequential of one-expression modules (no checks
    at all), which the bare loop's model is too: the floor of any module a user's model can hold."""
    adapters = [module for module in method.model if isinstance(module, NullSpaceAdapter)]
    weights = [adapter.base.weight.detach() for adapter in adapters]
    bases = [adapter.U for adapter in adapters]
    factors = [torch.zeros_like(adapter.V).requires_grad_() for adapter in adapters]
    x, y = task.transform(task.train.inputs), task.train.labels
    optimizer = torch.optim.SGD(factors, lr=CONFIG.lr)
    started = time.perf_counter()
    products = x @ torch.cat([weights[0].T, bases[0]], dim=1)
    outputs = weights[0].shape[0]

    def functional(idx: torch.Tensor) -> torch.Tensor:
        rows = products.index_select(0, idx)
        h = torch.relu(torch.addmm(rows[:, :outputs], rows[:, outputs:], factors[0]))
        for i in (1, 2):
            h = torch.addmm(F.linear(h, weights[i]), h @ bases[i], factors[i])
            h = torch.relu(h) if i < 2 else h
        return h

    model = nn.Sequential(
        ProductRowsLayer(products, outputs, factors[0]),
        nn.ReLU(),
        LowRankLayer(weights[1], bases[1], factors[1]),
        nn.ReLU(),
        LowRankLayer(weights[2], bases[2], factors[2]),
    )
    step = model if modules else functional
    steps = 0
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).split(CONFIG.batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(step(idx), y.index_select(0, idx)).backward()
            optimizer.step()
            steps += 1
    return (time.perf_counter() - started) / steps


class ProjectedRowsLinear(torch.autograd.Function):
    """F.linear(x, W) whose backward gives W the gradient δᵀ·x̃ for given projected rows x̃ (and x none): the least
    a layer projecting its weight gradient from its inputs needs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, projected_rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projected_rows)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (projected_rows,) = ctx.saved_tensors
        return None, grad_out.T @ projected_rows, None


def gpm_floor_steps(method: GPM, task: Task) -> tuple[float, float]:
    """Seconds per step of the least code GPM's plain step and its projected step need, over one epoch of `task`
    with `method`'s bases (task 1 open): plain, F.linear per layer; projected, the first layer through
    `ProjectedRowsLinear` with its rows from the split projected once (timed), the others' weight gradients projected
    after the backward pass in the factored form, G − (G·M)·Mᵀ. No modules, hooks or trainer."""
    weights = [method.model[i].weight for i in (0, 2, 4)]
    projections = [gradient_projection(method.bases[name], like=weights[0]) for name in ("0", "2", "4")]
    x, y = task.transform(task.train.inputs), task.train.labels
    times = []
    for projected in (False, True):
        optimizer = torch.optim.SGD(weights, lr=CONFIG.lr)
        started = time.perf_counter()
        split = projections[0].project_rows(x) if projected else None
        batches = torch.randperm(len(y), generator=torch.Generator().manual_seed(1)).split(CONFIG.batch_size)
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            rows = x.index_select(0, idx)
            if projected:
                h = ProjectedRowsLinear.apply(rows, weights[0], split.index_select(0, idx))
            else:
                h = F.linear(rows, weights[0])
            h = F.linear(torch.relu(F.linear(torch.relu(h), weights[1])), weights[2])
            F.cross_entropy(h, y.index_select(0, idx)).backward()
            if projected:
                for weight, projection in zip(weights[1:], projections[1:], strict=True):
                    projection.project_(weight.grad)
            optimizer.step()
        times.append((time.perf_counter() - started) / len(batches))
    return times[0], times[1]


def measure(bench: Benchmark, repeats: int) -> dict[str, float]:
    task0, task1 = bench.tasks
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        model = network()
        times.setdefault("bare loop", []).append(bare_loop(model, list(model.parameters()), task0, lambda: None))
        finetune = FineTune(network())
        finetune.begin_task(0)
        times.setdefault("trainer, finetune (task 0)", []).append(trainer_step(finetune, 0, task0))
        for name, options in NESS_SETTINGS.items():
            method = ness_at_task1(bench, options)
            method.begin_task(1, [(task1.transform(task1.train.inputs[:640]),)])
            params = method.trainable_parameters(1)
            key = f"own loop, {name}, task 1"
            times.setdefault(key, []).append(bare_loop(method.model, params, task1, lambda m=method: m.after_step(1)))
            method = ness_at_task1(bench, options)
            method.begin_task(1)
            times.setdefault(f"trainer, {name}, task 1", []).append(trainer_step(method, 1, task1))
        method = ness_at_task1(bench, NESS_SETTINGS[PROTOCOL_EPOCHS_ROW])
        method.begin_task(1)
        for epochs in (1, 5):
            key = f"functional floor with the first layer's products, {PROTOCOL_EPOCHS_ROW}, task 1, {epochs} epoch(s)"
            times.setdefault(key, []).append(products_floor_step(method, task1, epochs))
        key = f"module floor with the first layer's products, {PROTOCOL_EPOCHS_ROW}, task 1, 5 epochs"
        times.setdefault(key, []).append(products_floor_step(method, task1, 5, modules=True))
        key = f"trainer, {PROTOCOL_EPOCHS_ROW}, task 1, the protocol's 5 epochs"
        times.setdefault(key, []).append(trainer_step(method, 1, task1, epochs=5))
        for name, seconds in gpm_steps(bench).items():
            times.setdefault(name, []).append(seconds)
        for name, ranks in RANK_SETS.items():
            model = adapters_at_ranks(ranks)
            params = [p for p in model.parameters() if p.requires_grad]
            times.setdefault(f"own loop, adapters at {name}", []).append(bare_loop(model, params, task1, lambda: None))
            times.setdefault(f"functional floor at {name}", []).append(functional_step(ranks, task1))
    return {name: statistics.median(values) for name, values in times.items()}


def two_epochs(method, t: int, task: Task, device: str, backend: str | None) -> tuple[float, float]:
    """(seconds per step of the second epoch, first epoch's seconds − second's) of `train_task` over two epochs of
    task t, compiled on `backend` (None: eager); the difference is the compile time when compiled."""
    config = dataclasses.replace(
        CONFIG, epochs=2, device=device, compile=backend is not None, compile_backend=backend or "inductor"
    )
    ends: list[float] = []  # loop.train_seconds after each epoch

    def after_epoch(loop, record) -> None:
        ends.append(loop.train_seconds)

    generator = torch.Generator().manual_seed(t)
    train_task(method.model, method, t, task, config, generator, progress=False, after_epoch=after_epoch)
    first, second = ends[0], ends[1] - ends[0]
    return second / -(-len(task.train) // CONFIG.batch_size), first - second


COMPILED_RUNS = {
    "finetune (task 0)": lambda bench, device: (FineTune(network().to(device)), 0),
    "ness (defaults: energy δ 1e-3, transfer 100), task 1": lambda bench, device: (ness_at_task1(bench, {}, device), 1),
}
"""What `--compile` times: the method, ready to begin its task, and the task."""


def measure_compiled(bench: Benchmark, repeats: int, device: str, backend: str) -> tuple[dict[str, float], dict]:
    """Per row of COMPILED_RUNS, eager and compiled: the median second-epoch seconds per step; and each compiled
    run's compile seconds, in the order of the repeats."""
    times: dict[str, list[float]] = {}
    compile_seconds: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, ready in COMPILED_RUNS.items():
            for compiled in (False, True):
                method, t = ready(bench, device)
                method.begin_task(t)
                step, extra = two_epochs(method, t, bench.tasks[t], device, backend if compiled else None)
                label = f"trainer, {name}, " + (f"compiled ({backend})" if compiled else "eager")
                times.setdefault(label, []).append(step)
                if compiled:
                    compile_seconds.setdefault(label, []).append(extra)
    return {name: statistics.median(values) for name, values in times.items()}, compile_seconds


def statistics_pass_seconds() -> float:
    """Σxxᵀ of every layer's 54,000 input rows (784, 100, 100) in float64 products (`CovarianceSum`): one pass."""
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for d in (784, 100, 100):
        total = CovarianceSum()
        rows = torch.rand(54000, d, generator=g)
        for i in range(0, 54000, 64):
            total.add(rows[i : i + 64])
        total.result()
    return time.perf_counter() - started


def whole_run_floors(bare_step: float, ness_floor_step: float) -> dict[str, dict[str, float]]:
    """The least the issue's Permuted MNIST paper-preset run (10 tasks × 5 epochs × 5,400 batches of 10, Frobenius
    ε₁ 0.03, no transfer: 10 statistics passes) could take: every step at the bare loop's cost; and with tasks 1-9 at
    the functional floor of NESS's low-rank path at that run's mean ranks (`ISSUE_RUN_RANKS`), the least NESS's
    arithmetic allows."""
    steps_per_task = 5 * -(-54000 // 10)
    statistics = 10 * statistics_pass_seconds()
    return {
        "every step a bare step": {"training": 10 * steps_per_task * bare_step, "statistics products": statistics},
        "NESS's arithmetic (tasks 1-9 at the functional floor)": {
            "training": steps_per_task * (bare_step + 9 * ness_floor_step),
            "statistics products": statistics,
        },
    }


def machine(device: str) -> str:
    """The GPU's name on a CUDA device, else the CPU's as platform reports it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def compiled_main(bench: Benchmark, args: argparse.Namespace) -> None:
    """`--compile`: print the eager and compiled steps of `train_task` and the compile times (module docstring)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cache-"))
    per_step, compile_seconds = measure_compiled(bench, args.repeats, args.device, args.backend)
    print(
        f"{bench.name}, {args.images} images per task, batch {CONFIG.batch_size}, {args.threads} thread(s), "
        f"{args.device}, median of {args.repeats}; torch {torch.__version__}, {machine(args.device)}"
    )
    print("| train_task | µs per step (2nd epoch) | against eager | compile s (each repeat) |")
    print("|---|---|---|---|")
    for name, seconds in per_step.items():
        eager = per_step[name.rsplit(", ", 1)[0] + ", eager"]
        compiled = ", ".join(f"{s:.1f}" for s in compile_seconds.get(name, []))
        print(f"| {name} | {seconds * 1e6:.0f} | {seconds / eager:.2f}× | {compiled} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "per_step_seconds": per_step, "compile_seconds": compile_seconds}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--whole", action="store_true", help="also print a whole paper-preset run's floor")
    parser.add_argument("--json")
    parser.add_argument("--compile", action="store_true", help="time train_task eager against TrainConfig.compile")
    parser.add_argument("--backend", default="inductor", help="the torch.compile backend with --compile")
    parser.add_argument("--device", default="cpu", help="the training device with --compile")
    args = parser.parse_args()
    if not args.compile and (args.device != "cpu" or args.backend != "inductor"):
        parser.error("--device and --backend go with --compile (the other rows run on the CPU)")
    torch.set_num_threads(args.threads)
    bench = permuted_tasks(args.images)
    if args.compile:
        compiled_main(bench, args)
        return
    per_step = measure(bench, args.repeats)
    bare = per_step["bare loop"]
    print(
        f"{bench.name}, {args.images} images per task, batch {CONFIG.batch_size}, {args.threads} thread(s), "
        f"median of {args.repeats}; torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("| loop | µs per step | against the bare loop |")
    print("|---|---|---|")
    for name, seconds in per_step.items():
        print(f"| {name} | {seconds * 1e6:.0f} | {seconds / bare:.2f}× |")
    floors = whole_run_floors(bare, per_step[f"functional floor at {ISSUE_RUN_RANKS}"]) if args.whole else {}
    for name, floor in floors.items():
        parts = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in floor.items())
        print(f"floor of the issue's Permuted MNIST run, {name}: {sum(floor.values()):.1f} s ({parts})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "per_step_seconds": per_step, "whole_run_floors": floors}, f, indent=1)


if __name__ == "__main__":
    main()
