"""The figures of `ness plot`: the numbers drawn are read back from the artists and checked against the input,
recomputed here by explicit loops; plot_results' files are checked by their bytes."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ness.plots import (
    accuracy_matrix_figure,
    forgetting_figure,
    plot_results,
    rank_figure,
    save_figure,
    spectrum_figure,
)

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# R[i][j]; entries above the diagonal are placeholders and deliberately not 0 here, to prove they are ignored.
R4 = [
    [90.0, 11.0, 12.0, 13.0],
    [80.0, 95.0, 14.0, 15.0],
    [85.0, 70.0, 60.0, 16.0],
    [92.5, 70.0, 45.25, 88.0],
]
# Task 0 improved (90 → 92.5), task 1 forgot (95 → 70), task 2 forgot (60 → 45.25), task 3 is the last.


def make_run(r: list[list[float]], method: str = "ness", **extra: Any) -> dict[str, Any]:
    n = len(r)
    run = {
        "method": method,
        "benchmark": "split_toy",
        "preset": "quick",
        "seed": 7,
        "acc_matrix": r,
        "acc": 0.0,
        "bwt": 0.0,
        "tasks": [{"task": j, "name": f"toy {j}"} for j in range(n)],
        "diagnostics": [],
    }
    return {**run, **extra}


def acc_bwt_by_loop(r: list[list[float]]) -> tuple[float, float]:
    t = len(r)
    acc = sum(r[t - 1][j] for j in range(t)) / t
    bwt = 0.0 if t == 1 else sum(r[t - 1][j] - r[j][j] for j in range(t - 1)) / (t - 1)
    return acc, bwt


def random_matrix(n: int) -> list[list[float]]:
    return [[round(50 + 50 * math.sin(3 * i + 7 * j) ** 2, 2) if j <= i else 0.0 for j in range(n)] for i in range(n)]


def cell_texts(ax: Any) -> dict[tuple[int, int], str]:
    """Annotation text by (row i, column j)."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


# -- accuracy matrix ----------------------------------------------------------------------------------------------


def test_accuracy_matrix_draws_the_lower_triangle_and_masks_the_rest():
    fig = accuracy_matrix_figure(make_run(R4))
    ax = fig.axes[0]
    drawn = ax.images[0].get_array()
    assert drawn.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            if j > i:
                assert drawn.mask[i, j], f"cell ({i}, {j}) above the diagonal must be masked"
            else:
                assert not drawn.mask[i, j] and drawn.data[i, j] == R4[i][j]
    texts = cell_texts(ax)
    assert texts == {(i, j): f"{R4[i][j]:.1f}" for i in range(4) for j in range(i + 1)}
    acc, bwt = acc_bwt_by_loop(R4)
    title = ax.get_title()
    assert "split_toy · ness · seed 7" in title
    assert f"ACC {acc:.2f}%" in title and f"BWT {bwt:+.2f}%" in title
    assert ax.get_xlabel() == "evaluated on task j" and ax.get_ylabel() == "trained up to task i"
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{j}: toy {j}" for j in range(4)]


def test_accuracy_matrix_variant_names_the_method_and_nan_cells_stay_blank():
    r = [[90.0, 0.0], [NAN, 80.0]]
    fig = accuracy_matrix_figure(make_run(r, variant="ness_sam"))
    ax = fig.axes[0]
    assert "ness_sam" in ax.get_title()
    assert ax.images[0].get_array().mask.tolist() == [[False, True], [True, False]]
    assert cell_texts(ax) == {(0, 0): "90.0", (1, 1): "80.0"}


def test_accuracy_matrix_many_tasks_keeps_annotations_small_or_drops_them():
    small = accuracy_matrix_figure(make_run(random_matrix(5))).axes[0]
    twenty = accuracy_matrix_figure(make_run(random_matrix(20))).axes[0]
    r20 = random_matrix(20)
    assert cell_texts(twenty) == {(i, j): f"{r20[i][j]:.0f}" for i in range(20) for j in range(i + 1)}
    assert max(t.get_fontsize() for t in twenty.texts) < min(t.get_fontsize() for t in small.texts)
    assert [t.get_text() for t in twenty.get_xticklabels()] == [str(j) for j in range(20)]  # names dropped
    assert len(accuracy_matrix_figure(make_run(random_matrix(25))).axes[0].texts) == 0


def test_one_task_run_has_no_bwt_and_one_bar():
    r = [[97.5]]
    ax = accuracy_matrix_figure(make_run(r)).axes[0]
    assert cell_texts(ax) == {(0, 0): "97.5"} and "BWT n/a" in ax.get_title()
    ax = forgetting_figure(make_run(r)).axes[0]
    bars = {c.get_label(): list(c) for c in ax.containers}
    assert [p.get_height() for p in bars["Accuracy"]] == [97.5]
    assert bars["Improved"] == [] and bars["Forgot"] == []


# -- forgetting ---------------------------------------------------------------------------------------------------


def expected_bars(r: list[list[float]]) -> tuple[dict[int, float], dict[int, tuple[float, float]], dict]:
    """Blue height per task, and (bottom, height) of the green and red segments, by an explicit loop."""
    t = len(r)
    blue, green, red = {}, {}, {}
    for j in range(t):
        end, after = r[t - 1][j], r[j][j]
        if j == t - 1 or end == after:
            blue[j] = end
        elif end > after:
            blue[j] = after
            green[j] = (after, end - after)
        else:
            blue[j] = end
            red[j] = (end, after - end)
    return blue, green, red


def bars_by_task(container: Any) -> dict[int, Any]:
    return {round(p.get_x() + p.get_width() / 2): p for p in container}


def test_forgetting_bar_geometry_and_colours():
    # Task 0 improved (90 → 92.5), tasks 1 and 2 forgot (95 → 70, 60 → 45.25), task 3 unchanged, task 4 last.
    r = [
        [90.0, 1.0, 2.0, 3.0, 4.0],
        [80.0, 95.0, 5.0, 6.0, 7.0],
        [85.0, 70.0, 60.0, 8.0, 9.0],
        [88.0, 72.0, 50.0, 77.0, 10.0],
        [92.5, 70.0, 45.25, 77.0, 88.0],
    ]
    fig = forgetting_figure(make_run(r))
    ax = fig.axes[0]
    containers = {c.get_label(): bars_by_task(c) for c in ax.containers}
    blue, green, red = expected_bars(r)
    assert {j: p.get_height() for j, p in containers["Accuracy"].items()} == pytest.approx(blue)
    assert all(p.get_y() == 0 for p in containers["Accuracy"].values())
    for name, expected in (("Improved", green), ("Forgot", red)):
        assert sorted(containers[name]) == sorted(expected), name
        for j, (bottom, height) in expected.items():
            assert containers[name][j].get_y() == pytest.approx(bottom)
            assert containers[name][j].get_height() == pytest.approx(height)
    assert sorted(green) == [0] and sorted(red) == [1, 2]  # the data above was built so
    for p in containers["Improved"].values():
        red_c, green_c, blue_c, _ = p.get_facecolor()
        assert green_c > red_c and green_c > blue_c
    for p in containers["Forgot"].values():
        red_c, green_c, blue_c, _ = p.get_facecolor()
        assert red_c > green_c and red_c > blue_c
    # A forgot bar's top reads the accuracy right after learning; the improved bar's top the end accuracy.
    for j, p in containers["Forgot"].items():
        assert p.get_y() + p.get_height() == pytest.approx(r[j][j])
    assert containers["Improved"][0].get_y() + containers["Improved"][0].get_height() == pytest.approx(r[4][0])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Accuracy", "Improved", "Forgot"]
    changes = {round(t.get_position()[0]): t.get_text() for t in ax.texts}
    assert changes == {j: f"{r[4][j] - r[j][j]:+.1f}" for j in (0, 1, 2)}
    acc, bwt = acc_bwt_by_loop(r)
    assert f"ACC {acc:.2f}%" in ax.get_title() and f"BWT {bwt:+.2f}%" in ax.get_title()


# -- null-basis rank ------------------------------------------------------------------------------------------------


DIAGNOSTICS = [
    {"task": t, "layer": layer, "d": d, "rank": rank, "frozen": rank == 0, "threshold": 1.0}
    for t, ranks in ((1, (40, 90)), (2, (25, 60)), (3, (0, 41)))
    for (layer, d), rank in zip((("conv1", 64), ("fc", 100)), ranks, strict=True)
]


def test_rank_figure_plots_each_layers_ranks_and_marks_frozen_layers():
    run = make_run(R4, diagnostics=DIAGNOSTICS[::-1])  # order in the file must not matter
    ax = rank_figure(run).axes[0]
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines()}
    assert sorted(lines) == ["conv1", "fc"]
    for layer in lines:
        own = sorted((row["task"], row["rank"]) for row in DIAGNOSTICS if row["layer"] == layer)
        assert list(lines[layer].get_xdata()) == [t for t, _ in own]
        assert list(lines[layer].get_ydata()) == [rank for _, rank in own]
    assert lines["conv1"].get_label() == "conv1 (d=64)"
    (frozen,) = ax.collections
    assert frozen.get_offsets().tolist() == [[3.0, 0.0]]
    ax = rank_figure(run, fraction=True).axes[0]
    fc = next(line for line in ax.get_lines() if line.get_label().startswith("fc"))
    assert list(fc.get_ydata()) == pytest.approx([0.90, 0.60, 0.41])


def test_rank_figure_without_diagnostics_or_with_a_missing_key_says_so():
    with pytest.raises(ValueError, match="no NESS diagnostics"):
        rank_figure(make_run(R4, method="finetune"))
    broken = [dict(row) for row in DIAGNOSTICS]
    del broken[1]["rank"]
    with pytest.raises(ValueError, match=r"diagnostics'\[1\] has no 'rank' key"):
        rank_figure(make_run(R4, diagnostics=broken))


# -- spectrum -----------------------------------------------------------------------------------------------------


def spectra_for(layers: dict[str, tuple[float, list[float]]], task: int = 2) -> list[dict[str, Any]]:
    return [{"task": task, "layer": k, "threshold": tau, "singular_values": s} for k, (tau, s) in layers.items()]


SPECTRA = {
    "spectra": spectra_for({"conv1": (1.0, [50.0, 7.0, 1.5, 1.0, 0.2])}, task=1)
    + spectra_for(
        {
            "conv1": (2.5, [60.0, 9.0, 2.5, 2.0, 0.5, 0.0, 0.0]),
            "fc": (3.0, [30.0, 3.5, NAN, 0.01, 0.0]),
            "head_in": (0.5, [4.0, 3.0, 2.0]),
        },
        task=2,
    )
}


def panels(fig: Any) -> dict[str, Any]:
    return {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_visible()}


def line(ax: Any, label: str) -> Any:
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def test_spectrum_panels_show_threshold_and_kept_values():
    fig = spectrum_figure(SPECTRA)  # default: the last task, 2
    assert "start of task 2" in fig.get_suptitle()
    by_layer = panels(fig)
    assert sorted(by_layer) == ["conv1", "fc", "head_in"]
    for entry in SPECTRA["spectra"][1:]:
        ax, tau, sigma = by_layer[entry["layer"]], entry["threshold"], entry["singular_values"]
        kept = [s for s in sigma if s <= tau]  # NaN compares false: never kept
        assert ax.get_title() == f"{entry['layer']}\nrank {len(kept)} of {len(sigma)}"
        assert list(line(ax, "threshold").get_ydata()) == [tau, tau]
        highlighted = line(ax, "kept").get_ydata()
        assert len(highlighted) == len(kept)
        positive = [s for s in kept if s > 0]
        assert sorted(highlighted, reverse=True)[: len(positive)] == sorted(positive, reverse=True)
        assert all(y > 0 for y in line(ax, "spectrum").get_ydata())  # zeros clipped: drawable on a log axis
        assert ax.get_yscale() == "log"
    assert "2 σ <" in by_layer["conv1"].get_xlabel() and "floor" in by_layer["conv1"].get_xlabel()
    assert "1 NaN/Inf σ not drawn" in by_layer["fc"].get_xlabel()
    assert by_layer["head_in"].get_xlabel() == "index i"  # nothing clipped, nothing dropped
    assert len(line(by_layer["fc"], "spectrum").get_ydata()) == 4


def test_spectrum_chosen_task_and_unknown_task():
    fig = spectrum_figure(SPECTRA, task=1, title="split_toy · ness · seed 7")
    assert fig.get_suptitle().startswith("split_toy · ness · seed 7\n")
    (ax,) = panels(fig).values()
    assert ax.get_title() == "conv1\nrank 2 of 5"  # σ = 1.0 and 0.2 are ≤ τ = 1.0
    with pytest.raises(ValueError, match=r"no task 5; recorded tasks: \[1, 2\]"):
        spectrum_figure(SPECTRA, task=5)


def test_spectrum_grid_holds_twenty_layers():
    layers = {f"layer{k}.conv": (1.0, [10.0 / (i + 1) for i in range(30 + k)]) for k in range(20)}
    fig = spectrum_figure({"spectra": spectra_for(layers)})
    by_layer = panels(fig)
    assert sorted(by_layer) == sorted(layers)
    for name, (tau, sigma) in layers.items():
        assert by_layer[name].get_title().endswith(f"rank {sum(s <= tau for s in sigma)} of {len(sigma)}")


def test_spectrum_missing_key_is_named():
    with pytest.raises(ValueError, match=r"spectra 'spectra'\[0\] has no 'singular_values' key"):
        spectrum_figure({"spectra": [{"task": 1, "layer": "fc", "threshold": 1.0}]})
    with pytest.raises(ValueError, match="spectra has no 'spectra' key"):
        spectrum_figure({"layers": []})


# -- plot_results -------------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_plot_results_writes_the_applicable_figures_atomically(tmp_path):
    ness_dir = tmp_path / "split_toy" / "ness" / "seed_7"
    finetune_dir = tmp_path / "split_toy" / "finetune" / "seed_7"
    write_json(ness_dir / "results.json", make_run(R4, diagnostics=DIAGNOSTICS))
    write_json(ness_dir / "spectra.json", SPECTRA)
    write_json(finetune_dir / "results.json", make_run(R4, method="finetune"))
    written = plot_results(tmp_path)
    expected = {
        ness_dir / "figures" / f"{name}.{ext}"
        for name in ("accuracy_matrix", "forgetting", "null_rank", "spectrum")
        for ext in ("png", "svg")
    } | {
        finetune_dir / "figures" / f"{name}.{ext}"
        for name in ("accuracy_matrix", "forgetting")
        for ext in ("png", "svg")
    }
    assert set(written) == expected and len(written) == len(expected)
    umask = os.umask(0)
    os.umask(umask)
    for folder in (ness_dir / "figures", finetune_dir / "figures"):
        assert set(folder.iterdir()) <= expected  # no temporary files left behind
    for path in expected:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_SIGNATURE
        else:
            assert ET.parse(path).getroot().tag.endswith("svg")
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    # Re-plotting one run (its folder as the root) replaces its files and still leaves nothing else.
    before = (finetune_dir / "figures" / "forgetting.png").stat().st_ino
    assert set(plot_results(finetune_dir)) == {p for p in expected if p.is_relative_to(finetune_dir)}
    assert (finetune_dir / "figures" / "forgetting.png").stat().st_ino != before  # a new file renamed over it
    assert sorted(p.name for p in (finetune_dir / "figures").iterdir()) == [
        "accuracy_matrix.png",
        "accuracy_matrix.svg",
        "forgetting.png",
        "forgetting.svg",
    ]


def test_plot_results_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results directory"):
        plot_results(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no results\.json under"):
        plot_results(tmp_path)
    bad = tmp_path / "a" / "results.json"
    run = make_run(R4)
    del run["acc_matrix"]
    write_json(bad, run)
    with pytest.raises(ValueError, match="no 'acc_matrix' key") as err:
        plot_results(tmp_path)
    assert str(bad) in str(err.value)
    write_json(bad, make_run([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"T×T with T ≥ 1, got shape \(1, 2\)"):
        plot_results(tmp_path)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON") as err:
        plot_results(tmp_path)
    assert str(bad) in str(err.value)
    write_json(bad, make_run(R4))
    write_json(bad.parent / "spectra.json", {"spectra": [{"task": 1, "layer": "fc"}]})
    with pytest.raises(ValueError, match="has no 'threshold' key") as err:
        plot_results(tmp_path)
    assert str(bad.parent / "spectra.json") in str(err.value)


def test_save_figure_failure_leaves_no_file(tmp_path):
    fig = forgetting_figure(make_run(R4))
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "figure.notaformat")
    assert list(tmp_path.iterdir()) == []
