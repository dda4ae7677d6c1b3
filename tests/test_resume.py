"""Kill a run with SIGKILL at several points, resume it, and get the uninterrupted run's results bit for bit.

The runs are `ness run` subprocesses on the real Split Digits (NESS, 3 epochs per task, one checkpoint per epoch).
tests/kill_harness.py makes the process SIGKILL itself at an exact point: mid-epoch, between tasks, in the middle of
the statistics pass, and in a checkpoint write before its rename; one more run is killed from outside at whatever
moment it has reached. Every resumed run must give the same accuracy matrix, losses and per-layer records as a run
that was never stopped (the CPU ops here are deterministic), and no results file may be half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ness.checkpoint import CHECKPOINT_NAME, read_header
from run_compare import comparable

HERE = Path(__file__).parent
COMMAND = ["run", "--benchmark", "split_digits", "--method", "ness", "--set", "epochs=3", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
# Split Digits: 239–244 training rows per task at the preset's batch size 16 give 16 steps an epoch (15 in the last
# task), 48 a task (3 epochs), 237 a run.


def ness(args: list[str], point: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "kill_harness.py"), point] if point else [sys.executable, "-m", "ness"]
    done = subprocess.run([*command, *args], env=ENV, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"ness {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def results(out: Path, seed: int = 1, variant: str = "ness") -> dict:
    return json.loads((out / "split_digits" / variant / f"seed_{seed}" / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    ness([*COMMAND, "--seeds", "1", "--out", str(out)])
    return results(out)


def assert_no_partial_files(out: Path) -> None:
    for path in out.rglob("*.json"):
        json.loads(path.read_text())  # a half-written file would not parse
    for path in out.rglob(CHECKPOINT_NAME):
        read_header(path)


@pytest.mark.parametrize(
    "point",
    [
        "step:53",  # task 1, epoch 0, its 5th step: mid-epoch
        "step:135",  # task 2, epoch 2, its 7th step
        "task_end:1",  # between tasks 1 and 2, right after the checkpoint of task 1's end
        "statistics:2",  # NESS's covariance pass of task 2, two batches in
        "rename:7",  # the 7th checkpoint (task 1, epoch 2) is complete in its temporary file but not renamed
        "step:3",  # before the first checkpoint: nothing to resume, the run starts again
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_results(tmp_path, uninterrupted, point):
    killed = ness([*COMMAND, "--seeds", "1", "--out", str(tmp_path)], point=point, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = tmp_path / "split_digits" / "ness" / "seed_1"
    assert not (folder / "results.json").exists()
    assert_no_partial_files(tmp_path)
    if point.startswith("rename"):
        assert list(folder.glob(".checkpoint.pt.*.tmp")), "the killed write should have left its temporary file"
    resumed = ness(["run", "--resume", str(tmp_path), "--quiet"])
    assert "ACC" in resumed.stdout
    run = results(tmp_path)
    assert comparable(run) == comparable(uninterrupted)
    assert run["acc_matrix"] == uninterrupted["acc_matrix"]
    assert not (folder / CHECKPOINT_NAME).exists(), "the checkpoint should go once results.json is written"
    assert not list(folder.glob(".checkpoint.pt.*.tmp"))
    assert len(run["resumed_from"]) == (0 if point == "step:3" else 1)


def test_killed_from_outside_at_any_moment(tmp_path, uninterrupted):
    """A `kill -9` from another process once the run is in task 2, wherever it then is."""
    args = [sys.executable, "-m", "ness", *COMMAND, "--seeds", "1", "--out", str(tmp_path)]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "split_digits" / "ness" / "seed_1" / CHECKPOINT_NAME
    deadline, in_task_2 = time.monotonic() + 300, False
    while not in_task_2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
        with contextlib.suppress(ValueError, OSError):  # no checkpoint yet, or one being replaced
            in_task_2 = read_header(checkpoint)["meta"]["position"].get("task", 0) >= 2
    process.kill()
    # The kill landed mid-run: in task 2, and it ended the process (not a run that had finished or failed before).
    assert process.wait() == -signal.SIGKILL, f"the run ended by itself ({process.returncode}) before the kill"
    assert in_task_2, "the run never reached task 2 in 300 s"
    assert not (checkpoint.parent / "results.json").exists()
    assert_no_partial_files(tmp_path)
    ness(["run", "--resume", str(tmp_path), "--quiet"])
    assert comparable(results(tmp_path)) == comparable(uninterrupted)


def test_resume_skips_finished_seeds_and_resumes_the_killed_one(tmp_path, uninterrupted):
    # Seed 1 finishes (237 steps); seed 2 is killed in the 2nd step of its task 1.
    killed = ness([*COMMAND, "--seeds", "1", "2", "--out", str(tmp_path)], point="step:287", check=False)
    assert killed.returncode == -signal.SIGKILL
    first = results(tmp_path, seed=1)
    assert comparable(first) == comparable(uninterrupted)
    seed1 = tmp_path / "split_digits" / "ness" / "seed_1" / "results.json"
    written = seed1.stat().st_mtime_ns
    resumed = ness(["run", "--resume", str(tmp_path)])
    assert seed1.stat().st_mtime_ns == written, "the finished seed must not run again"
    assert "finished before" in resumed.stderr
    assert "resuming from" in resumed.stderr
    fresh = tmp_path / "fresh"
    ness([*COMMAND, "--seeds", "2", "--out", str(fresh)])
    assert comparable(results(tmp_path, seed=2)) == comparable(results(fresh, seed=2))
    assert results(tmp_path, seed=2)["resumed_from"] == [{"tasks_done": 1}]
