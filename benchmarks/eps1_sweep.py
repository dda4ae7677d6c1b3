"""Sweep NESS's ε₁ on one benchmark and report validation ACC (for choosing ε₁) next to test ACC/BWT.

Usage: python benchmarks/eps1_sweep.py BENCHMARK PRESET SEED EPS1 [EPS1 ...] [--no-finetune] [--set KEY=VALUE ...]
(data root from $NESS_DATA_ROOT; each --set is a NESS option for every ε₁, e.g. --set threshold=nuclear)
Choose ε₁ on validation ACC with a seed that is not reported (we use seed 0; results use seeds 1-3).
"""

from __future__ import annotations

import sys
import time

from ness.cli import parse_option
from ness.data import build_benchmark
from ness.methods import build_method
from ness.presets import get_protocol
from ness.trainer import evaluate, run_continual, seed_everything


def main(
    benchmark: str,
    preset: str,
    seed: int,
    eps1_values: list[float],
    finetune: bool = True,
    extra: dict | None = None,
) -> None:
    protocol = get_protocol(benchmark, preset)
    runs = [("finetune", {})] * finetune + [("ness", {**(extra or {}), "eps1": e}) for e in eps1_values]
    print("| method | ε₁ | validation ACC | test ACC | test BWT | final ranks per layer | seconds |")
    print("|---|---|---|---|---|---|---|")
    for method, options in runs:
        seed_everything(seed)
        bench = build_benchmark(benchmark, seed=seed, **protocol.data)
        model = protocol.network(bench)
        runner = build_method(method, model, {**protocol.variant(method).options, **options})
        start = time.perf_counter()
        result = run_continual(model, runner, bench, protocol.train, seed, progress=False)
        val = [evaluate(model, j, task.val, task, 256, protocol.train.device)[1] for j, task in enumerate(bench.tasks)]
        ranks = {d["layer"]: d["rank"] for d in result["diagnostics"]}  # the last task's record wins
        print(
            f"| {method} | {options.get('eps1', '–')} | {sum(val) / len(val):.2f} | {result['acc']:.2f} | "
            f"{result['bwt']:.2f} | {ranks or '–'} | {time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    argv = sys.argv[1:]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--set")]
    options = dict(parse_option(text) for text in sets)
    main(args[0], args[1], int(args[2]), [float(v) for v in args[3:]], "--no-finetune" not in argv, options)
