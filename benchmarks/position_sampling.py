"""What summing only a random m of each convolution's output positions into Σxxᵀ (NESSConfig.statistics_positions)
does: to the null bases, to the statistics pass's time, and to ACC / BWT, before it is offered.

Real data: MNIST digits as 3×32×32 images (the 5-datasets loader: padded 28→32, grey repeated to 3 channels) split
into 5 tasks of 2 digits, through the paper's AlexNet-5 (conv1 29×29 = 841 positions of d = 48, conv2 12×12 = 144 of
576, conv3 5×5 = 25 of 512). Two parts:
- bases: the model after training task 0 (exact NESS), then `end_task(0)` with each m on the same weights and batches;
  per layer the rank of the default energy rule, ‖P_m − P_exact‖_F of the null bases U, σ_max(U)'s relative change,
  and the pass's seconds (median of `--repeats`);
- runs: whole 5-task NESS runs (the defaults: energy δ 1e-3, transfer rank 100) per m and seed: test ACC / BWT, the
  final model's mean validation accuracy over the tasks, and the summed boundary seconds.

Usage: python benchmarks/position_sampling.py [--positions 0,64,16] [--seeds 1,2] [--train-per-task 2000]
       [--epochs 2] [--threads 2] [--json OUT]   (0 = every position, the exact sum; needs NESS_DATA_ROOT)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import time

import torch

from ness.data.five_datasets import five_datasets
from ness.data.tasks import Benchmark, Split, Task, iterate_batches
from ness.methods import NESS, NESSConfig
from ness.presets import IMAGE_NETWORKS
from ness.results import write_json_atomic
from ness.subspace import projector_distance
from ness.trainer import TrainConfig, evaluate, run_continual, train_task

TRAIN = TrainConfig(epochs=2, lr=0.01, batch_size=64, lr_schedule=False)
"""SGD lr 0.01, batch 64 (the AlexNet protocol's), a fixed lr for a fixed number of epochs (CPU-sized)."""


def split_mnist_images(train_per_task: int, seed: int) -> Benchmark:
    """MNIST as 3×32×32 images, 5 tasks of the digit pairs (0,1) … (8,9), labels 0/1 within each task."""
    mnist = five_datasets(os.environ.get("NESS_DATA_ROOT"), seed, datasets=("mnist",)).tasks[0]
    g = torch.Generator().manual_seed(seed)

    def pair(split: Split, first: int, limit: int | None = None) -> Split:
        idx = torch.nonzero((split.labels == first) | (split.labels == first + 1)).flatten()
        if limit is not None:
            idx = idx[torch.randperm(len(idx), generator=g)[:limit]].sort().values
        return Split(split.inputs[idx], split.labels[idx] - first)

    tasks = [
        Task(
            f"digits {first}/{first + 1}",
            2,
            pair(mnist.train, first, train_per_task),
            pair(mnist.val, first),
            pair(mnist.test, first),
            mnist.transform,
        )
        for first in range(0, 10, 2)
    ]
    return Benchmark("split_mnist_images", tuple(tasks), (3, 32, 32), shared_head=False, details={})


def network(bench: Benchmark, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return IMAGE_NETWORKS["alexnet"](bench, [t.num_classes for t in bench.tasks])


def positions_config(m: int, **options) -> NESSConfig:
    return NESSConfig(statistics_positions=m or None, **options)


def basis_effect(bench: Benchmark, caps: list[int], seed: int, repeats: int, train: TrainConfig) -> list[dict]:
    """Each m's null bases and pass time after the same trained task 0 (transfer_rank 0: the bases alone)."""
    model = network(bench, seed)
    trained = NESS(model, NESSConfig(transfer_rank=0))
    trained.begin_task(0)
    train_task(model, trained, 0, bench.tasks[0], train, torch.Generator().manual_seed(seed), progress=False)
    weights = copy.deepcopy(model.state_dict())
    task = bench.tasks[0]
    rows, reference = [], {}  # reference: the first m's U and σ_max(U) per layer
    for m in caps:
        seconds = []
        for _ in range(repeats):
            fresh = network(bench, seed)
            fresh.load_state_dict(weights)
            method = NESS(fresh, positions_config(m, transfer_rank=0))
            method.begin_task(0)
            started = time.perf_counter()
            method.end_task(0, iterate_batches(task.train, task.transform, train.test_batch_size))
            seconds.append(time.perf_counter() - started)
        method.begin_task(1)
        for record in (r for r in method.diagnostics() if r["task"] == 1):
            name, basis, sigma = record["layer"], method.model.get_submodule(record["layer"]).U, record["sigma_max_U"]
            exact_basis, exact_sigma = reference.setdefault(name, (basis, sigma))
            rows.append(
                {
                    "m": m,
                    "layer": name,
                    "d": record["d"],
                    "rank": record["rank"],
                    "projector_distance": projector_distance(exact_basis, basis),
                    "sigma_max_U": sigma,
                    "sigma_max_U_over_sigma_1": sigma / record["sigma_max_all"],
                    "sigma_max_change": abs(sigma - exact_sigma) / exact_sigma if exact_sigma else 0.0,
                    "pass_seconds": statistics.median(seconds),
                }
            )
    return rows


def whole_run(bench: Benchmark, m: int, seed: int, train: TrainConfig) -> dict:
    model = network(bench, seed)
    method = NESS(model, positions_config(m))
    result = run_continual(model, method, bench, train, seed, progress=False)
    val = [
        evaluate(model, j, task.val, task, train.test_batch_size, "cpu", predict=method.predict)[1]
        for j, task in enumerate(bench.tasks)
    ]
    ranks = {}
    for r in result["diagnostics"]:
        ranks.setdefault(r["layer"], []).append(r["rank"])
    return {
        "m": m,
        "seed": seed,
        "acc": result["acc"],
        "bwt": result["bwt"],
        "final_val_acc": sum(val) / len(val),
        "boundary_seconds": sum(t["boundary_seconds"] for t in result["tasks"]),
        "train_seconds": sum(t["train_seconds"] for t in result["tasks"]),
        "mean_rank": {name: sum(v) / len(v) for name, v in ranks.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", default="0,64,16", help="m per run, 0 = every position (first: the reference)")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--train-per-task", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=TRAIN.epochs)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-runs", action="store_true", help="the bases part only")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = dataclasses.replace(TRAIN, epochs=args.epochs)
    caps = [int(v) for v in args.positions.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    bench = split_mnist_images(args.train_per_task, seeds[0])
    print(
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); {args.train_per_task} training "
        f"images per task, {args.epochs} epochs, batch {train.batch_size}, SGD lr {train.lr}"
    )
    rows = basis_effect(bench, caps, seeds[0], args.repeats, train)
    print("\n| m (0: all) | layer | d | rank | ‖P_m − P_all‖_F | σ_max(U)/σ₁ | σ_max(U)'s change | pass (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['m']} | {r['layer']} | {r['d']} | {r['rank']} | {r['projector_distance']:.3g} | "
            f"{r['sigma_max_U_over_sigma_1']:.3g} | {r['sigma_max_change']:.2%} | {r['pass_seconds']:.2f} |"
        )
    runs = []
    if not args.skip_runs:
        print("\n| m (0: all) | seed | ACC | BWT | final val ACC | boundaries (s) | training (s) | mean ranks |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in seeds:
            bench = split_mnist_images(args.train_per_task, seed)
            for m in caps:
                r = whole_run(bench, m, seed, train)
                runs.append(r)
                ranks = " / ".join(f"{v:.0f}" for v in r["mean_rank"].values())
                print(
                    f"| {m} | {seed} | {r['acc']:.2f} | {r['bwt']:.2f} | {r['final_val_acc']:.2f} | "
                    f"{r['boundary_seconds']:.1f} | {r['train_seconds']:.1f} | {ranks} |",
                    flush=True,
                )
    if args.json:
        write_json_atomic(args.json, {"settings": vars(args), "bases": rows, "runs": runs})


if __name__ == "__main__":
    main()
