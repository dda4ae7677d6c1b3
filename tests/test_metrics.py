"""ACC, BWT and mean ± std against hand-worked matrices and independent computations (METHODS_SPEC §1.5)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from ness.metrics import average_accuracy, backward_transfer, mean_std

NAN = float("nan")


def acc_by_loop(r: list[list[float]]) -> float:
    """ACC = (1/T) Σ_j R[T−1][j], written out."""
    t = len(r)
    total = 0.0
    for j in range(t):
        total += r[t - 1][j]
    return total / t


def bwt_by_loop(r: list[list[float]]) -> float:
    """BWT = (1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j]), written out; 0 for T = 1."""
    t = len(r)
    if t == 1:
        return 0.0
    total = 0.0
    for j in range(t - 1):
        total += r[t - 1][j] - r[j][j]
    return total / (t - 1)


def test_acc_bwt_hand_worked_3x3():
    # R[i][j]: after task 0: 90; after task 1: 80, 95; after task 2: 70, 85, 100.
    r = [[90.0, 0.0, 0.0], [80.0, 95.0, 0.0], [70.0, 85.0, 100.0]]
    # ACC = (70 + 85 + 100) / 3 = 85; BWT = ((70 − 90) + (85 − 95)) / 2 = −15.
    assert average_accuracy(r) == pytest.approx(85.0)
    assert backward_transfer(r) == pytest.approx(-15.0)


def test_acc_bwt_positive_backward_transfer():
    # A later task improved an earlier one: BWT > 0. ACC = (60 + 90) / 2 = 75; BWT = 60 − 50 = +10.
    r = [[50.0, 0.0], [60.0, 90.0]]
    assert average_accuracy(r) == pytest.approx(75.0)
    assert backward_transfer(r) == pytest.approx(10.0)


@pytest.mark.parametrize("garbage", [NAN, math.inf, -1e9, 12345.0])
def test_upper_triangle_is_ignored(garbage):
    # Same matrix as the hand-worked one, with garbage strictly above the diagonal.
    r = [[90.0, garbage, garbage], [80.0, 95.0, garbage], [70.0, 85.0, 100.0]]
    assert average_accuracy(r) == pytest.approx(85.0)
    assert backward_transfer(r) == pytest.approx(-15.0)


@pytest.mark.parametrize("seed", range(5))
def test_acc_bwt_match_explicit_loops_on_random_matrices(seed):
    rng = random.Random(seed)
    t = rng.randint(2, 7)
    r = [[rng.uniform(0, 100) if j <= i else rng.choice([NAN, 1e6, -7.0]) for j in range(t)] for i in range(t)]
    assert average_accuracy(r) == pytest.approx(acc_by_loop(r), rel=1e-12, abs=1e-12)
    assert backward_transfer(r) == pytest.approx(bwt_by_loop(r), rel=1e-12, abs=1e-12)


def test_single_task():
    assert average_accuracy([[73.5]]) == pytest.approx(73.5)
    assert backward_transfer([[73.5]]) == 0.0


def test_bwt_zero_without_forgetting_and_minus_drop_with_uniform_forgetting():
    # Diagonal 100 everywhere; last row loses exactly 10 points on every earlier task → BWT = −10.
    t = 4
    r = [[100.0 if j == i else (90.0 if i == t - 1 and j < i else 100.0) for j in range(t)] for i in range(t)]
    assert backward_transfer(r) == pytest.approx(-10.0)
    # ACC = (3·90 + 100) / 4 = 92.5.
    assert average_accuracy(r) == pytest.approx(92.5)
    flat = [[100.0] * t for _ in range(t)]
    assert backward_transfer(flat) == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        [],  # no tasks
        [[90.0, 0.0], [80.0, 95.0], [70.0, 85.0]],  # 3 rows, 2 columns (tall)
        [[90.0], [80.0, 95.0], [70.0, 85.0, 100.0]],  # ragged: row 0 shorter than T
    ],
    ids=["empty", "tall_3x2", "ragged"],
)
@pytest.mark.parametrize("metric", [average_accuracy, backward_transfer])
def test_non_square_matrix_raises(metric, bad):
    with pytest.raises(ValueError):
        metric(bad)


@pytest.mark.parametrize("metric", [average_accuracy, backward_transfer])
def test_wide_non_square_matrix_raises(metric):
    with pytest.raises(ValueError):
        metric([[90.0, 0.0, 0.0], [80.0, 95.0, 0.0]])  # 2 rows, 3 columns


@pytest.mark.parametrize(
    "values",
    [[1.0, 2.0, 3.0, 4.0], [92.5, 94.0], [-3.0, 0.0, 10.0, 2.5, 2.5], [1e-3, 2e-3, 7e-3]],
)
def test_mean_std_is_sample_std(values):
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(values), rel=1e-12)  # n − 1 in the denominator
    assert std != pytest.approx(statistics.pstdev(values), rel=1e-6)  # and not the population std


def test_mean_std_hand_worked():
    # [90, 94]: mean 92, deviations ±2, sample variance (4 + 4) / 1 = 8 → std √8.
    mean, std = mean_std([90.0, 94.0])
    assert mean == pytest.approx(92.0)
    assert std == pytest.approx(math.sqrt(8.0))


def test_mean_std_one_value_and_empty():
    assert mean_std([42.0]) == (42.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
