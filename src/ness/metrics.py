"""Continual-learning metrics as pure functions of the accuracy matrix R (`R[i][j]`: accuracy on task j, in %,
after training task i; entries above the diagonal are unused)."""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _last_row(acc_matrix: Matrix) -> Sequence[float]:
    n = len(acc_matrix)
    if n == 0 or any(len(row) != n for row in acc_matrix):
        raise ValueError(f"accuracy matrix must be T×T with T ≥ 1, got rows of lengths {[len(r) for r in acc_matrix]}")
    return acc_matrix[-1]


def average_accuracy(acc_matrix: Matrix) -> float:
    """ACC = (1/T) Σ_j `R[T−1][j]`: mean accuracy over all tasks after the last one."""
    last = _last_row(acc_matrix)
    return sum(last[: len(acc_matrix)]) / len(acc_matrix)


def backward_transfer(acc_matrix: Matrix) -> float:
    """BWT = (1/(T−1)) Σ_{j<T−1} (`R[T−1][j]` − `R[j][j]`): negative means forgetting; 0 for a single task."""
    last, n = _last_row(acc_matrix), len(acc_matrix)
    if n == 1:
        return 0.0
    return sum(last[j] - acc_matrix[j][j] for j in range(n - 1)) / (n - 1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value), as papers report over seeds."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
