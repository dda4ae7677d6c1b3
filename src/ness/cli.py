"""`ness demo | run | report | plot | adapters`: the command-line entry points."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ness import distributed
from ness.logs import RunLog
from ness.presets import NETWORKS, PRESET_NAMES, PROTOCOLS, get_protocol
from ness.results import (
    format_matrix,
    load_results,
    no_results,
    paper_table,
    paper_table_csv,
    paper_table_markdown,
    write_text_atomic,
)
from ness.runs import RunSpec
from ness.trainer import use_deterministic_algorithms

if TYPE_CHECKING:
    from ness.experiment import ResolvedSettings

log = logging.getLogger("ness")


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as a Python literal when it is one (`eps1=1e-3`, `exclude=['fc']`);
    `nan` and `inf` read as floats, so that the option's check names the bad number."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, got {text!r}; e.g. --set epochs=3 (the valid keys are listed when one is wrong)"
        )
    words = {"true": True, "false": False, "none": None}  # the shell's spellings of Python's literals
    try:
        value = words[raw.strip().lower()] if raw.strip().lower() in words else ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:
            value = float(raw)  # nan, inf, -inf
        except ValueError:
            value = raw
    return key.strip(), value


def side_by_side(left: dict[str, Any], right: dict[str, Any]) -> str:
    """Two runs' accuracy matrices next to each other, with ACC and BWT under each."""
    lm, rm = format_matrix(left["acc_matrix"]), format_matrix(right["acc_matrix"])
    width = max(len(line) for line in lm) + 4
    lines = [
        f"{left['method'].upper():<{width}}{right['method'].upper()}",
        f"{'R[i][j]: test acc. (%) on task j after task i':<{width}}",
    ]
    lines += [f"{a:<{width}}{b}" for a, b in zip(lm, rm, strict=True)]
    lines.append(
        f"{'ACC ' + format(left['acc'], '.2f') + '   BWT ' + format(left['bwt'], '.2f'):<{width}}"
        f"ACC {right['acc']:.2f}   BWT {right['bwt']:.2f}"
    )
    return "\n".join(lines)


def shows_progress(quiet: bool) -> bool:
    """Whether to draw progress bars: not with --quiet, and not when stderr (where tqdm draws) is no terminal, as
    in a log file or a pipe, where every redraw would become a line of its own."""
    return not quiet and sys.stderr.isatty()


def cmd_demo(args: argparse.Namespace) -> int:
    from ness.experiment import run_experiment

    runs = {
        m: run_experiment(RunSpec("split_digits", m, args.seed), out=args.out, progress=shows_progress(args.quiet))
        for m in ("finetune", "ness")
    }
    ness, ft = runs["ness"], runs["finetune"]
    print(
        "\nSplit Digits (scikit-learn's 1,797 real 8×8 digits), 5 tasks × 2 classes, "
        f"MLP 64-100-100, seed {args.seed}\n"
    )
    print(side_by_side(ft, ness))
    print(
        f"\nNESS forgets {ness['bwt'] - ft['bwt']:+.2f} points less (BWT) and reaches "
        f"{ness['acc'] - ft['acc']:+.2f} points of ACC over fine-tuning."
    )
    print(f"Results: {Path(args.out) / 'split_digits'}/<method>/seed_{args.seed}/results.json")
    return 0


WHAT_TO_RUN: tuple[str, ...] = (
    "benchmark",
    "method",
    "seeds",
    "preset",
    "network",
    "faithful",
    "set",
    "save_adapters",
    "checkpoint",
)
"""The options of `ness run` that say what to run: `--resume DIR` reads them from the plans recorded in DIR."""
RUN_DEFAULTS: dict[str, Any] = {
    "preset": "quick",
    "faithful": False,
    "download": False,
    "save_adapters": False,
    "checkpoint": "epoch",
}
"""The defaults of `ness run`'s options that are not None."""
RUN_OUT = "runs"
"""`ness run`'s default output folder."""
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)
"""Errors that say what the user should change: main() prints their message without a traceback."""
RESUME_CHANGEABLE: tuple[str, ...] = ("lr", "lr_min", "lr_patience", "lr_factor", "epochs")
"""Training options `--resume DIR --set KEY=VALUE` may change: the schedule (a lower lr after a diverged loss,
more epochs), never what the run is (method, data, network)."""
RESUME_TAKES: tuple[str, ...] = (
    "quiet",
    "data_root",
    "download",
    "log_dir",
    "deterministic",
    "checkpoint_interval",
)
"""The options `--resume` accepts beside it: where things are and how to show them, not what to run."""


@dataclass(frozen=True)
class Plan:
    """What one `ness run` command runs: its runs, one RunSpec per (method, seed), and how to run them (where the data
    is, what each run saves). `dataclasses.asdict` of it is what OUT/.ness/plan-<hash>.json records for `--resume`."""

    runs: tuple[RunSpec, ...]
    data_root: str | None = None
    download: bool = False
    save_adapters: bool = False
    checkpoint: str = RUN_DEFAULTS["checkpoint"]
    """'epoch', 'task' or 'none' (`--checkpoint`)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        """The plan of a `ness run` command, each run's spec validated; repeated methods and seeds run once."""
        missing = [flag for flag, value in (("--benchmark", args.benchmark), ("--method", args.method)) if not value]
        if missing:
            raise ValueError(f"ness run needs {' and '.join(missing)} (or --resume DIR to continue a run)")
        methods = once_each("--method", args.method)
        seeds = once_each("--seeds", args.seeds or list(get_protocol(args.benchmark, args.preset).seeds))
        overrides = dict(args.set or [])
        runs = tuple(
            RunSpec(args.benchmark, method, seed, args.preset, args.network, args.faithful, overrides)
            for method in methods
            for seed in seeds
        )
        return cls(runs, args.data_root, args.download, args.save_adapters, args.checkpoint)

    @classmethod
    def from_json(cls, plan: dict[str, Any]) -> Plan:
        """A plan read back from its file; one written before run specs existed is read as the runs it stands for."""
        if "runs" not in plan:
            plan = _runs_of_option_plan(plan)
        return cls(**{**plan, "runs": tuple(RunSpec(**run) for run in plan["runs"])})


def _runs_of_option_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan file of the layout before run specs (one key per option of `ness run`) in today's layout."""
    seeds = plan["seeds"] or get_protocol(plan["benchmark"], plan["preset"]).seeds
    spec = {key: plan[key] for key in ("benchmark", "preset", "network", "faithful")} | {"overrides": dict(plan["set"])}
    runs = [{**spec, "method": method, "seed": seed} for method in plan["method"] for seed in seeds]
    return {key: plan[key] for key in ("data_root", "download", "save_adapters", "checkpoint")} | {"runs": runs}


def record_plan(plan: Plan, out: str | Path) -> Path:
    """Write a plan to OUT/.ness/plan-<hash>.json (one file per distinct plan, so commands sharing an output folder
    never overwrite each other's), for `ness run --resume OUT`."""
    text = json.dumps(dataclasses.asdict(plan), sort_keys=True)
    path = Path(out) / ".ness" / f"plan-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    write_text_atomic(path, text + "\n")
    return path


def read_plans(folder: Path) -> list[tuple[Path, Plan]]:
    """Every plan recorded in folder/.ness/ with its file, oldest first."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume '{folder}': no such folder; give the --out folder of the run to resume")
    paths = sorted((folder / ".ness").glob("plan-*.json"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(
            f"--resume '{folder}': no run was recorded there (no .ness/plan-*.json); give the --out folder of a "
            "`ness run` command"
        )
    plans = []
    for path in paths:
        try:
            plans.append((path, Plan.from_json(json.loads(path.read_text()))))
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume: '{path}' is not valid JSON ({err}); delete it or restore it") from err
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"--resume: '{path}' is not a plan this ness-cl can read ({err!r}); resume with the ness-cl that "
                "wrote it, or delete it and run its command again"
            ) from err
    return plans


def resume_plans(args: argparse.Namespace) -> list[Plan]:
    """The plans `--resume DIR` continues, with the data root and download given beside --resume. A `--set` of
    training options in RESUME_CHANGEABLE (a lower lr after a diverged loss) changes every run of every plan from
    here on: its plan file is rewritten and its runs continue with the new values."""
    given = [key for key in WHAT_TO_RUN if key != "set" and getattr(args, key) != RUN_DEFAULTS.get(key)]
    changes = dict(args.set or [])
    if set(changes) - set(RESUME_CHANGEABLE):
        given.append("set " + ", ".join(sorted(set(changes) - set(RESUME_CHANGEABLE))))
    if given:
        flags = ", ".join("--" + key.replace("_", "-") for key in given)
        raise ValueError(
            f"--resume DIR runs the commands recorded in DIR with their own settings; drop {flags} (only "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUME_TAKES)} may go with it, and --set of the "
            f"training options {', '.join(RESUME_CHANGEABLE)})"
        )
    if args.out != RUN_OUT and Path(args.out) != Path(args.resume):
        raise ValueError(f"--resume DIR continues the runs in DIR and writes there; drop --out {args.out}")
    plans = []
    for path, recorded in read_plans(Path(args.resume)):
        plan = dataclasses.replace(
            recorded, data_root=args.data_root or recorded.data_root, download=args.download or recorded.download
        )
        if changes:  # the plan now runs with the new values, later resumes too
            runs = tuple(dataclasses.replace(spec, overrides={**spec.overrides, **changes}) for spec in plan.runs)
            plan = dataclasses.replace(plan, runs=runs)
            if distributed.is_main() and record_plan(plan, args.resume) != path:
                path.unlink()
        plans.append(plan)
    return plans


def cmd_run(args: argparse.Namespace) -> int:
    with distributed.process_group():  # under torchrun: one data-parallel run over all its processes
        return run_commands(args)


def run_commands(args: argparse.Namespace) -> int:
    """The plans of `ness run`: the command's own, or every plan recorded in the folder of --resume."""
    if args.resume is not None:
        return max(run_plan(plan, args, Path(args.resume), resume=True) for plan in resume_plans(args))
    return run_plan(Plan.from_args(args), args, Path(args.out), resume=False)


def run_plan(plan: Plan, args: argparse.Namespace, out: Path, resume: bool) -> int:
    """Every run of one plan into `out`, each resolved once; a failing run is reported with its traceback and the
    others go on. `args` gives how the runs show, log and save their progress."""
    from ness.experiment import check_builds, check_data_root, check_saves_adapters, resolve_settings, run_experiment

    # fail before any training if a name or a setting is wrong
    runs = [resolve_settings(spec, plan.download) for spec in plan.runs]
    if plan.save_adapters:
        for run in runs:
            check_saves_adapters(run.spec.method, run.variant.method)
    benchmark = plan.runs[0].benchmark
    check_data_root(benchmark, plan.data_root)
    if not args.checkpoint_interval >= 0:  # also NaN
        raise ValueError(f"--checkpoint-interval {args.checkpoint_interval}: give seconds ≥ 0 (0: every epoch)")
    check_writable(out)
    # a setting refused only once the model exists (a layer pattern, target_modules, a network the data cannot feed)
    # is the user's error too: it fails here, once (with the first seed), rather than in every seed
    check_builds([run for run in runs if run.spec.seed == plan.runs[0].seed], plan.data_root)
    if not resume and distributed.is_main():
        record_plan(plan, out)

    failures = []
    for run in runs:
        spec = run.spec
        try:
            with run_logs(args.log_dir, run) as logs:
                r = run_experiment(
                    run,
                    data_root=plan.data_root,
                    out=out,
                    progress=shows_progress(args.quiet),
                    save_adapters=plan.save_adapters,
                    checkpoint=None if plan.checkpoint == "none" else plan.checkpoint,
                    checkpoint_interval=args.checkpoint_interval,
                    resume=resume,
                    resume_changes=tuple(dict(args.set or [])) if resume else (),
                    observers=logs,
                )
            if distributed.is_main():
                print(
                    f"{benchmark} {spec.method} seed {spec.seed}: ACC {r['acc']:.2f}  BWT {r['bwt']:.2f}  "
                    f"({r['timings']['total_seconds']:.1f} s)"
                )
        except Exception as err:  # every failure is reported, kept in failure.txt, and fails the command
            trace = traceback.format_exc()
            if distributed.is_main():
                write_text_atomic(run.folder(out) / "failure.txt", trace)
            if len(runs) == 1 and isinstance(err, USER_ERRORS):
                raise  # one run: main() prints the message alone
            if distributed.world_size() > 1:
                raise  # the other ranks may wait in a collective: this process ends, and torchrun ends them
            failures.append(spec)
            detail = f" {err}" if isinstance(err, USER_ERRORS) else f"\n{trace}"  # a user error: its message
            print(f"{benchmark} {spec.method} seed {spec.seed} FAILED:{detail}", file=sys.stderr)
        else:
            if distributed.is_main():
                (run.folder(out) / "failure.txt").unlink(missing_ok=True)
    if failures:
        failed = ", ".join(f"{spec.method} seed {spec.seed}" for spec in failures)
        print(
            f"{len(failures)} run(s) failed ({failed}); they are not in the results, and each one's traceback is in "
            "its seed folder's failure.txt. Fix the cause, then `ness run --resume "
            f"{out}` runs what is missing.",
            file=sys.stderr,
        )
        return 1
    if distributed.is_main():
        print(paper_table_markdown(paper_table(load_results(out / benchmark))))
    return 0


@contextlib.contextmanager
def run_logs(log_dir: str | None, run: ResolvedSettings) -> Iterator[list[RunLog]]:
    """The run's --log-dir logger, in LOG_DIR/<benchmark>/<variant>/seed_N (none without --log-dir), closed after."""
    if log_dir is None or not distributed.is_main():  # several processes: rank 0 logs
        yield []
        return
    run_log = RunLog(run.folder(log_dir))
    try:
        yield [run_log]
    finally:
        run_log.close()


def once_each(option: str, values: list[Any]) -> list[Any]:
    """`values` without repeats, in order; a repeat would run (and overwrite) the same run twice, so it is dropped
    with a warning rather than refused."""
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        log.warning("%s lists %s more than once: each runs once", option, ", ".join(repeated))
    return unique


def check_writable(folder: Path) -> None:
    """The output folder must be creatable and writable before hours of training go into it."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "it" if blocker == folder else f"'{blocker}', a folder above it,"
        raise ValueError(
            f"output folder '{folder}' cannot be created: {where} is an existing file, not a folder; choose another "
            "path with --out"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test"):
            pass
    except OSError as err:
        raise ValueError(
            f"output folder '{folder}' is not writable ({err.strerror}); choose a folder you can write to with --out"
        ) from err


def cmd_report(args: argparse.Namespace) -> int:
    runs = load_results(args.dir)
    if not runs:
        raise no_results(args.dir)
    rows = paper_table(runs, include_missing=args.missing)
    table = paper_table_markdown(rows)
    print(table)
    if args.save:
        folder = Path(args.dir)
        write_text_atomic(folder / "report.md", table + "\n")
        write_text_atomic(folder / "report.csv", paper_table_csv(rows))
        print(f"\nwrote {folder / 'report.md'} and {folder / 'report.csv'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ness.plots import plot_results

    written = plot_results(args.dir)
    for path in written:
        print(path)
    print(f"{len(written)} figure files written under '{args.dir}'")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from ness.adapter_files import describe_adapters, merged_state_dict, read_state_dict, write_state_dict

    if args.merge != (args.base is not None and args.out is not None):
        raise ValueError(
            "--merge goes with --base BASE.safetensors (the model after task 0) and --out MODEL.safetensors"
        )
    if args.task is not None and not args.merge:
        raise ValueError("--task J goes with --merge: it chooses which task's own model --merge writes")
    print(describe_adapters(args.dir))
    if args.merge:
        merged = merged_state_dict(read_state_dict(args.base), args.dir, task=args.task)
        which = "the merged model's" if args.task is None else f"task {args.task}'s own merged model's"
        print(f"wrote {which} state dict ({len(merged)} tensors) to {write_state_dict(args.out, merged)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ness", description="Continual learning in the null space (NESS).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="NESS vs fine-tuning on Split Digits (offline, about a minute on a CPU)")
    demo.add_argument("--out", default="runs/demo", help="where results.json files go (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    benchmarks = sorted({b for b, _ in PROTOCOLS})
    run = sub.add_parser("run", help="run methods on a benchmark over seeds; one results.json per run")
    run.add_argument("--benchmark", choices=benchmarks, help="required unless --resume")
    run.add_argument(
        "--method",
        nargs="+",
        help="registered methods or the preset's variants, e.g. ness_sam ness_sgdm finetune (required unless --resume)",
    )
    run.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="default: the preset's (paper: 1 2 3 4 37, quick: 1 2 3)"
    )
    run.add_argument("--preset", default=RUN_DEFAULTS["preset"], choices=PRESET_NAMES)
    run.add_argument(
        "--network",
        default=None,
        help=f"train this network instead of the preset's: one of {', '.join(NETWORKS)}; 'vit' is a small vision "
        "transformer (ness.models.vision_transformer; runs are labelled <method>_vit)",
    )
    run.add_argument(
        "--faithful",
        action="store_true",
        help="reproduce the official code where it changes results (nuclear threshold, raw-data replay, SAM in "
        "task 1 only, 5-datasets: only task 0 stored and MNIST in the Fashion-MNIST slot); see docs/faithful.md",
    )
    run.add_argument(
        "--download", action="store_true", help="let torchvision download missing dataset files (needs internet)"
    )
    run.add_argument("--data-root", default=None, help="folder with the dataset files (default: $NESS_DATA_ROOT)")
    run.add_argument("--out", default=RUN_OUT, help=f"results folder (default: {RUN_OUT})")
    run.add_argument(
        "--checkpoint",
        default=RUN_DEFAULTS["checkpoint"],
        choices=("epoch", "task", "none"),
        help="save each run to <out>/<benchmark>/<variant>/seed_N/checkpoint.pt after every epoch (default) or "
        "task; deleted once the run's results.json is written",
    )
    run.add_argument(
        "--checkpoint-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="skip an epoch's checkpoint while the last one is younger than SECONDS (default 0: every epoch); "
        "task ends are always saved. For large models on fast GPUs, where writing one takes a sizeable part of "
        "an epoch",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the runs of an earlier `ness run --out DIR` where they stopped: finished seeds are skipped, "
        "killed ones resume from their last checkpoint, the rest start",
    )
    run.add_argument(
        "--set",
        action="append",
        type=parse_option,
        metavar="KEY=VALUE",
        help="override a method, training or data option, e.g. --set eps1=1e-2 --set epochs=3",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    run.add_argument(
        "--log-dir",
        default=None,
        help="also log every epoch and task to LOG_DIR/<benchmark>/<variant>/seed_N/: TensorBoard scalars (with "
        "the tensorboard package), scalars.csv and events.jsonl (losses, lr, accuracy rows, per-layer ranks/bounds)",
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN deterministic): the same "
        "seed gives the same numbers on a GPU too, at some cost in speed",
    )
    run.add_argument(
        "--save-adapters",
        action="store_true",
        help="NESS variants: also write seed_N/base_model.safetensors (the model after task 0) and seed_N/adapters/ "
        "(each task's U and V, the statistics; without this option the last task's statistics pass is skipped); "
        "`ness adapters DIR` reads them",
    )
    run.set_defaults(func=cmd_run)

    report = sub.add_parser(
        "report", help="ACC ± std and BWT ± std per benchmark and variant, beside the NESS paper's table"
    )
    report.add_argument("dir")
    report.add_argument("--save", action="store_true", help="also write report.md and report.csv in DIR")
    report.add_argument("--missing", action="store_true", help="also list the paper's rows not run yet")
    report.set_defaults(func=cmd_report)

    plot = sub.add_parser("plot", help="figures (PNG and SVG) for every run under DIR, in <run>/figures/")
    plot.add_argument("dir")
    plot.set_defaults(func=cmd_plot)

    adapters = sub.add_parser(
        "adapters",
        help="summary of a NESS adapter directory (layers, rank per task, file sizes); --merge writes a model",
    )
    adapters.add_argument("dir", help="a directory written by method.save_adapters or `ness run --save-adapters`")
    adapters.add_argument(
        "--merge", action="store_true", help="merge every ΔW into the base model (needs --base, --out)"
    )
    adapters.add_argument("--base", help="the base model's state dict (seed_N/base_model.safetensors)")
    adapters.add_argument("--out", help="where the merged model's state dict goes (.safetensors)")
    adapters.add_argument(
        "--task",
        type=int,
        default=None,
        help="with --merge: task J's own model, its transfer adapter (NESSConfig.transfer_rank) merged too, and its "
        "BatchNorm state with batchnorm='per_task' (default: the shared model)",
    )
    adapters.set_defaults(func=cmd_adapters)
    return parser


class ProgressSafeHandler(logging.Handler):
    """Log lines to the current stderr through tqdm.write, so they never break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def configure_logging(quiet: bool) -> None:
    """The `ness` loggers' lines on stderr: INFO and up, or WARNING and up with --quiet."""
    logger = logging.getLogger("ness")
    for handler in [h for h in logger.handlers if isinstance(h, ProgressSafeHandler)]:
        logger.removeHandler(handler)
    handler = ProgressSafeHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "quiet", False))
    if getattr(args, "deterministic", False):
        use_deterministic_algorithms()
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"ness {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
