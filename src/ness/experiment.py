"""One run = (benchmark, method, seed, preset): build everything, train, write results.json."""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ness.data import build_benchmark
from ness.methods import METHODS, build_method
from ness.presets import get_protocol
from ness.results import write_json_atomic
from ness.trainer import TrainConfig, run_continual, seed_everything


def split_overrides(method: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Route `key=value` overrides to the method config, the training config or the data options."""
    method_fields = {f.name for f in dataclasses.fields(METHODS[method].config_class)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    routed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
    for key, value in overrides.items():
        if key in method_fields:
            routed[0][key] = value
        elif key in train_fields:
            routed[1][key] = value
        elif key in ("pc_valid", "train_per_task", "num_tasks"):
            routed[2][key] = value
        else:
            raise ValueError(
                f"unknown option {key!r} for method {method!r}; method options: "
                f"{sorted(method_fields)}; training options: {sorted(train_fields)}; "
                "data options: ['num_tasks', 'pc_valid', 'train_per_task']"
            )
    return routed


def run_experiment(
    benchmark: str,
    method: str,
    seed: int,
    preset: str = "quick",
    *,
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one seed of `method` on `benchmark`; write `out/benchmark/method/seed_N/results.json` if `out`."""
    protocol = get_protocol(benchmark, preset)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    method_over, train_over, data_over = split_overrides(method, overrides or {})
    train = dataclasses.replace(protocol.train, **train_over)
    start = time.perf_counter()
    seed_everything(seed)
    bench = build_benchmark(benchmark, seed=seed, data_root=data_root, **{**protocol.data, **data_over})
    model = protocol.network(bench)
    runner = build_method(method, model, {**protocol.methods.get(method, {}), **method_over})
    outcome = run_continual(model, runner, bench, train, seed, progress)
    results = {
        "method": method,
        "benchmark": benchmark,
        "preset": preset,
        "seed": seed,
        "config": {
            "method": dataclasses.asdict(runner.config),
            "train": dataclasses.asdict(train),
            "protocol": protocol.describe(),
            "overrides": overrides or {},
        },
        **outcome,
        "timings": {"total_seconds": time.perf_counter() - start},
        "benchmark_details": bench.details,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "device": train.device,
            "threads": torch.get_num_threads(),
        },
    }
    if out is not None:
        write_json_atomic(Path(out) / benchmark / method / f"seed_{seed}" / "results.json", results)
    return results
