"""The data-parallel training step on 2 processes (gloo): the same work timed for each given source tree.

The work: 2 Permuted-MNIST-shaped tasks of `--images` random training images each (784 features, 10 classes; the
values do not change the cost), MLP 784-100-100-10 with one shared output, SGD lr 0.01, a fixed lr, `--epochs`
epochs of batches of `--batch-size` per task, trained by `ness.trainer.run_continual` under
`python -m torch.distributed.run --nproc_per_node 2` with OMP_NUM_THREADS=1. It reports the trainer's training
seconds summed over both tasks (`train_seconds`: the steps, without the task boundaries or the evaluation), the
median over `--repeats` runs, each source tree's runs interleaved with the others'.

Each `--src DIR` is a source tree put first on PYTHONPATH (default: this checkout's src), so an older version of
ness can be timed on the same work, e.g. the version before DistributedDataParallel (issue 16):
    mkdir -p /tmp/ness-old && git archive 98d0b60 src | tar -x -C /tmp/ness-old
    python benchmarks/distributed_step.py --src /tmp/ness-old/src --src src --repeats 3

Usage: python benchmarks/distributed_step.py [--src DIR ...] [--methods finetune,ness] [--images 4000]
       [--epochs 2] [--batch-size 64] [--repeats 3] [--single] [--json OUT.json]
`--single` also times one process (the last --src) on the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
METHODS = ("finetune", "gpm", "ness")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One process of the run (all of it with --single): train, and rank 0 writes what it measured."""
    import torch

    from ness import distributed
    from ness.data import Benchmark, Split, Task
    from ness.data.mnist import MNIST_MEAN, MNIST_STD
    from ness.data.tasks import PixelTransform
    from ness.methods import GPM, NESS, FineTune
    from ness.models import shared_head_mlp
    from ness.trainer import TrainConfig, run_continual

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def task(name: str) -> Task:
        def split(n: int) -> Split:
            return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,)))

        transform = PixelTransform(255.0, MNIST_MEAN, MNIST_STD, torch.randperm(784, generator=g))
        return Task(name, 10, split(args.images), split(64), split(64), transform)

    benchmark = Benchmark("permuted-shaped", (task("0"), task("1")), (784,), shared_head=True, details={})
    config = TrainConfig(epochs=args.epochs, lr=0.01, batch_size=args.batch_size, lr_schedule=False)
    with distributed.process_group():
        torch.manual_seed(0)
        model = shared_head_mlp(784, [100, 100], 10)
        method = {"finetune": FineTune, "gpm": GPM, "ness": NESS}[args.method](model)
        started = time.perf_counter()
        result = run_continual(model, method, benchmark, config, seed=0, progress=False)
        wall = time.perf_counter() - started
        if distributed.is_main():
            train = sum(task["train_seconds"] for task in result["tasks"])
            Path(args.out).write_text(json.dumps({"train_seconds": train, "run_seconds": wall}))


def launch(src: str, method: str, args: argparse.Namespace, processes: int) -> dict:
    """One run of the work on `processes` processes with `src` first on PYTHONPATH; what rank 0 measured."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.json"
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
        for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(variable, None)
        work = [
            str(HERE), "--worker", "--method", method, "--images", str(args.images), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--out", str(out),
        ]  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command = [*launcher, "--master_port", str(free_port()), *work] if processes == 2 else [sys.executable, *work]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", help="a source tree to time (repeatable; default: ./src)")
    parser.add_argument("--methods", default="finetune,ness", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--images", type=int, default=4000, help="training images per task")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", action="store_true", help="also time one process (the last --src)")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sources = [str(Path(s).resolve()) for s in (args.src or [REPO / "src"])]
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    runs = [(src, 2) for src in sources] + ([(sources[-1], 1)] if args.single else [])
    times: dict[tuple[str, str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for method in methods:
            for src, processes in runs:
                figures = launch(src, method, args, processes)
                times.setdefault((method, src, processes), []).append(figures)
                print(f"  repeat {repeat}: {method:8s} {processes} proc  {src}: {figures['train_seconds']:.2f} s")
    steps = 2 * args.epochs * -(-args.images // args.batch_size)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 2 tasks × {args.epochs} epochs × "
        f"{args.images} images, batch {args.batch_size} ({steps} steps); median of {args.repeats}, train seconds"
    )
    for (method, src, processes), figures in times.items():
        train = statistics.median(f["train_seconds"] for f in figures)
        print(f"{method:8s} {processes} proc  {train:7.2f} s  {1000 * train / steps:6.2f} ms/step  {src}")
    if args.json:
        rows = [{"method": m, "src": s, "processes": p, "runs": f} for (m, s, p), f in times.items()]
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
