"""Task and benchmark containers, the pixel transform, batching and the GPM-style validation split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ness.modules import tensor_version


class DataError(ValueError):
    """A data file or data setting is unusable; the message names the path, the problem and the fix."""


@dataclass(frozen=True, eq=False)
class Split:
    """Raw inputs (e.g. uint8 images) and int64 task-local labels of one train, validation or test split."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"Split labels must be a 1-D int64 tensor, got {self.labels.dtype} with shape "
                f"{tuple(self.labels.shape)}; convert them with labels.long().flatten()"
            )
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"Split has {self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels; "
                "inputs and labels must be indexed by the same examples"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def subset(inputs: np.ndarray, labels: np.ndarray, idx: np.ndarray, label_offset: int = 0) -> Split:
    """The examples at `idx` as a Split: inputs keep their dtype, labels become int64 minus label_offset."""
    return Split(torch.from_numpy(inputs[idx]), torch.from_numpy(labels[idx].astype(np.int64) - label_offset))


@dataclass(frozen=True, eq=False)
class Task:
    """One task: its splits, its number of classes and the transform from raw inputs to model inputs."""

    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    transform: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        for split_name in ("train", "val", "test"):
            labels = getattr(self, split_name).labels
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"task {self.name!r}: {split_name} labels span {int(labels.min())}..{int(labels.max())} "
                    f"but num_classes is {self.num_classes}; labels must be task-local 0..num_classes-1"
                )


@dataclass(frozen=True, eq=False)
class Benchmark:
    """A sequence of tasks plus what a model needs to know (input size, shared or per-task head)."""

    name: str
    tasks: tuple[Task, ...]
    input_shape: tuple[int, ...]
    """Shape of one transformed input: (features,) for MLPs, (channels, height, width) for images."""
    shared_head: bool
    details: dict

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"benchmark {self.name!r} has no tasks")
        object.__setattr__(self, "input_shape", tuple(int(n) for n in self.input_shape))

    @property
    def input_dim(self) -> int:
        """Number of input features (the product of input_shape)."""
        return math.prod(self.input_shape)

    def __len__(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True, eq=False)
class PixelTransform:
    """Raw pixel batch -> float32 (B, features): x/scale, flatten, (x-mean)/std, then optionally permute."""

    deterministic: ClassVar[bool] = True
    """Each input's output depends on that input alone, without randomness: a split may be transformed once."""

    scale: float
    mean: float = 0.0
    std: float = 1.0
    permutation: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float32).reshape(x.shape[0], -1) / self.scale
        out = (out - self.mean) / self.std
        if self.permutation is None:
            return out
        if self.permutation.numel() != out.shape[1]:
            raise ValueError(
                f"permutation has {self.permutation.numel()} entries but each input has {out.shape[1]} "
                "features; the transform was built for inputs of another size"
            )
        return out[:, self.permutation.to(out.device)]


@dataclass(frozen=True, eq=False)
class ImageTransform:
    """uint8 (B, C, H, W) batch -> float32: x/255, (x − mean_c)/std_c per channel, then repeat the
    channels `repeat` times (grey images fed to 3-channel networks, as the 5-datasets loader does)."""

    deterministic: ClassVar[bool] = True
    """Each input's output depends on that input alone, without randomness: a split may be transformed once."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    repeat: int = 1

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"ImageTransform: mean {self.mean} and std {self.std} need one entry per channel")
        if min(self.std) <= 0:
            raise ValueError(f"ImageTransform: std must be positive, got {self.std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise ValueError(
                f"ImageTransform expects (batch, {len(self.mean)}, height, width) images, got shape {tuple(x.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        out = (x.to(torch.float32) / 255.0 - mean) / std
        return out.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else out


PREPARED_BYTES_LIMIT = 2 * 1024**3
"""The largest float copy of a training split `prepared` makes (2 GiB); a larger split is transformed per batch."""


def identity(x: torch.Tensor) -> torch.Tensor:
    """The transform of a split whose inputs are already the model's inputs."""
    return x


def prepared_training_split(
    task: Task, device: str | torch.device, limit: int = PREPARED_BYTES_LIMIT
) -> tuple[Split, Callable[[torch.Tensor], torch.Tensor]]:
    """(split, transform) to draw the task's training batches from: the split transformed once and on `device`, with
    the identity, so that a batch is plain indexing (what a bare loop does), when the task's transform declares
    itself deterministic (a random augmentation must run per batch) and the float copy takes at most `limit`
    bytes; otherwise the raw split and its transform. Both give the same batches."""
    train = task.train
    if not getattr(task.transform, "deterministic", False) or len(train) == 0:
        return train, task.transform
    sample = task.transform(train.inputs[:1])
    if sample.element_size() * sample.numel() * len(train) > limit:
        return train, task.transform
    return Split(task.transform(train.inputs.to(device)), train.labels.to(device)), identity


def take_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` along the first dimension; for a 1-D integer index on the tensor's device as `index_select`,
    which skips advanced indexing's general machinery (half the time for a batch of 10 rows of 784 on a CPU: 2.4
    against 5.0 µs). Indexing also takes an index from another device (a CPU permutation of a GPU split)."""
    if index.dim() == 1 and index.dtype in (torch.int64, torch.int32) and index.device == tensor.device:
        return tensor.index_select(0, index)
    return tensor[index]


@dataclass(frozen=True, eq=False)
class BatchRows:
    """A training batch drawn as rows `index` of a fixed tensor `source` (a prepared training split): `batch` is
    `source[index]`, drawn here, so the two always agree; `versions` are both tensors' version counters then (an
    in-place change of either bumps its own). What depends on the inputs alone may then be computed once for `source`
    and indexed (NESS's adapters do, while both versions hold)."""

    source: torch.Tensor
    index: torch.Tensor
    batch: torch.Tensor = field(init=False)
    versions: tuple[int | None, int | None] = field(init=False)

    def __post_init__(self) -> None:
        batch = take_rows(self.source, self.index)
        object.__setattr__(self, "batch", batch)
        object.__setattr__(self, "versions", (tensor_version(self.source), tensor_version(batch)))

    def unchanged(self) -> bool:
        """Whether neither the source nor the batch was changed in place since the batch was drawn."""
        return (tensor_version(self.source), tensor_version(self.batch)) == self.versions

    def drew(self, x: torch.Tensor) -> bool:
        """Whether x is the very batch drawn here, and neither it nor the source changed in place since."""
        return x is self.batch and self.unchanged()


class StepRows:
    """The training step's batch as rows of a fixed tensor (`BatchRows`, from the trainer's `on_step_rows`), which a
    method sets each step and shares with its layers. Never pickled: it refers to a whole training split."""

    def __init__(self) -> None:
        self.rows: BatchRows | None = None

    def __getstate__(self) -> dict:
        return {"rows": None}


class SplitProducts:
    """What a layer computes from each row of a step's fixed split alone (`BatchRows.source`) and from some frozen
    tensors, made once for the whole split and read per batch while the split and those tensors keep their identity
    and version counters: NESS's x·[Wᵀ B], GPM's projected rows. One product over the split costs the multiply-adds
    of one epoch of per-batch ones, but runs at a large product's speed and spares each step its reads of the frozen
    tensors. Never pickled (as large as a split): made again when next needed."""

    def __init__(self) -> None:
        self._made: tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple, torch.Tensor | None] | None = None

    def __getstate__(self) -> dict:
        return {"_made": None}

    def read(
        self,
        rows: BatchRows,
        frozen: tuple[torch.Tensor, ...],
        make: Callable[[torch.Tensor], torch.Tensor | None],
    ) -> torch.Tensor | None:
        """`make(rows.source)[rows.index]`, with `make(source)` called only when the source or a tensor of `frozen`
        is not the one (or not at the version) it was last made from; None where `make` gave None (too large)."""
        source = rows.source
        versions = (tensor_version(source), *(tensor_version(tensor) for tensor in frozen))
        made = self._made
        if (
            made is None
            or made[0] is not source
            or made[2] != versions  # one version per tensor: equal versions mean as many tensors
            or any(a is not b for a, b in zip(made[1], frozen, strict=True))
        ):
            with torch.no_grad():
                made = self._made = (source, frozen, versions, make(source))
        return None if made[3] is None else take_rows(made[3], rows.index)


def batch_indices(
    n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """The index of each batch of an epoch over n rows (shuffled with `generator` when asked), on `device`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if device != order.device:  # a split already on an accelerator: one copy of the order, not one a batch
        order = order.to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def iterate_batches(
    split: Split,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (transformed inputs, labels) on `device` batch by batch, so no float copy of the split exists.

    The raw batch moves to `device` before the transform; the last partial batch is kept.
    """
    for idx in batch_indices(len(split), batch_size, shuffle=shuffle, generator=generator, device=split.inputs.device):
        yield transform(take_rows(split.inputs, idx).to(device)), take_rows(split.labels, idx).to(device)


def iterate_prepared_batches(
    split: Split, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, BatchRows]]:
    """`iterate_batches` over a prepared split (transformed, on its device: `prepared_training_split`), the same
    batches in the same order, each with its `BatchRows`."""
    for idx in batch_indices(len(split), batch_size, shuffle=shuffle, generator=generator, device=split.inputs.device):
        rows = BatchRows(split.inputs, idx)
        yield rows.batch, take_rows(split.labels, idx), rows


def iterate_mixed_batches(
    sources: Sequence[tuple[int, Split, Callable[[torch.Tensor], torch.Tensor]]],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches over the union of several tasks' splits: (inputs, labels, task ids), each input through its own
    task's transform. `sources` holds (task id, split, transform); the union is read as one sequence (shuffled as
    a whole when asked), so a batch mixes the tasks in proportion to their sizes. Joint training reads this."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sizes = [len(split) for _, split, _ in sources]
    owner = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)])
    position = torch.cat([torch.arange(n) for n in sizes])
    order = torch.randperm(len(owner), generator=generator) if shuffle else torch.arange(len(owner))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        xs, ys, ts = [], [], []
        for i in owner[idx].unique().tolist():
            task_id, split, transform = sources[i]
            rows = position[idx[owner[idx] == i]]
            xs.append(transform(split.inputs[rows].to(device)))
            ys.append(split.labels[rows].to(device))
            ts.append(torch.full((len(rows),), task_id, dtype=torch.int64, device=device))
        yield torch.cat(xs), torch.cat(ys), torch.cat(ts)


def validation_split(n: int, pc_valid: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) of range(n) as the GPM-family loaders make them: the first int(pc_valid*n)
    entries of sklearn.utils.shuffle(arange(n), random_state=seed) are validation, the rest train."""
    if not 0 <= pc_valid < 1:
        raise ValueError(f"pc_valid must be in [0, 1), got {pc_valid}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    # sklearn.utils.shuffle(arange(n), random_state=seed) is this shuffle by a RandomState(seed); drawn here,
    # since importing scikit-learn takes most of a second
    perm = np.arange(n)
    np.random.RandomState(seed).shuffle(perm)
    n_val = int(pc_valid * n)
    return perm[n_val:], perm[:n_val]


def keep_first_training(train_pos: np.ndarray, train_per_task: int | None, task_name: str) -> np.ndarray:
    """The first `train_per_task` training positions (all when None): the quick presets' smaller tasks."""
    if train_per_task is None:
        return train_pos
    if not 1 <= train_per_task <= len(train_pos):
        raise ValueError(
            f"train_per_task={train_per_task} but task {task_name!r} has {len(train_pos)} training "
            f"images after the validation split; use a value in 1..{len(train_pos)}, or None for all"
        )
    return train_pos[:train_per_task]


def train_val_indices(
    pool: np.ndarray, pc_valid: float, seed: int, train_per_task: int | None, task_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """validation_split over `pool`, then the first `train_per_task` training indices when that is set."""
    train_pos, val_pos = validation_split(len(pool), pc_valid, seed)
    return pool[keep_first_training(train_pos, train_per_task, task_name)], pool[val_pos]
