"""Data-parallel training with torch.distributed (gloo, 2 CPU processes) against a single process.

`python -m torch.distributed.run --nproc_per_node 2 -m ness run ...` must give the single process's results up to
float round-off: DistributedDataParallel all-reduces the gradients in another summation order, so weights differ by
~1e-7 relative, which moves no test prediction on Split Digits and the NESS projectors U·Uᵀ by ~1e-7. Also: the
gradient weighting of unequal and empty shards against an explicit single-process gradient, the trainer's steps
going through DDP, a rank killed mid-run failing the whole command quickly with no results, and a refused method's
error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ness.cli import main

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "NESS_DISTRIBUTED_TIMEOUT": "60"}
for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(variable, None)
RUN = ["run", "--benchmark", "split_digits", "--seeds", "1", "--set", "epochs=2", "--quiet"]
PROJECTOR_TOLERANCE = 1e-5
"""max |ΔU·Uᵀ| allowed (measured ~1e-7): float32 weights differ by round-off, moved further by eigengaps."""

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with the gloo backend",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], script: list[str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 ... -m ness ARGS` (or the given script)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    target = script if script is not None else ["-m", "ness"]
    command = [*launcher, str(free_port()), *target, *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_both(tmp_path: Path, method: str, extra: list[str]) -> tuple[Path, Path]:
    """The same run on 2 processes and in this process; their output folders."""
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun([*RUN, "--method", method, *extra, "--out", str(two)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*RUN, "--method", method, *extra, "--out", str(one)]) == 0
    return two / "split_digits" / method / "seed_1", one / "split_digits" / method / "seed_1"


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def assert_same_accuracy(two: dict, one: dict) -> float:
    """Every R[i][j] within one test example of task j (a prediction at a tie may flip); returns max |ΔACC|."""
    tests = [sizes["test"] for sizes in one["benchmark_details"]["task_sizes"]]
    worst = 0.0
    for i, (row2, row1) in enumerate(zip(two["acc_matrix"], one["acc_matrix"], strict=True)):
        for j in range(i + 1):
            one_example = 100.0 / tests[j]
            assert abs(row2[j] - row1[j]) <= one_example + 1e-9, (i, j, row2[j], row1[j])
            worst = max(worst, abs(row2[j] - row1[j]))
    return worst


def test_ness_on_two_processes_matches_one(tmp_path: Path) -> None:
    two, one = run_both(tmp_path, "ness", ["--save-adapters"])
    r2, r1 = results(two), results(one)
    print(f"NESS max |ΔACC| {assert_same_accuracy(r2, r1)}")
    assert r2["environment"]["processes"] == 2 and r1["environment"]["processes"] == 1
    for d2, d1 in zip(r2["diagnostics"], r1["diagnostics"], strict=True):
        assert (d2["task"], d2["layer"], d2["rank"]) == (d1["task"], d1["layer"], d1["rank"])
    a2, a1 = (load_file(f / "adapters" / "adapter_model.safetensors") for f in (two, one))
    bases = [key for key in a1 if key.endswith(".U")]
    assert bases and set(a2) == set(a1)
    worst = 0.0
    for key in bases:  # U is defined up to a rotation within degenerate eigenspaces: compare projectors U·Uᵀ
        u2, u1 = a2[key].double(), a1[key].double()
        worst = max(worst, float((u2 @ u2.T - u1 @ u1.T).abs().max()))
    print(f"NESS max |ΔUUᵀ| {worst:.2e}")
    assert worst < PROJECTOR_TOLERANCE
    s2, s1 = (load_file(f / "adapters" / "adapter_statistics.safetensors") for f in (two, one))
    for key, value in s1.items():  # the reduced covariances and the merged probe rows, in the same order
        torch.testing.assert_close(s2[key], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()), msg=key)
    # Only rank 0 wrote: one plan, no stray files of another rank.
    assert len(list((tmp_path / "two" / ".ness").glob("plan-*.json"))) == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_gpm_with_sam_and_empty_shards_matches_one_process(tmp_path: Path) -> None:
    """Batch 22 leaves a last batch of 1 row in tasks 0, 1, 3 (rank 1 then holds none); SAM runs two backward
    passes per step. GPM's representations come from the same samples on every rank."""
    two, one = run_both(tmp_path, "gpm", ["--set", "batch_size=22", "--set", "sam_rho=0.05"])
    r2, r1 = results(two), results(one)
    print(f"GPM max |ΔACC| {assert_same_accuracy(r2, r1)}")
    for d2, d1 in zip(r2["diagnostics"], r1["diagnostics"], strict=True):
        assert (d2["basis_size"], d2["rows"]) == (d1["basis_size"], d1["rows"])
        assert d2["energy_captured"] == pytest.approx(d1["energy_captured"], rel=1e-5)
    for t2, t1 in zip(r2["tasks"], r1["tasks"], strict=True):
        assert t2["train_loss"] == pytest.approx(t1["train_loss"], rel=1e-5)


def spawn_two(worker_name: str, tmp_path: Path) -> list[str]:
    """Run distributed_harness.WORKER_NAME in 2 spawned processes (gloo over a file store); what each wrote."""
    sys.path.insert(0, str(HERE))
    try:
        import distributed_harness
    finally:
        sys.path.remove(str(HERE))
    out = tmp_path / "out"
    worker = getattr(distributed_harness, worker_name)
    torch.multiprocessing.spawn(worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    return [Path(f"{out}.{rank}").read_text() for rank in (0, 1)]


def test_gradient_weighting_of_unequal_and_empty_shards(tmp_path: Path) -> None:
    for rank, worst in enumerate(spawn_two("gradient_worker", tmp_path)):
        assert float(worst) < 1e-12, (rank, worst)


@pytest.mark.parametrize("worker", ["trainer_worker", "compiled_trainer_worker"])
def test_the_trainer_steps_through_distributed_data_parallel(tmp_path: Path, worker: str) -> None:
    """Every training step's loss is a forward pass of torch's DistributedDataParallel, and its reducer hands the
    gradient buckets to the rows-weighted all-reduce; the ranks end with the same weights. With TrainConfig.compile
    DDP's forward runs the compiled loss."""
    for rank, written in enumerate(spawn_two(worker, tmp_path)):
        counts = json.loads(written)
        assert counts["steps"] == 18, (rank, counts)  # 2 epochs of 3 batches (task 0), then of 6 (tasks 0 and 1)
        assert counts["forwards"] == counts["steps"], (rank, counts)
        assert counts["buckets"] >= counts["steps"], (rank, counts)
        assert counts["worst"] == 0.0, (rank, counts)
        # joint training's per-task heads break the graph: at least one compiled graph per step, none uncompiled
        assert (counts["graph_runs"] >= counts["steps"]) if worker.startswith("compiled") else not counts["graph_runs"]


def test_a_killed_rank_fails_the_run_and_both_ranks_resume(tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself before its 40th step (task 1, after 2 epoch checkpoints): torchrun ends rank 0 and
    exits non-zero, and nothing marks the run finished. `--resume` on 2 processes, every rank reading rank 0's
    checkpoint, then ends as the single process does."""
    two, one = tmp_path / "two", tmp_path / "one"
    started = time.monotonic()
    done = torchrun(
        [*RUN, "--method", "ness", "--out", str(two)],
        script=[str(HERE / "distributed_harness.py"), "kill", "1", "40"],
        timeout=120,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 60, "the surviving rank was not ended promptly"
    assert not list(two.rglob("results.json"))
    assert list(two.rglob("checkpoint.pt"))
    done = torchrun(["run", "--resume", str(two), "--quiet"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*RUN, "--method", "ness", "--out", str(one)]) == 0
    resumed, single = results(two / "split_digits/ness/seed_1"), results(one / "split_digits/ness/seed_1")
    assert resumed["resumed_from"]
    assert_same_accuracy(resumed, single)
    for t2, t1 in zip(resumed["tasks"], single["tasks"], strict=True):
        assert t2["train_loss"] == pytest.approx(t1["train_loss"], rel=1e-5)


def test_a_refused_method_says_why(tmp_path: Path) -> None:
    done = torchrun([*RUN, "--method", "owm", "--out", str(tmp_path)], timeout=120)
    assert done.returncode != 0
    assert "method 'owm' cannot run on 2 processes" in done.stderr
    assert "projectors" in done.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_a_method_that_does_not_declare_itself_is_refused_on_several_processes(monkeypatch) -> None:
    """Under torchrun a method class must say itself whether it trains data-parallel; a new one, or a subclass of a
    safe one (its step may differ), is refused until it does, and every registered method has said so."""
    from ness import distributed
    from ness.methods import METHODS, NESS

    class MyNESS(NESS):
        pass

    class DeclaredNESS(NESS):
        distributed_ok = True

    distributed.check_method(MyNESS, "mine")  # one process: anything goes
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"'mine' \(MyNESS\) does not declare .*distributed_ok = True"):
        distributed.check_method(MyNESS, "mine")
    distributed.check_method(DeclaredNESS, "declared")
    for name, method_class in METHODS.items():
        declared = vars(method_class).get("distributed_ok")
        assert declared in (True, False), name
        if declared:
            distributed.check_method(method_class, name)
        else:
            assert method_class.distributed_reason, name
            with pytest.raises(ValueError, match=f"method '{name}' cannot run on 2 processes"):
                distributed.check_method(method_class, name)


def test_the_process_group_is_left_only_after_unreachable_wrappers_are_freed(monkeypatch) -> None:
    """A DDP wrapper dropped during the run sits in a reference cycle; destroyed after the group is gone (at the
    interpreter's exit), gloo aborted the process in about one run of ten. The group is left only once such garbage
    is freed. (Launched by torchrun is faked, and the group's calls are spies: one process, no sockets.)"""
    import gc
    import weakref

    from ness import distributed

    class Wrapper:  # stands for DistributedDataParallel: held in a cycle, freed by the collector only
        def __init__(self) -> None:
            self.me = self

    alive_at_exit = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "active", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: alive_at_exit.append(wrapper() is not None))
    was_enabled = gc.isenabled()
    gc.disable()  # only the collection the context makes may free it
    try:
        with distributed.process_group():
            dropped = Wrapper()
            wrapper = weakref.ref(dropped)
            del dropped
            assert wrapper() is not None  # in its cycle, still alive
    finally:
        if was_enabled:
            gc.enable()
    assert alive_at_exit == [False]
