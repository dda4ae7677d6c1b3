"""One run: a RunSpec resolved once into its settings, then built, trained (resuming when asked), results.json."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import platform
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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
from ness.presets import Protocol, Variant, faithful_settings, get_protocol
from ness.results import write_json_atomic
from ness.runs import SEED_LIMIT, RunSpec
from ness.trainer import (
    RunObserver,
    RunState,
    TrainConfig,
    new_run_state,
    run_continual,
    seed_everything,
)
from ness.validation import Rule, checked, count, entries, flag, integer, number, optional

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


DATA_RULES: dict[str, Rule] = {
    "pc_valid": number(at_least=0, below=1, fix="the share of training images held out"),
    "train_per_task": optional(count(), "for every image"),
    "num_tasks": count(),
    "split_seed": integer(at_least=0, at_most=SEED_LIMIT - 1),
    "verify_md5": flag(),
    "download": flag(),
    "datasets": entries(fix="dataset names, e.g. ['mnist', 'svhn']"),
}
"""The type and range of the data options that several benchmarks share, checked before any file is read; a
benchmark's own options (fashion, ...) are checked by its builder, also before it reads files."""


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


@dataclass(frozen=True)
class ResolvedSettings:
    """Everything a run uses, resolved once from its RunSpec (`resolve_settings`) and passed down from there."""

    spec: RunSpec
    protocol: Protocol
    """The (benchmark, preset) protocol, with the spec's network in place of its own."""
    variant: Variant
    train: TrainConfig
    data: dict[str, Any]
    """The benchmark builder's options."""
    options: dict[str, Any]
    """The method config's fields: the variant's, --faithful's, then the overrides."""
    faithful_settings: dict[str, dict[str, Any]]
    """What --faithful changed (empty without it), by 'data', 'train' or method name."""
    label: str
    """The run's name in results: the method or variant, `<method>_<network>` when the network is not the
    protocol's own."""

    def folder(self, out: str | Path) -> Path:
        """Where the run's files go: out/benchmark/<label>[_faithful]/seed_N."""
        name = f"{self.label}_faithful" if self.spec.faithful else self.label
        return Path(out) / self.spec.benchmark / name / f"seed_{self.spec.seed}"

    def record(self) -> dict[str, Any]:
        """What the run resolved to, in JSON form, as results.json and checkpoints keep it. The device is left out
        (a run may move between machines) and so is `download` (where the files come from)."""
        settings = {
            "benchmark": self.spec.benchmark,
            "variant": self.label,
            "seed": self.spec.seed,
            "preset": self.spec.preset,
            "faithful": self.spec.faithful,
            "network": self.protocol.network_name,
            "method": dataclasses.asdict(METHODS[self.variant.method].config_class(**self.options)),
            "train": {k: v for k, v in dataclasses.asdict(self.train).items() if k != "device"},
            "data": {k: v for k, v in self.data.items() if k != "download"},
        }
        return json.loads(json.dumps(settings))


def resolve_settings(spec: RunSpec, download: bool = False) -> ResolvedSettings:
    """Resolve a run's settings once, each layer applied in order preset < variant < --faithful < overrides; every
    value is validated here, before any data is read. `download` lets the benchmark's builder fetch missing files."""
    base = get_protocol(spec.benchmark, spec.preset)
    protocol = base if spec.network is None else base.with_network(spec.network)
    variant = protocol.variant(spec.method)
    faithful_over = faithful_settings(protocol) if spec.faithful else {}
    method_over, train_over, data_over = split_overrides(variant.method, spec.benchmark, spec.overrides)
    train = dataclasses.replace(protocol.train, **{**variant.train, **faithful_over.get("train", {})})
    if protocol.epoch_cap is not None:  # a quick preset caps every variant's epochs
        train = dataclasses.replace(train, epochs=min(train.epochs, protocol.epoch_cap))
    train = dataclasses.replace(train, **train_over)
    check_device(train.device)
    data = checked(
        f"{spec.benchmark} data option ", {**protocol.data, **faithful_over.get("data", {}), **data_over}, DATA_RULES
    )
    if download:
        if "download" not in data_options(spec.benchmark):
            raise ValueError(f"{spec.benchmark} has no download option; its files are read from the data root only")
        data["download"] = True
    options = {**variant.options, **faithful_over.get(variant.method, {}), **method_over}
    METHODS[variant.method].config_class(**options)  # raises on a bad value, naming the field
    distributed.check_method(METHODS[variant.method], spec.method)  # under torchrun: refused methods fail here
    train = dataclasses.replace(train, device=distributed.device_for(train.device))
    label = spec.method if protocol.network_name == base.network_name else f"{spec.method}_{protocol.network_name}"
    return ResolvedSettings(spec, protocol, variant, train, data, options, faithful_over, label)


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


def build_runner(run: ResolvedSettings, bench: Benchmark) -> ContinualMethod:
    """The run's method on the protocol's network for `bench`. A ValueError or TypeError raised while building them
    comes from the settings, so it is raised again as a SettingsError naming the method and benchmark."""
    try:
        return build_method(run.variant.method, run.protocol.network(bench), run.options)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"--method {run.spec.method} on {run.spec.benchmark}: {err}") from err


def check_builds(runs: Sequence[ResolvedSettings], data_root: str | Path | None = None) -> None:
    """Build each run's benchmark and method on its network once, as the run would, then drop them: a setting refused
    only once the model exists fails here as a SettingsError, once, before any run trains. A benchmark that cannot be
    built (missing files) is left to the runs: the data is at fault, not the settings, so each run reports it, and
    `--resume` runs the same settings once the files are there."""
    benches: dict[str, Benchmark | None] = {}  # one benchmark per distinct seed and data options; None: it failed
    for run in runs:
        key = json.dumps([run.spec.benchmark, run.spec.seed, run.data], sort_keys=True, default=repr)
        if key not in benches:
            try:
                benches[key] = build_benchmark(run.spec.benchmark, seed=run.spec.seed, data_root=data_root, **run.data)
            except Exception as err:  # the runs build it again and report the error, with its traceback
                log.debug("the check of the settings skips %s: its benchmark failed (%s)", run.spec.method, err)
                benches[key] = None
        if (bench := benches[key]) is not None:
            build_runner(run, bench)


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
    saved: dict[str, Any],
    now: dict[str, Any],
    where: Path,
    may_change: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """The settings in `may_change` (flat keys, 'train.lr') that differ between a checkpoint and the run resuming
    it, as {key: [then, now]}; raise CheckpointError naming every other setting that differs. A setting the
    checkpoint lacks counts as its value in `defaults` (flat keys): an option added since, which the run that wrote
    the checkpoint ran without, is its default."""
    old, new = {**flat_settings(defaults or {}), **flat_settings(saved)}, flat_settings(now)
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


def check_resumable(
    meta: dict[str, Any], run: ResolvedSettings, where: Path, may_change: Sequence[str]
) -> dict[str, list[Any]]:
    """The schedule changes ({'train.lr': [then, now]}) a run resumes `where` with: its spec must be the one the
    checkpoint's header records, but for overrides of the training options `may_change`, and so must what the spec
    resolves to (the same spec resolves otherwise under another ness-cl whose presets changed). A checkpoint
    written before run specs existed records only the resolved settings, and is checked on those."""
    if "spec" in meta:
        check_same_settings(meta["spec"], dataclasses.asdict(run.spec), where, [f"overrides.{k}" for k in may_change])
    defaults = {
        "method": dataclasses.asdict(METHODS[run.variant.method].config_class()),
        "train": {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "device"},
    }
    defaults = json.loads(json.dumps(defaults))  # in the JSON form the records have (tuples as lists)
    return check_same_settings(meta["settings"], run.record(), where, [f"train.{k}" for k in may_change], defaults)


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
    run: RunSpec | ResolvedSettings,
    *,
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    save_adapters: bool = False,
    checkpoint: str | None = "epoch",
    checkpoint_interval: float = 0.0,
    resume_changes: Sequence[str] = (),
    resume: bool = False,
    observers: Sequence[RunObserver] = (),
) -> dict[str, Any]:
    """Run one RunSpec (resolved here), or settings already resolved from one (`resolve_settings(spec,
    download=True)` lets the builder download missing files).

    Writes `out/benchmark/<label>/seed_N/results.json` (and `spectra.json` when the method reports spectra); the
    label is the spec's method or variant, `<variant>_<network>` with a network other than the protocol's.
    `save_adapters` (NESS variants) also writes `seed_N/base_model.safetensors`, the model as task 0 left it, and
    `seed_N/adapters/` (ness.adapter_files), from which the final model can be rebuilt or merged.
    With `out`, the run saves `seed_N/checkpoint.pt` after every epoch (`checkpoint="epoch"`) or task ("task"; None:
    never; with `checkpoint_interval` seconds, epoch checkpoints at most that often) and deletes it once results.json
    is written; `resume=True` continues from that checkpoint when there is one and it was written for this spec (the
    training options `resume_changes` excepted). `observers` also see every epoch and task (logs).
    """
    settings = run if isinstance(run, ResolvedSettings) else resolve_settings(run)
    spec, protocol, variant, train = settings.spec, settings.protocol, settings.variant, settings.train
    benchmark, label, seed = spec.benchmark, settings.label, spec.seed
    if save_adapters:
        check_saves_adapters(spec.method, variant.method)
        if out is None:
            raise ValueError("save_adapters needs an `out` folder to write the adapters to")
    if checkpoint is not None and checkpoint not in EVERY:
        raise ValueError(f"checkpoint={checkpoint!r}: choose one of {EVERY}, or None for no checkpoints")
    folder = None if out is None else settings.folder(out)
    checkpoint_path = None if folder is None else folder / CHECKPOINT_NAME
    identity = settings.record()
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
        changes = check_resumable(read_header(checkpoint_path)["meta"], settings, checkpoint_path, resume_changes)
    start = time.perf_counter()
    seed_everything(seed)
    bench = build_benchmark(benchmark, seed=seed, data_root=data_root, **settings.data)
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
        runner, run_id = build_runner(settings, bench), uuid.uuid4().hex
        state = new_run_state(runner, bench, seed)
    distributed.barrier()  # several processes: every rank has read the checkpoint before rank 0 overwrites it
    if not distributed.is_main():  # only rank 0 shows progress and feeds the logs
        progress, observers = False, ()
    model = runner.model
    watchers: list[RunObserver] = [Clock(start, state.extras.get("elapsed_seconds", 0.0))]
    if save_adapters:
        watchers.append(BaseModelKeeper())
    if checkpoint_path is not None and checkpoint is not None:
        meta = {"run_id": run_id, "spec": dataclasses.asdict(spec), "settings": identity}
        watchers.append(Checkpointer(checkpoint_path, meta, checkpoint, checkpoint_interval))
    try:
        # Only adapter files use the last task's statistics: without them the last task's end skips that pass.
        outcome = run_continual(
            model, runner, bench, train, seed, progress, [*watchers, *observers], state, continuable=save_adapters
        )
    except FloatingPointError as err:  # a diverged loss: say where the last good state is
        raise FloatingPointError(f"{err}. {last_good_state(checkpoint_path, run_id)}") from err
    spectra = _take_spectra(outcome["diagnostics"])
    extras = state.extras
    results = {
        "method": variant.method,
        "variant": label,
        "network": protocol.network_name,
        "benchmark": benchmark,
        "preset": spec.preset,
        "faithful": spec.faithful,
        "seed": seed,
        "run_id": run_id,
        "settings": identity,
        "resumed_from": extras.get("resumed", []),
        "changed_on_resume": extras.get("changed_on_resume", []),
        "tasks_run": len(bench),
        "config": {
            "method": dataclasses.asdict(runner.config),
            "train": dataclasses.asdict(train),
            "data": settings.data,
            "protocol": protocol.describe(),
            "variant_sources": variant.sources,
            "faithful_settings": settings.faithful_settings,
            "overrides": spec.overrides,
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
