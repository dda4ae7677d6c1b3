"""A user's own loop, model and names: what trains is what the user is told, and a loop that breaks what NESS relies
on (a stale optimiser, a frozen weight trained anyway, a skipped after_step, a bad loader at end_task) is refused
with an error that leaves the method as it was. Checked against explicit computations on small synthetic tasks."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches
from ness import NESS, NESSConfig, NullSpaceAdapter, TrainingLoopError

IN, HIDDEN, CLASSES = 16, 32, 6


class SharedClassifierNet(nn.Module):
    """An MLP whose one `classifier` serves every task (global labels 0..5), as in the README."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class OwnHeadsNet(nn.Module):
    """Per-task heads in a ModuleList the user named `heads` (not the declared `task_heads`), picked by hand."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 2) for _ in range(tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.features(x))


def task_data(t: int, n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t: two Gaussian classes (global labels 2t, 2t+1) inside task t's own 4-dimensional input subspace, so
    every task leaves null directions for the next."""
    g = torch.Generator().manual_seed(10 + t)
    basis = torch.linalg.qr(torch.randn(IN, IN, generator=torch.Generator().manual_seed(0)))[0][:, 4 * t : 4 * t + 4]
    y = torch.arange(n) % 2
    means = torch.randn(2, 4, generator=g) * 3
    z = means[y] + 0.5 * torch.randn(n, 4, generator=g)
    return z @ basis.T, y + 2 * t


def train_shared(method: NESS, model: nn.Module, t: int, optimizer: torch.optim.Optimizer, after_step: bool = True):
    x, y = task_data(t)
    for _ in range(30):
        for xb, yb in batches(x, y, 32):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step:
                method.after_step(t)


def accuracy(model: nn.Module, t: int) -> float:
    """Task-incremental accuracy on task t: the argmax over task t's own two classes of the shared classifier."""
    x, y = task_data(t)
    with torch.no_grad():
        return float((model(x)[:, 2 * t : 2 * t + 2].argmax(1) + 2 * t == y).float().mean())


# -- 1. what trains fully: modules_to_save; excluded layers are named when frozen ------------------------------------
def test_shared_classifier_in_modules_to_save_keeps_training_and_is_never_adapted(caplog):
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["classifier"]))
    assert method.layer_names == ["features.0", "features.2"]
    for t in range(3):
        method.begin_task(t)
        if t == 1:
            classifier_before = model.classifier.weight.detach().clone()
        optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.05, momentum=0.9)
        train_shared(method, model, t, optimizer)
        if t == 1:
            assert not torch.equal(model.classifier.weight, classifier_before)  # it trained in task 1
        method.end_task(t, batches(*task_data(t), 32))
    # Without the fix the frozen classifier scores 0 % on tasks 1 and 2 (their classes were never trained).
    assert accuracy(model, 1) > 0.9 and accuracy(model, 2) > 0.9
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "classifier" in r.getMessage()]


def test_excluded_classifier_is_frozen_with_a_warning_naming_it(caplog):
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.05, exclude=["classifier"]))
    method.begin_task(0)
    method.end_task(0, batches(*task_data(0), 32))
    with caplog.at_level(logging.WARNING, logger="ness"):
        method.begin_task(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "classifier (Linear): excluded by NESSConfig.exclude" in warnings[0]
    assert "modules_to_save" in warnings[0]
    assert not model.classifier.weight.requires_grad
    roles = {r.module: r for r in method.layer_roles(1)}
    assert (roles["classifier"].status, roles["classifier"].reason) == ("frozen", "excluded")


def test_own_heads_train_when_listed_in_modules_to_save_and_are_frozen_with_a_warning_when_excluded(caplog):
    torch.manual_seed(0)
    model = OwnHeadsNet()
    with caplog.at_level(logging.WARNING, logger="ness"):
        excluded = NESS(
            copy.deepcopy(model), NESSConfig(transfer_rank=0, eps1=0.05, exclude=["heads.*"]), lambda m, x, t: m(x, t)
        )
        excluded.begin_task(0)
        excluded.end_task(0, batches(*task_data(0), 32))
        excluded.begin_task(1)
    message = " ".join(caplog.messages)
    assert all(f"heads.{i} (Linear): excluded" in message for i in range(3))

    method = NESS(
        model, NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["heads"]), forward=lambda m, x, t: m(x, t)
    )
    assert method.saved_modules == ["heads"] and method.layer_names == ["features.0"]
    for t in range(2):
        method.begin_task(t)
        head = model.heads[t].weight.detach().clone()
        optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.1)
        x, y = task_data(t)
        for _ in range(20):
            optimizer.zero_grad()
            F.cross_entropy(model(x, t), y - 2 * t).backward()
            optimizer.step()
        assert not torch.equal(model.heads[t].weight, head)
        method.end_task(t, batches(x, y, 32))
    x1, y1 = task_data(1)
    assert float((model(x1, 1).argmax(1) == y1 - 2).float().mean()) > 0.9


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_own_heads_left_to_nesss_defaults_are_adapted_and_those_no_task_called_yet_train_freely(memory, caplog):
    """Heads NESS was not told about (the README's defaults, nothing excluded): heads.1 and heads.2 see no input in
    task 0, so begin_task(1) gives them U = their whole input space (a zero covariance) and says so; head 0, which
    task 1 never calls, gets no transfer adapter and stays exactly as task 0 left it."""
    torch.manual_seed(0)
    model = OwnHeadsNet()
    method = NESS(model, NESSConfig(memory=memory), forward=lambda m, x, t: m(x, t))
    x0, y0 = task_data(0)
    x1, y1 = task_data(1)
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x0, 0), y0).backward()
        optimizer.step()
    method.end_task(0, batches(x0, y0, 32))
    task0_logits = model(x0, 0).detach()
    with caplog.at_level(logging.WARNING, logger="ness"):
        method.begin_task(1, batches(x1, y1, 32))
    assert "heads.1, heads.2 received no input in the finished tasks" in " ".join(caplog.messages)
    records = {r["layer"]: r for r in method.records if r["task"] == 1}
    assert records["heads.1"]["rank"] == records["heads.2"]["rank"] == HIDDEN  # every direction is free
    assert "transfer_rank" not in records["heads.0"]  # task 1 never calls head 0
    head = model.get_submodule("heads.1").base.weight.detach().clone()
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x1, 1), y1 - 2).backward()
        optimizer.step()
    method.end_task(1, batches(x1, y1, 32))
    assert not torch.equal(model.heads[1].weight, head)  # merged: the head learnt task 1
    assert float((method.predict(x1, 1).argmax(1) == y1 - 2).float().mean()) > 0.9
    assert float((method.predict(x0, 0).argmax(1) == task0_logits.argmax(1)).float().mean()) == 1.0


def test_a_misspelt_exclude_or_modules_to_save_entry_is_an_error():
    with pytest.raises(ValueError, match=r"exclude: entry 'clasifier' matches no module"):
        NESS(SharedClassifierNet(), NESSConfig(transfer_rank=0, exclude=["clasifier"]))
    with pytest.raises(ValueError, match=r"modules_to_save: entry 'clasifier' matches no module"):
        NESS(SharedClassifierNet(), NESSConfig(transfer_rank=0, modules_to_save=["clasifier"]))


# -- 2. a stale optimiser, a frozen weight trained anyway -------------------------------------------------------------
def open_task1(model: nn.Module, config: NESSConfig) -> NESS:
    method = NESS(model, config)
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.05)
    train_shared(method, model, 0, optimizer)
    method.end_task(0, batches(*task_data(0), 32))
    method.begin_task(1)
    return method


def test_begin_task_freezes_what_the_task_does_not_train_even_without_trainable_parameters():
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = open_task1(model, NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["classifier"]))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {f"{name}.V" for name in method.active}
    assert adapted and trains == adapted | {"classifier.weight", "classifier.bias"}


def test_an_optimiser_made_before_task0_misses_the_new_vs_and_end_task_refuses():
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["classifier"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # once, before task 0: the common habit
    method.begin_task(0)
    train_shared(method, model, 0, optimizer)
    method.end_task(0, batches(*task_data(0), 32))
    method.begin_task(1)
    train_shared(method, model, 1, optimizer)
    assert all(not layer.adapter.V.any() for layer in method.active.values())  # V never moved
    with pytest.raises(
        TrainingLoopError, match=r"no adapter's V \(or transfer A\) moved during task 1.*trainable_parameters\(1\)"
    ):
        method.end_task(1, batches(*task_data(1), 32))
    assert method.active_task == 1 and method.tasks_done == 1  # the task stays open


def test_a_frozen_weight_the_loop_trained_anyway_is_named_at_end_task():
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = open_task1(model, NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["classifier"]))
    model.requires_grad_(True)  # e.g. a loop that unfreezes everything, then trains model.parameters()
    train_shared(method, model, 1, torch.optim.SGD(model.parameters(), lr=0.05))
    with pytest.raises(TrainingLoopError, match=r"froze for task 1 changed during it: features\.0\.base\.weight"):
        method.end_task(1, batches(*task_data(1), 32))


def test_a_correct_loop_passes_the_checks():
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = open_task1(model, NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["classifier"]))
    train_shared(method, model, 1, torch.optim.SGD(method.trainable_parameters(1), lr=0.05))
    method.end_task(1, batches(*task_data(1), 32))
    assert method.tasks_done == 2


# -- 3./4. the summary of what trains; nn.MultiheadAttention, embeddings, LSTM, LayerNorm ------------------------------
class SequenceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.task_heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(3))

    def forward(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        h = self.embed(tokens)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.proj(self.lstm(h)[0]).relu().mean(dim=1)
        return self.task_heads[task](h)


def sequence_task(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return torch.randint(0, 20, (24, 5), generator=g), torch.randint(0, 2, (24,), generator=g)


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_multihead_attention_is_skipped_with_a_reason_and_every_layer_is_summarised(memory, caplog):
    torch.manual_seed(0)
    model = SequenceNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.5, memory=memory))
    assert method.layer_names == ["proj"]  # attn.out_proj is never called as a layer: not picked
    with caplog.at_level(logging.INFO, logger="ness"):
        for t in range(3):
            method.begin_task(t)
            optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.1)
            x, y = sequence_task(t)
            for _ in range(3):
                optimizer.zero_grad()
                F.cross_entropy(model(x, t), y).backward()
                optimizer.step()
            if t == 1:
                roles = {r.module: (r.status, r.reason) for r in method.layer_roles(1)}
            method.end_task(t, [(x, y)])
    assert roles == {
        "embed": ("frozen", "not_adaptable"),
        "attn": ("frozen", "not_adaptable"),
        "attn.out_proj": ("frozen", "unreachable"),
        "norm": ("frozen", "not_adaptable"),
        "lstm": ("frozen", "not_adaptable"),
        "proj": ("adapted", "adapted"),
        "task_heads.0": ("frozen", "other_head"),
        "task_heads.1": ("trains", "head"),
        "task_heads.2": ("frozen", "other_head"),
    }
    warnings = [r.getMessage() for r in caplog.records if "frozen from now on" in r.getMessage()]
    assert len(warnings) == 1  # once, at task 1: task 2 freezes nothing new
    for module in ("embed (Embedding)", "attn (MultiheadAttention)", "norm (LayerNorm)", "lstm (LSTM)"):
        assert module in warnings[0]
    assert "never calls its forward" in warnings[0]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "what trains" in r.getMessage()]
    rank = method.diagnostics()[0]["rank"]
    assert len(info) == 2
    line = next(line for line in info[0].splitlines() if line.startswith("  proj "))
    assert line.startswith(f"  proj           Linear: adapted, rank {rank} of 8; only V trains; bias frozen")
    assert line.endswith(f"({rank * 8} trainable)")
    assert "task_heads.1 (Linear): trains, head of task 1" in info[0]


def test_targeting_multihead_attentions_out_proj_is_an_error_that_says_why():
    with pytest.raises(ValueError, match=r"target 'out_proj' matches only layers it cannot adapt.*never calls"):
        NESS(SequenceNet(), NESSConfig(transfer_rank=0, target_modules=["out_proj"]))


def test_a_layer_at_rank_zero_is_reported_frozen_with_its_threshold(caplog):
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.01, modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(96, IN, generator=g)  # full rank: σ_min ≈ √96 − √16 ≫ τ = 0.01·‖X‖_F ≈ 0.4
    method.begin_task(0)
    method.end_task(0, [(x0, torch.zeros(96, dtype=torch.long))])
    with caplog.at_level(logging.WARNING, logger="ness"):
        method.begin_task(1)
    sigma = torch.linalg.svdvals(x0.double())
    assert float(sigma.min()) > 0.01 * float(sigma.norm())
    role = next(r for r in method.layer_roles(1) if r.module == "features.0")
    assert (role.status, role.reason, role.trainable) == ("frozen", "rank0", 0)
    assert role.detail.startswith("rank 0 of 16") and "raise ε₁" in role.detail
    assert "features.0 (Linear): rank 0 of 16" in caplog.text
    assert not model.features[0].weight.requires_grad


# -- 6. certified stability holds whatever the loop does ---------------------------------------------------------------
def test_certified_stability_is_refused_at_end_task_when_the_loop_skips_after_step():
    torch.manual_seed(0)
    epsilon = 1e-3
    model = SharedClassifierNet()
    method = open_task1(model, NESSConfig(transfer_rank=0, eps1=0.3, max_output_shift=epsilon))
    x0, _ = task_data(0)
    weight_before = model.features[0].base.weight.detach().double().clone()
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.5)
    x1, y1 = task_data(1)
    x1 = x1 + x0  # task 1 overlaps task 0's inputs, so its V moves them
    for _ in range(50):  # a loop that never calls method.after_step(1)
        optimizer.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        optimizer.step()
    first = method.active["features.0"].adapter
    unclipped = ((x0.double() @ (first.U @ first.V).double()).norm(dim=1) ** 2).max()
    assert unclipped > 10 * epsilon  # what would have been merged (0.014)
    with pytest.raises(
        TrainingLoopError, match=r"the constraint on V \(max_output_shift=0.001, output_budget=None\) does not hold"
    ):
        method.end_task(1, batches(*task_data(1), 32))
    method.after_step(1)  # what the message says to do
    method.end_task(1, batches(*task_data(1), 32))
    delta = model.features[0].weight.detach().double() - weight_before  # (o, d)
    shifts = (x0.double() @ delta.T).norm(dim=1) ** 2  # every task-0 input of the first layer, by hand
    assert float(shifts.max()) <= epsilon * (1 + 1e-4)


# -- 7. end_task completes or leaves everything as it was -------------------------------------------------------------
def snapshot(method: NESS) -> dict:
    return {
        "state": {k: v.clone() for k, v in method.model.state_dict().items()},
        "modules": [type(m).__name__ for m in method.model.modules()],
        "records": copy.deepcopy(method.records),
        "deltas": len(method.task_deltas),
        "covariances": {k: v.clone() for k, v in method.covariances.items()},
        "probes": {k: len(v) for k, v in method.probes.items()},
        "replay": len(method.replay),
        "generator": method._probe_generator.get_state().clone(),
        "open": (method.active_task, method.tasks_done, list(method.active)),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), torch.Tensor):
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_a_failed_end_task_changes_nothing_and_a_retry_equals_a_run_that_never_failed(memory):
    config = NESSConfig(transfer_rank=0, eps1=0.05, modules_to_save=["classifier"], memory=memory)

    def task1_trained() -> NESS:
        torch.manual_seed(0)
        model = SharedClassifierNet()
        method = open_task1(model, config)
        train_shared(method, model, 1, torch.optim.SGD(method.trainable_parameters(1), lr=0.05))
        return method

    reference = task1_trained()
    reference.end_task(1, batches(*task_data(1), 32))

    method = task1_trained()
    before = snapshot(method)
    x1, y1 = task_data(1)
    refused = {
        "covariance": r"SharedClassifierNet.forward does not take its keys \['input'\]",  # passed as keywords
        "replay": r"end_task\(1\): memory='replay' keeps tensor inputs",
    }
    with pytest.raises(TypeError, match=refused[memory]):
        method.end_task(1, [{"input": x1[i : i + 32], "label": y1[i : i + 32]} for i in range(0, 96, 32)])
    assert_same(before, snapshot(method))
    with pytest.raises(ValueError, match=r"end_task\(1\): the task's loader yielded no batches"):
        method.end_task(1, [])
    assert_same(before, snapshot(method))
    assert isinstance(method.model.features[0], NullSpaceAdapter)

    method.end_task(1, batches(x1, y1, 32))
    assert_same(snapshot(reference), snapshot(method))
    method.begin_task(2)  # the next task sees exactly one finished later task
    assert [r["task"] for r in method.diagnostics()].count(1) == len(method.layer_names)


# -- 10. replay goes through the model in evaluation-sized batches ----------------------------------------------------
def test_replay_passes_through_the_model_in_batches_of_replay_batch_size():
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = open_task1(
        model,
        NESSConfig(transfer_rank=0, eps1=0.05, memory="replay", replay_batch_size=40, modules_to_save=["classifier"]),
    )
    train_shared(method, model, 1, torch.optim.SGD(method.trainable_parameters(1), lr=0.05))
    method.end_task(1, batches(*task_data(1), 32))
    seen: list[int] = []
    handle = model.features.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    method.begin_task(2)
    handle.remove()
    assert seen == [40, 40, 16, 40, 40, 16]  # 96 stored inputs of each of tasks 0 and 1, never all at once
    # The covariance of the first layer is the explicit Σxxᵀ over both tasks' inputs, whatever the batching.
    rows = torch.cat([task_data(0)[0], task_data(1)[0]]).double()
    record = next(r for r in method.diagnostics() if r["task"] == 2 and r["layer"] == "features.0")
    expected = torch.linalg.eigvalsh(rows.T @ rows).clamp(min=0).sqrt()
    found = torch.tensor(record["singular_values"][::-1], dtype=torch.float64)
    torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6 * float(expected.max()))


# -- 9. a null basis that keeps nearly every direction of anisotropic inputs is flagged ------------------------------
@pytest.mark.parametrize(("eps1", "flagged"), [(0.15, True), (0.05, False)])
def test_a_layer_whose_u_carries_most_of_the_old_inputs_energy_is_flagged(eps1, flagged, caplog):
    """A nuclear-rule ε₁ that keeps all but the dominant direction: U then carries most of the old inputs' energy
    Σ‖x‖², which the record states (checked by hand) and a warning flags; a smaller ε₁ keeps a small share."""
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=eps1, threshold="nuclear"))
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([1.0] + [0.5] * 7 + [0.05] * 8)  # one dominant direction, 7 mid ones, 8 quiet ones
    x0 = torch.randn(256, IN, generator=g) * scales
    method.begin_task(0)
    method.end_task(0, [(x0, torch.zeros(256, dtype=torch.long))])
    with caplog.at_level(logging.WARNING, logger="ness"):
        method.begin_task(1)
    sigma = torch.linalg.svdvals(x0.double()).flip(0)  # ascending
    r = int((sigma <= eps1 * sigma.sum()).sum())
    share = float((sigma[:r] ** 2).sum() / (sigma**2).sum())
    record = next(r for r in method.diagnostics() if r["layer"] == "features.0")
    assert record["rank"] == r and abs(record["energy_share_U"] - share) < 1e-9
    assert (share >= 0.5) == flagged
    assert ("features.0 (Linear): rank" in caplog.text and "protects little" in caplog.text) == flagged


def test_a_failed_begin_task_changes_nothing_and_can_be_retried():
    torch.manual_seed(0)
    model = SharedClassifierNet()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.05))
    method.begin_task(0)
    method.end_task(0, batches(*task_data(0), 32))
    before = snapshot(method)
    good = method.covariances["features.2"].clone()
    method.covariances["features.2"][0, 0] = float("nan")  # the second layer's basis cannot be computed
    with pytest.raises(ValueError, match=r"features\.2: the input covariance holds NaN"):
        method.begin_task(1)
    method.covariances["features.2"] = good
    assert_same(before, snapshot(method))  # the first layer was not wrapped, no record was added, no task is open
    assert all(p.requires_grad for p in model.parameters())
    method.begin_task(1)
    assert method.active_task == 1 and isinstance(model.features[0], NullSpaceAdapter)
