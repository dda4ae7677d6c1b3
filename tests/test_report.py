"""The paper's table as data and the paper-format report, checked against literals typed from METHODS_SPEC §14 and
against independent computations.

Our std is the sample standard deviation (n − 1), what `ness.metrics.mean_std` computes and what papers report over
seeds; the tests compute it with `statistics.stdev` and check that the data tell it apart from `statistics.pstdev`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics

import pytest

from ness.paper import (
    PAPER_ARXIV,
    PAPER_BENCHMARKS,
    PAPER_ENTRIES,
    PAPER_LABELS,
    PAPER_VARIANTS,
    PAPER_VENUE,
    TABLE_CAPTION,
    paper_entry,
)
from ness.results import (
    CSV_COLUMNS,
    load_results,
    paper_table,
    paper_table_csv,
    paper_table_markdown,
    report_markdown,
    summarize,
    write_json_atomic,
    write_text_atomic,
)

HEADER = "| method | preset | seeds | ACC ours | ACC paper | ΔACC | BWT ours | BWT paper |"


def make_run(method: str, variant: str | None, benchmark: str, preset: str, seed: int, r: list[list[float]]) -> dict:
    """A results.json-shaped run whose ACC and BWT are worked out from its accuracy matrix R by explicit loops."""
    t = len(r)
    acc = sum(r[t - 1][j] for j in range(t)) / t
    bwt = sum(r[t - 1][j] - r[j][j] for j in range(t - 1)) / (t - 1)
    run = {
        "method": method,
        "benchmark": benchmark,
        "preset": preset,
        "seed": seed,
        "acc": acc,
        "bwt": bwt,
        "acc_matrix": r,
        "timings": {"total_seconds": 10.0 + seed},
    }
    if variant is not None:
        run["variant"] = variant
    return run


# (ACC, BWT) per seed, as 2-task matrices R = [[R00, 0], [R10, R11]]: ACC = (R10 + R11)/2, BWT = R10 − R00.
SAM_MATRICES = {
    1: [[75.0, 0.0], [74.0, 70.0]],  # ACC 72.0, BWT −1.0
    2: [[74.0, 0.0], [74.5, 72.5]],  # ACC 73.5, BWT +0.5
    3: [[73.0, 0.0], [71.0, 71.0]],  # ACC 71.0, BWT −2.0
    4: [[76.0, 0.0], [75.0, 73.0]],  # ACC 74.0, BWT −1.0
    37: [[72.0, 0.0], [72.0, 73.0]],  # ACC 72.5, BWT 0.0
}
SAM_RUNS = [make_run("ness", "ness_sam", "split_cifar100", "paper", s, m) for s, m in SAM_MATRICES.items()]
SGDM_RUNS = [
    make_run("ness", "ness_sgdm", "split_cifar100", "paper", 1, [[70.0, 0.0], [69.0, 75.0]]),  # ACC 72.0, BWT −1.0
    make_run("ness", "ness_sgdm", "split_cifar100", "paper", 2, [[71.0, 0.0], [71.0, 74.0]]),  # ACC 72.5, BWT 0.0
]
QUICK_RUN = make_run("ness", "ness_sam", "split_cifar100", "quick", 1, [[60.0, 0.0], [50.0, 40.0]])  # 45.0, −10.0
GPM_RUN = make_run("gpm", None, "split_cifar100", "paper", 1, [[72.0, 0.0], [71.0, 70.0]])  # ACC 70.5, BWT −1.0
OWM_5D_RUN = make_run("owm", None, "five_datasets", "paper", 1, [[90.0, 0.0], [80.0, 86.0]])  # ACC 83.0, BWT −10.0
MNIST_RUN = make_run("ness", None, "split_mnist", "quick", 3, [[99.0, 0.0], [98.0, 97.0]])  # ACC 97.5, BWT −1.0
ALL_RUNS = [QUICK_RUN, MNIST_RUN, *SGDM_RUNS[::-1], OWM_5D_RUN, *SAM_RUNS[::-1], GPM_RUN]  # deliberately shuffled


def row_for(rows: list[dict], benchmark: str, variant: str, preset: str | None) -> dict:
    (row,) = [r for r in rows if (r["benchmark"], r["variant"], r["preset"]) == (benchmark, variant, preset)]
    return row


def markdown_tables(text: str) -> dict[str, tuple[list[list[str]], list[str]]]:
    """Markdown report → {benchmark key: (table rows as cell lists, footnote lines)}."""
    tables = {}
    for block in text.split("### ")[1:]:
        heading, *lines = block.strip().splitlines()
        key = heading.split("`")[1]
        assert HEADER in lines, heading
        cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines if line.startswith("| ")]
        tables[key] = (cells[1:], [line for line in lines if line.startswith("- ")])  # cells[0] is the header
    return tables


# -- the paper's table as data ------------------------------------------------------------------------------------


def test_paper_table_shape_and_order():
    assert list(PAPER_BENCHMARKS) == ["split_cifar100", "five_datasets", "split_miniimagenet"]
    assert PAPER_VARIANTS == (
        "owm",
        "ewc",
        "hat",
        "agem",
        "gpm",
        "sgp",
        "trgp",
        "fsdgpm",
        "dfgp_mixup0.01",
        "dfgp_mixup0.05",
        "dfgp_mixup0.001",
        "dfgp_mixup0.0001",
        "ness_sam",
        "ness_sgdm",
    )
    assert len(PAPER_ENTRIES) == 14 * 3
    assert len({(e.benchmark, e.variant) for e in PAPER_ENTRIES}) == 42
    # "–" in the paper: OWM and FS-DGPM were reported on CIFAR-100 only.
    missing = {(e.variant, e.benchmark) for e in PAPER_ENTRIES if not e.reported}
    assert missing == {(v, b) for v in ("owm", "fsdgpm") for b in ("five_datasets", "split_miniimagenet")}
    for e in PAPER_ENTRIES:
        if not e.reported:
            assert (e.acc, e.acc_std, e.bwt, e.bwt_std, e.acc_text, e.bwt_text) == (None, None, None, None, "–", "–")
    assert {e.variant for e in PAPER_ENTRIES if e.dagger} == {"owm", "ewc", "hat", "agem", "fsdgpm"}
    assert PAPER_LABELS["ness_sgdm"] == "NESS (with SGDm: m=0.9)"
    assert PAPER_LABELS["dfgp_mixup0.0001"] == "DFGP (mixup=0.0001)"
    assert PAPER_LABELS["agem"] == "A-GEM"


@pytest.mark.parametrize(
    ("variant", "benchmark", "expected"),
    [  # typed from METHODS_SPEC §14: ACC, ACC std, BWT, BWT std, †
        ("ness_sgdm", "split_cifar100", (72.46, 0.26, 0.03, 0.40, False)),
        ("ness_sam", "split_cifar100", (72.56, 0.07, -0.17, 0.51, False)),
        ("ness_sam", "split_miniimagenet", (63.48, 1.38, -0.26, 0.67, False)),
        ("ness_sgdm", "five_datasets", (90.20, 0.47, -0.58, 0.15, False)),
        ("owm", "split_cifar100", (50.94, 0.60, -30.0, 1.0, True)),
        ("hat", "split_miniimagenet", (59.78, 0.57, -3.0, 0.0, True)),
        ("fsdgpm", "split_cifar100", (74.10, 0.09, -3.03, 0.31, True)),
        ("trgp", "five_datasets", (92.78, 0.65, -0.09, 0.08, False)),
        ("gpm", "split_miniimagenet", (63.56, 2.42, -1.39, 1.37, False)),
        ("dfgp_mixup0.05", "five_datasets", (90.22, 0.46, -3.87, 0.53, False)),
        ("dfgp_mixup0.0001", "split_miniimagenet", (68.39, 1.07, -0.16, 1.42, False)),
        ("agem", "five_datasets", (84.04, 0.33, -12.0, 1.0, True)),
    ],
)
def test_paper_numbers_against_spec(variant, benchmark, expected):
    e = paper_entry(benchmark, variant)
    assert e is not None and e.reported
    assert (e.acc, e.acc_std, e.bwt, e.bwt_std, e.dagger) == expected


def test_paper_entry_text_as_printed_and_lookups():
    owm = paper_entry("split_cifar100", "owm")
    assert (owm.acc_text, owm.bwt_text) == ("50.94 ± 0.60", "-30 ± 1")  # whole-number BWT stays as printed
    assert paper_entry("split_cifar100", "ness_sgdm").acc_text == "72.46 ± 0.26"
    assert paper_entry("five_datasets", "owm").reported is False
    assert paper_entry("split_mnist", "ness_sam") is None
    assert paper_entry("split_cifar100", "ness") is None  # plain "ness" is neither paper row
    with pytest.raises(dataclasses.FrozenInstanceError):
        owm.acc = 99.0
    assert "2602.21919" in PAPER_ARXIV and PAPER_VENUE == "CPAL 2026"
    assert TABLE_CAPTION == "ACC and BWT, mean ± std over 5 seeds 1, 2, 3, 4, 37"


# -- paper_table: grouping, statistics, the paper's numbers, Δ ---------------------------------------------------


def test_ours_mean_and_sample_std_by_independent_computation():
    rows = paper_table(ALL_RUNS)
    sam = row_for(rows, "split_cifar100", "ness_sam", "paper")
    accs = [72.0, 73.5, 71.0, 74.0, 72.5]
    bwts = [-1.0, 0.5, -2.0, -1.0, 0.0]
    assert [r["acc"] for r in sorted(SAM_RUNS, key=lambda r: r["seed"])] == accs  # make_run's loops
    assert sam["seeds"] == [1, 2, 3, 4, 37] and sam["n"] == 5
    assert sam["acc"] == pytest.approx(statistics.mean(accs))
    assert sam["acc_std"] == pytest.approx(statistics.stdev(accs))
    assert sam["acc_std"] != pytest.approx(statistics.pstdev(accs))  # the data tell sample from population std
    assert sam["bwt"] == pytest.approx(statistics.mean(bwts))
    assert sam["bwt_std"] == pytest.approx(statistics.stdev(bwts))
    assert (sam["method"], sam["label"], sam["preset"], sam["paper_protocol"]) == (
        "ness",
        "NESS (with SAM)",
        "paper",
        True,
    )


def test_grouped_by_variant_not_method():
    rows = paper_table(ALL_RUNS)
    sam = row_for(rows, "split_cifar100", "ness_sam", "paper")
    sgdm = row_for(rows, "split_cifar100", "ness_sgdm", "paper")
    assert sam["method"] == sgdm["method"] == "ness"
    assert sgdm["seeds"] == [1, 2]
    assert sgdm["acc"] == pytest.approx(statistics.mean([72.0, 72.5]))
    assert sgdm["acc_std"] == pytest.approx(statistics.stdev([72.0, 72.5]))
    # A run without a variant is grouped under its method name.
    assert row_for(rows, "split_cifar100", "gpm", "paper")["method"] == "gpm"
    # summarize carries the variant too.
    summary = {(s["benchmark"], s["variant"], s["preset"]): s for s in summarize(ALL_RUNS)}
    assert summary[("split_cifar100", "ness_sam", "paper")]["seeds"] == [1, 2, 3, 4, 37]
    assert summary[("split_cifar100", "ness_sam", "quick")]["seeds"] == [1]
    assert summary[("split_cifar100", "ness_sgdm", "paper")]["method"] == "ness"
    assert summary[("split_mnist", "ness", "quick")]["variant"] == "ness"
    assert "| split_cifar100 | ness_sgdm | paper | 1,2 |" in report_markdown(ALL_RUNS)


def test_paper_numbers_in_the_right_row_and_delta():
    rows = paper_table(ALL_RUNS)
    sam = row_for(rows, "split_cifar100", "ness_sam", "paper")
    sgdm = row_for(rows, "split_cifar100", "ness_sgdm", "paper")
    assert (sam["paper_acc"], sam["paper_acc_std"], sam["paper_bwt"], sam["paper_bwt_std"]) == (
        72.56,
        0.07,
        -0.17,
        0.51,
    )
    assert (sgdm["paper_acc"], sgdm["paper_acc_std"], sgdm["paper_bwt"], sgdm["paper_bwt_std"]) == (
        72.46,
        0.26,
        0.03,
        0.40,
    )
    assert sam["paper_dagger"] is False
    assert sam["delta_acc"] == pytest.approx(statistics.mean([72.0, 73.5, 71.0, 74.0, 72.5]) - 72.56)  # 72.6 − 72.56
    assert sgdm["delta_acc"] == pytest.approx(72.25 - 72.46)
    gpm = row_for(rows, "split_cifar100", "gpm", "paper")
    assert gpm["delta_acc"] == pytest.approx(70.5 - 71.63)
    # OWM ran on 5-datasets, where the paper has "–": no paper numbers, no Δ, no †.
    owm = row_for(rows, "five_datasets", "owm", "paper")
    assert owm["label"] == "OWM" and owm["acc"] == pytest.approx(83.0)
    assert owm["paper_acc"] is None and owm["delta_acc"] is None and owm["paper_dagger"] is None
    # A benchmark the paper does not have: ours only.
    mnist = row_for(rows, "split_mnist", "ness", "quick")
    assert mnist["label"] == "ness" and mnist["paper_acc"] is None and mnist["delta_acc"] is None


def test_a_run_on_a_subset_of_the_tasks_is_reported_apart_without_paper_numbers():
    subset = {**make_run("ness", "ness_sgdm", "five_datasets", "quick", 1, [[90.0, 0.0], [88.0, 92.0]]), "tasks_run": 2}
    full = {**make_run("ness", "ness_sgdm", "five_datasets", "paper", 1, [[90.0, 0.0], [80.0, 86.0]]), "tasks_run": 5}
    rows = paper_table([subset, full])
    part = row_for(rows, "five_datasets (2 of 5 tasks)", "ness_sgdm", "quick")
    assert part["paper_acc"] is None and part["delta_acc"] is None and part["acc"] == pytest.approx(90.0)
    whole = row_for(rows, "five_datasets", "ness_sgdm", "paper")
    assert whole["paper_acc"] == 90.20  # METHODS_SPEC §14, NESS (with SGDm) on 5-datasets
    text = paper_table_markdown(rows)
    assert "`five_datasets (2 of 5 tasks)` (a subset of the paper's benchmark)" in text
    assert "the paper's numbers do not apply" in text


def test_markdown_cells_quick_flag_and_single_seed_dash():
    tables = markdown_tables(paper_table_markdown(paper_table(ALL_RUNS)))
    assert list(tables) == ["split_cifar100", "five_datasets", "split_mnist"]
    cifar, notes = tables["split_cifar100"]
    by_key = {(cells[0], cells[1]): cells for cells in cifar}
    sam_mean = statistics.mean([72.0, 73.5, 71.0, 74.0, 72.5])
    sam_std = statistics.stdev([72.0, 73.5, 71.0, 74.0, 72.5])
    bwt_mean = statistics.mean([-1.0, 0.5, -2.0, -1.0, 0.0])
    bwt_std = statistics.stdev([-1.0, 0.5, -2.0, -1.0, 0.0])
    assert by_key[("NESS (with SAM)", "paper")] == [
        "NESS (with SAM)",
        "paper",
        "1,2,3,4,37",
        f"{sam_mean:.2f} ± {sam_std:.2f}",
        "72.56 ± 0.07",
        f"{sam_mean - 72.56:+.2f}",
        f"{bwt_mean:.2f} ± {bwt_std:.2f}",
        "-0.17 ± 0.51",
    ]
    # The quick run: flagged in the preset and Δ cells; one seed, so its std is "–", never 0.00 or nan.
    assert by_key[("NESS (with SAM)", "quick*")] == [
        "NESS (with SAM)",
        "quick*",
        "1",
        "45.00 ± –",
        "72.56 ± 0.07",
        f"{45.0 - 72.56:+.2f}*",
        "-10.00 ± –",
        "-0.17 ± 0.51",
    ]
    assert by_key[("GPM", "paper")][3] == "70.50 ± –"
    assert "- Presets used: paper, quick*." in notes
    assert any("NOT the paper's protocol" in line for line in notes)
    assert any("2602.21919" in line and TABLE_CAPTION in line for line in notes)
    # 5-datasets: only paper-preset rows, so no quick warning; OWM has "–" in the paper.
    five, five_notes = tables["five_datasets"]
    assert five == [["OWM", "paper", "1", "83.00 ± –", "–", "–", "-10.00 ± –", "–"]]
    assert not any("NOT the paper's protocol" in line for line in five_notes)
    mnist, mnist_notes = tables["split_mnist"]
    assert mnist == [["ness", "quick*", "3", "97.50 ± –", "–", "–", "-1.00 ± –", "–"]]
    assert "- The NESS paper reports no numbers on this benchmark." in mnist_notes
    assert any("NOT the paper's protocol" in line for line in mnist_notes)


def test_dagger_shown_for_copied_rows():
    owm = make_run("owm", None, "split_cifar100", "paper", 1, [[60.0, 0.0], [30.0, 70.0]])
    (cells,), notes = markdown_tables(paper_table_markdown(paper_table([owm])))["split_cifar100"]
    assert cells[0] == "OWM †" and cells[4] == "50.94 ± 0.60" and cells[7] == "-30 ± 1"
    assert any(line.startswith("- †") for line in notes)


def test_paper_row_order_whatever_the_input_order():
    extra = [
        make_run("finetune", None, "split_cifar100", "paper", 1, [[80.0, 0.0], [20.0, 80.0]]),
        make_run("agem", None, "split_cifar100", "quick", 1, [[60.0, 0.0], [55.0, 60.0]]),
        make_run("dfgp", "dfgp_mixup0.001", "split_cifar100", "paper", 1, [[70.0, 0.0], [69.0, 74.0]]),
        make_run("ness", None, "split_digits", "quick", 1, [[99.0, 0.0], [95.0, 98.0]]),
    ]
    runs = [*extra, *ALL_RUNS]
    rows = paper_table(runs)
    assert [(r["benchmark"], r["variant"], r["preset"]) for r in rows] == [
        ("split_cifar100", "agem", "quick"),
        ("split_cifar100", "gpm", "paper"),
        ("split_cifar100", "dfgp_mixup0.001", "paper"),
        ("split_cifar100", "ness_sam", "paper"),
        ("split_cifar100", "ness_sam", "quick"),
        ("split_cifar100", "ness_sgdm", "paper"),
        ("split_cifar100", "finetune", "paper"),  # not in the paper: after its rows
        ("five_datasets", "owm", "paper"),
        ("split_digits", "ness", "quick"),  # benchmarks not in the paper: after, by name
        ("split_mnist", "ness", "quick"),
    ]
    labels = [cells[0] for cells in markdown_tables(paper_table_markdown(rows[::-1]))["split_cifar100"][0]]
    assert labels == [
        "A-GEM †",
        "GPM",
        "DFGP (mixup=0.001)",
        "NESS (with SAM)",
        "NESS (with SAM)",
        "NESS (with SGDm: m=0.9)",
        "finetune",
    ]


def test_include_missing_lists_what_is_left():
    rows = paper_table(ALL_RUNS, include_missing=True)
    missing = [r for r in rows if r["preset"] is None]
    done_at_paper = {("split_cifar100", "ness_sam"), ("split_cifar100", "ness_sgdm"), ("split_cifar100", "gpm")}
    expected = [(e.benchmark, e.variant) for e in PAPER_ENTRIES if e.reported]
    expected = [key for key in expected if key not in done_at_paper]
    assert len(expected) == 38 - 3  # 42 entries, 4 "–"; OWM on 5-datasets is "–" so its run changes nothing
    assert sorted((r["benchmark"], r["variant"]) for r in missing) == sorted(expected)
    for r in missing:
        assert r["method"] is None and r["n"] == 0 and r["seeds"] == [] and r["acc"] is None
        assert r["delta_acc"] is None and r["paper_acc"] == paper_entry(r["benchmark"], r["variant"]).acc
    # Paper order inside each benchmark, missing rows included.
    cifar = [r["variant"] for r in rows if r["benchmark"] == "split_cifar100"]
    assert [v for v in dict.fromkeys(cifar)] == list(PAPER_VARIANTS)
    tables = markdown_tables(paper_table_markdown(rows))
    assert list(tables) == ["split_cifar100", "five_datasets", "split_miniimagenet", "split_mnist"]
    mini, mini_notes = tables["split_miniimagenet"]
    assert len(mini) == 12 and all(cells[1] == "not run" and cells[3] == "–" for cells in mini)
    assert mini[0] == ["EWC †", "not run", "–", "–", "52.01 ± 2.53", "–", "–", "-12 ± 3"]
    assert "- Presets used: none (nothing run yet)." in mini_notes
    # Without the option, nothing we did not run appears.
    assert all(r["preset"] is not None for r in paper_table(ALL_RUNS))


def test_a_quick_run_does_not_count_as_reproduced():
    quick = make_run("ness", "ness_sgdm", "five_datasets", "quick", 1, [[90.0, 0.0], [85.0, 95.0]])
    rows = [r for r in paper_table([quick], include_missing=True) if r["variant"] == "ness_sgdm"]
    assert [(r["benchmark"], r["preset"]) for r in rows] == [
        ("split_cifar100", None),
        ("five_datasets", "quick"),
        ("five_datasets", None),  # still left to reproduce at the paper preset
        ("split_miniimagenet", None),
    ]


def test_csv_parses_back_to_the_same_numbers():
    rows = paper_table(ALL_RUNS, include_missing=True)
    parsed = list(csv.DictReader(io.StringIO(paper_table_csv(rows))))
    assert len(parsed) == len(rows)
    assert tuple(parsed[0]) == CSV_COLUMNS

    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    for row, line in zip(rows, parsed, strict=True):
        for key in ("acc", "acc_std", "bwt", "bwt_std", "paper_acc", "paper_acc_std", "paper_bwt", "delta_acc"):
            assert number(line[key]) == row[key], (key, line)
        assert line["seeds"].split() == [str(s) for s in row["seeds"]]
        assert int(line["n"]) == row["n"]
        assert line["paper_protocol"] == ("true" if row["paper_protocol"] else "false")
        assert line["preset"] == (row["preset"] or "")
    sam = next(p for p in parsed if (p["variant"], p["preset"]) == ("ness_sam", "paper"))
    assert float(sam["acc"]) == pytest.approx(72.6) and float(sam["paper_acc"]) == 72.56
    assert sam["seeds"] == "1 2 3 4 37" and sam["paper_dagger"] == "false"
    quick = next(p for p in parsed if (p["variant"], p["preset"]) == ("ness_sam", "quick"))
    assert quick["acc_std"] == "" and quick["paper_protocol"] == "false"
    owm = next(p for p in parsed if (p["benchmark"], p["variant"]) == ("split_cifar100", "owm"))
    assert owm["paper_bwt"] == "-30.0" and owm["paper_dagger"] == "true" and owm["acc"] == ""


# -- bad input -----------------------------------------------------------------------------------------------------


def test_results_file_missing_acc_names_file_and_key(tmp_path):
    good = make_run("ness", "ness_sam", "split_cifar100", "paper", 1, SAM_MATRICES[1])
    write_json_atomic(tmp_path / "a" / "results.json", good)
    bad = {k: v for k, v in good.items() if k != "acc"}
    bad_path = write_json_atomic(tmp_path / "b" / "results.json", bad)
    with pytest.raises(ValueError, match="'acc'") as err:
        load_results(tmp_path)
    assert str(bad_path) in str(err.value)
    (tmp_path / "b" / "results.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        load_results(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bwt": None}, "'bwt' must be a finite number"),
        ({"acc": "72.1"}, "'acc' must be a finite number"),
        ({"acc": float("nan")}, "'acc' must be a finite number"),
        ({"seed": "1"}, "'seed' must be an integer"),
        ({"variant": ""}, "'variant' must be a non-empty string"),
    ],
)
def test_bad_run_values_are_named(change, message):
    run = {**SAM_RUNS[0], **change}
    with pytest.raises(ValueError, match=message) as err:
        paper_table([SAM_RUNS[1], run])
    assert "run #1 (split_cifar100/" in str(err.value)


def test_missing_key_in_memory_names_the_run():
    run = {k: v for k, v in SGDM_RUNS[0].items() if k != "bwt"}
    with pytest.raises(ValueError, match=r"run #0 \(split_cifar100/ness_sgdm/seed 1\): missing key\(s\) 'bwt'"):
        paper_table([run])


def test_duplicate_seed_and_shared_variant_are_errors():
    with pytest.raises(ValueError, match="seed 1 appears twice"):
        paper_table([SAM_RUNS[0], dict(SAM_RUNS[0])])
    clash = make_run("gpm", "ness_sam", "split_cifar100", "paper", 9, SAM_MATRICES[1])
    with pytest.raises(ValueError, match="variant 'ness_sam' is also used by method 'ness'"):
        paper_table([SAM_RUNS[0], clash])


def test_missing_timings_names_the_run():
    run = {k: v for k, v in SAM_RUNS[0].items() if k != "timings"}
    with pytest.raises(ValueError, match=r"split_cifar100/ness_sam/seed 1: no number at key 'timings.total_seconds'"):
        paper_table([run])


def test_markdown_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no rows"):
        paper_table_markdown([])


def test_write_text_atomic_writes_reports_whole(tmp_path):
    rows = paper_table(ALL_RUNS)
    path = write_text_atomic(tmp_path / "deep" / "report.csv", paper_table_csv(rows))
    assert path.read_text() == paper_table_csv(rows)
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.csv"]  # no temporary file left
