"""Continual-learning benchmarks (Split Digits, Split MNIST, Permuted MNIST) and the containers they use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ness.data.digits import split_digits
from ness.data.mnist import load_mnist, permuted_mnist, read_idx, resolve_data_root, split_mnist
from ness.data.tasks import Benchmark, DataError, Split, Task, iterate_batches, validation_split

BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "split_digits": split_digits,
    "split_mnist": split_mnist,
    "permuted_mnist": permuted_mnist,
}


def build_benchmark(name: str, *, seed: int, data_root: str | Path | None = None, **options: Any) -> Benchmark:
    """Build a benchmark by name; split_digits needs no files and ignores data_root."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    if name == "split_digits":
        return split_digits(seed=seed, **options)
    return BENCHMARKS[name](data_root, seed=seed, **options)


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DataError",
    "Split",
    "Task",
    "build_benchmark",
    "iterate_batches",
    "load_mnist",
    "permuted_mnist",
    "read_idx",
    "resolve_data_root",
    "split_digits",
    "split_mnist",
    "validation_split",
]
