"""Data-parallel training over several processes started by torchrun (`torchrun --nproc_per_node N -m ness run ...`).

Every rank builds the same run (same seed, same data order) and keeps rows rank::world of each global batch. Torch's
DistributedDataParallel drives each training step (`DataParallel`): it all-reduces the gradients of each backward pass
while the pass runs, weighted by each rank's rows, so that the update equals the single-process update on the whole
global batch. Statistics passes reduce their sums here (`all_reduce_sum`, `all_gather_rows`), so every rank builds
the same bases. Only rank 0 writes files. In a single process (no WORLD_SIZE > 1 in the environment) every function
here is the identity or a no-op.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from ness.methods.base import ContinualMethod

from ness.batches import ModelInputs, batch_rows, select_rows
from ness.modules import instance_attribute

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
        # DDP wrappers dropped earlier sit in reference cycles: freed now, while the group they hold still exists, and
        # not by the interpreter's exit after it is gone, where gloo's threads abort the process (SIGABRT, "terminate
        # called without an active exception", in about one run of ten of tests/test_distributed.py's workers)
        gc.collect()
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
            "loss, computed with training_loss, and its task-boundary passes give every rank the same result (else "
            "False, with `distributed_reason`), or run it in a single process"
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


# -- the data-parallel step (torch's DistributedDataParallel) ---------------------------------------------


class _TrainingLoss(nn.Module):
    """A method's `training_loss` as a module, so that DDP's forward runs all of it: every parameter the loss
    reaches (through the model, a task head applied outside the model's forward in joint training, a penalty) is in
    the graph DDP searches for the parameters a step leaves without a gradient."""

    def __init__(self, method: ContinualMethod, extra: list[nn.Parameter]) -> None:
        super().__init__()
        self.model = method.model
        self.extra = nn.ParameterList(extra)  # trained parameters that live outside the model
        self.loss = method.training_loss

    def forward(self, t: int, x: Tensor, y: Tensor, tasks: Tensor | None) -> Tensor:
        return self.loss(t, x, y, tasks)


@dataclass
class _StepRows:
    """The rows of the training step under way: this rank's and the global batch's."""

    rows: int = 0
    total: int = 1


def _weighted_all_reduce(step: _StepRows, bucket):  # unannotated: DDP reads the annotations, these would be strings
    """DDP's all-reduce of a gradient bucket (a dist.GradBucket; returns a Future of the reduced tensor), weighted by
    rows: Σ_r n_r·g_r / N, where g_r is rank r's gradient of its mean loss over its n_r rows, is the gradient of the
    mean loss over the global batch of N rows even when the shards differ in size (DDP's own hook takes the plain
    mean over the ranks). A gradient every rank computes alike (a penalty) comes out unchanged, since
    Σ_r n_r·g / N = g; a placeholder shard adds 0."""
    total = step.total
    buffer = bucket.buffer().mul_(step.rows)
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda done: done.value()[0].div_(total))


def _ddp_without_buffer_sync(module: nn.Module) -> DistributedDataParallel:
    """DDP that finds the parameters a step leaves without a gradient and broadcasts no buffer before its forward
    (torch ≥ 2.13 names that `forward_sync_buffers`, earlier versions `broadcast_buffers`)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, find_unused_parameters=True, forward_sync_buffers=False)
    return DistributedDataParallel(module, find_unused_parameters=True, broadcast_buffers=False)


class DataParallel:
    """The training steps of one task under torch's DistributedDataParallel (in a single process: no-ops).

    DDP runs the method's `training_loss` as its forward and all-reduces each backward pass's gradients in buckets
    while the pass runs, so they are the global batch's when backward() returns: before the method's after_backward
    acts on them (GPM's projection, EWC's penalty, HAT's masks), and for each of SAM's two passes. Its all-reduce
    weights each rank by its rows (`_weighted_all_reduce`). DDP is told to look for parameters without a gradient
    (`find_unused_parameters`): a rank's rows may not reach a trained parameter (joint training's heads of tasks not
    in its shard, a layer the task does not call); such a parameter still gets the other ranks' gradient, and one no
    rank reaches keeps .grad None, as in a single process. DDP watches the parameters that require a gradient when
    it wraps, so it wraps again when that set changes (NESS's adapters and the baselines' freezing change it from task
    to task; the trainer builds one DataParallel per task). Use as a context manager, one `step` per training step.
    """

    def __init__(self, method: ContinualMethod, params: Iterable[nn.Parameter]) -> None:
        self.method = method
        in_model = {id(p) for p in method.model.parameters()}
        extra = list({id(p): p for p in params if id(p) not in in_model}.values())
        self.module = _TrainingLoss(method, extra)
        self.ddp: DistributedDataParallel | None = None
        self.wrapped: list[bool] = []
        """requires_grad of each of the module's parameters when DDP wrapped it."""
        self.rows = _StepRows()
        self.forwards = 0
        """Forward passes of the loss through DDP with gradients on (a step must run at least one)."""

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ddp = None  # its reducer goes with it: its hooks on the parameters and its gradient buckets

    def _wrapper(self) -> DistributedDataParallel:
        trainable = [p.requires_grad for p in self.module.parameters()]
        if self.ddp is None or trainable != self.wrapped:
            self.ddp = None  # the old reducer's hooks leave the parameters before the new one adds its own
            self.ddp = _ddp_without_buffer_sync(self.module)
            self.ddp.register_comm_hook(self.rows, _weighted_all_reduce)
            self.wrapped = trainable
        return self.ddp

    def _loss(self, ddp: DistributedDataParallel, t: int, x: Tensor, y: Tensor, tasks: Tensor | None = None) -> Tensor:
        """The method's training loss, computed by DDP's forward (what the method's step calls during a step)."""
        if torch.is_grad_enabled():
            self.forwards += 1
        return ddp(t, x, y, tasks)

    @contextmanager
    def step(self, part: Shard, position: tuple[int, ...]) -> Iterator[None]:
        """The block runs one training step on `part`: the method's `training_loss` goes through DDP, whose
        all-reduce weights this rank by its rows, and dropout draws from a stream of its own per rank and step
        (seeded from `position` and the global RNG without advancing it), so the global RNG stays the same on every
        rank whatever the shard sizes. The normalisation layers' buffers (BatchNorm running statistics) are then
        copied from rank 0, so every rank holds the same model: DDP's own buffer broadcast would send every buffer
        (NESS's bases too) before each forward and leave the last step's statistics different across ranks."""
        if not active():
            yield
            return
        ddp = self._wrapper()
        self.rows.rows, self.rows.total = part.rows, part.total
        forwards = self.forwards
        self.module.loss = self.method.training_loss  # the loss in place now (compiled with TrainConfig.compile)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with (
            instance_attribute(self.method, "training_loss", partial(self._loss, ddp)),
            torch.random.fork_rng(devices=devices),
        ):
            base = int(torch.randint(2**62, ()))
            torch.manual_seed(hash((base, *position, rank())) % 2**63)
            yield
        if self.forwards == forwards:
            raise RuntimeError(
                f"{type(self.method).__name__}.training_step computed no loss with training_loss, so "
                "DistributedDataParallel saw no forward pass and averaged no gradient: the ranks now hold different "
                "models. A method that trains data-parallel computes its step's loss with self.training_loss (the "
                "default training_step does); else declare distributed_ok = False"
            )
        for module in ddp.module.modules():  # only normalisation statistics change in a step
            if isinstance(module, nn.modules.batchnorm._NormBase):
                for buffer in module.buffers(recurse=False):
                    dist.broadcast(buffer, src=0)
