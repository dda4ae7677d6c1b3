"""Compare NESS settings on one benchmark, choosing on validation: each candidate's validation ACC and BWT (from
the validation accuracy matrix, read after every task) beside its test ACC and BWT and its wall time.

Usage: python benchmarks/candidates.py BENCHMARK PRESET SEED NAME=KEY:VALUE,KEY:VALUE ... [--method ness]
       [--network NAME] [--json OUT.json]
e.g.   python benchmarks/candidates.py permuted_mnist quick 0 preset= b3=output_budget:1e-3,threshold:energy,delta:0.5
Each candidate is the preset's variant (`--method`, default ness) with the options given (method, training or data
options, as `ness run --set`). Data root from $NESS_DATA_ROOT. Choose on validation; the test columns are reported
only beside the choice.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from typing import Any

from ness.data import build_benchmark, resolve_data_root
from ness.experiment import resolve_settings
from ness.methods import build_method
from ness.metrics import average_accuracy, backward_transfer
from ness.runs import RunSpec
from ness.trainer import RunObserver, RunState, evaluate, run_continual, seed_everything


class ValidationMatrix(RunObserver):
    """R_val[i][j]: validation accuracy of task j after task i, read at every task's end."""

    def __init__(self, benchmark, device: str) -> None:
        self.benchmark, self.device = benchmark, device
        self.rows: list[list[float]] = []

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        i, n = len(self.rows), len(self.benchmark)
        row = [0.0] * n
        for j in range(i + 1):
            task = self.benchmark.tasks[j]
            row[j] = evaluate(state.method.model, j, task.val, task, 256, self.device, predict=state.method.predict)[1]
        self.rows.append(row)


def parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    name, _, spec = text.partition("=")
    options = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def run(
    benchmark: str, preset: str, seed: int, method: str, options: dict[str, Any], network: str | None = None
) -> dict[str, Any]:
    settings = resolve_settings(RunSpec(benchmark, method, seed, preset, network, overrides=options))
    train = settings.train
    seed_everything(seed)  # as `ness run` does: the network's initial weights come from the run's seed
    bench = build_benchmark(benchmark, seed=seed, data_root=resolve_data_root(None), **settings.data)
    model = settings.protocol.network(bench)
    runner = build_method(settings.variant.method, model, settings.options)
    validation = ValidationMatrix(bench, train.device)
    started = time.perf_counter()
    result = run_continual(model, runner, bench, train, seed, progress=False, observers=[validation])
    seconds = time.perf_counter() - started
    last = [r for r in result["diagnostics"] if r.get("task") == len(bench) - 1]
    return {
        "options": options,
        "val_acc": average_accuracy(validation.rows),
        "val_bwt": backward_transfer(validation.rows),
        "val_matrix": validation.rows,
        "acc": result["acc"],
        "bwt": result["bwt"],
        "acc_matrix": result["acc_matrix"],
        "seconds": seconds,
        "last_ranks": {r["layer"]: r["rank"] for r in last},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark")
    parser.add_argument("preset")
    parser.add_argument("seed", type=int)
    parser.add_argument("candidates", nargs="+", type=parse_candidate)
    parser.add_argument("--method", default="ness")
    parser.add_argument("--network", help="another network than the preset's, as `ness run --network` (e.g. vit)")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"{args.benchmark}, {args.preset} preset, seed {args.seed}, variant {args.method}, network {args.network}")
    print("| candidate | options | val ACC | val BWT | test ACC | test BWT | last ranks | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, options in args.candidates:
        row = rows[name] = run(args.benchmark, args.preset, args.seed, args.method, options, args.network)
        print(
            f"| {name} | {options or '(preset)'} | {row['val_acc']:.2f} | {row['val_bwt']:.2f} | {row['acc']:.2f} | "
            f"{row['bwt']:.2f} | {row['last_ranks']} | {row['seconds']:.0f} |",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(vars(args) | {"candidates": None, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
