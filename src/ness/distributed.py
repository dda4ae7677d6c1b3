"""Data-parallel training over several processes started by torchrun (`torchrun --nproc_per_node N -m ness run ...`).

Every rank builds the same run (same seed, same data order) and keeps rows rank::world of each global batch. The
gradients of each backward pass are averaged so that the update equals the single-process update on the whole
global batch; statistics passes reduce their sums, so every rank builds the same bases. Only rank 0 writes files.
In a single process (no WORLD_SIZE > 1 in the environment) every function here is the identity or a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable

from ness.batches import ModelInputs, batch_rows, select_rows

log = logging.getLogger(__name__)

TIMEOUT_VARIABLE = "NESS_DISTRIBUTED_TIMEOUT"
"""Environment variable: seconds a collective waits for the other ranks before failing (default 300)."""
DEFAULT_TIMEOUT_SECONDS = 300.0


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 in a single process."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes training the run together, 1 in a single process."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its own machine (torchrun's LOCAL_RANK), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def timeout_seconds() -> float:
    """How long a collective may wait: $NESS_DISTRIBUTED_TIMEOUT seconds, else 300."""
    raw = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"${TIMEOUT_VARIABLE}={raw!r}: give the collective timeout in seconds, a number > 0")
    return seconds


@contextmanager
def process_group() -> Iterator[None]:
    """Join torchrun's process group for the block when launched by it (gloo for CPU tensors, NCCL for CUDA ones
    where CUDA is available) and leave it on exit; otherwise do nothing. Ranks other than 0 log warnings only."""
    if not launched() or active():
        yield
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    if not is_main():
        logging.getLogger("ness").setLevel(logging.WARNING)
    log.info("ness: rank %d of %d (%s)", rank(), world_size(), backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def device_for(device: str) -> str:
    """The device this rank trains on: 'cuda' becomes its own GPU, cuda:LOCAL_RANK, under torchrun."""
    return f"cuda:{local_rank()}" if launched() and device == "cuda" else device


def check_method(method_class: type, name: str) -> None:
    """Raise before any training when a method cannot train data-parallel: its class declares `distributed_ok`
    False, or does not declare it at all (a new method is not assumed safe)."""
    if world_size() <= 1:
        return
    declared = vars(method_class).get("distributed_ok")
    if declared is None:
        raise ValueError(
            f"method {name!r} ({method_class.__name__}) does not declare whether it trains data-parallel: set "
            "`distributed_ok = True` in its class once its step uses the batch only through the mean gradient of its "
            "loss and its task-boundary passes give every rank the same result (else False, with "
            "`distributed_reason`), or run it in a single process"
        )
    if not declared:
        reason = (
            getattr(method_class, "distributed_reason", "") or "its training step uses more than the batch gradient"
        )
        raise ValueError(
            f"method {name!r} cannot run on {world_size()} processes: {reason}, so the ranks would train different "
            "models; run it in a single process"
        )


# -- collectives (identities in a single process) ------------------------------------------------------


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The elementwise sum of `tensor` over every rank (a new tensor; the same tensor in a single process)."""
    if not active():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's rows of `tensor` (any number per rank), concatenated in rank order, on every rank."""
    if not active():
        return tensor
    counts = [torch.zeros((), dtype=torch.int64, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(tensor.shape[0], device=tensor.device))
    longest = int(max(counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[: int(n)] for rows, n in zip(gathered, counts, strict=True)])


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Python numbers summed over every rank (float64)."""
    if not active():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def agree(value: Any, what: str) -> None:
    """Raise on every rank unless every rank holds the same (picklable) `value`; `what` names it in the error."""
    if not active():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(
            f"the ranks disagree on {what} ({', '.join(f'rank {r}: {v!r}' for r, v in enumerate(values))}); "
            "every rank must see the same files: put --out on a file system every node shares"
        )


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if active():
        dist.barrier()


# -- sharding --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This rank's part of a global batch: rows rank::world. A rank left without rows gets the batch's first row,
    weighted 0, so that it still runs the same forward and backward passes (and collectives) as the others."""

    x: ModelInputs
    y: Tensor | None
    tasks: Tensor | None
    rows: int
    """Rows of the global batch this rank holds (0: x holds only the placeholder row)."""
    total: int
    """Rows of the global batch."""

    @property
    def indices(self) -> slice:
        """Where this rank's rows sit in the global batch."""
        return slice(rank(), None, world_size())


def shard(x: ModelInputs, y: Tensor | None = None, tasks: Tensor | None = None) -> Shard:
    """Rows rank::world of a global batch (the whole batch in a single process); x a tensor or a mapping of them."""
    total = batch_rows(x)
    if not active():
        return Shard(x, y, tasks, total, total)
    take = slice(rank(), None, world_size())
    rows = len(range(total)[take])
    if rows == 0:
        take = slice(0, 1)
    part = select_rows(x, take)
    return Shard(part, None if y is None else y[take], None if tasks is None else tasks[take], rows, total)


def shard_keys(rows: int, part: Shard, generator: torch.Generator) -> Tensor:
    """Uniform random keys for the `rows` layer-input rows this rank got from `part` (sample-major, the same number
    per sample). Keys are drawn for all the global batch's rows on every rank, so the ranks draw the same stream
    and each row gets the key a single process gives it; a placeholder shard gets none."""
    if not active():
        return torch.rand(rows, generator=generator)
    per_sample = rows // batch_rows(part.x)
    keys = torch.rand(part.total * per_sample, generator=generator)
    return keys.view(part.total, per_sample)[part.indices].reshape(-1)


# -- gradient averaging ------------------------------------------------------------------------------------


@dataclass
class StepRows:
    """The rows of the training step under way: this rank's and the global batch's."""

    rows: int
    total: int


_step: StepRows | None = None


class GradientAverager:
    """Makes every backward pass's gradient of `params` the global batch's: Σ_r n_r·g_r / N over the ranks, where
    g_r is rank r's gradient of its mean loss over its n_r rows. A gradient identical on every rank (EWC's penalty,
    HAT's regulariser) is left unchanged, since Σ_r n_r·g / N = g.

    Tensor hooks see each pass's own gradient before it is added to .grad; one callback at the end of the pass
    then all-reduces them in one flat tensor in a fixed order and sets .grad = (.grad before the pass) + average.
    Two passes in one step (SAM) are each averaged once, and a parameter that got no gradient on some rank (a task
    head without rows there, in joint training) still gets the global one. Use as a context manager.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        unique = {id(p): p for p in params if p.requires_grad}
        self.params = list(unique.values())
        self.local: dict[int, Tensor] = {}
        self.before: dict[int, Tensor | None] = {}
        self.queued = False
        self.handles: list[Any] = []

    def __enter__(self) -> GradientAverager:
        if active():
            self.handles = [p.register_hook(self._capture_hook(i)) for i, p in enumerate(self.params)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _capture_hook(self, index: int) -> Any:
        param = self.params[index]

        def capture(grad: Tensor) -> None:
            self.local[index] = grad.detach()
            self.before[index] = None if param.grad is None else param.grad.detach().clone()
            if not self.queued:
                self.queued = True
                Variable._execution_engine.queue_callback(self._average)

        return capture

    @torch.no_grad()
    def _average(self) -> None:
        self.queued = False
        if _step is None:
            raise RuntimeError("a backward pass ran outside a training step: the averaged gradient has no weights")
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        for indices in groups.values():
            # A rank's weight n_r multiplies its mean-loss gradient; the sum over ranks divided by N is the
            # gradient of the mean loss over the global batch. The last entries count the ranks where each
            # parameter got a gradient: one no rank reached keeps .grad None, as in a single process (the
            # optimiser then skips it, momentum and weight decay included).
            reached = self.params[indices[0]].new_tensor([float(i in self.local) for i in indices])
            flat = torch.cat(
                [
                    *(
                        (self.local[i] * _step.rows).reshape(-1)
                        if i in self.local
                        else self.params[i].new_zeros(self.params[i].numel())
                        for i in indices
                    ),
                    reached,
                ]
            )
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            reached = flat[-len(indices) :] > 0
            flat /= _step.total
            offset = 0
            for i, any_rank in zip(indices, reached.tolist(), strict=True):
                p = self.params[i]
                average = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if not any_rank:
                    continue
                before = self.before[i] if i in self.local else p.grad
                p.grad = average.clone() if before is None else before + average
        self.local.clear()
        self.before.clear()


@contextmanager
def training_step(model: nn.Module, part: Shard, position: tuple[int, ...]) -> Iterator[None]:
    """The block runs one training step on `part`: the gradient hooks weight it by its rows, and dropout draws
    from a stream of its own per rank and step (seeded from `position` and the global RNG without advancing it),
    so the global RNG stays the same on every rank whatever the shard sizes. The normalisation layers' buffers
    (BatchNorm running statistics) are then copied from rank 0, as DDP does, so every rank holds the same model."""
    global _step
    if not active():
        yield
        return
    _step = StepRows(part.rows, part.total)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            base = int(torch.randint(2**62, ()))
            torch.manual_seed(hash((base, *position, rank())) % 2**63)
            yield
    finally:
        _step = None
    for module in model.modules():  # only normalisation statistics change in a step; NESS's U buffers never do
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for buffer in module.buffers(recurse=False):
                dist.broadcast(buffer, src=0)
