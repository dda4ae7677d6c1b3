"""Sweep NESS's ε₁ on one benchmark and report validation ACC (for choosing ε₁) next to test ACC/BWT.

Usage: python benchmarks/eps1_sweep.py BENCHMARK PRESET SEED EPS1 [EPS1 ...] [--no-finetune] [--faithful]
(data root from $NESS_DATA_ROOT; --faithful sweeps ε₁ under the official code's settings: nuclear threshold, replay)
Choose ε₁ on validation ACC with a seed that is not reported (we use seed 0; results use seeds 1-3).
"""

from __future__ import annotations

import sys
import time

from ness.data import build_benchmark
from ness.methods import build_method
from ness.presets import faithful_settings, get_protocol
from ness.trainer import evaluate, run_continual, seed_everything


def main(
    benchmark: str, preset: str, seed: int, eps1_values: list[float], finetune: bool = True, faithful: bool = False
) -> None:
    protocol = get_protocol(benchmark, preset)
    official = faithful_settings(protocol)["ness"] if faithful else {}
    runs = [("finetune", {})] * finetune + [("ness", {**official, "eps1": e}) for e in eps1_values]
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
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    eps1_values = [float(v) for v in args[3:]]
    main(args[0], args[1], int(args[2]), eps1_values, "--no-finetune" not in sys.argv, "--faithful" in sys.argv)
