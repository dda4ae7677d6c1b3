"""The paper's benchmarks end to end through the CLI (run → report → plot) on small files in the official formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ness.cli import main
from test_cifar_five_data import write_cifar100, write_five
from test_miniimagenet import write_dataset

# benchmark, variant, extra CLI arguments, expected number of tasks
CASES = [
    ("split_cifar100", "ness_sgdm", ["--set", "verify_md5=False", "--set", "num_tasks=3"], 3),
    # Two of the five tasks keep the test fast; Fashion-MNIST is among them to check --faithful's MNIST swap.
    (
        "five_datasets",
        "ness_sam",
        ["--set", "verify_md5=False", "--set", "datasets=['mnist','fashion_mnist']", "--faithful"],
        2,
    ),
    ("split_miniimagenet", "ness_sgdm", ["--set", "pc_valid=0.2", "--set", "num_tasks=2"], 2),
]


def write_files(benchmark: str, root: Path) -> None:
    if benchmark == "split_cifar100":
        write_cifar100(root)
    elif benchmark == "five_datasets":
        write_five(root)
    else:
        write_dataset(root / "miniimagenet")


@pytest.mark.parametrize(("benchmark", "variant", "extra", "tasks"), CASES, ids=[c[0] for c in CASES])
def test_paper_benchmark_runs_reports_and_plots(tmp_path, capsys, benchmark, variant, extra, tasks):
    data, out = tmp_path / "data", tmp_path / "runs"
    write_files(benchmark, data)
    args = ["run", "--benchmark", benchmark, "--method", variant, "--preset", "quick", "--seeds", "1"]
    args += ["--data-root", str(data), "--out", str(out), "--set", "epochs=1", "--set", "train_per_task=None"]
    args += ["--quiet", *extra]
    assert main(args) == 0, capsys.readouterr().err
    faithful = "--faithful" in extra
    folder = out / benchmark / (f"{variant}_faithful" if faithful else variant) / "seed_1"
    r = json.loads((folder / "results.json").read_text())
    assert (r["benchmark"], r["variant"], r["method"], r["preset"], r["faithful"]) == (
        benchmark,
        variant,
        "ness",
        "quick",
        faithful,
    )
    assert len(r["acc_matrix"]) == tasks and all(len(row) == tasks for row in r["acc_matrix"])
    assert all(0.0 <= r["acc_matrix"][i][j] <= 100.0 for i in range(tasks) for j in range(i + 1))
    assert len(r["tasks"]) == tasks and all(log["epochs"] == 1 for log in r["tasks"])
    # Every task ≥ 1 reports every adaptable layer of the paper's network (5 for AlexNet, 20 for ResNet-18).
    layers = 5 if benchmark == "split_cifar100" else 20
    assert len(r["diagnostics"]) == (tasks - 1) * layers
    assert r["config"]["protocol"]["network"] == ("alexnet" if benchmark == "split_cifar100" else "resnet18")
    spectra = json.loads((folder / "spectra.json").read_text())["spectra"]
    assert len(spectra) == len(r["diagnostics"])
    if variant == "ness_sam":
        assert r["config"]["train"]["sam_rho"] == 0.05
    if faithful:  # the official code: nuclear threshold, replay, task 0 only, SAM in task 1, MNIST as Fashion-MNIST
        assert r["config"]["method"]["threshold"] == "nuclear" and r["config"]["method"]["memory_tasks"] == "first"
        assert r["config"]["train"]["sam_tasks"] == "first"
        assert r["benchmark_details"]["fashion_mnist_variant"].startswith("mnist")

    assert main(["report", str(out), "--save"]) == 0
    report = capsys.readouterr().out
    assert "quick*" in report and "NOT the paper's protocol" in report
    with open(out / "report.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    # Fewer tasks than the paper's benchmark: reported apart, with no paper numbers beside ours.
    full = {"split_cifar100": 10, "five_datasets": 5, "split_miniimagenet": 20}[benchmark]
    assert row["benchmark"] == f"{benchmark} ({tasks} of {full} tasks)" and row["paper_acc"] == ""
    assert float(row["acc"]) == pytest.approx(r["acc"]) and r["tasks_run"] == tasks

    assert main(["plot", str(out)]) == 0
    figures = sorted(p.name for p in (folder / "figures").iterdir())
    expected = ["accuracy_matrix", "forgetting", "null_rank", "spectrum", "stability"]
    assert figures == sorted(f"{name}.{ext}" for name in expected for ext in ("png", "svg"))


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    args = ["run", "--benchmark", "split_cifar100", "--method", "ness_sam", "--seeds", "1", "--quiet"]
    assert main([*args, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and "To fix" in err
    assert not list((tmp_path / "runs").rglob("results.json")) if (tmp_path / "runs").exists() else True
