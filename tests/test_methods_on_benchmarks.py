"""Every registered method runs from the CLI on each paper benchmark with its `paper` preset (and `--faithful`),
on small files in the official formats: 2 tasks, 1 epoch, a few images, so the whole table stays fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ness.cli import main
from ness.methods import METHODS
from test_end_to_end import write_files

# The benchmark's data options that keep a run tiny: two tasks of a few training images each.
SMALL = {
    "split_cifar100": ["num_tasks=2", "train_per_task=12", "verify_md5=False"],
    "five_datasets": ["datasets=['cifar10','mnist']", "train_per_task=12", "verify_md5=False"],
    "split_miniimagenet": ["num_tasks=2", "train_per_task=8", "pc_valid=0.2"],
}
NETWORK = {"split_cifar100": "alexnet", "five_datasets": "resnet18", "split_miniimagenet": "resnet18"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for benchmark in SMALL:
        write_files(benchmark, root)
    return root


@pytest.mark.parametrize("benchmark", sorted(SMALL))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_on_the_paper_benchmark(tmp_path, capsys, data_root, method, benchmark):
    faithful = method in {"gpm", "trgp", "dfgp", "fsdgpm"}  # the methods with official-code switches
    args = ["run", "--benchmark", benchmark, "--method", method, "--preset", "paper", "--seeds", "1", "--quiet"]
    args += ["--data-root", str(data_root), "--out", str(tmp_path), "--set", "epochs=1"]
    for option in SMALL[benchmark]:
        args += ["--set", option]
    if faithful:
        args.append("--faithful")
    assert main(args) == 0, capsys.readouterr().err
    folder = tmp_path / benchmark / (f"{method}_faithful" if faithful else method) / "seed_1"
    r = json.loads((folder / "results.json").read_text())
    assert r["method"] == METHODS[method].name and r["faithful"] == faithful
    assert r["config"]["protocol"]["network"] == NETWORK[benchmark]
    matrix = r["acc_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= matrix[i][j] <= 100.0 for i in range(2) for j in range(i + 1))
    assert math.isfinite(r["acc"]) and math.isfinite(r["bwt"])
    assert all(math.isfinite(log["train_loss"]) for log in r["tasks"])
