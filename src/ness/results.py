"""Results files: one `results.json` per run, written atomically, and the report that reads them."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from ness.metrics import mean_std


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to a temporary file beside `path`, fsync, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every results.json under `root` (sorted by path)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no results directory at '{root}'")
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"'{path}' is not valid JSON ({err}); delete it and re-run that seed") from err
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, method, preset): ACC and BWT mean ± std over seeds, and the seeds used."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["benchmark"], run["method"], run.get("preset", "?"))].append(run)
    rows = []
    for (benchmark, method, preset), group in sorted(groups.items()):
        acc, acc_std = mean_std([r["acc"] for r in group])
        bwt, bwt_std = mean_std([r["bwt"] for r in group])
        seconds, _ = mean_std([r["timings"]["total_seconds"] for r in group])
        rows.append(
            {
                "benchmark": benchmark,
                "method": method,
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


def report_markdown(runs: list[dict[str, Any]]) -> str:
    """A markdown table of ACC ± std and BWT ± std (%) per benchmark, method and preset."""
    lines = [
        "| benchmark | method | preset | seeds | ACC (%) | BWT (%) | time / run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summarize(runs):
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(
            f"| {row['benchmark']} | {row['method']} | {row['preset']} | {seeds} | "
            f"{row['acc']:.2f} ± {row['acc_std']:.2f} | {row['bwt']:.2f} ± {row['bwt_std']:.2f} | "
            f"{row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def format_matrix(acc_matrix: list[list[float]]) -> list[str]:
    """The lower triangle of R as text rows, one per training stage."""
    return [" ".join(f"{row[j]:6.1f}" for j in range(i + 1)) for i, row in enumerate(acc_matrix)]
