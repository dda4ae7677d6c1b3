"""Every method stops twice and resumes from its checkpoints to the result of a run that never stopped.

In process (fast) rather than by SIGKILL (tests/test_resume.py does that for NESS): the run is stopped by an
exception no `except Exception` catches, raised right after a chosen checkpoint is written, so what continues is
exactly what the file holds. The first stop is mid-task (after an epoch of task 1: optimiser, lr schedule and the
method's open-task state such as OWM's projectors or a NESS adapter's V), the second between tasks 2 and 3 (HAT
draws task 3's embeddings from the global RNG then, so the RNG states must come back too).
"""

from __future__ import annotations

import json

import pytest
import torch

from ness.checkpoint import CHECKPOINT_NAME, Checkpointer
from ness.experiment import run_experiment
from ness.methods import METHODS, ContinualMethod
from ness.runs import RunSpec
from run_compare import comparable

SETTINGS = {"epochs": 2}
SMALL = {  # keep the slow ones small; each method's own tests check its numbers
    "fsdgpm": {"memories": 32, "mem_batch_size": 16},
    "agem": {"memory_per_task": 16},
    "gpm": {"samples": 40},
    "sgp": {"samples": 40},
    "trgp": {"samples": 40, "gradient_samples": 40},
    "dfgp": {"samples": 40},
}


class Stop(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def stop_after(monkeypatch, position: dict) -> None:
    save = Checkpointer.save

    def save_then_stop(self, state, where):
        save(self, state, where)
        if where == position:
            raise Stop

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stopped_twice_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, method):
    overrides = {**SETTINGS, **SMALL.get(method, {})}

    def run(out, resume=False):
        return run_experiment(
            RunSpec("split_digits", method, 1, overrides=overrides), out=out, progress=False, resume=resume
        )

    reference = run(tmp_path / "reference")
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_after(patch, {"task": 1, "epochs_done": 1})
        with pytest.raises(Stop):
            run(out)
    with monkeypatch.context() as patch:
        stop_after(patch, {"tasks_done": 3})
        with pytest.raises(Stop):
            run(out, resume=True)
    resumed = run(out, resume=True)
    assert comparable(resumed) == comparable(reference)
    assert resumed["resumed_from"] == [{"task": 1, "epochs_done": 1}, {"tasks_done": 3}]
    assert not (out / "split_digits" / method / "seed_1" / CHECKPOINT_NAME).exists()


def test_a_failing_seed_is_reported_and_fails_the_command(tmp_path, monkeypatch, capsys):
    """Seed 2 breaks (a RuntimeError deep in training): seeds 1 and 3 still run, the command exits 1, and the
    traceback is printed and kept in seed_2/failure.txt, never silently dropped from the mean."""
    from ness import experiment
    from ness.cli import main

    build = experiment.build_method

    def breaks_for_seed_2(name, model, options):
        method = build(name, model, options)
        if torch.initial_seed() == 2:  # run_experiment seeds every RNG with the run's seed before building

            def broken(*args, **kwargs):
                raise RuntimeError("simulated CUDA error in seed 2")

            method.training_step = broken
        return method

    monkeypatch.setattr(experiment, "build_method", breaks_for_seed_2)
    args = ["run", "--benchmark", "split_digits", "--method", "finetune", "--seeds", "1", "2", "3", "--quiet"]
    assert main([*args, "--set", "epochs=1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "split_digits finetune seed 2 FAILED" in err
    assert "Traceback" in err and "simulated CUDA error in seed 2" in err
    assert "1 run(s) failed (finetune seed 2)" in err
    folder = tmp_path / "split_digits" / "finetune"
    assert (folder / "seed_1" / "results.json").is_file() and (folder / "seed_3" / "results.json").is_file()
    assert not (folder / "seed_2" / "results.json").exists()
    assert "simulated CUDA error in seed 2" in (folder / "seed_2" / "failure.txt").read_text()


def test_checkpoint_interval_skips_epoch_checkpoints_but_never_a_task_end(tmp_path, monkeypatch):
    saved = []
    save = Checkpointer.save

    def record(self, state, where):
        saved.append(where)
        save(self, state, where)

    monkeypatch.setattr(Checkpointer, "save", record)
    spec = RunSpec("split_digits", "finetune", 1, overrides=SETTINGS)
    run_experiment(spec, out=tmp_path, progress=False)
    assert len(saved) == 5 * (SETTINGS["epochs"] + 1)  # every epoch and every task end
    saved.clear()
    run_experiment(spec, out=tmp_path / "b", progress=False, checkpoint_interval=3600)
    # the first epoch is saved (no checkpoint yet), then only task ends within the hour
    assert saved == [{"task": 0, "epochs_done": 1}] + [{"tasks_done": t} for t in range(1, 6)]
    with pytest.raises(ValueError, match="checkpoint interval -1"):
        Checkpointer(tmp_path / "c.pt", {}, "epoch", -1)


def test_diverged_run_resumes_from_its_last_good_checkpoint_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    """Task 1's loss turns NaN in its 2nd epoch while lr > 0.02 (a stand-in for a real divergence): the run stops
    naming the checkpoint of task 1's 1st epoch; `--resume DIR --set lr=0.01` continues from there at the new lr,
    which the open task's optimiser and every later task use; later resumes keep the change."""
    from ness.cli import main
    from ness.methods import FineTune

    used: list[tuple[int, int, float]] = []  # (task, epoch, lr) of every step

    def begin_step(self, t, progress):
        self.epoch_now = progress.epoch

    def training_step(self, t, x, y, optimizer, check_loss, tasks=None):
        lr = optimizer.param_groups[0]["lr"]
        used.append((t, self.epoch_now, lr))
        if t == 1 and self.epoch_now == 1 and lr > 0.02:
            check_loss(torch.tensor(float("nan")))
        return ContinualMethod.training_step(self, t, x, y, optimizer, check_loss, tasks)

    monkeypatch.setattr(FineTune, "begin_step", begin_step)
    monkeypatch.setattr(FineTune, "training_step", training_step)
    args = ["run", "--benchmark", "split_digits", "--method", "finetune", "--seeds", "1", "--quiet"]
    assert main([*args, "--set", "epochs=3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "task 1, epoch 1, step 0: the loss is nan" in err
    assert "The last good state (task 1 after 1 epoch(s)) is kept in the checkpoint" in err

    used.clear()
    assert main(["run", "--resume", str(tmp_path), "--quiet", "--set", "lr=0.01"]) == 0
    assert {lr for *_, lr in used} == {0.01}, "the open task and the later ones train at the new lr"
    assert used[0][:2] == (1, 1), "the run goes on with task 1's 2nd epoch"
    results = json.loads((tmp_path / "split_digits" / "finetune" / "seed_1" / "results.json").read_text())
    assert results["config"]["train"]["lr"] == 0.01
    assert results["changed_on_resume"] == [{"position": {"task": 1, "epochs_done": 1}, "train.lr": [0.05, 0.01]}]
    plans = list((tmp_path / ".ness").glob("plan-*.json"))
    assert len(plans) == 1 and json.loads(plans[0].read_text())["runs"][0]["overrides"] == {"epochs": 3, "lr": 0.01}
    used.clear()
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 0
    assert used == [], "a finished run is not run again"
