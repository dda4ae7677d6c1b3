"""Peak memory of a replay boundary: NESS with memory='replay' re-forwards every stored input at each task start.

One synthetic 5-datasets-sized task (N images of 3×32×32, CIFAR-10's 47,500 training images after the validation
split) is stored as task 0's replay memory of the 5-datasets network (reduced ResNet-18, 32×32); the script then
measures the process's peak resident memory and the time of `begin_task(1)`, the boundary that passes those inputs
through the model and builds every layer's covariance. Each measurement runs in a fresh process, so the peak is the
boundary's own (ru_maxrss is a high-water mark).

Usage: python benchmarks/replay_memory.py N [N ...] [--batch B [B ...]] [--json OUT.json]
B is NESSConfig.replay_batch_size; B = 0 passes a task's N inputs as one batch, as ness-cl did before it batched
the replay (the official code uses DataLoader batches of 64).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from ness.methods.ness import NESS, NESSConfig
from ness.models import reduced_resnet18


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(n: int, batch: int) -> dict[str, float]:
    """Store n synthetic images as task 0's replay memory, then time begin_task(1) and read the peak memory."""
    torch.manual_seed(0)
    model = reduced_resnet18([10] * 5, input_size=32)
    method = NESS(model, NESSConfig(memory="replay", replay_batch_size=batch or n, probe_samples=256))
    images = torch.randn(n, 3, 32, 32)
    method.begin_task(0)
    method.end_task(0, images.split(64))
    del images
    before = peak_mb()
    started = time.perf_counter()
    method.begin_task(1)
    seconds = time.perf_counter() - started
    return {"n": n, "batch": batch, "peak_mb": peak_mb(), "peak_before_mb": before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 0])
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.n[0], args.batch[0])))
        return
    rows = []
    print("| stored images N | replay batch | peak memory (MB) | before the boundary (MB) | boundary (s) |")
    print("|---|---|---|---|---|")
    for n in args.n:
        for batch in args.batch:
            command = [sys.executable, __file__, str(n), "--batch", str(batch), "--child"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {n} | {batch or 'all'} | failed: {done.stderr.strip().splitlines()[-1:]} | | |", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"| {n:,} | {batch or 'all (N)'} | {row['peak_mb']:,.0f} | {row['peak_before_mb']:,.0f} | "
                f"{row['seconds']:.1f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
