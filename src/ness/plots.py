"""Figures of a run: the accuracy matrix, forgetting per task, NESS's null-basis ranks and input spectra.

Each `*_figure` function takes loaded JSON data (dicts) and returns a `matplotlib.figure.Figure` drawn with the
Agg backend, touching no pyplot state. `plot_results` writes them beside every `results.json` under a folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from ness.metrics import average_accuracy, backward_transfer
from ness.results import atomic_file, no_results

ACCURACY_COLOR = "#4c72b0"
IMPROVED_COLOR = "#2ca02c"
FORGOT_COLOR = "#d62728"
KEPT_COLOR = "#ff7f0e"
SPECTRUM_COLOR = "#7f7f7f"
THRESHOLD_COLOR = "#d62728"
HEATMAP_CMAP = "viridis"
FLOOR_RATIO = 1e-8  # singular values below FLOOR_RATIO·σ₁ (zeros included) are drawn at that floor
MAX_NAMED_TASKS = 12  # beyond this many tasks, ticks show task indices instead of names
MAX_NAME_LENGTH = 14
MAX_ANNOTATED_TASKS = 20  # beyond this many tasks, heatmap cells carry no numbers
FORMATS = ("png", "svg")
DPI = 150


# -- reading and checking the data ---------------------------------------------------------------------------------


def _require(data: dict[str, Any], key: str, what: str) -> Any:
    """`data[key]`, or a ValueError naming the missing key."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}")
    if key not in data:
        raise ValueError(f"{what} has no {key!r} key (keys present: {sorted(data)}); re-run to rewrite the file")
    return data[key]


def _acc_matrix(run: dict[str, Any]) -> np.ndarray:
    """R as a float T×T array (T ≥ 1) with the unused entries above the diagonal set to NaN."""
    raw = _require(run, "acc_matrix", "results")
    try:
        r = np.array(raw, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"results 'acc_matrix' must be a T×T list of numbers ({err})") from err
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"results 'acc_matrix' must be T×T with T ≥ 1, got shape {r.shape}")
    r[np.triu_indices(r.shape[0], k=1)] = np.nan
    return r


def _method_name(run: dict[str, Any]) -> str:
    return str(run.get("variant") or _require(run, "method", "results"))


def _run_name(run: dict[str, Any]) -> str:
    """'benchmark · method · seed N'."""
    return f"{_require(run, 'benchmark', 'results')} · {_method_name(run)} · seed {_require(run, 'seed', 'results')}"


def _header(run: dict[str, Any], r: np.ndarray) -> str:
    """'benchmark · method · seed N' and the run's ACC and BWT, recomputed from R."""
    name = _run_name(run)
    rows = r.tolist()  # the metrics read only the lower triangle; a NaN there shows as nan
    acc = average_accuracy(rows)
    bwt = f"BWT {backward_transfer(rows):+.2f}%" if len(r) > 1 else "BWT n/a (1 task)"
    return f"{name}\nACC {acc:.2f}%   {bwt}"


def _task_labels(run: dict[str, Any], n: int) -> list[str]:
    """'j: name' when there are few tasks with short names in `tasks`, else the task indices."""
    tasks = run.get("tasks") or []
    names = [t.get("name") if isinstance(t, dict) else None for t in tasks]
    readable = len(names) == n and n <= MAX_NAMED_TASKS
    if readable and all(isinstance(s, str) and 0 < len(s) <= MAX_NAME_LENGTH for s in names):
        return [f"{j}: {s}" for j, s in enumerate(names)]
    return [str(j) for j in range(n)]


# -- figures -------------------------------------------------------------------------------------------------------


def accuracy_matrix_figure(run: dict[str, Any]) -> Figure:
    """Heatmap of the lower triangle of R (rows: trained up to task i; columns: evaluated on task j)."""
    r = _acc_matrix(run)
    n = len(r)
    labels = _task_labels(run, n)
    named = labels[0] != "0"
    size = min(max(4.8, 0.5 * n + 2.6), 13.0)
    fig = Figure(figsize=(size + (1.4 if named else 0.6), size), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = Normalize(vmin=0.0, vmax=100.0)
    cmap = colormaps[HEATMAP_CMAP].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(r), cmap=cmap, norm=norm)
    fig.colorbar(image, ax=ax, label="test accuracy (%)", shrink=0.8)
    if n <= MAX_ANNOTATED_TASKS:
        fontsize = 9.0 if n <= 8 else (8.0 if n <= 12 else 7.0)
        digits = 1 if n <= 12 else 0
        for i in range(n):
            for j in range(i + 1):
                value = r[i, j]
                if not math.isfinite(value):
                    continue
                red, green, blue, _ = cmap(norm(value))
                light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                ax.text(
                    j,
                    i,
                    f"{value:.{digits}f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="black" if light else "white",
                )
    ticks = list(range(n))
    ax.set_xticks(ticks, labels, rotation=45 if named else 0, ha="right" if named else "center", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("trained up to task i")
    ax.set_title(_header(run, r), fontsize=10)
    return fig


def forgetting_figure(run: dict[str, Any]) -> Figure:
    """Per task j: accuracy at the end, R[T−1][j], and its change since right after learning it, R[j][j].

    Each bar spans 0 to max(R[j][j], R[T−1][j]) and is split at the smaller of the two: the blue part
    ("Accuracy") and a green segment ("Improved", R[T−1][j] > R[j][j]) on top of it, so blue plus green is the
    end accuracy; or a red segment ("Forgot", R[T−1][j] < R[j][j]) above the blue end accuracy, reaching the
    accuracy right after learning. The last task has no change.
    """
    r = _acc_matrix(run)
    n = len(r)
    labels = _task_labels(run, n)
    named = labels[0] != "0"
    fig = Figure(figsize=(min(max(7.0, 0.45 * n + 4.0), 15.0), 4.6 + (0.6 if named else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    end = r[n - 1]
    after = np.diagonal(r)
    base = np.where(np.arange(n) < n - 1, np.fmin(end, after), end)
    ax.bar(range(n), np.nan_to_num(base), color=ACCURACY_COLOR, width=0.7, label="Accuracy")
    for label, color, sign in (("Improved", IMPROVED_COLOR, 1.0), ("Forgot", FORGOT_COLOR, -1.0)):
        change = (end - after)[: n - 1]
        tasks = [j for j in range(n - 1) if sign * change[j] > 0]
        bottoms = [min(end[j], after[j]) for j in tasks]
        ax.bar(tasks, [abs(change[j]) for j in tasks], bottom=bottoms, color=color, width=0.7, label=label)
    if n <= MAX_NAMED_TASKS:
        for j in range(n - 1):
            delta = end[j] - after[j]
            if math.isfinite(delta) and delta != 0:
                top = max(end[j], after[j])
                ax.text(
                    j,
                    top + 1.0,
                    f"{delta:+.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color=IMPROVED_COLOR if delta > 0 else FORGOT_COLOR,
                )
    handles = [
        Patch(color=c, label=s)
        for s, c in (("Accuracy", ACCURACY_COLOR), ("Improved", IMPROVED_COLOR), ("Forgot", FORGOT_COLOR))
    ]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    ax.set_ylim(0.0, 108.0)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(range(n), labels, rotation=45 if named else 0, ha="right" if named else "center", fontsize=8)
    ax.set_xlabel("task j")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_header(run, r), fontsize=10)
    return fig


def _diagnostics(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's NESS records, each checked for the keys the rank figure reads."""
    rows = _require(run, "diagnostics", "results")
    if not isinstance(rows, list):
        raise ValueError(
            f"results 'diagnostics' must be a list of per-(task, layer) records, got {type(rows).__name__}"
        )
    if not rows:
        raise ValueError(
            f"results of method {_method_name(run)!r} have no NESS diagnostics (empty 'diagnostics'): "
            "the null-basis rank figure applies to NESS runs only"
        )
    for k, row in enumerate(rows):
        for key in ("task", "layer", "rank", "d"):
            _require(row, key, f"results 'diagnostics'[{k}]")
    return rows


def rank_figure(run: dict[str, Any], fraction: bool = False) -> Figure:
    """Rank of the null basis per layer against the task t ≥ 1 (as a fraction of d with `fraction`).

    Frozen layers (rank 0: the layer does not change in that task) get a black cross on top of their line.
    """
    rows = _diagnostics(run)
    layers = list(dict.fromkeys(str(row["layer"]) for row in rows))
    tasks = sorted({int(row["task"]) for row in rows})
    fig = Figure(figsize=(min(max(6.5, 0.4 * len(tasks) + 5.0), 14.0), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    frozen: list[int] = []
    for layer, color in zip(layers, _layer_colors(len(layers)), strict=True):
        own = sorted(((int(row["task"]), row) for row in rows if str(row["layer"]) == layer), key=lambda p: p[0])
        y = [row["rank"] / row["d"] if fraction else row["rank"] for _, row in own]
        ax.plot(
            [t for t, _ in own],
            y,
            marker="o",
            markersize=4,
            linewidth=1.4,
            color=color,
            label=f"{layer} (d={own[-1][1]['d']})",
        )
        frozen += [t for t, row in own if row["rank"] == 0]
    if frozen:
        ax.scatter(frozen, [0] * len(frozen), marker="x", s=60, color="black", zorder=3, label="frozen (rank 0)")
    ax.set_xticks(tasks)
    ax.set_xlabel("task t (null basis built at its start)")
    ax.set_ylabel("rank / d" if fraction else "rank of the null basis")
    ax.set_ylim(bottom=-0.04 * (1.0 if fraction else max(1, *(row["rank"] for row in rows))))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7 if len(layers) > 10 else 8, frameon=False)
    what = "null-basis rank per layer" + (" (fraction of d)" if fraction else "")
    ax.set_title(f"{_run_name(run)}\n{what}", fontsize=10)
    return fig


def stability_figure(run: dict[str, Any]) -> Figure:
    """Per adapted layer and task: the measured max ‖xᵀΔW‖ over kept earlier inputs (solid) against Eq. 8's bound
    σ_max(U)·‖V‖₂ (dashed), and the certified √ε when max_output_shift was set (grey line); log scale."""
    rows = [row for row in _diagnostics(run) if row.get("measured_max_shift") is not None]
    if not rows:
        raise ValueError("results have no measured output shifts (no layer was adapted, or probe_samples = 0)")
    layers = list(dict.fromkeys(str(row["layer"]) for row in rows))
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for layer, color in zip(layers, _layer_colors(len(layers)), strict=True):
        own = sorted((row for row in rows if str(row["layer"]) == layer), key=lambda row: int(row["task"]))
        tasks = [int(row["task"]) for row in own]
        ax.plot(tasks, [row["measured_max_shift"] for row in own], marker="o", markersize=4, color=color, label=layer)
        ax.plot(tasks, [row["eq8_bound"] for row in own], linestyle="--", linewidth=1.0, color=color)
    certified = {row["certified_shift"] for row in rows if row.get("certified_shift") is not None}
    for value in certified:
        ax.axhline(value, color="grey", linewidth=1.2, label="certified √ε")
    ax.set_yscale("log")
    ax.set_xticks(sorted({int(row["task"]) for row in rows}))
    ax.set_xlabel("task t")
    ax.set_ylabel("max ‖xᵀΔW‖ over earlier inputs")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right upper", fontsize=7 if len(layers) > 10 else 8, frameon=False)
    ax.set_title(f"{_run_name(run)}\nmeasured output shift (solid) and Eq. 8 bound (dashed) per layer", fontsize=10)
    return fig


def _layer_colors(n: int) -> list[tuple[float, float, float, float]]:
    """n distinguishable colours: tab10 up to 10 layers, tab20 up to 20, then a continuous map."""
    if n <= 10:
        return [colormaps["tab10"](k) for k in range(n)]
    if n <= 20:
        return [colormaps["tab20"](k) for k in range(n)]
    return [colormaps["turbo"](k / (n - 1)) for k in range(n)]


def _spectra_entries(spectra: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of spectra.json, each checked for the keys the spectrum figure reads."""
    entries = _require(spectra, "spectra", "spectra")
    if not isinstance(entries, list) or not entries:
        raise ValueError("spectra 'spectra' must be a non-empty list of {task, layer, threshold, singular_values}")
    for k, entry in enumerate(entries):
        for key in ("task", "layer", "threshold", "singular_values"):
            _require(entry, key, f"spectra 'spectra'[{k}]")
    return entries


def spectrum_figure(spectra: dict[str, Any], task: int | None = None, title: str | None = None) -> Figure:
    """One panel per layer: the singular values of its stacked earlier-task inputs at the start of `task`
    (default: the last task recorded), log scale, with ε₁'s threshold τ and the kept part σ ≤ τ highlighted."""
    entries = _spectra_entries(spectra)
    available = sorted({int(e["task"]) for e in entries})
    task = available[-1] if task is None else task
    if task not in available:
        raise ValueError(f"spectra hold no task {task}; recorded tasks: {available}")
    chosen = [e for e in entries if int(e["task"]) == task]
    ncols = min(len(chosen), 4 if len(chosen) <= 8 else 5)
    nrows = math.ceil(len(chosen) / ncols)
    fig = Figure(figsize=(3.2 * ncols + 0.4, 2.6 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, entry in zip(axes[: len(chosen)], chosen, strict=True):
        _spectrum_panel(ax, entry)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color=SPECTRUM_COLOR, label="singular values σᵢ (descending)"),
        Line2D([], [], color=KEPT_COLOR, linewidth=2.4, label="kept: σᵢ ≤ τ (null basis)"),
        Line2D([], [], color=THRESHOLD_COLOR, linestyle="--", label="threshold τ"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    heading = f"input spectra at the start of task {task}"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=11)
    return fig


def _spectrum_panel(ax: Any, entry: dict[str, Any]) -> None:
    """Draw one layer's spectrum; zeros and tiny values are clipped to a floor, non-finite ones left out, both
    said under the panel."""
    layer = str(entry["layer"])
    try:
        sigma = np.array(entry["singular_values"], dtype=float)
        tau = float(entry["threshold"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"spectra of layer {layer!r}: singular_values and threshold must be numbers ({err})") from err
    if sigma.ndim != 1 or sigma.size == 0:
        raise ValueError(f"spectra of layer {layer!r}: singular_values must be a non-empty list, got {sigma.shape}")
    finite = -np.sort(-sigma[np.isfinite(sigma)])
    rank = int((finite <= tau).sum())
    top = max(float(finite.max(initial=0.0)), tau if math.isfinite(tau) else 0.0)
    floor = FLOOR_RATIO * top if top > 0 else 1.0
    shown = np.maximum(finite, floor)
    index = np.arange(1, finite.size + 1)
    kept = finite <= tau
    ax.plot(index, shown, color=SPECTRUM_COLOR, linewidth=1.2, label="spectrum")
    ax.plot(
        index[kept],
        shown[kept],
        color=KEPT_COLOR,
        linewidth=2.4,
        label="kept",
        marker="o" if kept.sum() <= 5 else None,
        markersize=3,
    )
    notes = []
    if math.isfinite(tau) and tau > 0:
        ax.axhline(tau, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.0, label="threshold")
    else:
        notes.append(f"τ = {tau:g} cannot be drawn on a log axis")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=6))
    ax.yaxis.set_minor_locator(NullLocator())  # minor ticks of many decades cost seconds and add only clutter
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    clipped = int((finite < floor).sum())
    if clipped:
        notes.append(f"{clipped} σ < {floor:.1e} (zeros too) shown at that floor")
        ax.set_ylim(bottom=floor / 3)
    if finite.size < sigma.size:
        notes.append(f"{sigma.size - finite.size} NaN/Inf σ not drawn")
    ax.set_title(f"{layer}\nrank {rank} of {sigma.size}", fontsize=8.5)
    ax.set_xlabel("\n".join(["index i", *notes]), fontsize=7.5)  # below the axes, the notes hide no data
    ax.tick_params(labelsize=7)


# -- writing -------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON ({err}); delete it and re-run that seed") from err
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (format from the suffix, dpi 150) via a temporary file in the same folder."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip("."), dpi=DPI)
    return path


def _run_figures(path: Path) -> dict[str, Figure]:
    """The figures that apply to the run stored at `path`, errors prefixed with the file they concern."""
    run = _read_json(path)
    try:
        figures = {"accuracy_matrix": accuracy_matrix_figure(run), "forgetting": forgetting_figure(run)}
        if run.get("diagnostics") and all("rank" in row for row in run["diagnostics"]):  # NESS's null bases
            figures["null_rank"] = rank_figure(run)
            if any(row.get("measured_max_shift") is not None for row in run["diagnostics"]):
                figures["stability"] = stability_figure(run)
        name = _run_name(run)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    spectra_path = path.parent / "spectra.json"
    if spectra_path.exists():
        try:
            figures["spectrum"] = spectrum_figure(_read_json(spectra_path), title=name)
        except ValueError as err:
            raise ValueError(f"{spectra_path}: {err}") from err
    return figures


def plot_results(root: str | Path) -> list[Path]:
    """For every results.json under `root`, write its figures as PNG and SVG into a `figures/` folder beside it:
    accuracy_matrix, forgetting, null_rank and stability (runs with NESS diagnostics), spectrum (with spectra.json)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no results directory at '{root}'")
    paths = sorted(root.rglob("results.json"))
    if not paths:
        raise no_results(root)
    written = []
    for path in paths:
        for name, fig in _run_figures(path).items():
            written += [save_figure(fig, path.parent / "figures" / f"{name}.{fmt}") for fmt in FORMATS]
    return written
