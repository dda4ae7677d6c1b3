"""One run = (benchmark, method variant, seed, preset): build everything, train, write results.json."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ness import distributed
from ness.adapter_files import write_state_dict
from ness.checkpoint import (
    CHECKPOINT_NAME,
    EVERY,
    Checkpointer,
    CheckpointError,
    read_header,
    remove_temporaries,
    resume_state,
)
from ness.data import BENCHMARKS, WITHOUT_FILES, Benchmark, build_benchmark, resolve_data_root
from ness.methods import METHODS, ContinualMethod, build_method
from ness.methods.base import is_count, is_integer, is_number
from ness.presets import Protocol, Variant, faithful_settings, get_protocol
from ness.results import write_json_atomic
from ness.trainer import (
    RunObserver,
    RunState,
    TrainConfig,
    new_run_state,
    run_continual,
    seed_everything,
)

log = logging.getLogger(__name__)


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


SEED_LIMIT = 2**32
"""Seeds are integers in 0..2**32 − 1: NumPy's seeding accepts no others."""
DATA_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pc_valid": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1), the share of training images held out"),
    "train_per_task": (lambda v: v is None or is_count(v), "an integer ≥ 1, or none for every image"),
    "num_tasks": (is_count, "an integer ≥ 1"),
    "split_seed": (lambda v: is_integer(v) and 0 <= v < SEED_LIMIT, f"an integer in 0..{SEED_LIMIT - 1}"),
    "verify_md5": (lambda v: isinstance(v, bool), "true or false"),
    "download": (lambda v: isinstance(v, bool), "true or false"),
    "datasets": (lambda v: isinstance(v, (list, tuple)), "a list of dataset names, e.g. \"('mnist', 'svhn')\""),
}
"""The type and range of the data options that several benchmarks share, checked before any file is read."""


def check_data_options(benchmark: str, data: dict[str, Any]) -> None:
    """Raise ValueError naming a data option of the wrong type or range, before the benchmark reads any file."""
    for key, value in data.items():
        if key not in DATA_RULES:
            continue  # a benchmark's own option (fashion, ...): its builder checks it before reading files
        valid, rule = DATA_RULES[key]
        if not valid(value):
            raise ValueError(f"{benchmark} data option {key}={value!r}: it must be {rule} (--set {key}=...)")


def check_device(device: str) -> None:
    """The training device must exist on this machine: a clear error now rather than deep inside training."""
    kind = torch.device(device)
    if kind.type == "cuda" and (index := kind.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), so there is no cuda:"
            f"{index}; use --set device=cpu, or a CUDA index below {torch.cuda.device_count()}"
        )
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: Apple's MPS is not available on this machine; use --set device=cpu")


def check_data_root(benchmark: str, data_root: str | Path | None) -> None:
    """A benchmark read from files needs an existing data root (--data-root or $NESS_DATA_ROOT): checked once,
    before any run, rather than failing every seed."""
    if benchmark not in WITHOUT_FILES:
        resolve_data_root(data_root)


def check_seed(seed: Any) -> None:
    """A run's seed must be an integer in 0..2**32 − 1, the range NumPy's seeding accepts."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed {seed!r} is out of range: seeds are integers in 0..{SEED_LIMIT - 1} (--seeds 1 2 3)")


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
    check_device(train.device)
    data = {**protocol.data, **faithful_over.get("data", {}), **data_over}
    check_data_options(benchmark, data)
    if download:
        if "download" not in data_options(benchmark):
            raise ValueError(f"{benchmark} has no download option; its files are read from the data root only")
        data["download"] = True
    options = {**variant.options, **faithful_over.get(variant.method, {}), **method_over}
    METHODS[variant.method].config_class(**options)  # raises on a bad value, naming the field
    distributed.check_method(METHODS[variant.method], method)  # under torchrun: refused methods fail here
    train = dataclasses.replace(train, device=distributed.device_for(train.device))
    return protocol, variant, train, data, options


def check_saves_adapters(variant: str, method: str) -> None:
    """`--save-adapters` needs a method that learns adapter files over a base model (NESS: ΔW = U·V); the method's
    class says so (`ContinualMethod.saves_adapters`)."""
    if not METHODS[method].saves_adapters:
        raise ValueError(
            f"--save-adapters works with NESS variants only; {variant!r} runs {method!r}, which learns no adapters"
        )


class SettingsError(ValueError):
    """A setting refused once the network and the method are built (a layer pattern that matches no layer, a
    network the data cannot feed): the user's to fix, and every seed would fail on it the same way."""


def build_runner(
    method: str, benchmark: str, protocol: Protocol, variant: Variant, bench: Benchmark, options: dict[str, Any]
) -> ContinualMethod:
    """The variant's method on the protocol's network for `bench`. A ValueError or TypeError raised while building
    them comes from the settings, so it is raised again as a SettingsError naming the method and benchmark."""
    try:
        return build_method(variant.method, protocol.network(bench), options)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"--method {method} on {benchmark}: {err}") from err


def check_builds(
    benchmark: str,
    methods: Sequence[str],
    seed: int,
    preset: str = "quick",
    *,
    data_root: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    faithful: bool = False,
    download: bool = False,
    network: str | None = None,
) -> None:
    """Build the benchmark (with `seed`) and each method on its network once, as a run would, then drop them: a
    setting refused only once the model exists fails here as a SettingsError, once, before any seed trains.
    A benchmark that cannot be built (missing files) is left to the runs: the data is at fault, not the settings,
    so each seed reports it as before, and `--resume` runs the same settings once the files are there."""
    benches: dict[str, Benchmark | None] = {}  # one benchmark per distinct data options; None: it failed
    for method in methods:
        protocol, variant, _, data, options = resolve_settings(
            benchmark, method, preset, overrides, faithful, download, network
        )
        key = json.dumps(data, sort_keys=True, default=repr)
        if key not in benches:
            try:
                benches[key] = build_benchmark(benchmark, seed=seed, data_root=data_root, **data)
            except Exception as err:  # the runs build it again and report the error, with its traceback
                log.debug("the check of the settings skips %s: its benchmark failed (%s)", method, err)
                benches[key] = None
        if (bench := benches[key]) is not None:
            build_runner(method, benchmark, protocol, variant, bench, options)


def run_label(benchmark: str, method: str, preset: str, network: str | None) -> str:
    """The variant's name in results: `method`, or `method_<network>` when `network` is not the protocol's own."""
    own = network is None or network == get_protocol(benchmark, preset).network_name
    return method if own else f"{method}_{network}"


def run_folder(out: str | Path, benchmark: str, label: str, faithful: bool, seed: int) -> Path:
    """Where a run's files go: out/benchmark/<variant>[_faithful]/seed_N."""
    return Path(out) / benchmark / (f"{label}_faithful" if faithful else label) / f"seed_{seed}"


def environment(device: str) -> dict[str, Any]:
    """What the run ran on, for its results file."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "processes": distributed.world_size(),
    }


class Clock(RunObserver):
    """Keeps the run's elapsed seconds in the state, so that a resumed run reports its whole time."""

    def __init__(self, start: float, before: float = 0.0) -> None:
        # perf_counter() when this process began the run, and the seconds spent on it before (a resumed run)
        self.start, self.before = start, before

    def tick(self, state: RunState) -> None:
        state.extras["elapsed_seconds"] = self.before + time.perf_counter() - self.start

    def epoch_end(self, state: RunState, record: dict[str, Any]) -> None:
        self.tick(state)

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        self.tick(state)


class BaseModelKeeper(RunObserver):
    """Keeps the model as task 0 left it (the base the adapter files apply to) in the state, across resumes."""

    def task_end(self, state: RunState, record: dict[str, Any]) -> None:
        if record["task"] == 0:
            model = state.method.model
            state.extras["base_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_settings(
    benchmark: str,
    label: str,
    seed: int,
    preset: str,
    faithful: bool,
    network: str,
    method_config: dict[str, Any],
    train: TrainConfig,
    data: dict[str, Any],
) -> dict[str, Any]:
    """What makes a run the run it is, in JSON form: a checkpoint resumes only under the same settings. The device
    is left out (a run may move between machines) and so is `download` (where the files come from)."""
    settings = {
        "benchmark": benchmark,
        "variant": label,
        "seed": seed,
        "preset": preset,
        "faithful": faithful,
        "network": network,
        "method": method_config,
        "train": {k: v for k, v in dataclasses.asdict(train).items() if k != "device"},
        "data": {k: v for k, v in data.items() if k != "download"},
    }
    return json.loads(json.dumps(settings))


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """{'train.epochs': 3, 'seed': 1, ...}: a settings dict flattened one level, for naming what differs."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_same_settings(
    saved: dict[str, Any], now: dict[str, Any], where: Path, may_change: Sequence[str] = ()
) -> dict[str, list[Any]]:
    """The settings in `may_change` (flat keys, 'train.lr') that differ between a checkpoint and the run resuming
    it, as {key: [then, now]}; raise CheckpointError naming every other setting that differs."""
    old, new = flat_settings(saved), flat_settings(now)
    missing = object()
    differ = [key for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]
    refused = [
        f"{key} = {old.get(key, 'unset')!r} in the checkpoint, {new.get(key, 'unset')!r} now"
        for key in differ
        if key not in may_change
    ]
    if refused:
        raise CheckpointError(
            f"cannot resume '{where}': it was written by a run with other settings ({'; '.join(refused)}); resume "
            "with the command that started it, or delete the checkpoint to start this run afresh"
        )
    return {key: [old.get(key), new.get(key)] for key in differ}


def finished_run(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results of the run in `folder` when it finished, else None (a finished run is never run over, even when
    `settings` differ from those it ran with: a resume may have changed the schedule). A checkpoint left beside
    its results (killed between writing results.json and deleting the checkpoint) is deleted here."""
    results_path, checkpoint_path = folder / "results.json", folder / CHECKPOINT_NAME
    if not results_path.is_file():
        return None
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"'{results_path}' is damaged (not valid JSON: {err}), so whether this run finished is unknown; delete "
            "it and resume again to run this seed afresh"
        ) from err
    if results.get("settings") != settings:  # finished before a resume changed the schedule: kept, never redone
        log.info("'%s' finished with other settings than the plan's now; kept as it is", results_path)
    if checkpoint_path.is_file():
        if read_header(checkpoint_path)["meta"].get("run_id") != results.get("run_id"):
            return None  # a later run of the same settings was under way
        distributed.barrier()  # several processes: every rank has read the header before rank 0 deletes the file
        if distributed.is_main():
            checkpoint_path.unlink()
    return results


def apply_schedule_changes(state: RunState, train: TrainConfig, changes: dict[str, list[Any]]) -> None:
    """Resume with a changed schedule: a task left open takes the new lr at once (its optimiser too); lr_min,
    patience, factor and epochs are read from `train` at every epoch anyway."""
    if "train.lr" in changes and state.loop is not None:
        state.loop.lr = train.lr
        for group in state.loop.optimizer.param_groups:
            group["lr"] = train.lr


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
    checkpoint: str | None = "epoch",
    checkpoint_interval: float = 0.0,
    resume_changes: Sequence[str] = (),
    resume: bool = False,
    observers: Sequence[RunObserver] = (),
) -> dict[str, Any]:
    """Run one seed of a method or variant (e.g. `ness_sam`) on `benchmark`.

    Writes `out/benchmark/<variant>/seed_N/results.json` (and `spectra.json` when the method reports spectra).
    `faithful` applies the official code's behaviour where it changes results (presets.FAITHFUL). `network`
    (e.g. 'vit') trains that network instead of the protocol's; the run is then labelled `<variant>_<network>`.
    `save_adapters` (NESS variants) also writes `seed_N/base_model.safetensors`, the model as task 0 left it, and
    `seed_N/adapters/` (ness.adapter_files), from which the final model can be rebuilt or merged.
    With `out`, the run saves `seed_N/checkpoint.pt` after every epoch (`checkpoint="epoch"`) or task ("task"; None:
    never; with `checkpoint_interval` seconds, epoch checkpoints at most that often) and deletes it once results.json
    is written; `resume=True` continues from that checkpoint when there is
    one (and its settings are this run's). `observers` also see every epoch and task (logs).
    """
    check_seed(seed)
    settings = resolve_settings(benchmark, method, preset, overrides, faithful, download, network)
    protocol, variant, train, data, options = settings
    if save_adapters:
        check_saves_adapters(method, variant.method)
        if out is None:
            raise ValueError("save_adapters needs an `out` folder to write the adapters to")
    if checkpoint is not None and checkpoint not in EVERY:
        raise ValueError(f"checkpoint={checkpoint!r}: choose one of {EVERY}, or None for no checkpoints")
    label = run_label(benchmark, method, preset, network)
    faithful_over = faithful_settings(protocol) if faithful else {}
    folder = None if out is None else run_folder(out, benchmark, label, faithful, seed)
    checkpoint_path = None if folder is None else folder / CHECKPOINT_NAME
    method_config = dataclasses.asdict(METHODS[variant.method].config_class(**options))
    identity = run_settings(benchmark, label, seed, preset, faithful, protocol.network_name, method_config, train, data)
    if resume and folder is not None:
        finished = finished_run(folder, identity)
        distributed.agree(finished is not None, f"whether '{folder}' holds this run's results")
        if finished is not None:
            log.info("%s %s seed %d: finished before (%s), skipped", benchmark, label, seed, folder / "results.json")
            return finished
    if resume and checkpoint_path is not None and distributed.is_main() and remove_temporaries(checkpoint_path):
        log.info("removed the temporary file(s) of a checkpoint write that was killed, in %s", folder)
    resuming = resume and checkpoint_path is not None and checkpoint_path.is_file()
    distributed.agree(resuming, f"whether to resume from '{checkpoint_path}'")
    changes: dict[str, list[Any]] = {}
    if resuming:  # check before building anything: a wrong checkpoint fails in a second
        saved = read_header(checkpoint_path)["meta"]["settings"]
        changes = check_same_settings(saved, identity, checkpoint_path, [f"train.{k}" for k in resume_changes])
    start = time.perf_counter()
    seed_everything(seed)
    bench = build_benchmark(benchmark, seed=seed, data_root=data_root, **data)
    if resuming:
        meta, state = resume_state(checkpoint_path, map_location=train.device)
        runner, run_id = state.method, meta["run_id"]
        state.extras.setdefault("resumed", []).append(meta["position"])
        if changes:
            apply_schedule_changes(state, train, changes)
            state.extras.setdefault("changed_on_resume", []).append({"position": meta["position"], **changes})
            log.warning("%s %s seed %d: resuming with %s", benchmark, label, seed, changes)
        log.info("%s %s seed %d: resuming from %s (%s)", benchmark, label, seed, checkpoint_path, meta["position"])
    else:
        runner, run_id = build_runner(method, benchmark, protocol, variant, bench, options), uuid.uuid4().hex
        state = new_run_state(runner, bench, seed)
    distributed.barrier()  # several processes: every rank has read the checkpoint before rank 0 overwrites it
    if not distributed.is_main():  # only rank 0 shows progress and feeds the logs
        progress, observers = False, ()
    model = runner.model
    watchers: list[RunObserver] = [Clock(start, state.extras.get("elapsed_seconds", 0.0))]
    if save_adapters:
        watchers.append(BaseModelKeeper())
    if checkpoint_path is not None and checkpoint is not None:
        meta = {"run_id": run_id, "settings": identity}
        watchers.append(Checkpointer(checkpoint_path, meta, checkpoint, checkpoint_interval))
    try:
        outcome = run_continual(model, runner, bench, train, seed, progress, [*watchers, *observers], state)
    except FloatingPointError as err:  # a diverged loss: say where the last good state is
        raise FloatingPointError(f"{err}. {last_good_state(checkpoint_path, run_id)}") from err
    spectra = _take_spectra(outcome["diagnostics"])
    extras = state.extras
    results = {
        "method": variant.method,
        "variant": label,
        "network": protocol.network_name,
        "benchmark": benchmark,
        "preset": preset,
        "faithful": faithful,
        "seed": seed,
        "run_id": run_id,
        "settings": identity,
        "resumed_from": extras.get("resumed", []),
        "changed_on_resume": extras.get("changed_on_resume", []),
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
        "timings": {"total_seconds": extras["elapsed_seconds"]},
        "benchmark_details": bench.details,
        "environment": environment(train.device),
    }
    if folder is not None and distributed.is_main():  # several processes: rank 0 writes for all
        if save_adapters:  # before results.json, which marks a finished run
            write_state_dict(folder / "base_model.safetensors", extras["base_model"])
            runner.save_adapters(folder / "adapters")
        write_json_atomic(folder / "results.json", results)
        if spectra:
            write_json_atomic(folder / "spectra.json", {"spectra": spectra})
        if checkpoint_path is not None:
            checkpoint_path.unlink(missing_ok=True)  # results.json now holds what it was kept for
    return results


def last_good_state(checkpoint_path: Path | None, run_id: str) -> str:
    """For the error that stops a run: where its last checkpoint is and what it holds, or that it has none."""
    try:
        header = None if checkpoint_path is None else read_header(checkpoint_path)
    except CheckpointError:
        header = None
    if header is None or header["meta"].get("run_id") != run_id:
        return (
            "No checkpoint of this run was written before it (one is written at the end of every epoch or task "
            "when the run has an output folder)"
        )
    position = header["meta"].get("position", {})
    when = (
        f"after {position['tasks_done']} finished task(s)"
        if "tasks_done" in position
        else f"task {position.get('task')} after {position.get('epochs_done')} epoch(s)"
    )
    return (
        f"The last good state ({when}) is kept in the checkpoint '{checkpoint_path}'; `ness run --resume OUT --set "
        "lr=...` continues from it with a lower learning rate"
    )


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
