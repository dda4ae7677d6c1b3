"""Certified per-layer stability against the whole network's drift (NESSConfig.max_output_shift, Eq. 10).

For each ε (and no constraint), train NESS on a benchmark and, after every task t ≥ 1, record per layer the certified
√ε, Eq. 8's bound and the measured max ‖xᵀΔW‖ on recorded old inputs, and for the whole network the largest change of
an earlier task's logits, max over its test images of ‖f_t(x) − f_{t-1}(x)‖ through its own head.

Usage: python benchmarks/certified_drift.py BENCHMARK PRESET SEED EPS [EPS ...]   (EPS "none": no constraint)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from ness.data import build_benchmark, iterate_batches
from ness.methods import build_method
from ness.presets import get_protocol
from ness.trainer import run_continual, seed_everything


@torch.no_grad()
def old_task_logits(method, bench, upto: int) -> list[torch.Tensor]:
    """Logits of every task j < upto on its whole test split (eval mode, in file order)."""
    method.model.eval()
    out = []
    for j, task in enumerate(bench.tasks[:upto]):
        out.append(torch.cat([method.predict(x, j) for x, _ in iterate_batches(task.test, task.transform, 512)]))
    method.model.train()
    return out


def measure(benchmark: str, preset: str, seed: int, shift: float | None) -> tuple[dict, dict[int, float], float]:
    """One NESS-SAM run with max_output_shift = shift: (results, old tasks' max logit drift per task, seconds)."""
    protocol = get_protocol(benchmark, preset)
    variant = protocol.variant("ness_sam")
    seed_everything(seed)
    bench = build_benchmark(benchmark, seed=seed, **protocol.data)
    model = protocol.network(bench)
    method = build_method("ness", model, {**variant.options, "max_output_shift": shift})
    train = dataclasses.replace(protocol.train, **variant.train)
    drift: dict[int, float] = {}
    before: list[torch.Tensor] = []
    original_begin, original_end = method.begin_task, method.end_task

    def begin_task(t: int) -> None:
        before[:] = old_task_logits(method, bench, t)
        original_begin(t)

    def end_task(t: int, batches: Any) -> None:
        original_end(t, batches)
        after = old_task_logits(method, bench, t)
        if after:
            drift[t] = max(float((a - b).norm(dim=1).max()) for a, b in zip(after, before, strict=True))

    method.begin_task, method.end_task = begin_task, end_task
    start = time.perf_counter()
    result = run_continual(model, method, bench, train, seed, progress=False)
    return result, drift, time.perf_counter() - start


def main(benchmark: str, preset: str, seed: int, shifts: list[float | None]) -> None:
    print("| ε | ACC | BWT | task | max layer shift / √ε | max Eq. 8 bound | max logit drift of old tasks | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for shift in shifts:
        result, drift, seconds = measure(benchmark, preset, seed, shift)
        for t in sorted(drift):
            rows = [r for r in result["diagnostics"] if r["task"] == t and r.get("measured_max_shift") is not None]
            layer = max((r["measured_max_shift"] for r in rows), default=float("nan"))
            bound = max((r["eq8_bound"] for r in rows), default=float("nan"))
            ratio = f"{layer:.3g} / {shift**0.5:.3g}" if shift else f"{layer:.3g}"
            print(
                f"| {shift or 'none'} | {result['acc']:.2f} | {result['bwt']:.2f} | {t} | {ratio} | {bound:.3g} | "
                f"{drift[t]:.3g} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    values = [None if v == "none" else float(v) for v in sys.argv[4:]]
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), values)
