"""PEFT-style adapter files: save_adapters → load_adapters on the base model gives the same method (weights, outputs,
the next task's basis, each task's transfer adapter), merge_and_unload gives a plain model with the same outputs (the
shared model, or one task's own with its transfer term merged), the files hold the method's tensors (modules_to_save
and transfer adapters included), older format versions still load, a model that is not the base (any tensor the files
do not carry changed) and other bad input get a clear error, and the CLI writes and merges them."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from ness import NESS, NESSConfig, NullSpaceAdapter
from ness.adapter_files import describe_adapters, merged_state_dict, save_adapters, write_state_dict
from ness.cli import main
from ness.data import build_benchmark
from ness.methods import FineTune
from ness.models import MultiHeadNet, call_model, multi_head_mlp
from ness.normalization import load_batchnorm_state
from ness.presets import get_protocol
from ness.trainer import evaluate

HEADS = (3, 3, 3, 3)
FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_statistics.safetensors"]

# ---------------------------------------------------------------------------------------------------------------
# models, data, training
# ---------------------------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return multi_head_mlp(12, [16, 16], HEADS)


def mlp_with_biases() -> nn.Module:
    return multi_head_mlp(12, [16, 16], HEADS, bias=True)


def conv2d_batchnorm(bias: bool = False) -> nn.Module:
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=bias),  # (B, 4, 3, 3)
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 16, bias=bias),
        nn.BatchNorm1d(16),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 16, HEADS)


def conv2d_batchnorm_with_biases() -> nn.Module:
    return conv2d_batchnorm(bias=True)


def conv1d_batchnorm() -> nn.Module:
    backbone = nn.Sequential(
        nn.Conv1d(3, 5, 3, padding=1),  # (B, 5, 8)
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(40, 16),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 16, HEADS)


class Shift(nn.Module):
    """Adds a fixed vector, a buffer that is not BatchNorm's, to its input."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1, 1, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


class SharedClassifierNet(nn.Module):
    """One classifier for every task (NESSConfig.modules_to_save), and tensors NESS never adapts: the adapted layers'
    biases, a LayerNorm, a buffer and an excluded layer (features.6)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), Shift(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)
        )
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).relu())


# What the adapter files of SharedClassifierNet do not carry, so the config records their digests.
SHARED_UNCARRIED = [
    "features.0.bias",
    "features.1.weight",
    "features.1.bias",
    "features.3.offset",
    "features.4.bias",
    "features.6.weight",
    "features.6.bias",
]


def paper_ness(**options: Any) -> NESSConfig:
    """The paper's NESS, without transfer adapters (NESSConfig's default gives each task one), with `options`."""
    return NESSConfig(transfer_rank=0, **options)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    config: NESSConfig


CASES = {
    "mlp": Case(mlp, (12,), paper_ness(threshold="rank", rank=5, probe_samples=10)),  # a sample of the rows
    "mlp_adapt_bias_replay": Case(
        mlp_with_biases, (12,), paper_ness(threshold="rank", rank=5, adapt_bias=True, memory="replay")
    ),
    "conv2d_batchnorm_per_task_replay": Case(
        conv2d_batchnorm,
        (2, 6, 6),
        paper_ness(threshold="rank", rank=4, batchnorm="per_task", memory="replay", probe_samples=40),
    ),
    "conv1d_adapt_bias_frozen_batchnorm": Case(
        conv1d_batchnorm, (3, 8), paper_ness(threshold="rank", rank=4, adapt_bias=True, max_output_shift=0.05)
    ),
    "shared_classifier_modules_to_save": Case(
        SharedClassifierNet,
        (12,),
        paper_ness(threshold="rank", rank=5, exclude=["features.6"], modules_to_save=["classifier"]),
    ),
}
BIASES_NOT_ADAPTED = Case(mlp_with_biases, (12,), paper_ness(threshold="rank", rank=5))
# NESSConfig.transfer_rank: each task t ≥ 1 also trains its own Ū_t·A_t, which acts only in predict(x, t).
TRANSFER_CASES = {
    # backbone.0 gets null rank 0 (no input direction has σ ≤ 1e-6·‖I‖_F): wrapped for its transfer adapter only.
    "mlp_transfer_with_a_rank0_layer": Case(
        mlp,
        (12,),
        NESSConfig(
            threshold="rank",
            rank=5,
            transfer_rank=4,
            layer_rules={"backbone.0": {"threshold": "frobenius", "eps1": 1e-6}},
        ),
    ),
    "mlp_adapt_bias_replay_transfer": Case(
        mlp_with_biases, (12,), NESSConfig(threshold="rank", rank=5, adapt_bias=True, memory="replay", transfer_rank=3)
    ),
    "conv2d_batchnorm_per_task_transfer": Case(
        conv2d_batchnorm, (2, 6, 6), NESSConfig(threshold="rank", rank=4, batchnorm="per_task", transfer_rank=4)
    ),
    "conv2d_adapt_bias_transfer": Case(
        conv2d_batchnorm_with_biases, (2, 6, 6), NESSConfig(threshold="rank", rank=4, adapt_bias=True, transfer_rank=2)
    ),
}


def task_data(case: Case, t: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, *case.input_shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(method: NESS, case: Case, t: int, steps: int = 4) -> None:
    """Plain SGD steps through the method's training_step, with a fresh optimiser (none is saved)."""
    x, y = task_data(case, t)
    optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.2)
    method.model.train()
    for _ in range(steps):
        method.training_step(t, x, y, optimizer, lambda loss: None)


def batches(case: Case, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Task t's training data as a loader: two batches of 12."""
    x, y = task_data(case, t)
    return [(x[:12], y[:12]), (x[12:], y[12:])]


def begin(method: NESS, case: Case, t: int) -> None:
    """begin_task with the task's data, from which transfer_rank chooses its transfer directions."""
    method.begin_task(t, batches(case, t))


def end(method: NESS, case: Case, t: int) -> None:
    method.end_task(t, batches(case, t))


def trained(case: Case, open_task: bool, preview: bool = True) -> tuple[NESS, nn.Module]:
    """(method, base model): tasks 0 and 1 finished, then task 2 trained and left open (open_task) or finished.
    preview=False: task 2 is begun without its data and left open untrained (its transfer directions not chosen)."""
    torch.manual_seed(0)
    method = NESS(case.build(), case.config)
    base = None
    for t in range(3):
        if t == 2 and not preview:
            method.begin_task(t)
            break
        begin(method, case, t)
        train(method, case, t)
        if t == 2 and open_task:
            break
        end(method, case, t)
        if t == 0:
            base = copy.deepcopy(method.model)
    return method, base


@torch.no_grad()
def predictions(method: NESS, case: Case, tasks: range) -> list[torch.Tensor]:
    """Each task's logits on fixed inputs in eval mode, through method.predict (per-task BatchNorm where set)."""
    x, _ = task_data(case, 99)
    was_training = method.model.training
    method.model.eval()
    out = [method.predict(x, t) for t in tasks]
    method.model.train(was_training)
    return out


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    model.eval()
    return call_model(model, x, t)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts with the same keys, in order, and bit-for-bit equal tensors."""
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    assert_same_tensors(a.state_dict(), b.state_dict())


def current_layer(method: NESS, name: str) -> nn.Module:
    module = method.model.get_submodule(name)
    return module.base if isinstance(module, NullSpaceAdapter) else module


def transfer_of(method: NESS, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Task j's transfer terms {layer: (Ū, A)}: method.transfers[j] once it finished, its adapters' while open."""
    if j < method.tasks_done:
        return method.transfers[j]
    return {
        n: (a.adapter.transfer_basis, a.adapter.A.detach()) for n, a in method.active.items() if a.adapter.A is not None
    }


def assert_trained_transfers(method: NESS) -> None:
    """Every task t ≥ 1 so far has a transfer adapter on every adapted layer, and its A trained away from zero."""
    for j in range(1, method.tasks_done + (method.active_task is not None)):
        terms = transfer_of(method, j)
        assert sorted(terms) == sorted(method.layer_names), j
        assert all(factor.abs().max() > 1e-4 for _, factor in terms.values()), j


def assert_same_transfers(a: NESS, b: NESS) -> None:
    """The two methods hold the same transfer adapters, finished and open, bit for bit."""
    assert (a._transfer_task, a.tasks_done, a.active_task) == (b._transfer_task, b.tasks_done, b.active_task)
    assert len(a.transfers) == len(b.transfers) == a.tasks_done
    for j in range(a.tasks_done + (a.active_task is not None)):
        ta, tb = transfer_of(a, j), transfer_of(b, j)
        assert sorted(ta) == sorted(tb), j
        for layer, (basis, factor) in ta.items():
            assert torch.equal(basis, tb[layer][0]) and torch.equal(factor, tb[layer][1]), (j, layer)


# ---------------------------------------------------------------------------------------------------------------
# round trip: the loaded method is the saved one
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("open_task", [True, False], ids=["mid_task", "between_tasks"])
@pytest.mark.parametrize("name", [*CASES, *TRANSFER_CASES])
def test_loaded_method_equals_the_saved_one_and_continues_identically(tmp_path, name, open_task):
    case = {**CASES, **TRANSFER_CASES}[name]
    method, base = trained(case, open_task)
    method.save_adapters(tmp_path / "adapters")
    loaded = NESS.load_adapters(copy.deepcopy(base), tmp_path / "adapters")

    assert (loaded.tasks_done, loaded.active_task) == (method.tasks_done, method.active_task)
    assert sorted(loaded.active) == sorted(method.active) and (len(method.active) > 0) == open_task
    assert_same_state(loaded.model, method.model)  # the merges repeat end_task's arithmetic: bit for bit
    if case.config.transfer_rank:
        assert_trained_transfers(method)
    assert_same_transfers(loaded, method)
    # Each task's predict(x, j), its transfer adapter included (put back by hooks, or the open task's own terms).
    for got, want in zip(predictions(loaded, case, range(3)), predictions(method, case, range(3)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loaded.diagnostics() == method.diagnostics()

    # Continue both the same way: finish the open task, then task 3 gets the same bases and trains the same.
    for m in (method, loaded):
        if open_task:
            train(m, case, 2)
            end(m, case, 2)
        begin(m, case, 3)
    assert sorted(loaded.active) == sorted(method.active) and method.active
    for layer in method.active:
        torch.testing.assert_close(loaded.active[layer].adapter.U, method.active[layer].adapter.U, atol=1e-6, rtol=0)
    for m in (method, loaded):
        train(m, case, 3)
        end(m, case, 3)
    assert_same_state(loaded.model, method.model)
    assert_same_transfers(loaded, method)
    for got, want in zip(predictions(loaded, case, range(4)), predictions(method, case, range(4)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loaded.diagnostics() == method.diagnostics()


# ---------------------------------------------------------------------------------------------------------------
# what the files hold
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "mlp_adapt_bias_replay", "conv2d_batchnorm_per_task_replay"])
def test_the_files_hold_the_methods_tensors(tmp_path, name):
    case = CASES[name]
    method, base = trained(case, open_task=True)
    directory = method.save_adapters(tmp_path / "adapters")
    assert sorted(p.name for p in directory.iterdir()) == FILES  # and no temporary file
    config = json.loads((directory / "adapter_config.json").read_text())
    adapters = load_file(directory / "adapter_model.safetensors")
    statistics = load_file(directory / "adapter_statistics.safetensors")

    assert (config["format"], config["format_version"], config["method"]) == ("ness-adapters", 4, "ness")
    assert config["config"] == json.loads(json.dumps(asdict(method.config)))
    assert (config["tasks_done"], config["active_task"]) == (2, 2)
    assert config["records"] == json.loads(json.dumps(method.records))
    for layer in method.layer_names:
        module = base.get_submodule(layer)
        assert config["layers"][layer] == {
            "type": type(module).__name__,
            "d": module.weight[0].numel(),
            "out": module.weight.shape[0],
            "weight_shape": list(module.weight.shape),
            "adapt_bias": case.config.adapt_bias and module.bias is not None,
        }
    for file_name in FILES[1:]:
        data = (directory / file_name).read_bytes()
        assert config["files"][file_name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # (U, V) of the finished task 1 and of the open task 2, and the open task's kept singular values.
    assert [task["task"] for task in config["tasks"]] == [1]
    for layer, (u, v) in method.task_deltas[0].items():
        assert torch.equal(adapters[f"task1.{layer}.U"], u) and torch.equal(adapters[f"task1.{layer}.V"], v)
        assert config["tasks"][0]["ranks"][layer] == u.shape[1]
    ranks = {n: a.adapter.rank for n, a in method.active.items()}
    assert config["active"] == {"task": 2, "ranks": ranks, "transfer_ranks": {}}
    assert config["tasks"][0]["transfer_ranks"] == {} and config["transfer_task"] is None
    for layer, active in method.active.items():
        assert torch.equal(adapters[f"active.{layer}.U"], active.adapter.U)
        assert torch.equal(adapters[f"active.{layer}.V"], active.adapter.V.detach())
        assert torch.equal(adapters[f"active.{layer}.kept_singular_values"], active.kept_singular_values)
        assert torch.equal(statistics[f"active_probe.{layer}"], active.probe)
    for key, value in method.model.task_heads.state_dict().items():
        assert torch.equal(adapters[f"modules_to_save.task_heads.{key}"], value)

    # Independently: W now = W after task 0 + (U₁V₁)ᵀ, with the bias as U·V's last row when it is adapted.
    for layer in method.task_deltas[0]:
        before, now = base.get_submodule(layer), current_layer(method, layer)
        delta = (adapters[f"task1.{layer}.U"].double() @ adapters[f"task1.{layer}.V"].double()).T  # (o, d[+1])
        out = now.weight.shape[0]
        expected = before.weight.detach().double().reshape(out, -1)
        if case.config.adapt_bias:
            expected = torch.cat([expected, before.bias.detach().double()[:, None]], dim=1)
            torch.testing.assert_close(now.bias.detach().double(), (expected + delta)[:, -1], atol=1e-6, rtol=0)
            expected = expected[:, :-1] + delta[:, :-1]
        else:
            expected = expected + delta
        torch.testing.assert_close(now.weight.detach().double().reshape(out, -1), expected, atol=1e-6, rtol=0)

    if case.config.memory == "replay":  # the raw inputs of tasks 0 and 1
        assert config["statistics"]["replay_tasks"] == 2
        for j in range(2):
            assert torch.equal(statistics[f"replay.task{j}"], task_data(case, j)[0])
    else:  # Σxxᵀ of the first layer's inputs over tasks 0 and 1, in float64
        inputs = torch.cat([task_data(case, j)[0] for j in range(2)]).double()
        assert statistics["covariance.backbone.0"].dtype == torch.float64
        torch.testing.assert_close(statistics["covariance.backbone.0"], inputs.T @ inputs)
        for layer, rows in method.probes.items():
            assert config["statistics"]["probe_tasks"][layer] == len(rows) == 2
            for j, probe in enumerate(rows):
                assert torch.equal(statistics[f"probe.task{j}.{layer}"], probe)
    assert config["statistics"]["batchnorm_tasks"] == len(method.batchnorm_states)
    for j, state in enumerate(method.batchnorm_states):
        for layer, tensors in state.items():
            for key, value in tensors.items():
                assert torch.equal(statistics[f"batchnorm.task{j}.{layer}.{key}"], value)
    if case.config.batchnorm == "per_task":
        assert len(method.batchnorm_states) == 2
        assert "modules_to_save.backbone.1.running_mean" in adapters


def test_config_is_written_last_and_checksums_catch_a_mixed_directory(tmp_path, monkeypatch):
    case = CASES["mlp"]
    method, base = trained(case, open_task=True)
    real_save = safetensors.torch.save
    calls = []

    def fail_on_the_statistics(tensors, metadata=None):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise OSError("disk full")
        return real_save(tensors, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save", fail_on_the_statistics)
    with pytest.raises(OSError, match="disk full"):
        method.save_adapters(tmp_path / "interrupted")
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == ["adapter_model.safetensors"]
    with pytest.raises(FileNotFoundError, match="save did not finish"):
        NESS.load_adapters(copy.deepcopy(base), tmp_path / "interrupted")

    # An interrupted save over a complete one leaves a new adapter file beside the old config: refused.
    monkeypatch.setattr(safetensors.torch, "save", real_save)
    method.save_adapters(tmp_path / "resaved")
    train(method, case, 2)
    monkeypatch.setattr(safetensors.torch, "save", fail_on_the_statistics)
    with pytest.raises(OSError):
        method.save_adapters(tmp_path / "resaved")
    assert sorted(p.name for p in (tmp_path / "resaved").iterdir()) == FILES
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not match its checksum"):
        NESS.load_adapters(copy.deepcopy(base), tmp_path / "resaved")


def test_the_files_hold_each_tasks_transfer_adapter_and_the_open_tasks(tmp_path):
    case = TRANSFER_CASES["mlp_transfer_with_a_rank0_layer"]
    method, _ = trained(case, open_task=True)
    assert_trained_transfers(method)
    assert method.active["backbone.0"].adapter.rank == 0 and "backbone.0" not in method.task_deltas[0]
    directory = method.save_adapters(tmp_path / "adapters")
    config = json.loads((directory / "adapter_config.json").read_text())
    adapters = load_file(directory / "adapter_model.safetensors")

    assert (config["format_version"], config["config"]["transfer_rank"], config["transfer_task"]) == (4, 4, 2)
    # Task 1's Ū and A on every layer, beside its U and V where its null rank was > 0.
    assert config["tasks"][0]["ranks"] == {"backbone.2": 5}
    assert config["tasks"][0]["transfer_ranks"] == {n: a.shape[0] for n, (_, a) in method.transfers[1].items()}
    for layer, (basis, factor) in method.transfers[1].items():
        assert torch.equal(adapters[f"transfer.task1.{layer}.basis"], basis)
        assert torch.equal(adapters[f"transfer.task1.{layer}.A"], factor)
    # The open task's: the rank-0 layer's U is 12×0, Ū and A under their names in the model's state dict.
    assert config["active"]["ranks"] == {"backbone.0": 0, "backbone.2": 5}
    assert adapters["active.backbone.0.U"].shape == (12, 0) and adapters["active.backbone.0.V"].shape == (0, 16)
    assert config["active"]["transfer_ranks"] == {n: a.adapter.transfer_rank for n, a in method.active.items()}
    for layer, active in method.active.items():
        assert torch.equal(adapters[f"active.{layer}.transfer_basis"], active.adapter.transfer_basis)
        assert torch.equal(adapters[f"active.{layer}.A"], active.adapter.A.detach())
    assert config["base_tensors"] == {}  # Ū and A are carried, not taken for base tensors


# ---------------------------------------------------------------------------------------------------------------
# merge_and_unload
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(tmp_path, name):
    case = CASES[name]
    method, base = trained(case, open_task=True)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    merged = method.merge_and_unload()
    # The file route (`ness adapters --merge`: base state dict + adapter files, no model class) gives the same.
    from_files = merged_state_dict(base.state_dict(), method.save_adapters(tmp_path / "adapters"))
    assert list(from_files) == list(merged.state_dict())
    for key, value in merged.state_dict().items():
        assert torch.equal(from_files[key], value), key

    assert not any(isinstance(m, NullSpaceAdapter) for m in merged.modules())
    assert all(type(m).__module__.startswith(("torch.nn", __name__)) for m in merged.modules() if m is not merged)
    assert all(p.requires_grad for p in merged.parameters())
    for layer in merged.modules():  # BatchNorm's momentum as built: a frozen task's 0 stays with the method
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            assert layer.momentum == 0.1
    x, _ = task_data(case, 99)
    for t in range(3):
        torch.testing.assert_close(logits(merged, x, t), logits(method.model, x, t), atol=1e-5, rtol=1e-5)
    for layer, active in method.active.items():  # W + (U V)ᵀ, by hand
        w = active.adapter.base.weight.detach().double()
        delta = (active.adapter.U.double() @ active.adapter.V.detach().double()).T[:, : w[0].numel()]
        torch.testing.assert_close(
            merged.get_submodule(layer).weight.double(), w + delta.reshape(w.shape), atol=1e-6, rtol=0
        )

    # The method is as it was, and still trains and ends its task.
    assert all(isinstance(method.model.get_submodule(n), NullSpaceAdapter) for n in method.active)
    for key, value in method.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    v_before = {n: a.adapter.V.detach().clone() for n, a in method.active.items()}
    train(method, case, 2)
    assert any(not torch.equal(a.adapter.V, v_before[n]) for n, a in method.active.items())
    end(method, case, 2)
    method.begin_task(3)


@pytest.mark.parametrize("open_task", [True, False], ids=["mid_task", "between_tasks"])
@pytest.mark.parametrize("name", TRANSFER_CASES)
def test_merge_and_unload_of_a_task_is_its_own_model_and_without_one_the_shared_model(tmp_path, name, open_task):
    case = TRANSFER_CASES[name]
    method, base = trained(case, open_task)
    assert_trained_transfers(method)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    directory = method.save_adapters(tmp_path / "adapters")
    x, _ = task_data(case, 99)
    want = predictions(method, case, range(3))  # each task's function: its transfer adapter acts through hooks
    shared = method.merge_and_unload()
    assert_same_tensors(merged_state_dict(base.state_dict(), directory), shared.state_dict())

    for j in (1, 2):
        own = method.merge_and_unload(task=j)
        assert not any(isinstance(m, NullSpaceAdapter) for m in own.modules())
        assert all(p.requires_grad for p in own.parameters())
        torch.testing.assert_close(logits(own, x, j), want[j], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits(shared, x, j), want[j], atol=1e-3)  # the transfer term matters
        assert_same_tensors(merged_state_dict(base.state_dict(), directory, task=j), own.state_dict())
        # By hand: task j's model differs from the shared one by (Ū_j A_j)ᵀ in W, and its bias row in b, alone.
        for layer, (basis, factor) in transfer_of(method, j).items():
            mine, theirs = own.get_submodule(layer), shared.get_submodule(layer)
            delta, d = (basis.double() @ factor.double()).T, mine.weight[0].numel()
            change = (mine.weight - theirs.weight).double()
            torch.testing.assert_close(change, delta[:, :d].reshape(change.shape), atol=1e-6, rtol=0)
            if layer in method.bias_layers:
                torch.testing.assert_close((mine.bias - theirs.bias).double(), delta[:, d], atol=1e-6, rtol=0)
            elif mine.bias is not None:
                assert torch.equal(mine.bias, theirs.bias)

    # The shared model is what task 0 computes, which has no transfer adapter (in task 0's BatchNorm state).
    if method.batchnorm_states:
        load_batchnorm_state(shared, method.batchnorm_states[0])
    torch.testing.assert_close(logits(shared, x, 0), want[0], atol=1e-5, rtol=1e-5)
    # The method is as it was.
    assert_same_tensors(method.model.state_dict(), before)
    assert all(layer.adapter.transfer_enabled for layer in method.active.values())
    for got, expected in zip(predictions(method, case, range(3)), want, strict=True):
        assert torch.equal(got, expected)


def test_merging_a_task_without_a_transfer_adapter_is_refused_with_the_reason(tmp_path):
    case = TRANSFER_CASES["mlp_transfer_with_a_rank0_layer"]
    method, base = trained(case, open_task=True)
    directory = method.save_adapters(tmp_path / "adapters")
    refused = {
        0: r"task 0 has no transfer term to merge \(task 0 trains the whole network and has no transfer adapter\); "
        "task=None gives the shared model",
        3: r"there is no task 3; tasks 0 to 2 have begun \(task 2 is open\)\. Pass one of them, or task=None",
        -1: "there is no task -1",
    }
    for task, message in refused.items():
        with pytest.raises(ValueError, match=rf"^merge_and_unload\(task={task}\): {message}"):
            method.merge_and_unload(task=task)
        with pytest.raises(ValueError, match=rf"^merged_state_dict\(task={task}\): {message}"):
            merged_state_dict(base.state_dict(), directory, task=task)
    for task in ("1", True, 1.0):
        with pytest.raises(TypeError, match="task must be a task index"):
            method.merge_and_unload(task=task)

    plain, _ = trained(CASES["mlp"], open_task=False)
    with pytest.raises(ValueError, match=r"task 1 has no transfer term to merge \(NESSConfig\.transfer_rank is 0"):
        plain.merge_and_unload(task=1)


def test_an_open_task_saved_before_its_transfer_directions_are_chosen_gets_them_after_loading(tmp_path):
    case = TRANSFER_CASES["mlp_adapt_bias_replay_transfer"]
    method, base = trained(case, open_task=True, preview=False)  # begin_task(2) without the task's data
    assert method._transfer_task is None and all(a.adapter.A is None for a in method.active.values())
    directory = method.save_adapters(tmp_path / "adapters")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["transfer_task"] is None and config["active"]["transfer_ranks"] == {}
    assert "task 2 open (its transfer directions not chosen yet)" in describe_adapters(directory)
    loaded = NESS.load_adapters(copy.deepcopy(base), directory)
    assert_same_transfers(loaded, method)
    not_chosen = r"task 2 is open and its transfer directions are not chosen yet: call method\.preview_task\(2,"
    for m in (method, loaded):
        with pytest.raises(ValueError, match=not_chosen):
            m.merge_and_unload(task=2)
    with pytest.raises(ValueError, match=not_chosen):
        merged_state_dict(base.state_dict(), directory, task=2)

    for m in (method, loaded):  # both choose the same directions now, and train and end the task the same
        m.preview_task(2, batches(case, 2))
        train(m, case, 2)
    assert_trained_transfers(method)
    assert_same_transfers(loaded, method)
    for m in (method, loaded):
        end(m, case, 2)
    assert_same_state(loaded.model, method.model)
    assert_same_transfers(loaded, method)
    for got, want in zip(predictions(loaded, case, range(3)), predictions(method, case, range(3)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(method after tasks 0–2, its base model, its adapter directory)."""
    method, base = trained(CASES["mlp"], open_task=False)
    return method, base, method.save_adapters(tmp_path_factory.mktemp("saved") / "adapters")


def edited_copy(directory: Path, target: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(directory, target)
    edit(target)
    return target


def set_config(key, value):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "adapter_config.json").read_text())
        config[key] = value
        (directory / "adapter_config.json").write_text(json.dumps(config))

    return edit


def test_bad_directories_and_files_get_clear_errors(saved, tmp_path):
    _, base, directory = saved

    def load(path):
        return NESS.load_adapters(copy.deepcopy(base), path)

    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json"):
        load(tmp_path / "empty")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(edited_copy(directory, tmp_path / "json", lambda d: (d / "adapter_config.json").write_text("{")))
    with pytest.raises(ValueError, match="not a NESS adapter config: format 'peft'"):
        load(edited_copy(directory, tmp_path / "format", set_config("format", "peft")))
    with pytest.raises(ValueError, match=r"format version 5; this ness-cl reads versions 1 to 4\..*Upgrade"):
        load(edited_copy(directory, tmp_path / "version", set_config("format_version", 5)))
    with pytest.raises(FileNotFoundError, match=r"no adapter_statistics\.safetensors"):
        load(edited_copy(directory, tmp_path / "gone", lambda d: (d / "adapter_statistics.safetensors").unlink()))

    def truncate(d: Path) -> None:
        path = d / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not match its checksum.*corrupt"):
        load(edited_copy(directory, tmp_path / "truncated", truncate))

    garbage = b"not a safetensors file"
    files = json.loads((directory / "adapter_config.json").read_text())["files"]
    files["adapter_model.safetensors"] = {"bytes": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}

    def replace(d: Path) -> None:
        (d / "adapter_model.safetensors").write_bytes(garbage)
        set_config("files", files)(d)

    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(edited_copy(directory, tmp_path / "garbage", replace))


def test_models_that_do_not_fit_get_clear_errors_and_stay_unchanged(saved):
    method, base, directory = saved
    torch.manual_seed(1)
    mismatched = {
        "layer 'backbone.0': the adapters expect a Linear with d=12 inputs per row and 16 outputs, the model has a "
        "Linear with d=12, 20 outputs": multi_head_mlp(12, [20, 16], HEADS),
        r"layer 'backbone.2' \(Linear with d=16 inputs per row and 16 outputs\) of the saved adapters is not in the "
        "model": multi_head_mlp(12, [16], HEADS),
        r"the model has layers \['backbone.4'\] that NESS would adapt": multi_head_mlp(12, [16, 16, 16], HEADS),
        "module 'task_heads' saved in .* has tensors": with_backbone(multi_head_mlp(12, [16, 16], (3, 3)), base),
        "not the base model these adapters were trained from": mlp(),  # right shapes, other weights
        "they are the trained model's, with every task's ΔW already in them": copy.deepcopy(method.model),
    }
    for message, model in mismatched.items():
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=message):
            NESS.load_adapters(model, directory)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    wrapped, _ = trained(CASES["mlp"], open_task=True)
    with pytest.raises(ValueError, match="holds NullSpaceAdapter layers"):
        NESS.load_adapters(wrapped.model, directory)
    with pytest.raises(ValueError, match=r"base state dict's 'backbone.0.weight' \(shape \[20, 12\]\) does not fit"):
        merged_state_dict(multi_head_mlp(12, [20, 16], HEADS).state_dict(), directory)


# ---------------------------------------------------------------------------------------------------------------
# the base model: every tensor the files do not carry is checked; modules_to_save are carried
# ---------------------------------------------------------------------------------------------------------------


def blake2b(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def assert_refused(model: nn.Module, directory: Path, message: str) -> None:
    """load_adapters refuses `model` with `message`, and leaves it as it was."""
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        NESS.load_adapters(model, directory)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("open_task", [True, False], ids=["mid_task", "between_tasks"])
def test_a_base_whose_unadapted_bias_is_shifted_is_refused(tmp_path, open_task):
    # Without the check the shifted base loaded silently, its logits up to 0.47 off the trained model's.
    method, base = trained(BIASES_NOT_ADAPTED, open_task)
    directory = method.save_adapters(tmp_path / "adapters")
    shifted = copy.deepcopy(base)
    with torch.no_grad():
        shifted.backbone[2].bias.add_(0.5)
    message = (
        r"the model is not the base model these adapters were trained from: 1 of the 2 tensors the adapters do not "
        r"carry differ from the base's \(backbone\.2\.bias\).*after task 0"
    )
    assert_refused(shifted, directory, message)
    with pytest.raises(ValueError, match=message.replace("the model", "the base state dict")):
        merged_state_dict(shifted.state_dict(), directory)

    loaded = NESS.load_adapters(copy.deepcopy(base), directory)  # the true base: the trained model's outputs
    for got, want in zip(
        predictions(loaded, BIASES_NOT_ADAPTED, range(3)),
        predictions(method, BIASES_NOT_ADAPTED, range(3)),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def shared_saved(tmp_path_factory):
    """(method of SharedClassifierNet with task 2 open, its base model, its adapter directory)."""
    method, base = trained(CASES["shared_classifier_modules_to_save"], open_task=True)
    return method, base, method.save_adapters(tmp_path_factory.mktemp("shared") / "adapters")


def test_the_config_records_each_base_tensor_the_files_do_not_carry_by_its_plain_name(shared_saved):
    method, base, directory = shared_saved
    assert {"features.0", "features.4"} <= set(method.active)  # wrapped: features.0.base.bias in the model now
    config = json.loads((directory / "adapter_config.json").read_text())
    assert list(config["base_tensors"]) == SHARED_UNCARRIED
    for name, record in config["base_tensors"].items():
        value = base.state_dict()[name]
        assert record == {"shape": list(value.shape), "dtype": "float32", "blake2b": blake2b(value)}


@pytest.mark.parametrize("tensor", SHARED_UNCARRIED)
def test_a_base_with_a_changed_layernorm_buffer_excluded_layer_or_bias_is_refused(shared_saved, tensor):
    _, base, directory = shared_saved
    changed = copy.deepcopy(base)
    changed.state_dict()[tensor].add_(1e-3)  # the state dict's tensors share the model's storage
    assert_refused(
        changed, directory, rf"1 of the 7 tensors the adapters do not carry differ .*\({re.escape(tensor)}\)"
    )


def test_a_base_with_other_tensors_or_dtypes_is_refused_with_a_count(shared_saved):
    _, base, directory = shared_saved
    everything = copy.deepcopy(base)
    for name in SHARED_UNCARRIED:
        everything.state_dict()[name].add_(1.0)
    listed = ", ".join(re.escape(n) for n in SHARED_UNCARRIED[:6])
    assert_refused(everything, directory, rf"7 of the 7 tensors .* \({listed}, … \(7 in all\)\)")

    extra = copy.deepcopy(base)
    extra.features[2].register_buffer("scale", torch.ones(1))
    assert_refused(extra, directory, r"the model .* has features\.2\.scale, which the base did not have.*architecture")
    missing = copy.deepcopy(base)
    del missing.features[3].offset
    assert_refused(missing, directory, r"the model .* lacks features\.3\.offset.*architecture")
    with pytest.raises(ValueError, match=r"the base state dict .* lacks features\.3\.offset"):
        merged_state_dict(missing.state_dict(), directory)
    double = copy.deepcopy(base)
    double.features[1].double()
    assert_refused(double, directory, r"features\.1\.weight \(float64 \[16\], base float32 \[16\]\), features\.1\.bias")


def test_modules_to_save_are_carried_and_loading_onto_the_base_gives_the_trained_model(tmp_path):
    case = CASES["shared_classifier_modules_to_save"]
    method, base = trained(case, open_task=False)
    assert method.saved_modules == ["classifier"] and "classifier" not in method.layer_names
    trained_classifier = {k: v.clone() for k, v in method.model.classifier.state_dict().items()}
    assert not torch.equal(trained_classifier["weight"], base.classifier.weight)  # tasks 1 and 2 trained it
    directory = method.save_adapters(tmp_path / "adapters")
    loaded = NESS.load_adapters(copy.deepcopy(base), directory)
    x, _ = task_data(case, 99)
    torch.testing.assert_close(logits(loaded.model, x, 0), logits(method.model, x, 0), atol=1e-5, rtol=1e-5)
    for key, value in trained_classifier.items():
        assert torch.equal(loaded.model.classifier.state_dict()[key], value), key
    merged = merged_state_dict(base.state_dict(), directory)
    assert torch.equal(merged["classifier.weight"], trained_classifier["weight"])

    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert "saved whole: classifier; other base tensors checked at load: 7" in describe_adapters(directory)


def as_format_version(version: int) -> Callable[[Path], None]:
    """An edit that makes a directory of a method without transfer adapters read as format `version` wrote it:
    before 3 no NESSConfig.transfer_rank, transfer ranks or transfer_task; before 2 no digests of the base tensors
    the files do not carry."""

    def edit(directory: Path) -> None:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        assert config["config"]["transfer_rank"] == 0  # an older ness-cl could not have saved one
        del config["config"]["transfer_rank"], config["transfer_task"]
        for entry in [*config["tasks"], *([config["active"]] if config["active"] else [])]:
            del entry["transfer_ranks"]
        if version < 2:
            del config["base_tensors"]
        config["format_version"] = version
        path.write_text(json.dumps(config))

    return edit


def test_format_version_1_loads_without_the_new_check_with_a_warning_but_not_with_modules_to_save(
    shared_saved, tmp_path, caplog
):
    method, base = trained(BIASES_NOT_ADAPTED, open_task=False)
    old = edited_copy(method.save_adapters(tmp_path / "adapters"), tmp_path / "v1", as_format_version(1))
    with caplog.at_level(logging.WARNING, logger="ness"):
        loaded = NESS.load_adapters(copy.deepcopy(base), old)
    assert "format version 1 records only the adapted weights" in caplog.text and "not checked" in caplog.text
    assert_same_state(loaded.model, method.model)
    assert "other base tensors checked at load: none (format version 1)" in describe_adapters(old)

    _, shared_base, directory = shared_saved
    old = edited_copy(directory, tmp_path / "shared_v1", as_format_version(1))
    assert_refused(copy.deepcopy(shared_base), old, r"format version 1 does not hold the NESSConfig's modules_to_save")


@pytest.mark.parametrize("open_task", [True, False], ids=["mid_task", "between_tasks"])
def test_format_version_2_loads_as_a_method_without_transfer_adapters_that_continues_identically(tmp_path, open_task):
    case = CASES["mlp"]
    method, base = trained(case, open_task)
    directory = method.save_adapters(tmp_path / "adapters")
    old = edited_copy(directory, tmp_path / "v2", as_format_version(2))
    loaded = NESS.load_adapters(copy.deepcopy(base), old)

    assert loaded.config.transfer_rank == 0 and loaded._transfer_task is None
    assert loaded.transfers == [{}] * method.tasks_done
    assert_same_state(loaded.model, method.model)
    for got, want in zip(predictions(loaded, case, range(3)), predictions(method, case, range(3)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_tensors(merged_state_dict(base.state_dict(), old), merged_state_dict(base.state_dict(), directory))
    summary = describe_adapters(old)
    assert "(ness-adapters v2)" in summary and "transfer_rank=0" in summary and "transfer rank" not in summary

    for m in (method, loaded):
        if open_task:
            train(m, case, 2)
            end(m, case, 2)
        begin(m, case, 3)
        train(m, case, 3)
        end(m, case, 3)
    assert_same_state(loaded.model, method.model)


def with_backbone(model: nn.Module, base: nn.Module) -> nn.Module:
    """`model` with the base model's backbone weights (its heads stay its own)."""
    model.backbone.load_state_dict(base.backbone.state_dict())
    return model


def test_saving_needs_a_finished_task_0_and_a_ness_method(tmp_path):
    method = NESS(mlp(), CASES["mlp"].config)
    with pytest.raises(ValueError, match="task 0 has not ended"):
        method.save_adapters(tmp_path / "a")
    method.begin_task(0)
    with pytest.raises(ValueError, match="task 0 has not ended"):
        method.save_adapters(tmp_path / "a")
    with pytest.raises(TypeError, match="takes a NESS method, got FineTune"):
        save_adapters(FineTune(mlp()), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_saves_adapters_and_merges_them_into_the_final_model(tmp_path, capsys):
    run = ["run", "--benchmark", "split_digits", "--method", "ness", "--seeds", "1", "--out", str(tmp_path)]
    assert main([*run, "--set", "epochs=1", "--quiet", "--save-adapters"]) == 0
    seed_dir = tmp_path / "split_digits" / "ness" / "seed_1"
    adapters, base_file = seed_dir / "adapters", seed_dir / "base_model.safetensors"
    assert sorted(p.name for p in adapters.iterdir()) == FILES and base_file.is_file()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert (config["tasks_done"], config["active_task"], len(config["tasks"])) == (5, None, 4)

    capsys.readouterr()
    assert main(["adapters", str(adapters)]) == 0
    summary = capsys.readouterr().out
    assert "5 tasks done, no task open" in summary
    for layer, spec in config["layers"].items():
        # A layer of null rank 0 that trained only its transfer adapter that task shows 0, a frozen one '-'.
        ranks = [
            str(task["ranks"].get(layer, 0 if layer in task["transfer_ranks"] else "-")) for task in config["tasks"]
        ]
        row = next(line for line in summary.splitlines() if line.startswith(layer))
        assert row.split() == [layer, spec["type"], str(spec["d"]), str(spec["out"]), "no", *ranks]
    for name in FILES:
        assert f"{(adapters / name).stat().st_size:,} bytes" in summary

    # Each task's model: the shared merge for task 0, and for a task with a transfer adapter (NESSConfig's default)
    # its own, `--task j`.
    own = [j for j, task in enumerate(config["tasks"], start=1) if task["transfer_ranks"]]
    merged_files = {}
    for j in range(config["tasks_done"]):
        merged_files[j] = tmp_path / f"merged_{j}.safetensors"
        merge = ["adapters", str(adapters), "--merge", "--base", str(base_file), "--out", str(merged_files[j])]
        assert main([*merge, *(["--task", str(j)] if j in own else [])]) == 0
        assert f"to {merged_files[j]}" in capsys.readouterr().out

    # A fresh model with task j's merged state dict is the run's final model for task j: it reproduces the last
    # accuracy row, and its outputs are those of the final method rebuilt from the base model through load_adapters.
    results = json.loads((seed_dir / "results.json").read_text())
    protocol = get_protocol("split_digits", "quick")
    bench = build_benchmark("split_digits", seed=1, **results["config"]["data"])
    base = protocol.network(bench)
    base.load_state_dict(load_file(base_file))
    final = NESS.load_adapters(base, adapters)
    final.model.eval()
    x = bench.tasks[0].transform(bench.tasks[0].test.inputs[:32])
    train_config = results["config"]["train"]
    for j, task in enumerate(bench.tasks):
        fresh = protocol.network(bench)
        fresh.load_state_dict(load_file(merged_files[j]))
        _, acc = evaluate(
            fresh, j, task.test, task, train_config["test_batch_size"], "cpu", train_config["eval_passes"], 1
        )
        assert acc == results["acc_matrix"][-1][j]
        with torch.no_grad():
            torch.testing.assert_close(logits(fresh, x, j), final.predict(x, j), atol=1e-5, rtol=1e-5)


def test_describe_and_the_cli_show_each_tasks_transfer_ranks_and_merge_a_tasks_own_model(tmp_path, capsys):
    case = TRANSFER_CASES["mlp_transfer_with_a_rank0_layer"]
    method, base = trained(case, open_task=False)
    directory = method.save_adapters(tmp_path / "adapters")
    lines = describe_adapters(directory).splitlines()
    assert lines[1].endswith("transfer_rank=4")
    # backbone.0's null rank was 0 in both tasks: its shared weights stayed, its transfer adapter trained.
    assert next(line for line in lines if line.startswith("backbone.0")).split() == [
        "backbone.0",
        "Linear",
        "12",
        "16",
        "no",
        "0",
        "0",
    ]
    start = next(i for i, line in enumerate(lines) if line.startswith("transfer rank per task"))
    assert lines[start + 1].split() == ["layer", "t1", "t2"]
    for i, layer in enumerate(method.layer_names, start=start + 2):
        assert lines[i].split() == [layer, *(str(method.transfers[t][layer][1].shape[0]) for t in (1, 2))]

    base_file = write_state_dict(tmp_path / "base_model.safetensors", base.state_dict())
    merged_file = tmp_path / "task1.safetensors"
    merge = ["adapters", str(directory), "--merge", "--base", str(base_file), "--out", str(merged_file)]
    capsys.readouterr()
    assert main([*merge, "--task", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote task 1's own merged model's state dict (" in out and f"to {merged_file}" in out
    fresh = mlp()
    fresh.load_state_dict(load_file(merged_file))
    x, _ = task_data(case, 99)
    torch.testing.assert_close(logits(fresh, x, 1), predictions(method, case, range(2))[1], atol=1e-5, rtol=1e-5)
    assert main([*merge, "--task", "0"]) == 2
    assert "merged_state_dict(task=0): task 0 has no transfer term to merge" in capsys.readouterr().err
    assert main(["adapters", str(directory), "--task", "1"]) == 2
    assert "--task J goes with --merge" in capsys.readouterr().err


def test_cli_refuses_adapters_for_other_methods_and_a_merge_without_files(tmp_path, capsys):
    run = ["run", "--benchmark", "split_digits", "--method", "ness", "finetune", "--out", str(tmp_path)]
    assert main([*run, "--quiet", "--save-adapters"]) == 2
    assert "--save-adapters works with NESS variants only; 'finetune'" in capsys.readouterr().err
    assert not tmp_path.joinpath("split_digits").exists()  # refused before any training
    assert main(["adapters", str(tmp_path), "--merge"]) == 2
    assert "--merge goes with --base" in capsys.readouterr().err
    assert main(["adapters", str(tmp_path / "none")]) == 2
    assert "no adapter directory" in capsys.readouterr().err


def test_only_a_method_that_says_so_saves_adapters(tmp_path):
    """The experiment asks the method's class (`saves_adapters`), and a method without adapters refuses clearly."""
    from ness.methods import METHODS, FineTune

    assert [name for name, cls in METHODS.items() if cls.saves_adapters] == ["ness"]
    with pytest.raises(TypeError, match="finetune learns no adapters"):
        FineTune(torch.nn.Linear(3, 2)).save_adapters(tmp_path)
