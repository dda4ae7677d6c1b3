"""How stale are memory-free NESS's statistics? (issue 5 §2)

memory='covariance' sums each task's Σxxᵀ as the layer saw it when that task ended; later tasks change the layers
below, so a deeper layer's earlier inputs drift. At every task boundary this script also recomputes the covariance of
all earlier tasks' inputs through the current model (what memory='replay' does) and reports per layer:
- the relative difference ‖C_stale − C_fresh‖_F / ‖C_fresh‖_F;
- the null-space ranks each gives;
- σ_max(U) of the basis NESS builds (from C_stale) measured on the stale and on the fresh covariance: the ratio is
  how much the fresh inputs' Eq. 8 bound exceeds the one NESS believes in.

Usage: python benchmarks/memory_staleness.py BENCHMARK PRESET SEED
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from ness.data import build_benchmark
from ness.methods import build_method
from ness.methods.base import task_inputs, watch_layer_inputs
from ness.presets import get_protocol
from ness.subspace import input_covariance, layer_input_rows, null_basis
from ness.trainer import run_continual, seed_everything


@torch.no_grad()
def fresh_covariances(method, inputs: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Σxxᵀ of every NESS layer over the stored inputs of earlier tasks, through the current model."""
    sums: dict[str, torch.Tensor] = {}

    def receive(name: str, layer: torch.nn.Module, x: torch.Tensor) -> None:
        c = input_covariance(layer_input_rows(layer, x))
        sums[name] = sums.get(name, 0) + c

    with watch_layer_inputs(method.model, method.layer_names, receive):
        for x, task in inputs:
            method.predict(x, task)
    return sums


def sigma_max(basis: torch.Tensor, covariance: torch.Tensor) -> float:
    """σ_max(U) on a covariance C: sqrt of the largest eigenvalue of UᵀCU."""
    return float(torch.linalg.eigvalsh(basis.T @ covariance @ basis).max().clamp(min=0).sqrt())


def main(benchmark: str, preset: str, seed: int) -> None:
    protocol = get_protocol(benchmark, preset)
    variant = protocol.variant("ness_sam")
    seed_everything(seed)
    bench = build_benchmark(benchmark, seed=seed, **protocol.data)
    model = protocol.network(bench)
    method = build_method("ness", model, variant.options)
    stored: list[tuple[torch.Tensor, int]] = []
    original_begin, original_end = method.begin_task, method.end_task

    def end_task(t: int, batches: Any) -> None:
        batches = list(batches)
        original_end(t, batches)
        stored.extend((x, t) for x in task_inputs(batches, "staleness"))

    def begin_task(t: int) -> None:
        if t > 0:
            fresh = fresh_covariances(method, stored)
            for name in method.layer_names:
                stale, now = method.covariances[name], fresh[name]
                rule = method.config.layer_config(name)
                options = {"name": name, "delta": rule.delta, "rank": rule.rank}
                basis = null_basis(stale, rule.eps1, rule.threshold, **options)
                fresh_rank = null_basis(now, rule.eps1, rule.threshold, **options).rank
                difference = float((stale - now).norm() / now.norm())
                ratio = sigma_max(basis.basis, now) / sigma_max(basis.basis, stale) if basis.rank else float("nan")
                print(
                    f"| {benchmark} | {t} | {name} | {difference:.2e} | {basis.rank} | {fresh_rank} | {ratio:.3f} |",
                    flush=True,
                )
        original_begin(t)

    method.begin_task, method.end_task = begin_task, end_task
    train = dataclasses.replace(protocol.train, **variant.train)
    print(
        "| benchmark | task | layer | ‖C_stale − C_fresh‖/‖C_fresh‖ | rank (stale) | rank (fresh) "
        "| σ_max(U) fresh/stale |"
    )
    print("|---|---|---|---|---|---|---|")
    result = run_continual(model, method, bench, train, seed, progress=False)
    print(f"ACC {result['acc']:.2f}  BWT {result['bwt']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
