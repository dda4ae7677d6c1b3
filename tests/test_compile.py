"""TrainConfig.compile: the training loss through torch.compile, checked against the eager run of the same steps.

The compiled runs use a backend of this file, `aot_eager` (AOTAutograd traces forward and backward, no code
generation: quick) with a count of the compiled graph's runs, so a test fails if a step silently ran eagerly (dynamo
falls back to eager after its recompile limit, with only a logged warning). One test runs the real inductor backend.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo import register_backend
from torch._dynamo.backends.debugging import aot_eager

from ness.adapters import NullSpaceAdapter
from ness.data import Benchmark, Split, Task
from ness.experiment import split_overrides
from ness.methods import ContinualMethod, FineTune, build_method
from ness.models import multi_head_mlp
from ness.trainer import TrainConfig, seed_everything, train_task
from ness.validation import ConfigError

GRAPH_RUNS = [0]
"""Forward runs of graphs compiled by the counting backend."""


@register_backend(name="ness_test_counting")
def counting_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    """aot_eager, counting each run of the compiled forward in GRAPH_RUNS."""
    compiled = aot_eager(graph, example_inputs)

    def run(*args: Any) -> Any:
        GRAPH_RUNS[0] += 1
        return compiled(*args)

    return run


@register_backend(name="ness_test_failing")
def failing_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    raise RuntimeError("this backend generates no code")


DIM, ROWS, BATCH = 12, 48, 16


class PreparedFloat:
    """x.float(), declared deterministic: the trainer transforms the split once and draws batches as its rows, so
    NESS's first layer takes its frozen products from rows made once per task (eagerly; traced, it computes them)."""

    deterministic = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def random_tasks(count: int, seed: int = 0, transform: Any = None) -> Benchmark:
    """`count` two-class tasks, each on Gaussian inputs in a random 4-dimensional subspace of its own (so NESS
    finds null directions to adapt in), labelled by the sign of a random direction."""
    g = torch.Generator().manual_seed(seed)

    def split(basis: torch.Tensor, direction: torch.Tensor, n: int) -> Split:
        x = torch.randn(n, basis.shape[0], generator=g) @ basis
        return Split(x, (x @ direction > 0).long())

    tasks = []
    for t in range(count):
        basis, direction = torch.randn(4, DIM, generator=g), torch.randn(DIM, generator=g)
        splits = (split(basis, direction, n) for n in (ROWS, 16, 16))
        tasks.append(Task(f"task {t}", 2, *splits, transform or float_of))
    return Benchmark("random", tuple(tasks), input_shape=(DIM,), shared_head=False, details={})


def float_of(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def config(**kw: Any) -> TrainConfig:
    base = dict(epochs=3, lr=0.1, momentum=0.9, batch_size=BATCH, test_batch_size=32, lr_patience=1, lr_factor=2.0)
    return TrainConfig(**{**base, **kw})


def new_method(name: str, bench: Benchmark) -> ContinualMethod:
    torch.manual_seed(0)
    model = multi_head_mlp(DIM, (16, 16), [task.num_classes for task in bench.tasks])
    return build_method(name, model, {})


def run_tasks(method: ContinualMethod, bench: Benchmark, settings: TrainConfig) -> dict[str, list]:
    """Train every task of `bench` in order; per task: its epochs' losses (training and validation), its steps, the
    compiled graphs' runs, and (rank, transfer rank) of each adapter it trained."""
    g = seed_everything(0)
    out: dict[str, list] = {"losses": [], "steps": [], "graph_runs": [], "adapters": []}
    for t, task in enumerate(bench.tasks):
        method.begin_task(t)
        runs, losses = GRAPH_RUNS[0], []
        log = train_task(
            method.model,
            method,
            t,
            task,
            settings,
            g,
            progress=False,
            after_epoch=lambda loop, record, losses=losses: losses.extend(
                value for key, value in record.items() if key in ("loss", "val_loss")
            ),
        )
        out["losses"].append(losses)
        out["steps"].append(log["epochs"] * math.ceil(ROWS / BATCH))
        out["graph_runs"].append(GRAPH_RUNS[0] - runs)
        adapters = [m for m in method.model.modules() if isinstance(m, NullSpaceAdapter)]
        out["adapters"].append([(m.rank, m.transfer_rank) for m in adapters])
        method.end_task(t, [(x,) for x in task.transform(task.train.inputs).split(BATCH)])
    return out


@pytest.mark.parametrize("name", ["finetune", "ness", "gpm", "sgp", "ness, prepared split"])
def test_compiled_training_gives_the_eager_losses_and_weights(name, monkeypatch):
    """GPM and SGP in task 1 swap their projected layers' forward for each step (the input-side projection of
    their own step): one object per layer and task, so the compiled graph serves every step. On a prepared split
    the eager NESS step reads its first layer's frozen products; the traced one computes them, in one graph."""
    prepared = name.endswith("prepared split")
    bench = random_tasks(2, transform=PreparedFloat() if prepared else None)
    name = name.split(",")[0]
    made: list[int] = []
    products_of = NullSpaceAdapter._products_of
    monkeypatch.setattr(NullSpaceAdapter, "_products_of", lambda self, *a: made.append(1) or products_of(self, *a))
    eager_method, compiled_method = new_method(name, bench), new_method(name, bench)
    eager = run_tasks(eager_method, bench, config())
    assert bool(made) == (prepared and name == "ness")  # the eager NESS step read them where the split is prepared
    made.clear()
    compiled = run_tasks(compiled_method, bench, config(compile=True, compile_backend="ness_test_counting"))
    assert not made  # traced, the step computes them
    assert eager["graph_runs"] == [0, 0]
    assert compiled["graph_runs"] == compiled["steps"] == eager["steps"]  # every step ran the compiled graph
    for eager_losses, compiled_losses in zip(eager["losses"], compiled["losses"], strict=True):
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-7)
    eager_state, compiled_state = eager_method.model.state_dict(), compiled_method.model.state_dict()
    assert eager_state.keys() == compiled_state.keys()
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    if name == "ness":  # task 1 trained adapters, with the defaults' transfer term (the stacked [U Ū] path)
        ranks = compiled["adapters"][1]
        assert ranks and any(rank > 0 for rank, _ in ranks) and any(transfer > 0 for _, transfer in ranks)


def train_first_task(method: ContinualMethod, bench: Benchmark, backend: str, **kw: Any) -> dict[str, Any]:
    """`train_task` of task 0 with compile=True on `backend`."""
    settings = config(compile=True, compile_backend=backend)
    return train_task(method.model, method, 0, bench.tasks[0], settings, seed_everything(0), progress=False, **kw)


class Watching(FineTune):
    """Fine-tuning that records, after each step, whether the instance has a `training_loss` attribute of its own."""

    def __init__(self, model: torch.nn.Module, stop_at: int | None = None) -> None:
        super().__init__(model)
        self.seen: list[bool] = []
        self.stop_at = stop_at

    def after_step(self, t: int) -> None:
        self.seen.append("training_loss" in vars(self))
        if len(self.seen) == self.stop_at:
            raise RuntimeError("stopped in after_step")


def watching(bench: Benchmark, stop_at: int | None = None) -> Watching:
    torch.manual_seed(0)
    method = Watching(multi_head_mlp(DIM, (16,), [2]), stop_at)
    method.begin_task(0)
    return method


def test_the_compiled_loss_is_in_place_for_the_steps_only():
    bench = random_tasks(1)
    method = watching(bench)
    between_epochs = []

    def after_epoch(loop, record):  # where a checkpoint is written: the method pickles without the compiled loss
        between_epochs.append(vars(method).get("training_loss"))
        torch.save(method, io.BytesIO())

    train_first_task(method, bench, "ness_test_counting", after_epoch=after_epoch)
    assert method.seen and all(method.seen)
    assert between_epochs == [None] * 3
    assert "training_loss" not in vars(method)


class Raising(FineTune):
    """Fine-tuning whose training loss raises a ValueError of its own (inside the compiled function)."""

    def training_loss(self, t, x, y, tasks=None):
        loss = super().training_loss(t, x, y, tasks)
        if x.shape[0] > 1:
            raise ValueError("a bad batch")
        return loss


@pytest.mark.parametrize("where", ["after_step", "training_loss"])
def test_an_error_in_a_step_passes_unchanged_and_the_instance_keeps_its_own_loss(where):
    bench = random_tasks(1)
    if where == "after_step":
        method: FineTune = watching(bench, stop_at=2)
        expected: tuple[type[Exception], str] = (RuntimeError, "stopped in after_step")
    else:
        torch.manual_seed(0)
        method = Raising(multi_head_mlp(DIM, (16,), [2]))
        method.begin_task(0)
        expected = (ValueError, "a bad batch")

    def own(t, x, y, tasks=None):
        return type(method).training_loss(method, t, x, y, tasks)

    method.training_loss = own
    with pytest.raises(expected[0], match=expected[1]) as caught:
        train_first_task(method, bench, "ness_test_counting")
    assert caught.value.__cause__ is None  # not wrapped: the method's own error
    assert vars(method)["training_loss"] is own


def test_an_error_of_torch_compile_names_the_task_the_method_and_how_to_turn_it_off():
    bench = random_tasks(1)
    method = watching(bench)
    with pytest.raises(RuntimeError) as caught:
        train_first_task(method, bench, "ness_test_failing")
    message = str(caught.value)
    assert message.startswith("task 0: torch.compile (backend 'ness_test_failing') failed on finetune's training step")
    assert "BackendCompilerFailed" in message and "--set compile=false" in message
    assert "this backend generates no code" in str(caught.value.__cause__)
    assert "training_loss" not in vars(method)


def test_a_second_order_step_that_torch_compile_cannot_run_says_how_to_turn_it_off():
    """FS-DGPM's default step differentiates through the loss's gradients, which a compiled backward refuses: a
    RuntimeError raised inside AOTAutograd, not one of dynamo's own."""
    bench = random_tasks(1)
    method = new_method("fsdgpm", bench)
    method.begin_task(0)
    with pytest.raises(RuntimeError, match=r"^task 0: torch\.compile \(backend 'aot_eager'\) failed on fsdgpm's") as e:
        train_first_task(method, bench, "aot_eager")
    assert "--set compile=false" in str(e.value) and "create_graph" in str(e.value.__cause__)


def test_ten_tasks_run_compiled_to_the_last_step():
    """Without the reset at each task's end, NESS's tenth task would run eagerly: its new adapters and task id make
    dynamo recompile once per task, past its recompile limit of 8 (measured with torch 2.13)."""
    bench = random_tasks(10)
    method = new_method("ness", bench)
    settings = config(epochs=1, lr_schedule=False, compile=True, compile_backend="ness_test_counting")
    out = run_tasks(method, bench, settings)
    assert out["graph_runs"] == out["steps"] == [math.ceil(ROWS / BATCH)] * 10


class OwnLoss(FineTune):
    """Fine-tuning whose step computes its loss without `training_loss`: nothing to compile."""

    def training_step(self, t, x, y, optimizer, check_loss, tasks=None):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.predict(x, t), y)
        check_loss(loss)
        loss.backward()
        optimizer.step()
        return loss


def test_a_step_that_never_calls_training_loss_is_reported_once(caplog):
    bench = random_tasks(1)
    torch.manual_seed(0)
    method = OwnLoss(multi_head_mlp(DIM, (16,), [2]))
    method.begin_task(0)
    with caplog.at_level(logging.WARNING, logger="ness.trainer"):
        train_first_task(method, bench, "ness_test_counting")
    warnings = [r.getMessage() for r in caplog.records if "compiles nothing" in r.getMessage()]
    expected = (
        "task 0: compile=True compiles nothing for finetune: its training_step does not compute its loss with "
        "training_loss, so its steps run eagerly"
    )
    assert warnings == [expected]


def test_the_settings_are_checked_and_reach_the_cli():
    assert TrainConfig(compile=True, compile_backend="aot_eager").compile is True
    with pytest.raises(ConfigError, match=r"^TrainConfig\.compile: got 1; True or False"):
        TrainConfig(compile=1)
    with pytest.raises(ConfigError, match=r"^TrainConfig\.compile_backend: got 'inductr'; a torch.compile backend"):
        TrainConfig(compile_backend="inductr")
    _, train, _ = split_overrides("finetune", "split_mnist", {"compile": True, "compile_backend": "aot_eager"})
    assert train == {"compile": True, "compile_backend": "aot_eager"}


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on the CPU needs a C++ compiler")
def test_inductor_gives_the_eager_losses():
    """The real backend (C++ code generated and compiled: about 20 s on a 2-core machine without inductor's cache,
    10 s with it): NESS's two tasks, the second with adapters."""
    bench = random_tasks(2)
    eager = run_tasks(new_method("ness", bench), bench, config(epochs=2))
    compiled = run_tasks(new_method("ness", bench), bench, config(epochs=2, compile=True))
    for eager_losses, compiled_losses in zip(eager["losses"], compiled["losses"], strict=True):
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
