"""One run = (benchmark, method variant, seed, preset): build everything, train, write results.json."""

from __future__ import annotations

import dataclasses
import inspect
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ness.adapter_files import save_adapters as write_adapters
from ness.adapter_files import write_state_dict
from ness.data import BENCHMARKS, build_benchmark
from ness.methods import METHODS, NESS, build_method
from ness.presets import Protocol, Variant, faithful_settings, get_protocol
from ness.results import write_json_atomic
from ness.trainer import TrainConfig, run_continual, seed_everything


def data_options(benchmark: str) -> list[str]:
    """The options a benchmark's builder accepts (train_per_task, pc_valid, ...)."""
    params = inspect.signature(BENCHMARKS[benchmark]).parameters
    return sorted(name for name in params if name not in ("data_root", "seed"))


def split_overrides(
    method: str, benchmark: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Route `key=value` overrides to the method config, the training config or the benchmark's data options."""
    method_fields = {f.name for f in dataclasses.fields(METHODS[method].config_class)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data_fields = set(data_options(benchmark))
    routed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
    for key, value in overrides.items():
        if key in method_fields:
            routed[0][key] = value
        elif key in train_fields:
            routed[1][key] = value
        elif key in data_fields:
            routed[2][key] = value
        else:
            raise ValueError(
                f"unknown option {key!r} for method {method!r} on {benchmark}; method options: "
                f"{sorted(method_fields)}; training options: {sorted(train_fields)}; "
                f"data options: {sorted(data_fields)}"
            )
    return routed


def resolve_settings(
    benchmark: str,
    method: str,
    preset: str,
    overrides: dict[str, Any] | None = None,
    faithful: bool = False,
    download: bool = False,
    network: str | None = None,
) -> tuple[Protocol, Variant, TrainConfig, dict[str, Any], dict[str, Any]]:
    """(protocol, variant, training config, data options, method options) of a run, each layer of settings
    applied in order preset < variant < --faithful < overrides; every value is validated here, before training.
    `network` (e.g. 'vit') replaces the protocol's network."""
    protocol = get_protocol(benchmark, preset)
    if network is not None:
        protocol = protocol.with_network(network)
    variant = protocol.variant(method)
    faithful_over = faithful_settings(protocol) if faithful else {}
    method_over, train_over, data_over = split_overrides(variant.method, benchmark, overrides or {})
    train = dataclasses.replace(protocol.train, **{**variant.train, **faithful_over.get("train", {})})
    if protocol.epoch_cap is not None:  # a quick preset caps every variant's epochs
        train = dataclasses.replace(train, epochs=min(train.epochs, protocol.epoch_cap))
    train = dataclasses.replace(train, **train_over)
    data = {**protocol.data, **faithful_over.get("data", {}), **data_over}
    if download:
        if "download" not in data_options(benchmark):
            raise ValueError(f"{benchmark} has no download option; its files are read from the data root only")
        data["download"] = True
    options = {**variant.options, **faithful_over.get(variant.method, {}), **method_over}
    METHODS[variant.method].config_class(**options)  # raises on a bad value, naming the field
    return protocol, variant, train, data, options


def check_saves_adapters(variant: str, method: str) -> None:
    """`--save-adapters` needs a NESS variant: only NESS learns adapters (ΔW = U·V over a base model) to write."""
    if not issubclass(METHODS[method], NESS):
        raise ValueError(
            f"--save-adapters works with NESS variants only; {variant!r} runs {method!r}, which learns no adapters"
        )


def run_experiment(
    benchmark: str,
    method: str,
    seed: int,
    preset: str = "quick",
    *,
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    faithful: bool = False,
    download: bool = False,
    progress: bool = True,
    network: str | None = None,
    save_adapters: bool = False,
) -> dict[str, Any]:
    """Run one seed of a method or variant (e.g. `ness_sam`) on `benchmark`.

    Writes `out/benchmark/<variant>/seed_N/results.json` (and `spectra.json` when the method reports spectra).
    `faithful` applies the official code's behaviour where it changes results (presets.FAITHFUL). `network`
    (e.g. 'vit') trains that network instead of the protocol's; the run is then labelled `<variant>_<network>`.
    `save_adapters` (NESS variants) also writes `seed_N/base_model.safetensors`, the model as task 0 left it, and
    `seed_N/adapters/` (ness.adapter_files), from which the final model can be rebuilt or merged.
    """
    settings = resolve_settings(benchmark, method, preset, overrides, faithful, download, network)
    protocol, variant, train, data, options = settings
    if save_adapters:
        check_saves_adapters(method, variant.method)
        if out is None:
            raise ValueError("save_adapters needs an `out` folder to write the adapters to")
    own_network = protocol.network_name == get_protocol(benchmark, preset).network_name
    label = method if own_network else f"{method}_{protocol.network_name}"
    faithful_over = faithful_settings(protocol) if faithful else {}
    start = time.perf_counter()
    seed_everything(seed)
    bench = build_benchmark(benchmark, seed=seed, data_root=data_root, **data)
    model = protocol.network(bench)
    runner = build_method(variant.method, model, options)
    base_state: dict[str, torch.Tensor] = {}  # the model as task 0 left it: the base the adapters apply to

    def keep_base(t: int) -> None:
        if t == 0:
            base_state.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    outcome = run_continual(model, runner, bench, train, seed, progress, keep_base if save_adapters else None)
    spectra = _take_spectra(outcome["diagnostics"])
    results = {
        "method": variant.method,
        "variant": label,
        "network": protocol.network_name,
        "benchmark": benchmark,
        "preset": preset,
        "faithful": faithful,
        "seed": seed,
        "tasks_run": len(bench),
        "config": {
            "method": dataclasses.asdict(runner.config),
            "train": dataclasses.asdict(train),
            "data": data,
            "protocol": protocol.describe(),
            "variant_sources": variant.sources,
            "faithful_settings": faithful_over,
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
            "device_name": torch.cuda.get_device_name(train.device) if train.device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(),
        },
    }
    if out is not None:
        folder = Path(out) / benchmark / (f"{label}_faithful" if faithful else label) / f"seed_{seed}"
        if save_adapters:  # before results.json, which marks a finished run
            write_state_dict(folder / "base_model.safetensors", base_state)
            write_adapters(runner, folder / "adapters")
        write_json_atomic(folder / "results.json", results)
        if spectra:
            write_json_atomic(folder / "spectra.json", {"spectra": spectra})
    return results


def _take_spectra(diagnostics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move each record's full singular spectrum out of the diagnostics (it would swell results.json)."""
    spectra = []
    for record in diagnostics:
        values = record.pop("singular_values", None)
        if values is not None:
            spectra.append(
                {
                    "task": record["task"],
                    "layer": record["layer"],
                    "threshold": record["threshold"],
                    "singular_values": values,
                }
            )
    return spectra
