"""What NESS costs on the paper's networks: a training step with adapters vs the plain network, and a task boundary.

For AlexNet-5 (3×32×32), reduced ResNet-18 (3×32×32) and reduced ResNet-18 (3×84×84), on synthetic smooth images
(low-pass noise, so layer inputs have decaying spectra as real images do), this times with torch.utils.benchmark:
  * one SGD training step (forward, backward, update) of the plain network (task 0: everything trains);
  * the end of task 0: NESS's hooked statistics pass over `--boundary-samples` images (every layer's Σxxᵀ), and the
    same pass with each convolution summing a random `--positions` of its output positions per sample;
  * the start of task 1: every layer's float64 eigh + threshold + adapter construction;
  * one training step with NESS adapters (task 1: only V and the head train), at the ranks the data gave and at
    forced ranks r = f·d in every layer (`--rank-fractions`), since the adapter's cost depends on r;
and, per layer, the covariance accumulation of one batch and the eigendecomposition of its d×d covariance.

Usage: python benchmarks/ness_cost.py [--networks alexnet resnet18_32 resnet18_84] [--batch 64]
       [--boundary-samples N] [--eps1 1e-3] [--rank-fractions 0.25 0.5] [--positions 64] [--pixel-noise 0]
       [--device cpu|cuda] [--threads N] [--json OUT.json]
Results go to stdout as markdown tables (and to --json, rewritten after each network); BENCHMARKS.md records them
with the machine.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from ness.adapters import NullSpaceAdapter
from ness.methods.base import adaptable_layers
from ness.methods.ness import NESS, NESSConfig
from ness.models import alexnet, call_model, reduced_resnet18
from ness.modules import replace_module
from ness.subspace import covariance_spectrum, input_covariance, input_dim, layer_input_rows

# name: (builder, image size, images per task boundary = the paper's training images per task after validation)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "alexnet": (lambda: alexnet([10] * 10), 32, 4750),  # Split CIFAR-100
    "resnet18_32": (lambda: reduced_resnet18([10] * 5, input_size=32), 32, 4750),  # 5-datasets (CIFAR-10 size/10)
    "resnet18_84": (lambda: reduced_resnet18([5] * 20, input_size=84), 84, 2450),  # Split miniImageNet
}


def smooth_images(n: int, size: int, generator: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """(n, 3, size, size) images: 8×8 noise upsampled bilinearly (plus optional pixel noise), so patches have the
    decaying spectrum of natural images rather than white noise's flat one."""
    coarse = torch.randn(n, 3, 8, 8, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine + noise * torch.randn(n, 3, size, size, generator=generator)


def seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call of fn (torch.utils.benchmark handles warm-up and CUDA synchronisation)."""
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def once(fn: Callable[[], object], device: str) -> float:
    """Seconds of a single call (for calls that change state, such as end_task), device synchronised."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def training_step(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, task: int):
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(call_model(model, x, task), y).backward()
        optimizer.step()

    return step


def forced_rank_step(name: str, fraction: float, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds per task-1 training step when every layer has an adapter of rank ⌈fraction·d⌉ (random orthonormal U):
    the adapter cost at a chosen rank, whatever the data would give."""
    model = NETWORKS[name][0]().to(args.device)
    generator = torch.Generator().manual_seed(1)
    adapters = []
    for layer_name, layer in adaptable_layers(model).items():
        d = input_dim(layer)
        rank = max(1, math.ceil(fraction * d))
        basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=generator, dtype=torch.float64))
        adapter = NullSpaceAdapter(layer, basis, layer_name)
        replace_module(model, layer_name, adapter)
        adapters.append(adapter)
    model.train()
    params = [a.V for a in adapters] + list(model.task_heads[1].parameters())
    return seconds(training_step(model, params, x, y, 1), args.min_run_time)


def measure(name: str, args: argparse.Namespace) -> dict:
    build, size, task_images = NETWORKS[name]
    boundary_samples = args.boundary_samples or task_images
    generator = torch.Generator().manual_seed(0)
    model = build().to(args.device)
    x = smooth_images(args.batch, size, generator, args.pixel_noise).to(args.device)
    y = torch.randint(0, 5, (args.batch,), generator=generator).to(args.device)
    method = NESS(model, NESSConfig(eps1=args.eps1, transfer_rank=0))
    model.train()
    method.begin_task(0)
    plain_step = seconds(training_step(model, method.trainable_parameters(0), x, y, 0), args.min_run_time)

    # Per layer: covariance of one batch's layer inputs (captured with hooks) and eigh of the d×d covariance.
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
        for n in method.layer_names
    ]
    model.eval()
    with torch.no_grad():
        call_model(model, x, 0)
    for h in handles:
        h.remove()

    boundary_images = smooth_images(boundary_samples, size, generator, args.pixel_noise).to(args.device)
    batches = [(boundary_images[i : i + 64], None) for i in range(0, boundary_samples, 64)]
    end_task = once(lambda: method.end_task(0, batches), args.device)
    # The same pass with each convolution summing a random m of its output positions per sample (on the same model)
    sampled = NESS(model, NESSConfig(eps1=args.eps1, transfer_rank=0, statistics_positions=args.positions))
    sampled.begin_task(0)
    end_task_sampled = once(lambda: sampled.end_task(0, batches), args.device)
    layers = []
    for layer_name in method.layer_names:
        module = model.get_submodule(layer_name)
        rows = layer_input_rows(module, inputs[layer_name])
        cov = method.covariances[layer_name]
        layers.append(
            {
                "layer": layer_name,
                "d": cov.shape[0],
                "rows_per_batch": rows.shape[0],
                "covariance_ms": 1e3 * seconds(lambda r=rows: input_covariance(r), args.min_run_time / 4),
                "eigh_ms": 1e3 * seconds(lambda c=cov: covariance_spectrum(c), args.min_run_time / 4),
            }
        )
    begin = once(lambda: method.begin_task(1), args.device)
    ranks = {r["layer"]: r["rank"] for r in method.diagnostics()}
    for layer in layers:
        layer["rank"] = ranks[layer["layer"]]
    model.train()
    ness_step = seconds(training_step(model, method.trainable_parameters(1), x, y, 1), args.min_run_time)
    forced = {str(f): 1e3 * forced_rank_step(name, f, x, y, args) for f in args.rank_fractions}
    return {
        "network": name,
        "batch": args.batch,
        "plain_step_ms": 1e3 * plain_step,
        "ness_step_ms": 1e3 * ness_step,
        "forced_rank_step_ms": forced,
        "end_task_s": end_task,
        "end_task_sampled_s": end_task_sampled,
        "positions": args.positions,
        "begin_task_s": begin,
        "boundary_samples": boundary_samples,
        "layers": layers,
    }


def report(results: list[dict], env: dict) -> str:
    fractions = list(results[0]["forced_rank_step_ms"])
    header = [
        "network",
        "batch",
        "plain step (ms)",
        "NESS step, data ranks (ms)",
        *(f"NESS step, r = {f}·d (ms)" for f in fractions),
        "end of task: statistics pass (s)",
        f"the pass, {results[0]['positions']} positions per sample (s)",
        "start of task: eigh + adapters (s)",
        "boundary images",
        "images/s, plain",
        "images/s, NESS",
    ]
    lines = [
        f"device: {env['device_name']}, torch {env['torch']}, threads {env['threads']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in results:
        cells = [
            r["network"],
            str(r["batch"]),
            f"{r['plain_step_ms']:.1f}",
            f"{r['ness_step_ms']:.1f} ({r['ness_step_ms'] / r['plain_step_ms']:.2f}×)",
            *(f"{ms:.1f} ({ms / r['plain_step_ms']:.2f}×)" for ms in r["forced_rank_step_ms"].values()),
            f"{r['end_task_s']:.2f}",
            f"{r['end_task_sampled_s']:.2f} ({r['end_task_sampled_s'] / r['end_task_s']:.2f}×)",
            f"{r['begin_task_s']:.2f}",
            str(r["boundary_samples"]),
            f"{1e3 * r['batch'] / r['plain_step_ms']:.0f}",
            f"{1e3 * r['batch'] / r['ness_step_ms']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        lines += [
            "",
            f"{r['network']}: per layer",
            "",
            "| layer | d | rows per batch | covariance of one batch (ms) | eigh of d×d (ms) | null rank r |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {a['layer']} | {a['d']} | {a['rows_per_batch']} | {a['covariance_ms']:.2f} | {a['eigh_ms']:.2f} | "
            f"{a['rank']} |"
            for a in r["layers"]
        ]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--boundary-samples", type=int, default=None, help="default: the paper's images per task (4750 or 2450)"
    )
    parser.add_argument("--eps1", type=float, default=1e-3)
    parser.add_argument(
        "--rank-fractions", type=float, nargs="*", default=[0.25, 0.5], help="also time steps with r = f·d adapters"
    )
    parser.add_argument(
        "--positions", type=int, default=64, help="also time the statistics pass with statistics_positions=m"
    )
    parser.add_argument("--pixel-noise", type=float, default=0.0, help="white noise added to the smooth images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of repeated calls per timing")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "threads": torch.get_num_threads(),
    }
    from ness.results import write_json_atomic

    results = []
    for name in args.networks:
        results.append(measure(name, args))
        print(f"{name}: measured", file=sys.stderr, flush=True)
        if args.json:  # after each network, so that a run stopped by a time limit keeps the networks it finished
            write_json_atomic(args.json, {"environment": env, "args": vars(args), "results": results})
    print(report(results, env))


if __name__ == "__main__":
    main()
