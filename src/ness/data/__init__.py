"""Continual-learning benchmarks (Split Digits, MNIST, CIFAR-100, 5-datasets, miniImageNet) and their containers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ness.data.cifar import split_cifar100
from ness.data.digits import split_digits

# Imported under another name: binding `five_datasets` here would hide the submodule of the same name.
from ness.data.five_datasets import five_datasets as five_datasets_benchmark
from ness.data.miniimagenet import split_miniimagenet
from ness.data.mnist import load_mnist, permuted_mnist, read_idx, resolve_data_root, split_mnist
from ness.data.tasks import (
    Benchmark,
    DataError,
    Split,
    Task,
    iterate_batches,
    iterate_mixed_batches,
    validation_split,
)

BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "split_digits": split_digits,
    "split_mnist": split_mnist,
    "permuted_mnist": permuted_mnist,
    "split_cifar100": split_cifar100,
    "five_datasets": five_datasets_benchmark,
    "split_miniimagenet": split_miniimagenet,
}
"""Each benchmark's builder, called as `builder(data_root, seed=seed, **options)`."""
WITHOUT_FILES: frozenset[str] = frozenset({"split_digits"})
"""Benchmarks whose data ship with a package (scikit-learn's digits): they need no data root."""


def build_benchmark(name: str, *, seed: int, data_root: str | Path | None = None, **options: Any) -> Benchmark:
    """Build a benchmark by name: `BENCHMARKS[name](data_root, seed=seed, **options)` (split_digits reads no file)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](data_root, seed=seed, **options)


__all__ = [
    "BENCHMARKS",
    "WITHOUT_FILES",
    "Benchmark",
    "DataError",
    "Split",
    "Task",
    "build_benchmark",
    "five_datasets_benchmark",
    "iterate_batches",
    "iterate_mixed_batches",
    "load_mnist",
    "permuted_mnist",
    "read_idx",
    "resolve_data_root",
    "split_cifar100",
    "split_digits",
    "split_miniimagenet",
    "split_mnist",
    "validation_split",
]
