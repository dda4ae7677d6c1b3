"""Prototype (issue 14): NESS plus a task-specific transfer adapter in the old inputs' principal directions.

Shared W changes only through NESS's null-space ΔW = U·V (merged after each task). Each task t ≥ 1 also trains its
own ΔW_t = Ū_t·A_t, with Ū_t the top-k eigenvectors of the earlier inputs' covariance (the directions NESS cannot
change for everyone), kept per task and applied only when task t is evaluated, as TRGP keeps per-task scales.
Linear layers only (the MLP benchmarks). Not part of the library: a measurement of whether the idea pays.

Usage: python benchmarks/prototype_transfer.py BENCHMARK PRESET SEED NAME=k:K,KEY:VALUE,... [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from typing import Any

import torch
from candidates import ValidationMatrix, parse_candidate
from torch import Tensor, nn

from ness.data import build_benchmark, resolve_data_root
from ness.experiment import resolve_settings
from ness.methods.ness import NESS, NESSConfig
from ness.metrics import average_accuracy, backward_transfer
from ness.subspace import covariance_spectrum
from ness.trainer import run_continual


class TransferNESS(NESS):
    def __init__(self, model: nn.Module, config: NESSConfig, k: int) -> None:
        super().__init__(model, config)
        self.k = k
        self.transfer: list[dict[str, tuple[Tensor, Tensor]]] = [{}]  # per task: layer → (Ū, A); task 0 has none
        self.open_transfer: dict[str, tuple[Tensor, nn.Parameter]] = {}
        self.handles: list[Any] = []

    def on_begin_task(self, t: int) -> None:
        super().on_begin_task(t)
        if t == 0 or self.k == 0:
            return
        for name in self.layer_names:
            spectrum = covariance_spectrum(self.covariances[name], name)
            k = min(self.k, spectrum.eigenvectors.shape[1])
            basis = spectrum.eigenvectors[:, -k:].flip(1).float()  # the k largest σ
            layer = self.model.get_submodule(name)
            out = (layer.base if hasattr(layer, "base") else layer).weight.shape[0]
            self.open_transfer[name] = (basis, nn.Parameter(torch.zeros(k, out)))
        self.handles = self._hook(self.open_transfer)

    def _hook(self, adapters: dict[str, tuple[Tensor, Tensor]]) -> list[Any]:
        return [
            self.model.get_submodule(name).register_forward_hook(
                lambda module, args, output, b=basis, a=weights: output + (args[0] @ b) @ a
            )
            for name, (basis, weights) in adapters.items()
        ]

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return super().task_parameters(t) + [a for _, a in self.open_transfer.values()]

    @contextmanager
    def _task(self, j: int):
        if j == self.active_task or j >= len(self.transfer) or not self.transfer[j]:
            closed = [] if j == self.active_task else self.handles
            for h in closed:
                h.remove()
            try:
                yield
            finally:
                if closed:
                    self.handles = self._hook(self.open_transfer)
            return
        for h in self.handles:
            h.remove()
        extra = self._hook(self.transfer[j])
        try:
            yield
        finally:
            for h in extra:
                h.remove()
            self.handles = self._hook(self.open_transfer)

    def predict(self, x: Tensor, t: int) -> Tensor:
        with self._task(t):
            return super().predict(x, t)

    def on_end_task(self, t: int, batches) -> None:
        super().on_end_task(t, batches)  # its statistics pass sees task t as task t is evaluated
        for h in self.handles:
            h.remove()
        self.handles = []
        if t > 0:
            self.transfer.append({n: (b, a.detach().clone()) for n, (b, a) in self.open_transfer.items()})
        self.open_transfer = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("benchmark")
    parser.add_argument("preset")
    parser.add_argument("seed", type=int)
    parser.add_argument("candidates", nargs="+", type=parse_candidate)
    parser.add_argument("--json")
    args = parser.parse_args()
    print("| candidate | options | val ACC | val BWT | test ACC | test BWT | seconds |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name, options in args.candidates:
        options = dict(options)
        k = int(options.pop("k", 0))
        protocol, _, train, data, method_options = resolve_settings(args.benchmark, "ness", args.preset, options)
        bench = build_benchmark(args.benchmark, seed=args.seed, data_root=resolve_data_root(None), **data)
        model = protocol.network(bench)
        method = TransferNESS(model, NESSConfig(**method_options), k)
        validation = ValidationMatrix(bench, train.device)
        started = time.perf_counter()
        result = run_continual(model, method, bench, train, args.seed, progress=False, observers=[validation])
        seconds = time.perf_counter() - started
        row = rows[name] = {
            "k": k,
            "options": options,
            "val_acc": average_accuracy(validation.rows),
            "val_bwt": backward_transfer(validation.rows),
            "val_matrix": validation.rows,
            "acc": result["acc"],
            "bwt": result["bwt"],
            "seconds": seconds,
        }
        print(
            f"| {name} | k {k} {options} | {row['val_acc']:.2f} | {row['val_bwt']:.2f} | {row['acc']:.2f} | "
            f"{row['bwt']:.2f} | {seconds:.0f} |",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
