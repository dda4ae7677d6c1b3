"""--log-dir writes TensorBoard scalars, scalars.csv and events.jsonl with the run's own figures; --deterministic
turns deterministic algorithms on and the results say so; library code logs through `logging`, never print."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from ness.cli import main

EPOCHS = 2


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("logged")
    args = ["run", "--benchmark", "split_digits", "--method", "ness", "--seeds", "1", "--quiet"]
    assert main([*args, "--set", f"epochs={EPOCHS}", "--out", str(out), "--log-dir", str(out / "logs")]) == 0
    results = json.loads((out / "split_digits" / "ness" / "seed_1" / "results.json").read_text())
    return out / "logs" / "split_digits" / "ness" / "seed_1", results


def csv_scalars(folder: Path) -> dict[tuple[str, int], float]:
    with (folder / "scalars.csv").open() as f:
        return {(row["tag"], int(row["step"])): float(row["value"]) for row in csv.DictReader(f)}


def test_csv_holds_the_accuracy_matrix_losses_and_layer_records(logged_run):
    folder, results = logged_run
    scalars = csv_scalars(folder)
    matrix = results["acc_matrix"]
    for t in range(len(matrix)):
        for j in range(t + 1):
            assert scalars[(f"accuracy/task_{j}", t)] == pytest.approx(matrix[t][j], abs=1e-12)
        finished = [matrix[i][: t + 1] for i in range(t + 1)]
        assert scalars[("accuracy/mean_so_far", t)] == pytest.approx(sum(finished[-1]) / (t + 1))
        # the last epoch's training loss is the one the task's log keeps
        assert scalars[(f"task_{t}/train_loss", EPOCHS - 1)] == pytest.approx(results["tasks"][t]["train_loss"])
        assert scalars[("tasks/epochs", t)] == results["tasks"][t]["epochs"]
    for record in results["diagnostics"]:
        for key in ("rank", "eq8_bound", "sigma_max_U"):
            assert scalars[(f"layers/{record['layer']}/{key}", record["task"])] == pytest.approx(record[key])


def test_tensorboard_has_the_same_scalars_as_the_csv(logged_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    folder, _ = logged_run
    reader = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    from_tensorboard = {
        (tag, event.step): event.value for tag in reader.Tags()["scalars"] for event in reader.Scalars(tag)
    }
    from_csv = csv_scalars(folder)
    assert set(from_tensorboard) == set(from_csv)
    for key, value in from_csv.items():  # TensorBoard stores float32
        assert from_tensorboard[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_events_jsonl_has_one_line_per_epoch_and_task(logged_run):
    folder, results = logged_run
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    tasks = len(results["acc_matrix"])
    assert [e["kind"] for e in events].count("epoch") == EPOCHS * tasks
    task_events = [e for e in events if e["kind"] == "task"]
    assert [e["acc"] for e in task_events] == [row[: t + 1] for t, row in enumerate(results["acc_matrix"])]
    assert all(math.isfinite(e["loss"]) for e in events if e["kind"] == "epoch")


def test_results_record_environment_and_seed(logged_run):
    _, results = logged_run
    assert results["seed"] == 1
    env = results["environment"]
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu"
    assert env["deterministic_algorithms"] is False


def test_deterministic_flag_turns_deterministic_algorithms_on(tmp_path):
    args = ["run", "--benchmark", "split_digits", "--method", "finetune", "--seeds", "2", "--quiet"]
    try:
        assert main([*args, "--set", "epochs=1", "--out", str(tmp_path), "--deterministic"]) == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    results = json.loads((tmp_path / "split_digits" / "finetune" / "seed_2" / "results.json").read_text())
    assert results["environment"]["deterministic_algorithms"] is True


def test_library_code_logs_instead_of_printing():
    """Only the command line prints; everything under src/ness else goes through `logging`."""
    source = Path(__file__).parents[1] / "src" / "ness"
    offenders = [
        f"{path.relative_to(source)}:{n}"
        for path in source.rglob("*.py")
        if path.name not in ("cli.py", "__main__.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"(?<![\w.])print\(", line)
    ]
    assert not offenders, f"print() in library code: {offenders}"
