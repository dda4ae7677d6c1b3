"""Where a continual method loses accuracy: plasticity or stability, which layer, and how far the network drifts.

Runs one method on one benchmark (any preset, `--set` overrides as `ness run`), keeps the model after every task,
and measures on each task's VALIDATION split (the diagnosis steers design choices, so it never reads the test set):
1. plasticity and stability: R[t][t] (how well task t learnt) and R[T-1][j] − R[j][j] (what later tasks took away);
2. which layer's later change costs an old task most: the final model with one layer's weights put back as they were
   right after task j, for each layer and old task j (the gain in task j's accuracy);
3. network drift against the per-layer change: for each layer and old task j, the RMS change of the layer's output
   on task j's inputs between the model after task j and the final one, split into the part from the layer's own
   weight change, ‖(W_T − W_j)·h_j‖, and the part from its inputs having moved, ‖W_T·(h_T − h_j)‖, each relative
   to ‖W_j·h_j‖.
For methods whose model alone predicts (NESS, GPM, SGP, fine-tuning, ...), not TRGP/HAT with their per-task state.

Usage: python benchmarks/ness_diagnosis.py BENCHMARK PRESET SEED METHOD [--set KEY=VALUE ...] [--json OUT.json]
(data root from $NESS_DATA_ROOT)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

from ness.cli import parse_option
from ness.data import Benchmark, build_benchmark, resolve_data_root
from ness.experiment import resolve_settings
from ness.methods import adaptable_layers, build_method
from ness.models import call_model
from ness.runs import RunSpec
from ness.subspace import SUPPORTED_LAYERS
from ness.trainer import RunObserver, RunState, evaluate, run_continual, seed_everything


class Snapshots(RunObserver):
    """The model's weights after every task."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        self.states.append({k: v.detach().clone() for k, v in state.method.model.state_dict().items()})


def val_accuracy(model: nn.Module, bench: Benchmark, j: int, device: str) -> float:
    task = bench.tasks[j]
    return evaluate(model, j, task.val, task, 256, device)[1]


@torch.no_grad()
def layer_io(model: nn.Module, names: list[str], x: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
    """Each named layer's input for the batch x of task t (a flattened row per sample for Linear layers)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    model.eval()
    call_model(model, x, t)
    for h in handles:
        h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark")
    parser.add_argument("preset")
    parser.add_argument("seed", type=int)
    parser.add_argument("method")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=parse_option)
    parser.add_argument("--json")
    args = parser.parse_args()
    spec = RunSpec(args.benchmark, args.method, args.seed, args.preset, overrides=dict(args.overrides))
    settings = resolve_settings(spec)
    train = settings.train
    seed_everything(args.seed)  # as `ness run` does: the initial weights come from the run's seed
    bench = build_benchmark(args.benchmark, seed=args.seed, data_root=resolve_data_root(None), **settings.data)
    model = settings.protocol.network(bench)
    method = build_method(settings.variant.method, model, settings.options)
    snapshots = Snapshots()
    started = time.perf_counter()
    result = run_continual(model, method, bench, train, args.seed, progress=False, observers=[snapshots])
    seconds = time.perf_counter() - started
    T, device = len(bench), train.device
    final = snapshots.states[-1]
    # The layers later tasks change (per-task heads are each task's own and never change after it).
    layers = list(adaptable_layers(model, kinds=SUPPORTED_LAYERS))

    val = [[0.0] * T for _ in range(T)]
    for i, state in enumerate(snapshots.states):
        model.load_state_dict(state)
        for j in range(i + 1):
            val[i][j] = val_accuracy(model, bench, j, device)
    print(f"{args.benchmark} {args.preset} seed {args.seed} {args.method} {dict(args.overrides)}: {seconds:.0f} s")
    print(f"test ACC {result['acc']:.2f}  BWT {result['bwt']:.2f}")
    print("\n| task j | val R[j][j] (learnt) | val R[T-1][j] | forgotten |")
    print("|---|---|---|---|")
    for j in range(T):
        print(f"| {j} | {val[j][j]:.2f} | {val[T - 1][j]:.2f} | {val[j][j] - val[T - 1][j]:.2f} |")

    # 2. one layer's weights put back as they were right after task j
    restore: dict[str, list[float]] = {}
    for name in layers:
        gains = []
        for j in range(T - 1):
            state = dict(final)
            for key in final:
                if key.startswith(f"{name}."):
                    state[key] = snapshots.states[j][key]
            model.load_state_dict(state)
            gains.append(val_accuracy(model, bench, j, device) - val[T - 1][j])
        restore[name] = gains
    print("\n| layer put back | mean gain over old tasks | gain per old task j = 0.. |")
    print("|---|---|---|")
    for name, gains in restore.items():
        print(f"| {name} | {sum(gains) / len(gains):+.2f} | {' '.join(f'{g:+.1f}' for g in gains)} |")

    # 3. each layer's output drift on old inputs: own weight change vs input drift
    drift: dict[str, dict[str, list[float]]] = {n: {"own": [], "inputs": [], "total": []} for n in layers}
    for j in range(T - 1):
        task = bench.tasks[j]
        x = task.transform(task.val.inputs[:2000]).to(device)
        model.load_state_dict(snapshots.states[j])
        before = layer_io(model, layers, x, j)
        weights_j = {n: model.get_submodule(n).weight.detach().clone() for n in layers}
        model.load_state_dict(final)
        after = layer_io(model, layers, x, j)
        for n in layers:
            w_t = model.get_submodule(n).weight.detach()
            w_j, h_j, h_t = weights_j[n], before[n].flatten(1), after[n].flatten(1)
            base = (h_j @ w_j.T).norm()
            drift[n]["own"].append(float(((h_j @ (w_t - w_j).T).norm()) / base))
            drift[n]["inputs"].append(float(((h_t - h_j) @ w_t.T).norm() / base))
            drift[n]["total"].append(float(((h_t @ w_t.T) - (h_j @ w_j.T)).norm() / base))
    print(
        "\n| layer | own weight change ‖ΔW·h_j‖/‖W_j·h_j‖ | input drift ‖W_T·Δh‖/‖W_j·h_j‖ | total (mean over old j) |"
    )
    print("|---|---|---|---|")
    for n, parts in drift.items():
        mean = {k: sum(v) / len(v) for k, v in parts.items()}
        print(f"| {n} | {mean['own']:.4f} | {mean['inputs']:.4f} | {mean['total']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": vars(args) | {"overrides": dict(args.overrides)},
                    "seconds": seconds,
                    "test": {k: result[k] for k in ("acc_matrix", "acc", "bwt")},
                    "val_matrix": val,
                    "restore_gain": restore,
                    "drift": drift,
                    "records": result["diagnostics"],
                },
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
