"""end_task(t, batches, last=True): the last task's end without what only later tasks use (issue 15).

NESS then never reads the batches (its statistics pass serves only later tasks and adapter files) and leaves the model
and its bookkeeping exactly as a normal end would; afterwards it refuses to begin a task or to save adapter files. A
method without its own `on_end_last_task` does its full work. run_continual(continuable=False), and run_experiment
without save_adapters, end the benchmark's last task so, with the same results.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from method_steps import batches, train
from ness import NESS, NESSConfig
from ness.data import Benchmark, Split, Task, build_benchmark
from ness.experiment import resolve_settings, run_experiment
from ness.methods import TaskOrderError, build_method
from ness.models import MultiHeadNet
from ness.runs import RunSpec
from ness.trainer import TrainConfig, run_continual

HEADS = (3, 3, 3)
CLOSED = r"task 1 was ended with end_task\(1, \.\.\., last=True\)"


class Counted:
    """The batches of a task, counting how many are read (a fresh count each time the trainer iterates them)."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.read = items, 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.read += 1
            yield item


def bn_mlp(seed: int = 0) -> nn.Module:
    """Linear → BatchNorm → ReLU → Linear → ReLU, a head per task: adapted layers and per-task BatchNorm state."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU())
    return MultiHeadNet(backbone, 16, HEADS)


def task_data(t: int, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 0's inputs nearly fill a 5-dimensional subspace (so null directions exist); later tasks are full-rank."""
    g = torch.Generator().manual_seed(100 + t)
    if t == 0:
        x = torch.randn(n, 5, generator=g) @ torch.randn(5, 12, generator=g) + 0.02 * torch.randn(n, 12, generator=g)
    else:
        x = 2 * torch.randn(n, 12, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def config(memory: str = "covariance") -> NESSConfig:
    """Transfer adapters and per-task BatchNorm: every piece of bookkeeping the end of a task does."""
    return NESSConfig(transfer_rank=4, batchnorm="per_task", memory=memory, probe_samples=16)


def task_1_trained(memory: str = "covariance") -> tuple[NESS, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A NESS method with task 0 ended and task 1 trained and open, and task 1's batches; deterministic."""
    model = bn_mlp()
    method = NESS(model, config(memory))
    x0, y0 = task_data(0)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    method.end_task(0, batches(x0, y0, 16))
    x1, y1 = task_data(1)
    data = batches(x1, y1, 16)
    method.begin_task(1, data)
    train(method, model, 1, x1, y1)
    return method, data


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts / lists / tuples of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------------------------
# NESS: the same end, without reading the batches
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_ness_last_end_reads_no_batch_and_ends_exactly_as_a_normal_end(memory):
    normal, data = task_1_trained(memory)
    closed, _ = task_1_trained(memory)
    full, unread = Counted(data), Counted(data)
    normal.end_task(1, full)
    closed.end_task(1, unread, last=True)
    assert full.read == len(data) and unread.read == 0
    assert normal.transfers[1] and normal.task_deltas[0] and len(normal.batchnorm_states) == 2  # all exercised

    # The merge, the per-task BatchNorm state, the transfer terms, the ΔW's and the records are the same.
    assert_same(closed.model.state_dict(), normal.model.state_dict(), "model")
    for kept in ("task_deltas", "batchnorm_states", "transfers", "records"):
        assert_same(getattr(closed, kept), getattr(normal, kept), kept)
    assert (closed.tasks_done, closed.active_task, closed.active) == (normal.tasks_done, None, {})
    x1, _ = task_data(1)
    closed.model.eval(), normal.model.eval()
    for t in (0, 1):
        assert torch.equal(closed.predict(x1, t), normal.predict(x1, t))
    # Only task 0's inputs are kept: the pass over task 1's was skipped.
    assert (normal.final_task, closed.final_task) == (None, 1)
    if memory == "replay":
        assert (len(normal.replay), len(closed.replay)) == (2, 1)
    else:
        assert {len(rows) for rows in normal.probes.values()} == {2}
        assert {len(rows) for rows in closed.probes.values()} == {1}


def test_after_a_last_end_begin_task_and_save_adapters_refuse_also_after_a_round_trip(tmp_path):
    method, data = task_1_trained()
    method.end_task(1, data, last=True)
    with pytest.raises(TaskOrderError, match=CLOSED + r".*end the last task with last=False"):
        method.begin_task(2)
    restored = NESS(bn_mlp(seed=1), config())
    restored.load_state_dict(method.state_dict())
    assert restored.final_task == 1
    with pytest.raises(TaskOrderError, match=CLOSED):
        restored.begin_task(2)
    for closed in (method, restored):
        with pytest.raises(ValueError, match=CLOSED + r".*would lack task 1's statistics.*last=False"):
            closed.save_adapters(tmp_path / "adapters")
    assert not (tmp_path / "adapters").exists()


def test_states_saved_before_final_task_existed_load_as_open_to_more_tasks():
    method, data = task_1_trained()
    method.end_task(1, data)
    state = method.state_dict()
    del state["final_task"]  # a checkpoint written before end_task(..., last=True)
    restored = NESS(bn_mlp(seed=1), config())
    restored.load_state_dict(state)
    restored.begin_task(2)
    # A method unpickled from such a checkpoint has no attribute of its own: the class's None holds.
    fresh = NESS(bn_mlp(), config())
    assert "final_task" not in vars(fresh) and fresh.final_task is None


def test_save_lora_needs_no_statistics_and_writes_the_same_files_after_a_last_end(tmp_path):
    normal, data = task_1_trained()
    closed, _ = task_1_trained()
    normal.end_task(1, data)
    closed.end_task(1, data, last=True)
    written = {}
    for label, method in (("normal", normal), ("closed", closed)):
        directory = method.save_lora(tmp_path / label, task=1)
        with safe_open(directory / "adapter_model.safetensors", "pt") as f:  # the bytes of its header's order vary
            metadata = f.metadata()
        tensors = load_file(directory / "adapter_model.safetensors")
        written[label] = (directory / "adapter_config.json").read_text(), tensors, metadata
    assert_same(written["closed"], written["normal"], "save_lora")
    assert written["closed"][1]  # the files hold the tasks' ΔW's


# ---------------------------------------------------------------------------------------------------------------
# other methods: the full work by default
# ---------------------------------------------------------------------------------------------------------------


def test_a_method_without_its_own_last_end_does_its_full_work_with_the_batches():
    states = {}
    for last in (False, True):
        torch.manual_seed(0)  # GPM draws its samples from a generator seeded by the global one
        model = bn_mlp()
        method = build_method("gpm", model, {"samples": 20})
        x0, y0 = task_data(0)
        method.begin_task(0)
        train(method, model, 0, x0, y0)
        data = Counted(batches(x0, y0, 16))
        method.end_task(0, data, last=last)
        assert data.read == len(data.items)
        states[last] = method.state_dict()
        if last:
            with pytest.raises(TaskOrderError, match=r"task 0 was ended with end_task\(0, \.\.\., last=True\)"):
                method.begin_task(1)
    assert (states[False].pop("final_task"), states[True].pop("final_task")) == (None, 0)
    assert_same(states[True], states[False], "gpm")


# ---------------------------------------------------------------------------------------------------------------
# run_continual and run_experiment
# ---------------------------------------------------------------------------------------------------------------


def blob_benchmark(num_tasks: int = 3) -> Benchmark:
    """Two Gaussian blobs per task on coordinates 3t..3t+2 of 12 (a new subspace per task), two classes."""
    g = torch.Generator().manual_seed(0)

    def split(t: int, n: int) -> Split:
        labels = torch.arange(n) % 2
        mean = torch.zeros(12)
        mean[3 * t : 3 * t + 3] = 1.2
        return Split((1 - 2 * labels.float())[:, None] * mean + 0.3 * torch.randn(n, 12, generator=g), labels)

    tasks = tuple(
        Task(f"blobs {t}", 2, split(t, 64), split(t, 32), split(t, 48), lambda x: x) for t in range(num_tasks)
    )
    return Benchmark("blobs", tasks, input_shape=(12,), shared_head=False, details={})


def count_statistics_passes(monkeypatch) -> list[int]:
    """The tasks whose end runs NESS's statistics pass, in order."""
    passes: list[int] = []
    task_memory = NESS._task_memory

    def counted(self, t, task_batches):
        passes.append(t)
        return task_memory(self, t, task_batches)

    monkeypatch.setattr(NESS, "_task_memory", counted)
    return passes


@pytest.mark.parametrize("name", ["ness", "gpm"])
def test_run_continual_without_continuation_gives_the_same_results_and_skips_the_last_pass(monkeypatch, name):
    passes = count_statistics_passes(monkeypatch)
    bench = blob_benchmark()
    train_config = TrainConfig(epochs=2, lr=0.1, batch_size=16, test_batch_size=32)
    options = {"eps1": 0.05, "transfer_rank": 2} if name == "ness" else {"samples": 20}
    results, finals, seen = {}, {}, {}
    for continuable in (True, False):
        torch.manual_seed(0)
        model = MultiHeadNet(nn.Sequential(nn.Linear(12, 16), nn.ReLU()), 16, (2, 2, 2))
        method = build_method(name, model, options)
        results[continuable] = run_continual(
            model, method, bench, train_config, seed=0, progress=False, continuable=continuable
        )
        finals[continuable], seen[continuable] = method.final_task, list(passes)
        passes.clear()
    assert results[False]["acc_matrix"] == results[True]["acc_matrix"]
    assert_same(results[False]["diagnostics"], results[True]["diagnostics"], "diagnostics")
    assert finals == {True: None, False: 2}
    assert seen == ({True: [0, 1, 2], False: [0, 1]} if name == "ness" else {True: [], False: []})


def test_run_experiment_runs_the_last_pass_only_to_save_adapters_and_they_load(tmp_path, monkeypatch):
    passes = count_statistics_passes(monkeypatch)
    spec = RunSpec("split_digits", "ness", 1, overrides={"epochs": 1})
    plain = run_experiment(spec, out=tmp_path / "plain", progress=False)
    assert passes == [0, 1, 2, 3]
    passes.clear()
    saved = run_experiment(spec, out=tmp_path / "saved", progress=False, save_adapters=True)
    assert passes == [0, 1, 2, 3, 4]
    assert saved["acc_matrix"] == plain["acc_matrix"]

    settings = resolve_settings(spec)
    seed_dir = settings.folder(tmp_path / "saved")
    base = settings.protocol.network(build_benchmark("split_digits", seed=1, **settings.data))
    base.load_state_dict(load_file(seed_dir / "base_model.safetensors"))
    loaded = NESS.load_adapters(base, seed_dir / "adapters")
    assert (loaded.tasks_done, loaded.active_task, loaded.final_task) == (5, None, None)
    assert {len(rows) for rows in loaded.probes.values()} == {5}  # the last task's statistics are in the files
