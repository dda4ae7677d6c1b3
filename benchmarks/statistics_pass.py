"""The statistics pass's products: Σxxᵀ of 54,000 rows of 784 (one Permuted MNIST task's first-layer inputs) summed
per batch of 64 (the old way), pooled into chunks in float64 (`CovarianceSum`, what NESS uses) and pooled in float32;
the time of each and the float32 sum's error against the float64 one (relative Frobenius, and in the spectrum).
`--end-task` times instead a whole boundary's statistics pass: NESS's `end_task(0)` (the paper rule, Frobenius ε₁
0.03, no transfer) on the 784-100-100-10 MLP over that task's 54,000 training images in the trainer's statistics
batches of 64 (every layer's Σxxᵀ, the probe sample, the null bases).

Usage: python benchmarks/statistics_pass.py [--threads 2] [--repeats 3] [--end-task]   (real MNIST from
$NESS_DATA_ROOT, else random pixels of the same shape)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ness.data import DataError, Split, Task, build_benchmark
from ness.data.mnist import MNIST_MEAN, MNIST_STD
from ness.data.tasks import PixelTransform, iterate_batches
from ness.methods.ness import NESS, NESSConfig
from ness.models import shared_head_mlp
from ness.subspace import CovarianceSum, input_covariance, null_basis


def first_layer_rows() -> torch.Tensor:
    try:
        task = build_benchmark("permuted_mnist", seed=1, num_tasks=1, pc_valid=0.1).tasks[0]
        return task.transform(task.train.inputs)
    except DataError:
        return torch.rand(54000, 784, generator=torch.Generator().manual_seed(0))


def per_batch(rows: torch.Tensor) -> torch.Tensor:
    """The old pass: one float64 product and one new d×d sum per batch of 64."""
    total = input_covariance(rows[:0])
    for i in range(0, rows.shape[0], 64):
        total = total + input_covariance(rows[i : i + 64])
    return total


def pooled(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    total = CovarianceSum(dtype=dtype)
    for i in range(0, rows.shape[0], 64):
        total.add(rows[i : i + 64])
    return total.result()


def end_task_seconds(repeats: int) -> list[float]:
    """Seconds of NESS's end_task(0) over one Permuted MNIST task, each repeat on a fresh method."""
    try:
        task = build_benchmark("permuted_mnist", seed=1, num_tasks=1, pc_valid=0.1).tasks[0]
    except DataError:
        inputs = torch.randint(0, 256, (54000, 784), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        transform = PixelTransform(255.0, MNIST_MEAN, MNIST_STD)
        split = Split(inputs, torch.zeros(54000, dtype=torch.int64))
        task = Task("random pixels", 10, split, split, split, transform)
    seconds = []
    for _ in range(repeats):
        torch.manual_seed(0)
        method = NESS(shared_head_mlp(784, (100, 100), 10), NESSConfig(eps1=0.03, transfer_rank=0))
        method.begin_task(0)
        started = time.perf_counter()
        method.end_task(0, iterate_batches(task.train, task.transform, 64))
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-task", action="store_true", help="time NESS's whole end_task(0) pass instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.end_task:
        seconds = end_task_seconds(args.repeats)
        print(
            f"NESS end_task(0), 54,000 rows in batches of 64: {statistics.median(seconds):.3f} s (median of "
            f"{args.repeats}: {', '.join(f'{s:.3f}' for s in seconds)}; {args.threads} threads)"
        )
        return
    rows = first_layer_rows()
    ways = {
        "a float64 product per batch of 64": per_batch,
        "pooled chunks, float64 products (NESS)": lambda r: pooled(r, torch.float64),
        "pooled chunks, float32 products": lambda r: pooled(r, torch.float32),
    }
    results = {}
    for name, way in ways.items():
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            results[name] = way(rows)
            seconds.append(time.perf_counter() - started)
        print(f"{name}: {statistics.median(seconds):.3f} s (median of {args.repeats}, {args.threads} threads)")
    exact, rough = results["pooled chunks, float64 products (NESS)"], results["pooled chunks, float32 products"]
    agreement = float((exact - per_batch(rows)).norm() / exact.norm())
    print(f"rows {tuple(rows.shape)}; float64 pooled against per batch: {agreement:.1e} (relative Frobenius)")
    print(f"float32 against float64, relative Frobenius error: {float((rough - exact).norm() / exact.norm()):.1e}")
    for rule, knob in (("energy", {"delta": 1e-3}), ("frobenius", {"eps1": 0.03})):
        bases = [null_basis(c, knob.get("eps1"), rule, delta=knob.get("delta")) for c in (exact, rough)]
        sigma_u = [float(b.singular_values[: b.rank].max()) if b.rank else 0.0 for b in bases]
        print(
            f"{rule} rule {knob}: rank {bases[0].rank} (float64) / {bases[1].rank} (float32); σ_max(U) "
            f"{sigma_u[0]:.6g} / {sigma_u[1]:.6g} (relative change {abs(sigma_u[1] - sigma_u[0]) / sigma_u[0]:.1e})"
        )


if __name__ == "__main__":
    main()
