"""`ness demo | run | report | plot | adapters`: the command-line entry points."""

from __future__ import annotations

import argparse
import ast
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from ness.presets import NETWORKS, PRESET_NAMES, PROTOCOLS, get_protocol
from ness.results import (
    format_matrix,
    load_results,
    paper_table,
    paper_table_csv,
    paper_table_markdown,
    write_text_atomic,
)

log = logging.getLogger("ness")


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as a Python literal when it is one (`eps1=1e-3`, `exclude=['fc']`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    words = {"true": True, "false": False, "none": None}  # the shell's spellings of Python's literals
    try:
        value = words[raw.strip().lower()] if raw.strip().lower() in words else ast.literal_eval(raw)
    except (ValueError, SyntaxError):
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


def cmd_demo(args: argparse.Namespace) -> int:
    from ness.experiment import run_experiment

    runs = {
        m: run_experiment("split_digits", m, args.seed, "quick", out=args.out, progress=not args.quiet)
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


def cmd_run(args: argparse.Namespace) -> int:
    from ness.experiment import check_saves_adapters, resolve_settings, run_experiment

    overrides = dict(args.set or [])
    protocol = get_protocol(args.benchmark, args.preset)
    for method in args.method:  # fail before any training if a name or a setting is wrong
        _, variant, *_ = resolve_settings(
            args.benchmark, method, args.preset, overrides, args.faithful, args.download, args.network
        )
        if args.save_adapters:
            check_saves_adapters(method, variant.method)
    seeds = args.seeds or list(protocol.seeds)
    failures = []
    for method in args.method:
        for seed in seeds:
            try:
                r = run_experiment(
                    args.benchmark,
                    method,
                    seed,
                    args.preset,
                    data_root=args.data_root,
                    out=args.out,
                    overrides=overrides,
                    faithful=args.faithful,
                    download=args.download,
                    progress=not args.quiet,
                    network=args.network,
                    save_adapters=args.save_adapters,
                )
                print(
                    f"{args.benchmark} {method} seed {seed}: ACC {r['acc']:.2f}  BWT {r['bwt']:.2f}  "
                    f"({r['timings']['total_seconds']:.1f} s)"
                )
            except (ValueError, TypeError, OSError, FloatingPointError):
                if len(seeds) * len(args.method) == 1:
                    raise
                failures.append((method, seed))
                print(
                    f"{args.benchmark} {method} seed {seed} FAILED:\n{traceback.format_exc()}",
                    file=sys.stderr,
                )
    if failures:
        print(f"{len(failures)} run(s) failed: {failures}; they are not in the results", file=sys.stderr)
        return 1
    print(paper_table_markdown(paper_table(load_results(Path(args.out) / args.benchmark))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    runs = load_results(args.dir)
    if not runs:
        print(f"no results.json under '{args.dir}'", file=sys.stderr)
        return 1
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
    print(describe_adapters(args.dir))
    if args.merge:
        merged = merged_state_dict(read_state_dict(args.base), args.dir)
        print(f"wrote the merged model's state dict ({len(merged)} tensors) to {write_state_dict(args.out, merged)}")
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
    run.add_argument("--benchmark", required=True, choices=benchmarks)
    run.add_argument(
        "--method",
        nargs="+",
        required=True,
        help="registered methods or the preset's variants, e.g. ness_sam ness_sgdm finetune",
    )
    run.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="default: the preset's (paper: 1 2 3 4 37, quick: 1 2 3)"
    )
    run.add_argument("--preset", default="quick", choices=PRESET_NAMES)
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
    run.add_argument("--out", default="runs", help="results folder (default: runs)")
    run.add_argument(
        "--set",
        action="append",
        type=parse_option,
        metavar="KEY=VALUE",
        help="override a method, training or data option, e.g. --set eps1=1e-2 --set epochs=3",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--save-adapters",
        action="store_true",
        help="NESS variants: also write seed_N/base_model.safetensors (the model after task 0) and seed_N/adapters/ "
        "(each task's U and V, the statistics); `ness adapters DIR` reads them",
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
    adapters.set_defaults(func=cmd_adapters)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as err:
        print(f"ness {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
