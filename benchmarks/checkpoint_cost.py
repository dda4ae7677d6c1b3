"""What an epoch checkpoint costs: its size, and the time to write it (atomically, fsynced) and to read it back.

For each network, NESS is taken to the middle of task 1 on synthetic inputs, as a real run's epoch checkpoint sees
it: task 0's statistics pass done, task 1's adapters installed, an SGD-with-momentum optimiser with its buffers, and
the best-validation copy of the weights. The checkpoint (ness.checkpoint.save_checkpoint: the whole run state, the
RNG states, a SHA-256 header) is written and read `--repeats` times; the medians are reported.

Usage: python benchmarks/checkpoint_cost.py [--networks mlp alexnet resnet18] [--samples 500] [--repeats 5]
       [--dir DIR] [--json OUT.json]
`--dir` is where the files go (default: a temporary folder; put it on the disk your runs write to).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ness.checkpoint import load_checkpoint, save_checkpoint
from ness.methods.ness import NESS, NESSConfig
from ness.models import alexnet, call_model, multi_head_mlp, reduced_resnet18
from ness.trainer import RunState, TaskLoop

# name: (builder, input shape); 10 task heads as Split CIFAR-100 / 5 as Split MNIST.
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: multi_head_mlp(784, (100, 100), [2] * 5), (784,)),
    "alexnet": (lambda: alexnet([10] * 10), (3, 32, 32)),
    "resnet18": (lambda: reduced_resnet18([10] * 5, input_size=32), (3, 32, 32)),
}


def mid_task_state(name: str, samples: int) -> RunState:
    """NESS in task 1 after a few SGDm steps, with the best-weights copy an epoch checkpoint carries."""
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = build()
    method = NESS(model, NESSConfig(eps1=1e-3, transfer_rank=0))  # the paper's NESS
    inputs = torch.randn(samples, *shape)
    method.begin_task(0)
    method.end_task(0, inputs.split(64))
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.01, momentum=0.9)
    for x in inputs[:128].split(32):
        optimizer.zero_grad()
        call_model(model, x, 1).logsumexp(dim=1).mean().backward()
        optimizer.step()
    loop = TaskLoop(optimizer, 0.01, 6, epochs_done=3, best_loss=1.0, best_state=copy.deepcopy(model.state_dict()))
    return RunState(method, torch.Generator().manual_seed(0), [[0.0] * 10 for _ in range(10)], loop=loop)


def measure(name: str, samples: int, repeats: int, folder: Path) -> dict[str, float | str]:
    state = mid_task_state(name, samples)
    path = folder / f"{name}.pt"
    writes, reads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(path, state, {"benchmark": "checkpoint_cost"})
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_checkpoint(path)
        reads.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in state.method.model.parameters())
    return {
        "network": name,
        "parameters": parameters,
        "megabytes": path.stat().st_size / 1e6,
        "write_seconds": statistics.median(writes),
        "read_seconds": statistics.median(reads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--samples", type=int, default=500, help="task 0's inputs for the statistics pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoint files go")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = [measure(name, args.samples, args.repeats, Path(folder)) for name in args.networks]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| network | parameters | checkpoint (MB) | write (s) | read (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['network']} | {r['parameters']:,} | {r['megabytes']:.1f} | {r['write_seconds']:.3f} | "
            f"{r['read_seconds']:.3f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
