"""EWC and A-GEM on tiny multi-head nets, checked against the tests' own Fisher loops, penalties, reference
gradients and projections (never against the methods' own numbers)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.data import Benchmark, Split, Task
from ness.methods import FineTune, TaskOrderError
from ness.methods.agem import AGEM, AGEMConfig
from ness.methods.ewc import EWC, EWCConfig
from ness.models import MultiHeadNet, call_model, multi_head_mlp
from ness.trainer import TrainConfig, run_continual

DIM = 6

# ---------------------------------------------------------------------------------------------------------
# models, data and training
# ---------------------------------------------------------------------------------------------------------


def mlp(seed: int, heads=(3, 3, 3)) -> MultiHeadNet:
    torch.manual_seed(seed)
    return multi_head_mlp(DIM, [8], heads, bias=True)


def bn_net(seed: int, heads=(3, 3, 3)) -> MultiHeadNet:
    """Linear → BatchNorm1d (running statistics kept) → ReLU → Linear → ReLU, heads with biases."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(DIM, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    return MultiHeadNet(backbone, 8, heads, head_bias=True)


def task_data(t: int, n: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + t)
    return torch.randn(n, DIM, generator=g) + t, torch.randint(0, 3, (n,), generator=g)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def train(method, model, t, x, y, steps=5, lr=0.1):
    optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(call_model(model, x, t), y).backward()
        method.after_backward(t)
        optimizer.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def explicit_fisher(model, t, x, y, chunk=20) -> dict[str, torch.Tensor]:
    """§11 by hand on a copy: train mode, consecutive chunks of 20, 20·(grad of the chunk's mean CE)², / N."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for start in range(0, len(y), chunk):
        model.zero_grad()
        F.cross_entropy(model(x[start : start + chunk], t), y[start : start + chunk]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] += chunk * p.grad**2
    return {n: v / len(y) for n, v in total.items()}


def explicit_penalty(model, lam, fisher, anchor) -> torch.Tensor:
    return lam / 2 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------
# EWC
# ---------------------------------------------------------------------------------------------------------


def test_fisher_equals_explicit_chunked_loop():
    model = bn_net(0)
    method = EWC(model)
    x, y = task_data(0, n=50)  # chunks 20, 20, 10 across batches of 9: re-chunking and the constant 20 matter
    method.begin_task(0)
    train(method, model, 0, x, y)
    expected = explicit_fisher(model, 0, x, y)
    method.end_task(0, batches(x, y, size=9))
    assert method.fisher.keys() == expected.keys()
    for name, f in expected.items():
        torch.testing.assert_close(method.fisher[name], f, rtol=1e-5, atol=1e-12)
    # The check discriminates: chunks of the batches as given (9), or the last chunk weighed by its own size
    # (10·g² instead of 20·g²), would give another Fisher.
    w = "backbone.0.weight"
    as_given = explicit_fisher(model, 0, x, y, chunk=9)[w]
    last_squared = explicit_fisher(model, 0, x[40:], y[40:], chunk=10)[w]  # 10·g²/10 = g² of the last chunk
    own_size = expected[w] - 10 * last_squared / 50
    for other in (as_given, own_size):
        assert not torch.allclose(other, expected[w], rtol=1e-2, atol=0)


def test_fisher_covers_bn_and_heads_and_restores_the_model():
    model = bn_net(1)
    method = EWC(model)
    x, y = task_data(0)
    method.begin_task(0)
    train(method, model, 0, x, y)
    model.eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    method.end_task(0, batches(x, y))
    assert not model.training  # mode restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for n, b in model.named_buffers():  # the train-mode pass leaves BatchNorm's running statistics alone
        assert torch.equal(b, buffers[n]), n
    for name in ("backbone.1.weight", "backbone.1.bias", "task_heads.0.weight", "task_heads.0.bias"):
        assert float(method.fisher[name].min()) >= 0 and float(method.fisher[name].max()) > 0, name
    for name in ("task_heads.1.weight", "task_heads.2.bias"):  # heads of tasks not yet seen
        assert float(method.fisher[name].abs().max()) == 0, name

    # Task 1: head 0 is another task's head now, yet its Fisher (halved by the merge) keeps it penalized.
    method.begin_task(1)
    x1, y1 = task_data(1)
    train(method, model, 1, x1, y1)
    f0_head = method.fisher["task_heads.0.weight"].clone()
    method.end_task(1, batches(x1, y1))
    torch.testing.assert_close(method.fisher["task_heads.0.weight"], f0_head / 2)
    with torch.no_grad():
        before = float(method.penalty())
        model.task_heads[0].weight.add_(0.1)
        moved = float(method.penalty())
    expected = method.config.lam / 2 * float((method.fisher["task_heads.0.weight"] * 0.1**2).sum())
    assert math.isclose(moved - before, expected, rel_tol=1e-4)


def test_fisher_merge_and_anchor_over_three_tasks():
    model = bn_net(2)
    method = EWC(model)
    merged, anchors = None, []
    for t in range(3):
        x, y = task_data(t)
        method.begin_task(t)
        train(method, model, t, x, y, steps=4)
        new = explicit_fisher(model, t, x, y)
        merged = new if merged is None else {n: (new[n] + t * merged[n]) / (t + 1) for n in new}
        anchors.append(snapshot(model))
        method.end_task(t, batches(x, y, size=9))
        for name, f in merged.items():
            torch.testing.assert_close(method.fisher[name], f, rtol=1e-5, atol=1e-12)
            assert torch.equal(method.anchor[name], anchors[-1][name])  # θ* = the weights after the last task
    assert not all(torch.equal(anchors[0][n], anchors[2][n]) for n in anchors[0])


def setup_two_tasks(config: EWCConfig, seed: int = 3):
    """EWC after tasks 0 and 1, a few steps into task 2; with the tests' own merged Fisher and θ*."""
    model = bn_net(seed)
    method = EWC(model, config)
    merged = None
    for t in range(2):
        x, y = task_data(t)
        method.begin_task(t)
        train(method, model, t, x, y)
        new = explicit_fisher(model, t, x, y)
        merged = new if merged is None else {n: (new[n] + t * merged[n]) / (t + 1) for n in new}
        method.end_task(t, batches(x, y))
    anchor = snapshot(model)
    method.begin_task(2)
    x2, y2 = task_data(2)
    train(method, model, 2, x2, y2, steps=3, lr=0.5)
    return model, method, merged, anchor, (x2, y2)


def ce_and_penalty_grads(model, lam, fisher, anchor, x, y):
    """(CE gradient, CE + penalty gradient) of the trainable parameters, by autograd on the explicit loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    ce = F.cross_entropy(model(x, 2), y)
    ce_grads = torch.autograd.grad(ce, params, retain_graph=True)
    pen_grads = torch.autograd.grad(explicit_penalty(model, lam, fisher, anchor), params)
    return params, ce_grads, [c + p for c, p in zip(ce_grads, pen_grads, strict=True)]


def test_after_backward_adds_the_penalty_gradient():
    lam = 300.0
    model, method, fisher, anchor, (x, y) = setup_two_tasks(EWCConfig(lam=lam, clip_grad_norm=None))
    assert not all(torch.equal(p, anchor[n]) for n, p in model.named_parameters())
    params, ce_grads, expected = ce_and_penalty_grads(model, lam, fisher, anchor, x, y)
    pen_norm = math.sqrt(sum(float(((e - c) ** 2).sum()) for e, c in zip(expected, ce_grads, strict=True)))
    assert pen_norm > 1e-3, "the test needs a visible penalty gradient"
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, 2), y).backward()
    method.after_backward(2)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    assert model.task_heads[0].weight.grad is None  # not trainable in task 2: untouched
    torch.testing.assert_close(method.penalty(), explicit_penalty(model, lam, fisher, anchor), rtol=1e-5, atol=0)

    # An old head made trainable and moved: CE does not reach it, the penalty's gradient alone pulls it back.
    old_head = model.task_heads[0].weight
    old_head.requires_grad_(True)
    with torch.no_grad():
        old_head.add_(0.2)
    expected_head = torch.autograd.grad(explicit_penalty(model, lam, fisher, anchor), [old_head])[0]
    assert float(expected_head.abs().max()) > 1e-3
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, 2), y).backward()
    assert old_head.grad is None
    method.after_backward(2)
    torch.testing.assert_close(old_head.grad, expected_head, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_after_backward_clips_the_total_gradient_norm(clip):
    lam = 300.0
    model, method, fisher, anchor, (x, y) = setup_two_tasks(EWCConfig(lam=lam, clip_grad_norm=clip))
    params, _, expected = ce_and_penalty_grads(model, lam, fisher, anchor, x, y)
    norm = math.sqrt(sum(float((e**2).sum()) for e in expected))
    assert 0.05 < norm < 1e6
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, 2), y).backward()
    method.after_backward(2)
    scale = min(1.0, clip / norm)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e * scale, rtol=1e-4, atol=1e-8)
    got = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert math.isclose(got, min(norm, clip), rel_tol=1e-4)


def test_clipping_acts_in_the_first_task_too():
    model = mlp(0)
    method = EWC(model, EWCConfig(clip_grad_norm=0.01))
    x, y = task_data(0)
    method.begin_task(0)
    method.trainable_parameters(0)
    F.cross_entropy(model(x, 0), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    raw = [p.grad.clone() for p in params]
    norm = math.sqrt(sum(float((g**2).sum()) for g in raw))
    assert norm > 0.01
    method.after_backward(0)
    for p, g in zip(params, raw, strict=True):
        torch.testing.assert_close(p.grad, g * 0.01 / norm, rtol=1e-4, atol=1e-9)


def test_lambda_zero_is_fine_tuning_exactly():
    models = [bn_net(4), bn_net(4)]
    methods = [EWC(models[0], EWCConfig(lam=0.0, clip_grad_norm=None)), FineTune(models[1])]
    for model, method in zip(models, methods, strict=True):
        for t in range(3):
            x, y = task_data(t)
            method.begin_task(t)
            train(method, model, t, x, y, steps=4, lr=0.3)
            method.end_task(t, batches(x, y))
    ewc_state, finetune_state = models[0].state_dict(), models[1].state_dict()
    assert ewc_state.keys() == finetune_state.keys()
    for name, value in ewc_state.items():  # parameters and BatchNorm buffers, bit for bit
        assert torch.equal(value, finetune_state[name]), name


def test_large_lambda_keeps_task1_near_the_anchor():
    def run(lam: float) -> tuple[float, float, float]:
        model = mlp(5, heads=(3, 3))
        method = EWC(model, EWCConfig(lam=lam))
        x0, y0 = task_data(0)
        method.begin_task(0)
        train(method, model, 0, x0, y0, steps=30, lr=0.2)
        fisher = explicit_fisher(model, 0, x0, y0)
        anchor = snapshot(model)
        method.end_task(0, batches(x0, y0))
        with torch.no_grad():
            old_outputs = model(x0, 0)
        method.begin_task(1)
        x1, y1 = task_data(1, seed=9)
        train(method, model, 1, x1, y1, steps=150, lr=0.05)
        shared = [(n, p) for n, p in model.named_parameters() if not n.startswith("task_heads.1")]
        with torch.no_grad():
            weighted = sum(float((fisher[n] * (p - anchor[n]) ** 2).sum()) for n, p in shared)
            distance = math.sqrt(sum(float(((p - anchor[n]) ** 2).sum()) for n, p in shared))
            output_change = float((model(x0, 0) - old_outputs).abs().max())
        return weighted, distance, output_change

    # λ = 1500 makes lr·λ·max F ≈ 0.85 here: strong, yet below the step size 2 at which SGD on the quadratic
    # penalty would oscillate.
    free = run(0.0)
    held = run(1500.0)
    assert free[0] > 0 and free[1] > 0.3 and free[2] > 0.3
    assert held[0] < 0.03 * free[0]  # the Fisher-weighted move
    assert held[1] < 0.4 * free[1]  # the plain distance (low-Fisher directions may still move)
    assert held[2] < 0.3 * free[2]  # task 0's outputs


def test_ewc_diagnostics_record_penalty_and_fisher_statistics():
    lam = 50.0
    model = bn_net(6)
    method = EWC(model, EWCConfig(lam=lam))
    x0, y0 = task_data(0)
    method.begin_task(0)
    train(method, model, 0, x0, y0)
    f0, anchor0 = explicit_fisher(model, 0, x0, y0), snapshot(model)
    method.end_task(0, batches(x0, y0))
    method.begin_task(1)
    x1, y1 = task_data(1)
    train(method, model, 1, x1, y1)
    with torch.no_grad():
        penalty1 = float(explicit_penalty(model, lam, f0, anchor0))
    f1 = explicit_fisher(model, 1, x1, y1)
    method.end_task(1, batches(x1, y1))
    records = method.diagnostics()
    assert [r["task"] for r in records] == [0, 1]
    assert records[0]["penalty"] == 0.0 and records[0]["fisher_samples"] == 50
    assert penalty1 > 0 and math.isclose(records[1]["penalty"], penalty1, rel_tol=1e-5)
    for name, f in f0.items():
        merged = (f1[name] + f) / 2
        assert math.isclose(records[1]["fisher"][name]["mean"], float(merged.mean()), rel_tol=1e-5, abs_tol=1e-12)
        assert math.isclose(records[1]["fisher"][name]["max"], float(merged.max()), rel_tol=1e-5, abs_tol=1e-12)


def test_ewc_save_load_roundtrip(tmp_path):
    config = EWCConfig(lam=100.0)
    model, method, _, _, (x, y) = setup_two_tasks(config)
    torch.save(method.state_dict(), tmp_path / "ewc.pt")
    fresh = bn_net(999)
    loaded = EWC(fresh, config)
    loaded.load_state_dict(torch.load(tmp_path / "ewc.pt"))
    for name in method.fisher:
        assert torch.equal(loaded.fisher[name], method.fisher[name])
        assert torch.equal(loaded.anchor[name], method.anchor[name])
    for m, meth in ((model, method), (fresh, loaded)):
        train(meth, m, 2, x, y, steps=3)
        meth.end_task(2, batches(x, y))
    for name, p in model.named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[name], p), name
    assert loaded.diagnostics() == method.diagnostics()
    with pytest.raises(ValueError, match="EWCConfig"):
        EWC(bn_net(0), EWCConfig(lam=1.0)).load_state_dict(method.state_dict())


def test_ewc_needs_labels():
    model = mlp(0)
    method = EWC(model)
    method.begin_task(0)
    with pytest.raises(TypeError, match=r"end_task\(0\).*\(inputs, labels\)"):
        method.end_task(0, [torch.zeros(4, DIM)])


# ---------------------------------------------------------------------------------------------------------
# A-GEM
# ---------------------------------------------------------------------------------------------------------


def id_data(t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose first coordinate encodes a unique id, (100·t + i)/1000 (small, so it does not dominate the
    gradients), labels i mod 3."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(n, DIM, generator=g)
    x[:, 0] = (100 * t + torch.arange(n, dtype=torch.float32)) / 1000
    return x, torch.arange(n) % 3


def ids_of(x: torch.Tensor, t: int) -> torch.Tensor:
    """The position in task t's data of each row of id_data inputs."""
    return (x[:, 0] * 1000).round().long() - 100 * t


def test_memory_keeps_memory_per_task_distinct_examples_of_each_task():
    model = mlp(0)
    method = AGEM(model, AGEMConfig(memory_per_task=10))
    sizes = (37, 23, 5)  # the last task is smaller than memory_per_task: all of it is kept
    for t, n in enumerate(sizes):
        x, y = id_data(t, n)
        method.begin_task(t)
        method.end_task(t, batches(x, y, size=8))
        kept = method.memory_tasks == t
        rows, labels = method.memory_inputs[kept], method.memory_labels[kept]
        assert rows.shape[0] == min(10, n)
        assert rows.dtype == torch.float32 and rows.device.type == "cpu"
        ids = ids_of(rows, t)
        assert len(set(ids.tolist())) == rows.shape[0]  # distinct
        assert int(ids.min()) >= 0 and int(ids.max()) < n  # from task t
        assert torch.equal(rows, x[ids]) and torch.equal(labels, y[ids])
    assert method.memory_labels.numel() == 10 + 10 + 5
    assert [(r["stored"], r["memory_size"]) for r in method.diagnostics()] == [(10, 10), (10, 20), (5, 25)]


def test_memory_choice_is_uniform_over_the_task():
    n, k, runs = 10, 3, 400
    x, y = id_data(0, n)
    counts = torch.zeros(n)
    model = mlp(0)
    for seed in range(runs):
        method = AGEM(model, AGEMConfig(memory_per_task=k, seed=seed))
        method.begin_task(0)
        method.end_task(0, batches(x, y, size=4))
        counts[ids_of(method.memory_inputs, 0)] += 1
    frequency = counts / runs
    # Each example is kept with probability k/n = 0.3; 0.08 is about 3.5 binomial standard deviations.
    assert float((frequency - k / n).abs().max()) < 0.08, frequency


class Spy:
    """A forward that records which task's head each call used and the inputs it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, model, x, task):
        self.calls.append((task, x.detach().clone()))
        return call_model(model, x, task)


def agem_after_tasks(sizes, config, seed=0, forward=call_model, model=None):
    model = mlp(seed, heads=(3,) * (len(sizes) + 1)) if model is None else model
    method = AGEM(model, config, forward)
    data = []
    for t, n in enumerate(sizes):
        x, y = id_data(t, n)
        data.append((x, y))
        method.begin_task(t)
        train(method, model, t, x, y, steps=10, lr=0.3)
        method.end_task(t, batches(x, y))
    method.begin_task(len(sizes))
    method.trainable_parameters(len(sizes))
    model.zero_grad(set_to_none=True)
    return model, method, data


def own_head_reference(model, data, params):
    """∇ of (Σ_tasks Σ_examples CE through the example's own head) / count, over the whole memory."""
    count = sum(len(y) for _, y in data)
    loss = sum(F.cross_entropy(model(x, t), y, reduction="sum") for t, (x, y) in enumerate(data)) / count
    return torch.autograd.grad(loss, params, allow_unused=True)


def flat(tensors, like):
    """One float64 vector of per-parameter tensors, zeros where a tensor is None."""
    parts = [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for g, p in zip(tensors, like, strict=True)]
    return torch.cat(parts)


def test_projection_matches_hand_computation_and_removes_the_conflict():
    # memory_per_task and memory_batch_size exceed the tasks: the reference batch is the whole memory.
    model, method, data = agem_after_tasks((6, 5), AGEMConfig(memory_per_task=50, memory_batch_size=1000))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = own_head_reference(model, data, params)
    r = flat(reference, params)
    current = {id(p) for p in model.task_heads[2].parameters()}
    assert [ref is None for ref in reference] == [id(p) in current for p in params]  # only the current head
    g_gen = torch.Generator().manual_seed(5)
    noise = [torch.randn(p.shape, generator=g_gen) for p in params]
    for p, ref, e in zip(params, reference, noise, strict=True):  # g = −2·g_ref + noise: a conflict
        p.grad = e if ref is None else -2 * ref + 0.3 * e
    g = flat([p.grad for p in params], params)
    assert float(g @ r) < 0
    head_grads = [p.grad.clone() for p in model.task_heads[2].parameters()]
    method.after_backward(2)
    expected = g - (g @ r) / (r @ r) * r
    got = flat([p.grad for p in params], params)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(got @ r)) <= 1e-5 * float(g.norm() * r.norm())  # g·g_ref ≥ 0 up to round-off
    for p, before in zip(model.task_heads[2].parameters(), head_grads, strict=True):
        assert torch.equal(p.grad, before)  # g_ref = 0 on the current head: bit for bit unchanged
    assert model.task_heads[0].weight.grad is None  # old heads are not trainable and get no .grad

    # A reference through the current head instead of each example's own would give another projection.
    wrong = torch.autograd.grad(sum(F.cross_entropy(model(x, 2), y, reduction="sum") for x, y in data) / 11, params)
    w = flat(wrong, params)
    assert float((g - (g @ w) / (w @ w) * w - expected).norm()) > 1e-2 * float(expected.norm())


def test_no_conflict_leaves_the_gradient_bit_for_bit():
    model, method, data = agem_after_tasks((6, 5), AGEMConfig(memory_per_task=50, memory_batch_size=1000))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = own_head_reference(model, data, params)
    g_gen = torch.Generator().manual_seed(6)
    for p, ref in zip(params, reference, strict=True):
        p.grad = torch.randn(p.shape, generator=g_gen) if ref is None else ref + 0.1 * torch.randn(p.shape)
    assert float(flat([p.grad for p in params], params) @ flat(reference, params)) > 0
    before = [p.grad.clone() for p in params]
    method.after_backward(2)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    x, y = id_data(2, 6)
    method.end_task(2, batches(x, y))
    assert method.diagnostics()[-1]["reference_gradients"] == 1 and method.diagnostics()[-1]["projected"] == 0


def test_unreached_parameters_keep_their_grad():
    model = mlp(0)
    model.extra = nn.Parameter(torch.ones(3))  # trainable, on no path: no .grad, and none after the projection
    model, method, data = agem_after_tasks((6, 5), AGEMConfig(memory_per_task=50, memory_batch_size=1000), model=model)
    assert model.extra.requires_grad
    params = [p for p in model.parameters() if p.requires_grad]
    reference = own_head_reference(model, data, params)
    for p, ref in zip(params, reference, strict=True):
        if ref is not None:
            p.grad = -ref.clone()
    first = model.backbone[0].weight
    first.grad = None  # reached by the memory loss only: g = 0 there, and the projection gives it −c·g_ref
    head = model.task_heads[2].weight
    head.grad = torch.full_like(head, 0.5)
    g = flat([p.grad for p in params], params)
    r = flat(reference, params)
    expected = g - (g @ r) / (r @ r) * r
    method.after_backward(2)
    assert model.extra.grad is None
    assert torch.equal(head.grad, torch.full_like(head, 0.5))
    torch.testing.assert_close(flat([p.grad for p in params], params), expected, rtol=1e-5, atol=1e-7)
    assert first.grad is not None and float(first.grad.abs().max()) > 1e-4


def test_reference_pass_leaves_batchnorm_statistics_and_mode_alone():
    model = bn_net(2)
    model, method, data = agem_after_tasks((9, 7), AGEMConfig(memory_per_task=5), model=model)
    model.train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    method.after_backward(2)
    assert model.training
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    with torch.no_grad():  # a train-mode forward would have moved them: the check above is not vacuous
        model(data[0][0], 0)
    assert not torch.equal(model.backbone[1].running_mean, buffers["backbone.1.running_mean"])


def test_each_memory_example_goes_through_its_own_head():
    spy = Spy()
    model, method, data = agem_after_tasks((9, 7), AGEMConfig(memory_per_task=4, memory_batch_size=5), forward=spy)
    # Make the heads clearly different, so a wrong head would change the loss.
    with torch.no_grad():
        model.task_heads[0].weight.mul_(3)
        model.task_heads[1].weight.neg_()
    for _ in range(6):
        spy.calls.clear()
        for p in model.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        method.after_backward(2)
        drawn = []
        for task, x in spy.calls:
            ids = ids_of(x, task)
            assert task in (0, 1)
            assert int(ids.min()) >= 0 and int(ids.max()) < len(data[task][1]), (task, ids)
            assert torch.equal(x, data[task][0][ids])  # the example went through head `task`, its own
            drawn += [(task, i) for i in ids.tolist()]
        assert len(drawn) == len(set(drawn)) == 5  # memory_batch_size examples, without replacement


def test_memory_sampling_is_seeded_and_survives_save_load(tmp_path):
    config = AGEMConfig(memory_per_task=6, memory_batch_size=4, seed=3)

    def steps(model, method, spy, k):
        spy.calls.clear()
        x, y = id_data(2, 12)
        train(method, model, 2, x, y, steps=k, lr=0.3)
        return [(task, x[:, 0].tolist()) for task, x in spy.calls]

    spies = [Spy(), Spy(), Spy()]
    runs = [agem_after_tasks((12, 12), config, forward=spies[0]), agem_after_tasks((12, 12), config, forward=spies[1])]
    other = agem_after_tasks((12, 12), AGEMConfig(memory_per_task=6, memory_batch_size=4, seed=4), forward=spies[2])
    assert torch.equal(runs[0][1].memory_inputs, runs[1][1].memory_inputs)
    assert not torch.equal(runs[0][1].memory_inputs, other[1].memory_inputs)
    log_a, log_b = steps(*runs[0][:2], spies[0], 3), steps(*runs[1][:2], spies[1], 3)
    assert log_a == log_b
    assert log_a != steps(*other[:2], spies[2], 3)

    model, method, _ = runs[0]
    torch.save(method.state_dict(), tmp_path / "agem.pt")
    fresh_spy = Spy()
    fresh = mlp(77, heads=(3, 3, 3))
    loaded = AGEM(fresh, config, fresh_spy)
    loaded.load_state_dict(torch.load(tmp_path / "agem.pt"))
    assert torch.equal(loaded.memory_inputs, method.memory_inputs)
    assert steps(model, method, spies[0], 4) == steps(fresh, loaded, fresh_spy, 4)
    for name, p in model.named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[name], p), name
    x, y = id_data(2, 12)
    method.end_task(2, batches(x, y))
    loaded.end_task(2, batches(x, y))
    assert torch.equal(loaded.memory_inputs, method.memory_inputs)
    assert loaded.diagnostics() == method.diagnostics()
    with pytest.raises(ValueError, match="AGEMConfig"):
        AGEM(mlp(0), AGEMConfig(seed=9)).load_state_dict(method.state_dict())


def test_projection_rate_counts_conflicts():
    model, method, data = agem_after_tasks((6, 5), AGEMConfig(memory_per_task=50, memory_batch_size=1000))
    params = [p for p in model.parameters() if p.requires_grad]
    reference = own_head_reference(model, data, params)
    for sign in (-1, 1, -1, -1):
        for p, ref in zip(params, reference, strict=True):
            p.grad = torch.zeros_like(p) if ref is None else sign * ref.clone()
        method.after_backward(2)
    x, y = id_data(2, 6)
    method.end_task(2, batches(x, y))
    last = method.diagnostics()[-1]
    assert last["task"] == 2 and last["reference_gradients"] == 4 and last["projected"] == 3
    assert last["projection_rate"] == 0.75
    assert method.diagnostics()[0]["projection_rate"] is None  # task 0 has no memory to compare with


# ---------------------------------------------------------------------------------------------------------
# both: the trainer, configs, hook order
# ---------------------------------------------------------------------------------------------------------


def tiny_benchmark() -> Benchmark:
    g = torch.Generator().manual_seed(0)

    def split(t: int, n: int) -> Split:
        y = torch.arange(n) % 2
        return Split((2 * y[:, None] - 1) * (t + 1) + torch.randn(n, DIM, generator=g), y)

    tasks = tuple(Task(f"t{t}", 2, split(t, 40), split(t, 16), split(t, 20), lambda x: x.float()) for t in range(3))
    return Benchmark("tiny", tasks, input_shape=(DIM,), shared_head=False, details={})


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
@pytest.mark.parametrize("name", ["ewc", "agem"])
def test_methods_run_in_the_trainer(name, sam_rho):
    bench = tiny_benchmark()
    model = multi_head_mlp(DIM, [8], [2, 2, 2])
    method = EWC(model, EWCConfig(lam=10.0)) if name == "ewc" else AGEM(model, AGEMConfig(10, 8))
    config = TrainConfig(epochs=2, lr=0.05, batch_size=8, test_batch_size=16, sam_rho=sam_rho)
    result = run_continual(model, method, bench, config, seed=0, progress=False)
    records = result["diagnostics"]
    assert [r["task"] for r in records] == [0, 1, 2]
    assert all(0 < acc <= 100 for acc in result["acc_matrix"][-1])
    if name == "ewc":
        assert [r["fisher_samples"] for r in records] == [40, 40, 40]  # the whole training split
    else:
        # One reference gradient per after_backward: per step, two under SAM; 40 examples in batches of 8.
        steps = [log["epochs"] * 5 * (2 if sam_rho else 1) for log in result["tasks"]]
        assert [r["reference_gradients"] for r in records] == [0, *steps[1:]]
        assert [r["memory_size"] for r in records] == [10, 20, 30]


@pytest.mark.parametrize(
    ("config", "kwargs", "field"),
    [
        (EWCConfig, {"lam": -1.0}, "lam"),
        (EWCConfig, {"lam": math.inf}, "lam"),
        (EWCConfig, {"lam": "5000"}, "lam"),
        (EWCConfig, {"fisher_batch_size": 0}, "fisher_batch_size"),
        (EWCConfig, {"fisher_batch_size": 2.5}, "fisher_batch_size"),
        (EWCConfig, {"clip_grad_norm": 0.0}, "clip_grad_norm"),
        (EWCConfig, {"clip_grad_norm": math.nan}, "clip_grad_norm"),
        (AGEMConfig, {"memory_per_task": 0}, "memory_per_task"),
        (AGEMConfig, {"memory_per_task": 10.0}, "memory_per_task"),
        (AGEMConfig, {"memory_batch_size": 0}, "memory_batch_size"),
        (AGEMConfig, {"seed": -1}, "seed"),
        (AGEMConfig, {"seed": True}, "seed"),
    ],
)
def test_bad_config_values_name_the_field(config, kwargs, field):
    with pytest.raises(ValueError, match=rf"{config.__name__}\.{field}: got {re.escape(repr(kwargs[field]))}; "):
        config(**kwargs)


def test_config_boundaries_are_accepted():
    EWCConfig(lam=0.0, fisher_batch_size=1, clip_grad_norm=None)
    AGEMConfig(memory_per_task=1, memory_batch_size=1, seed=0)


@pytest.mark.parametrize("cls", [EWC, AGEM])
def test_hooks_out_of_order_raise(cls):
    method = cls(mlp(0))
    x, y = task_data(0)
    with pytest.raises(TaskOrderError, match=r"after_backward\(0\)"):
        method.after_backward(0)
    with pytest.raises(TaskOrderError, match=r"end_task\(0\)"):
        method.end_task(0, batches(x, y))
    with pytest.raises(TaskOrderError, match=r"begin_task\(1\) out of order"):
        method.begin_task(1)
    method.begin_task(0)
    with pytest.raises(TaskOrderError, match=r"after_backward\(1\)"):
        method.after_backward(1)
