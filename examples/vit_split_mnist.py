"""NESS on a small vision transformer trained from scratch on Split MNIST, against fine-tuning, on a CPU.

Every nn.Linear of the ViT (q, k, v, output and MLP projections, whose inputs are (batch, tokens, width)) and its
Conv2d patch embedding learn later tasks in the null space of earlier tasks' inputs, plus each task's own transfer
adapter (NESSConfig's defaults); the per-task heads are never adapted. It takes about half a minute on one core:

    NESS_DATA_ROOT=../shared/data python examples/vit_split_mnist.py
    python examples/vit_split_mnist.py --data-root ../shared/data --train-per-task 5000 --epochs 1 --eps1 0.03 \
        --transfer-rank 0                          # the paper's NESS: Frobenius rule, no transfer adapter
"""

from __future__ import annotations

import argparse
from typing import Any

from ness import NESS, FineTune, NESSConfig
from ness.data import Benchmark, split_mnist
from ness.models import vision_transformer
from ness.trainer import TrainConfig, run_continual, seed_everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="folder holding mnist/ (default: $NESS_DATA_ROOT)")
    parser.add_argument("--train-per-task", type=int, default=2000, help="training images per task (default: 2000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per task (default: 2)")
    parser.add_argument("--lr", type=float, default=0.05, help="plain SGD learning rate (default: 0.05)")
    parser.add_argument("--batch-size", type=int, default=10, help="as the Split MNIST protocol (default: 10)")
    parser.add_argument("--eps1", type=float, help="NESS's ε₁, Frobenius rule (default: the energy rule δ 1e-3)")
    parser.add_argument("--transfer-rank", type=int, default=100, help="k of each task's transfer adapter (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def run_method(name: str, benchmark: Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    """Train a freshly initialised ViT (the same initial weights for every method) over the tasks with `name`."""
    seed_everything(args.seed)
    model = vision_transformer([task.num_classes for task in benchmark.tasks], image_shape=(1, 28, 28), patch=7)
    config = NESSConfig(eps1=args.eps1, transfer_rank=args.transfer_rank)
    method = NESS(model, config) if name == "ness" else FineTune(model)
    train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, lr_schedule=False)
    return run_continual(model, method, benchmark, train, args.seed, progress=args.progress)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run fine-tuning and NESS, print their accuracy matrices, ACC and BWT, and return both outcomes."""
    args = parse_args(argv)
    benchmark = split_mnist(args.data_root, seed=args.seed, train_per_task=args.train_per_task)
    outcomes = {name: run_method(name, benchmark, args) for name in ("finetune", "ness")}
    print(
        f"Split MNIST, {len(benchmark)} tasks × 2 classes, {args.train_per_task} training images per task, "
        f"{args.epochs} epoch(s), ViT of {sum(p.numel() for p in vision_transformer([2] * 5).parameters())} "
        f"parameters, seed {args.seed}"
    )
    for name, outcome in outcomes.items():
        print(f"\n{name.upper()}: R[i][j] = test accuracy (%) on task j after task i")
        for row in outcome["acc_matrix"]:
            print("  " + " ".join(f"{a:5.1f}" for a in row))
        print(f"  ACC {outcome['acc']:.2f}   BWT {outcome['bwt']:.2f}")
    return outcomes


if __name__ == "__main__":
    main()
