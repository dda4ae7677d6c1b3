"""Results files: one `results.json` per run, written atomically, and the report that reads them."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ness.metrics import mean_std
from ness.paper import (
    DAGGER_NOTE,
    PAPER_ARXIV,
    PAPER_BENCHMARKS,
    PAPER_ENTRIES,
    PAPER_LABELS,
    PAPER_TASKS,
    PAPER_VARIANTS,
    PAPER_VENUE,
    TABLE_CAPTION,
    PaperEntry,
    paper_entry,
)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file beside `path` (text "w" or binary "wb") that replaces it, fsynced, only when the block succeeds;
    removed otherwise, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to a temporary file beside `path`, fsync, then rename: a reader never sees half a file."""
    path = Path(path)
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, allow_nan=True)
        f.write("\n")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text (a report) the same way as `write_json_atomic`."""
    path = Path(path)
    with atomic_file(path) as f:
        f.write(text)
    return path


REQUIRED_KEYS: tuple[str, ...] = ("benchmark", "method", "seed", "acc", "bwt")
GroupKey = tuple[str, str, str]  # (benchmark, variant, preset); variant is the method name when a run has none


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every results.json under `root` (sorted by path), each checked to have what a report needs."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"no results directory at '{root}': it {what}; give the --out folder of a `ness run` (default: runs)"
        )
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"'{path}' is not valid JSON ({err}); delete it and re-run that seed") from err
        check_run(run, f"'{path}'")
        runs.append(run)
    return runs


def no_results(root: str | Path) -> FileNotFoundError:
    """The error of `ness report` and `ness plot` on a folder that holds no results.json: where runs come from."""
    return FileNotFoundError(f"no results.json under '{root}'; write runs there first with `ness run ... --out {root}`")


def check_run(run: Any, where: str) -> None:
    """Raise ValueError naming `where` and the key when `run` lacks what a report needs or has it of the wrong type."""
    if not isinstance(run, dict):
        raise ValueError(f"{where}: a run must be a JSON object, got {type(run).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in run]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}: not a complete ness results file; "
            "delete it and re-run that seed"
        )
    for key in ("benchmark", "method", "variant", "preset"):
        value = run.get(key)
        if (key in ("benchmark", "method") or value is not None) and not (isinstance(value, str) and value):
            raise ValueError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
    if isinstance(run["seed"], bool) or not isinstance(run["seed"], int):
        raise ValueError(f"{where}: key 'seed' must be an integer, got {run['seed']!r}")
    for key in ("acc", "bwt"):
        value = run[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: key {key!r} must be a finite number, got {value!r}")


def _describe(run: Any) -> str:
    """`benchmark/variant/seed N` from whatever identifying keys the run has, for error messages."""
    if not isinstance(run, dict):
        return ""
    parts = [str(run[k]) for k in ("benchmark", "variant", "method") if run.get(k) is not None][:2]
    if "seed" in run:
        parts.append(f"seed {run['seed']}")
    return "/".join(parts)


def _run_name(run: Any, index: int) -> str:
    described = _describe(run)
    return f"run #{index} ({described})" if described else f"run #{index}"


def group_runs(runs: list[dict[str, Any]]) -> dict[GroupKey, list[dict[str, Any]]]:
    """Runs grouped by (benchmark, variant or method, preset), sorted by key; a seed may appear once per group."""
    groups: dict[GroupKey, list[dict[str, Any]]] = defaultdict(list)
    method_of: dict[str, str] = {}
    for index, run in enumerate(runs):
        where = _run_name(run, index)
        check_run(run, where)
        variant = run.get("variant") or run["method"]
        if method_of.setdefault(variant, run["method"]) != run["method"]:
            raise ValueError(
                f"{where}: variant {variant!r} is also used by method {method_of[variant]!r}; "
                "a variant name must belong to one method"
            )
        key = (_benchmark_key(run), variant, run.get("preset") or "?")
        if any(other["seed"] == run["seed"] for other in groups[key]):
            raise ValueError(
                f"{where}: seed {run['seed']} appears twice for {key[0]} {variant} preset {key[2]}; "
                "keep one of the two results"
            )
        groups[key].append(run)
    return dict(sorted(groups.items()))


def _benchmark_key(run: dict[str, Any]) -> str:
    """The run's benchmark, or e.g. `five_datasets (1 of 5 tasks)` for a run on a subset of the paper's tasks
    (`tasks_run`, which `ness run` records; a run without it counts as the whole benchmark)."""
    benchmark, tasks = run["benchmark"], run.get("tasks_run")
    full = PAPER_TASKS.get(benchmark)
    if full is None or not tasks or tasks == full:
        return benchmark
    return f"{benchmark} ({tasks} of {full} tasks)"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, variant, preset): ACC and BWT mean ± sample std over seeds, and the seeds used."""
    rows = []
    for (benchmark, variant, preset), group in group_runs(runs).items():
        acc, acc_std = mean_std([r["acc"] for r in group])
        bwt, bwt_std = mean_std([r["bwt"] for r in group])
        seconds, _ = mean_std([_total_seconds(r) for r in group])
        rows.append(
            {
                "benchmark": benchmark,
                "method": group[0]["method"],
                "variant": variant,
                "preset": preset,
                "seeds": sorted(r["seed"] for r in group),
                "acc": acc,
                "acc_std": acc_std,
                "bwt": bwt,
                "bwt_std": bwt_std,
                "seconds": seconds,
            }
        )
    return rows


def _total_seconds(run: dict[str, Any]) -> float:
    try:
        return float(run["timings"]["total_seconds"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"run {_describe(run)}: no number at key 'timings.total_seconds'") from err


def report_markdown(runs: list[dict[str, Any]]) -> str:
    """A markdown table of ACC ± std and BWT ± std (%) per benchmark, variant (method) and preset."""
    lines = [
        "| benchmark | method | preset | seeds | ACC (%) | BWT (%) | time / run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summarize(runs):
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(
            f"| {row['benchmark']} | {row['variant']} | {row['preset']} | {seeds} | "
            f"{row['acc']:.2f} ± {row['acc_std']:.2f} | {row['bwt']:.2f} ± {row['bwt_std']:.2f} | "
            f"{row['seconds']:.1f} |"
        )
    return "\n".join(lines)


# -- the paper-format table ----------------------------------------------------------------------------------------

PAPER_PRESET = "paper"  # the only preset whose numbers may be compared with the paper's
CSV_COLUMNS: tuple[str, ...] = (
    "benchmark",
    "variant",
    "method",
    "label",
    "preset",
    "paper_protocol",
    "seeds",
    "n",
    "acc",
    "acc_std",
    "bwt",
    "bwt_std",
    "paper_acc",
    "paper_acc_std",
    "paper_bwt",
    "paper_bwt_std",
    "paper_dagger",
    "delta_acc",
)


def _table_row(benchmark: str, variant: str, ours: dict[str, Any] | None, entry: PaperEntry | None) -> dict[str, Any]:
    """One row of `paper_table`: our summary (None: not run) beside the paper's entry (None or "–": no numbers)."""
    paper = entry if entry is not None and entry.reported else None
    n = len(ours["seeds"]) if ours else 0
    row: dict[str, Any] = {
        "benchmark": benchmark,
        "variant": variant,
        "method": ours["method"] if ours else None,
        "label": PAPER_LABELS.get(variant, variant),
        "preset": ours["preset"] if ours else None,
        "paper_protocol": bool(ours) and ours["preset"] == PAPER_PRESET,
        "seeds": ours["seeds"] if ours else [],
        "n": n,
        "acc": ours["acc"] if ours else None,
        "acc_std": ours["acc_std"] if n >= 2 else None,  # one seed has no spread: None, not 0
        "bwt": ours["bwt"] if ours else None,
        "bwt_std": ours["bwt_std"] if n >= 2 else None,
        "paper_acc": paper.acc if paper else None,
        "paper_acc_std": paper.acc_std if paper else None,
        "paper_bwt": paper.bwt if paper else None,
        "paper_bwt_std": paper.bwt_std if paper else None,
        "paper_acc_text": paper.acc_text if paper else None,
        "paper_bwt_text": paper.bwt_text if paper else None,
        "paper_dagger": paper.dagger if paper else None,
    }
    both = ours is not None and paper is not None
    row["delta_acc"] = row["acc"] - row["paper_acc"] if both else None
    return row


def _row_order(row: dict[str, Any]) -> tuple[tuple[int, Any], ...]:
    """The paper's benchmarks then ours by name; the paper's rows then ours by name; preset paper, others, not run."""
    benchmarks, variants = list(PAPER_BENCHMARKS), list(PAPER_VARIANTS)
    b, v, p = row["benchmark"], row["variant"], row["preset"]
    return (
        (0, benchmarks.index(b)) if b in benchmarks else (1, b),
        (0, variants.index(v)) if v in variants else (1, v),
        (0, "") if p == PAPER_PRESET else (1, p) if p is not None else (2, ""),
    )


def paper_table(runs: list[dict[str, Any]], include_missing: bool = False) -> list[dict[str, Any]]:
    """One row per (benchmark, variant, preset) we ran, beside the NESS paper's entry for (benchmark, variant).

    Ours: ACC, BWT mean and sample std over seeds (std None below 2 seeds); paper: ACC, BWT, their stds and †;
    `delta_acc` = ours − paper. With `include_missing`, the paper's entries with numbers that have no run at the
    `paper` preset are added as rows with no numbers of ours (method and preset None), to show what is left.
    """
    rows = [
        _table_row(s["benchmark"], s["variant"], s, paper_entry(s["benchmark"], s["variant"])) for s in summarize(runs)
    ]
    if include_missing:
        done = {(r["benchmark"], r["variant"]) for r in rows if r["paper_protocol"]}
        rows += [
            _table_row(e.benchmark, e.variant, None, e)
            for e in PAPER_ENTRIES
            if e.reported and (e.benchmark, e.variant) not in done
        ]
    return sorted(rows, key=_row_order)


def _pm(mean: float | None, std: float | None) -> str:
    """`72.46 ± 0.26`; `72.46 ± –` without a std; `–` without a mean."""
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {'–' if std is None else format(std, '.2f')}"


def _markdown_block(benchmark: str, rows: list[dict[str, Any]]) -> str:
    in_paper = benchmark in PAPER_BENCHMARKS
    if in_paper:
        title = f"{PAPER_BENCHMARKS[benchmark]}: `{benchmark}`"
    elif benchmark.split(" ")[0] in PAPER_BENCHMARKS:
        title = f"`{benchmark}` (a subset of the paper's benchmark)"
    else:
        title = f"`{benchmark}` (not in the NESS paper)"
    lines = [
        f"### {title}",
        "",
        "| method | preset | seeds | ACC ours | ACC paper | ΔACC | BWT ours | BWT paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        label = row["label"].replace("|", "\\|") + (" †" if row["paper_dagger"] else "")
        mark = "" if row["paper_protocol"] else "*"
        preset = "not run" if row["preset"] is None else row["preset"] + mark
        seeds = ",".join(str(s) for s in row["seeds"]) or "–"
        delta = "–" if row["delta_acc"] is None else f"{row['delta_acc']:+.2f}{mark}"
        lines.append(
            f"| {label} | {preset} | {seeds} | {_pm(row['acc'], row['acc_std'])} | {row['paper_acc_text'] or '–'} | "
            f"{delta} | {_pm(row['bwt'], row['bwt_std'])} | {row['paper_bwt_text'] or '–'} |"
        )
    lines.append("")
    if in_paper:
        lines.append(f"- Paper: NESS ({PAPER_ARXIV}, {PAPER_VENUE}), in %: {TABLE_CAPTION}.")
        if any(row["paper_dagger"] for row in rows):
            lines.append(f"- {DAGGER_NOTE}.")
    elif benchmark.split(" ")[0] in PAPER_BENCHMARKS:
        lines.append("- A subset of the paper's tasks: the paper's numbers do not apply, so none are shown.")
    else:
        lines.append("- The NESS paper reports no numbers on this benchmark.")
    lines.append("- Ours: ACC and BWT (%), mean ± sample std over our seeds; std – with fewer than 2 seeds.")
    presets = sorted({row["preset"] for row in rows if row["preset"] is not None}, key=lambda p: (p != PAPER_PRESET, p))
    used = ", ".join(p if p == PAPER_PRESET else f"{p}*" for p in presets)
    lines.append(f"- Presets used: {used or 'none (nothing run yet)'}.")
    if any(p != PAPER_PRESET for p in presets):
        lines.append(
            "- Presets marked * are NOT the paper's protocol (`quick` is a shortened schedule for checks): "
            "their numbers and ΔACC are no reproduction of the paper and must not be compared with it."
        )
    return "\n".join(lines)


def paper_table_markdown(rows: list[dict[str, Any]]) -> str:
    """`paper_table` rows as one markdown table per benchmark, in the paper's order, each with its footnotes."""
    if not rows:
        raise ValueError("no rows to report: run something first, or pass include_missing=True to paper_table")
    ordered = sorted(rows, key=_row_order)
    blocks = [_markdown_block(b, list(group)) for b, group in itertools.groupby(ordered, key=lambda r: r["benchmark"])]
    return "\n\n".join(blocks)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def paper_table_csv(rows: list[dict[str, Any]]) -> str:
    """`paper_table` rows as CSV: header CSV_COLUMNS, plain numbers, empty for None, seeds space-separated."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in sorted(rows, key=_row_order):
        writer.writerow([_csv_cell(row[column]) for column in CSV_COLUMNS])
    return buffer.getvalue()


def format_matrix(acc_matrix: list[list[float]]) -> list[str]:
    """The lower triangle of R as text rows, one per training stage."""
    return [" ".join(f"{row[j]:6.1f}" for j in range(i + 1)) for i, row in enumerate(acc_matrix)]
