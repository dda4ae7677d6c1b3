"""Tests of the NESS method end to end on small synthetic tasks, checked against the tests' own hooks,
im2col and eigendecompositions (never against the library's own numbers)."""

from __future__ import annotations

import copy
import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches as _batches
from method_steps import train
from ness import NESS, NESSConfig, NullSpaceAdapter
from ness.data.tasks import PixelTransform, Split, Task
from ness.methods import TaskOrderError
from ness.models import MultiHeadNet, call_model, multi_head_mlp
from ness.subspace import UnsupportedLayerError
from ness.trainer import check_labels

batches = functools.partial(_batches, size=16)

# ---------------------------------------------------------------------------------------------------------
# models, data and training
# ---------------------------------------------------------------------------------------------------------


def conv_model(seed, heads=(3, 3)):
    """Conv2d (stride 2, padding 1) → ReLU → flatten → Linear backbone: 2×6×6 inputs, 3×3 conv outputs."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 16, bias=False),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 16, heads)


def mlp_model(seed, heads=(3, 3)):
    torch.manual_seed(seed)
    return multi_head_mlp(12, [24, 24], heads)


def bn_model(seed, heads=(3, 3)):
    """Conv and Linear layers with BatchNorm between them."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 16, heads)


MODELS = {"conv": conv_model, "mlp": mlp_model, "bn": bn_model}


def task_data(kind, task, seed, n=32):
    """Task 0 inputs nearly fill only part of the input space (so null directions exist); later tasks are
    full-rank and larger, to push the weights hard."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("conv", "bn"):
        if task == 0:
            base = torch.randn(n, 1, 6, 6, generator=g)
            x = torch.cat([base, 0.5 * base + 0.02 * torch.randn(n, 1, 6, 6, generator=g)], dim=1)
        else:
            x = 2 * torch.randn(n, 2, 6, 6, generator=g)
    elif task == 0:
        x = torch.randn(n, 5, generator=g) @ torch.randn(5, 12, generator=g)
        x = x + 0.02 * torch.randn(n, 12, generator=g)
    else:
        x = 2 * torch.randn(n, 12, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


@torch.no_grad()
def outputs(model, x, t):
    was_training = model.training
    model.eval()
    out = call_model(model, x, t)
    model.train(was_training)
    return out


@torch.no_grad()
def record_layer_inputs(model, names, x, t):
    """The inputs each named layer receives (the tests' own forward pre-hooks, eval mode)."""
    seen = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0].detach().clone())
        )
        for name in names
    ]
    try:
        outputs(model, x, t)
    finally:
        for h in handles:
            h.remove()
    return seen


def im2col_by_slicing(conv, x):
    """im2col for a zero-padded conv with integer padding: one kernel-sized slice per output pixel."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    b, c, h, w = x.shape
    padded = torch.zeros(b, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    padded[:, :, ph : ph + h, pw : pw + w] = x
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    patches = []
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            patches.append(window.reshape(b, -1))
    return torch.stack(patches, dim=1).reshape(b * out_h * out_w, -1)  # rows ordered (sample, i, j)


def layer_rows(layer, inputs):
    """Rows that multiply the layer's weight, in float64, checked to reproduce the layer's own output."""
    x = inputs.double()
    if isinstance(layer, nn.Conv2d):
        rows = im2col_by_slicing(layer, x)
        out = F.conv2d(x, layer.weight.double(), None, layer.stride, layer.padding, layer.dilation)
        out_rows = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
        out_rows = rows @ layer.weight.double().T
    torch.testing.assert_close(rows @ layer.weight.double().reshape(layer.weight.shape[0], -1).T, out_rows)
    return rows


def hand_null_space(rows, eps1, rule):
    """The kept eigenvectors, their σ, τ and the full σ, from the test's own float64 eigh of Σ x xᵀ."""
    cov = rows.T @ rows
    lam, vec = torch.linalg.eigh(cov)
    sigma = lam.clamp(min=0).sqrt()
    values = [float(s) for s in sigma]
    tau = eps1 * math.sqrt(sum(v * v for v in values)) if rule == "frobenius" else eps1 * sum(values)
    kept = sigma <= tau
    return vec[:, kept], sigma[kept], tau, sigma


def adapters(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, NullSpaceAdapter)}


def run_task0(kind, config, seed=0, heads=(3, 3)):
    model = MODELS[kind](seed, heads)
    method = NESS(model, config)
    x0, y0 = task_data(kind, 0, seed=100)
    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=5, lr=0.1)
    method.end_task(0, batches(x0, y0))
    return model, method, (x0, y0)


def record(method, task, layer):
    found = [r for r in method.diagnostics() if r["task"] == task and r["layer"] == layer]
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------------------------------------------------
# (a) Eq. 8: ‖xᵀΔW‖ ≤ σ_max(U)·‖V‖₂ for every old input row
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "rule", "eps1", "memory"),
    [
        ("conv", "frobenius", 0.03, "covariance"),
        ("mlp", "nuclear", 0.01, "covariance"),
        ("conv", "nuclear", 0.01, "replay"),
        ("mlp", "frobenius", 0.02, "replay"),
    ],
)
def test_eq8_bound_holds_for_every_old_input(monkeypatch, kind, rule, eps1, memory):
    config = NESSConfig(transfer_rank=0, eps1=eps1, threshold=rule, memory=memory, probe_samples=100_000)
    model, method, (x0, _) = run_task0(kind, config)
    names = list(method.layer_names)
    # The task-0 layer inputs, recorded right after end_task(0) with the tests' own hooks.
    old_inputs = record_layer_inputs(model, names, x0, 0)
    old_rows = {name: layer_rows(model.get_submodule(name), old_inputs[name]) for name in names}

    method.begin_task(1)
    x1, y1 = task_data(kind, 1, seed=101)
    train(method, model, 1, x1, y1, steps=20, lr=1.0)

    mine = {}
    for name in names:
        adapter = model.get_submodule(name)
        assert isinstance(adapter, NullSpaceAdapter), name
        rows = old_rows[name]
        basis, kept_sigma, tau, sigma = hand_null_space(rows, eps1, rule)
        r = basis.shape[1]
        assert 0 < r < rows.shape[1], f"{name}: the test needs a proper null space, got rank {r}"
        # ... and kept directions well above round-off, so that the bound is not float noise.
        assert float(kept_sigma.max()) > 1e-3 * float(sigma.max())
        assert adapter.rank == r
        u = adapter.U.double()
        torch.testing.assert_close(u @ u.T, basis @ basis.T, atol=1e-5, rtol=0)

        v = adapter.V.detach().double()
        v_norm = float(torch.linalg.matrix_norm(v, ord=2))
        assert v_norm > 0.1, "task 1 must move V clearly away from zero"
        bound = float(kept_sigma.max()) * v_norm
        delta = u @ v  # paper layout, d × o
        shifts = (rows @ delta).norm(dim=1)
        measured = float(shifts.max())
        # U is stored in float32: its rounding (≈ 6e-8 per entry) may add ≈ 1e-7·‖x‖·‖V‖₂ to a shift.
        slack = 1e-6 * float(rows.norm(dim=1).max()) * v_norm
        assert slack < 1e-2 * bound
        assert 0 < measured <= bound * (1 + 1e-6) + slack, (name, measured, bound)

        # The shift the adapter really applies in its forward pass (float64 copy, both paths) is xᵀΔW.
        adapter64 = copy.deepcopy(adapter).double()
        x_old = old_inputs[name].double()
        for merged_path in (True, False):
            monkeypatch.setattr(
                NullSpaceAdapter, "_merged_path_is_cheaper", lambda self, x, terms=None, rows=None, m=merged_path: m
            )
            with torch.no_grad():
                change = adapter64(x_old) - adapter64.base(x_old)
            if change.dim() == 4:
                change = change.permute(0, 2, 3, 1).reshape(-1, change.shape[1])
            torch.testing.assert_close(change, rows @ delta, atol=1e-10, rtol=1e-7)
        monkeypatch.undo()

        # The bound protects old inputs only: the new task's rows do move by more than it.
        new_rows = layer_rows(adapter.base, record_layer_inputs(model, [name], x1, 1)[name])
        assert float((new_rows @ delta).norm(dim=1).max()) > bound
        mine[name] = (r, float(kept_sigma.max()), tau, v_norm, bound, measured, slack)

    method.end_task(1, batches(x1, y1))
    for name, (r, sigma_max, tau, v_norm, bound, measured, slack) in mine.items():
        rec = record(method, 1, name)
        assert rec["rank"] == r and not rec["frozen"]
        assert math.isclose(rec["threshold"], tau, rel_tol=1e-6)
        assert math.isclose(rec["sigma_max_U"], sigma_max, rel_tol=1e-6)
        assert math.isclose(rec["v_spectral_norm"], v_norm, rel_tol=1e-6)
        assert math.isclose(rec["eq8_bound"], bound, rel_tol=1e-5)
        assert rec["eq8_bound"] >= rec["measured_max_shift"]
        assert rec["covariance_bound"] <= rec["eq8_bound"] * (1 + 1e-9)
        assert rec["measured_max_shift"] <= rec["covariance_bound"] * (1 + 1e-5)
        assert measured <= rec["eq8_bound"] * (1 + 1e-6) + slack
        assert math.isclose(rec["measured_max_shift"], measured, rel_tol=1e-5)  # every row was probed


# ---------------------------------------------------------------------------------------------------------
# (c) end_task's merge leaves the model's function unchanged
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bn", "mlp"])
def test_end_task_merge_leaves_outputs_unchanged(kind):
    model, method, (x0, _) = run_task0(kind, NESSConfig(transfer_rank=0, eps1=0.01))
    method.begin_task(1)
    x1, y1 = task_data(kind, 1, seed=101)
    train(method, model, 1, x1, y1, steps=10, lr=1.0)

    active = adapters(model)
    assert active, "the test needs adapted layers"
    expected_weights = {}
    for name, adapter in active.items():
        u, v = adapter.U.double(), adapter.V.detach().double()
        assert torch.count_nonzero(v) > 0
        w = adapter.base.weight.detach().double()
        expected_weights[name] = w + (u @ v).T.reshape(w.shape)
    buffers_before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    before = [outputs(model, x, t) for x in (x0, x1) for t in (0, 1)]

    method.end_task(1, batches(x1, y1))

    assert not adapters(model)
    for name, expected in expected_weights.items():
        layer = model.get_submodule(name)
        assert type(layer) in (nn.Linear, nn.Conv2d)
        torch.testing.assert_close(layer.weight.detach().double(), expected, atol=1e-6, rtol=1e-6)
    for n, b in model.named_buffers():  # statistics are collected in eval mode: BN stats untouched
        if "running" in n:
            torch.testing.assert_close(b, buffers_before[n], rtol=0, atol=0)
    after = [outputs(model, x, t) for x in (x0, x1) for t in (0, 1)]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# (d) an exact null space keeps old outputs exactly
# ---------------------------------------------------------------------------------------------------------


def test_exact_null_space_keeps_old_task_outputs():
    torch.manual_seed(0)
    model = multi_head_mlp(16, [32, 32], [3, 3])
    g = torch.Generator().manual_seed(7)
    # 12 old samples in a 4-dimensional subspace of R^16, exactly representable in float32 (small integers
    # times {-1, 0, 1} / 2), and only 12 hidden activation rows in R^32.
    z = torch.randint(-2, 3, (12, 4), generator=g).float()
    basis = torch.randint(-1, 2, (4, 16), generator=g).float()
    x0 = z @ basis / 2
    assert int(torch.linalg.matrix_rank(x0.double())) == 4
    y0 = torch.randint(0, 3, (12,), generator=g)
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=1e-6))
    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=10, lr=0.1)
    method.end_task(0, [(x0, y0)])
    old = outputs(model, x0, 0)
    assert 0.1 < float(old.abs().max()) < 100

    method.begin_task(1)
    ranks = {name: a.rank for name, a in adapters(model).items()}
    assert ranks["backbone.0"] == 16 - 4
    assert ranks["backbone.2"] >= 32 - 12
    x1 = 2 * torch.randn(64, 16, generator=g)
    y1 = torch.randint(0, 3, (64,), generator=g)
    with torch.no_grad():
        features_before = model.backbone(x1)
    loss_before = float(F.cross_entropy(outputs(model, x1, 1), y1))
    train(method, model, 1, x1, y1, steps=150, lr=0.5)

    # Task 1 really trained: large V, lower loss, new-data features moved.
    for adapter in adapters(model).values():
        assert float(torch.linalg.matrix_norm(adapter.V.detach(), ord=2)) > 0.5
    assert float(F.cross_entropy(outputs(model, x1, 1), y1)) < 0.8 * loss_before
    with torch.no_grad():
        assert float((model.backbone(x1) - features_before).abs().max()) > 0.5
    torch.testing.assert_close(outputs(model, x0, 0), old, atol=1e-5, rtol=0)
    method.end_task(1, [(x1, y1)])
    torch.testing.assert_close(outputs(model, x0, 0), old, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# (e) state_dict → torch.save → torch.load → load_state_dict on a fresh model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "memory"), [("conv", "covariance"), ("mlp", "replay")])
def test_save_load_roundtrip_continues_identically(tmp_path, kind, memory):
    config = NESSConfig(transfer_rank=0, eps1=0.01, memory=memory)
    model, method, (x0, _) = run_task0(kind, config, heads=(3, 3, 3))
    method.begin_task(1)
    x1, y1 = task_data(kind, 1, seed=101)
    train(method, model, 1, x1, y1, steps=5, lr=1.0)
    assert all(torch.count_nonzero(a.V) > 0 for a in adapters(model).values())

    path = tmp_path / "ness.pt"
    torch.save(method.state_dict(), path)
    state = torch.load(path)

    fresh = MODELS[kind](seed=12345, heads=(3, 3, 3))  # a different random init
    assert not torch.equal(fresh.task_heads[0].weight, model.task_heads[0].weight)
    loaded = NESS(fresh, NESSConfig(transfer_rank=0, eps1=0.01, memory=memory))
    loaded.load_state_dict(state)

    probe = task_data(kind, 1, seed=102)[0]
    for x in (x0, x1, probe):
        for t in (0, 1):
            torch.testing.assert_close(outputs(fresh, x, t), outputs(model, x, t))
    original_adapters, loaded_adapters = adapters(model), adapters(fresh)
    assert original_adapters.keys() == loaded_adapters.keys() and original_adapters
    for name, adapter in original_adapters.items():
        assert torch.equal(loaded_adapters[name].U, adapter.U)
        assert torch.equal(loaded_adapters[name].V, adapter.V)

    # Continue both: the same training steps, then end_task(1) merges in both.
    train(method, model, 1, x1, y1, steps=3, lr=1.0)
    train(loaded, fresh, 1, x1, y1, steps=3, lr=1.0)
    method.end_task(1, batches(x1, y1))
    loaded.end_task(1, batches(x1, y1))
    assert not adapters(fresh)
    for x in (x0, x1, probe):
        for t in (0, 1):
            torch.testing.assert_close(outputs(fresh, x, t), outputs(model, x, t))
    # The next task sees the same memory: same bases.
    method.begin_task(2)
    loaded.begin_task(2)
    for name, adapter in adapters(model).items():
        assert torch.equal(adapters(fresh)[name].U, adapter.U)
    strip = ("measured_max_shift", "probe_rows")
    assert [{k: v for k, v in r.items() if k not in strip} for r in method.diagnostics()] == [
        {k: v for k, v in r.items() if k not in strip} for r in loaded.diagnostics()
    ]


def test_resumed_run_samples_the_same_probe_rows():
    config = NESSConfig(transfer_rank=0, eps1=0.01, probe_samples=100)  # fewer than the 288 conv rows: sampling matters
    _, method, _ = run_task0("conv", config, heads=(3, 3, 3))
    method.begin_task(1)
    state = copy.deepcopy(method.state_dict())
    fresh = conv_model(seed=1, heads=(3, 3, 3))
    loaded = NESS(fresh, config)
    loaded.load_state_dict(state)
    x1, y1 = task_data("conv", 1, seed=101)
    for m in (method, loaded):
        m.end_task(1, batches(x1, y1))
    for name in method.layer_names:
        for a, b in zip(method.probes[name], loaded.probes[name], strict=True):
            assert torch.equal(a, b), name


def test_load_state_dict_refuses_another_config_or_a_used_method():
    _, method, _ = run_task0("mlp", NESSConfig(transfer_rank=0, eps1=0.01))
    state = method.state_dict()
    with pytest.raises(ValueError, match=r"saved NESSConfig .* differs from this one"):
        NESS(mlp_model(1), NESSConfig(transfer_rank=0, eps1=0.02)).load_state_dict(state)
    with pytest.raises(RuntimeError, match="needs a freshly constructed NESS"):
        method.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# trainable parameters, frozen layers, memories
# ---------------------------------------------------------------------------------------------------------


def test_trainable_parameters_per_task():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU()
    )
    model = MultiHeadNet(backbone, 16, [3, 3, 3])
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.01))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(12, 3, generator=g) @ torch.randn(3, 8, generator=g) + 0.01 * torch.randn(12, 8, generator=g)
    y0 = torch.randint(0, 3, (12,), generator=g)

    method.begin_task(0)
    params = method.trainable_parameters(0)
    other_heads = {id(p) for p in [*model.task_heads[1].parameters(), *model.task_heads[2].parameters()]}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if id(p) not in other_heads}
    assert len(params) == len({id(p) for p in params})
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in other_heads)
    train(method, model, 0, x0, y0, steps=3, lr=0.1)
    method.end_task(0, [(x0, y0)])

    method.begin_task(1)
    active = adapters(model)
    assert set(active) == {"backbone.0", "backbone.3"}  # heads and BatchNorm are never adapted
    params = method.trainable_parameters(1)
    expected = [a.V for a in active.values()] + [model.task_heads[1].weight]
    assert len(params) == len(expected)
    assert {id(p) for p in params} == {id(p) for p in expected}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in {id(q) for q in expected}), name
    bn = model.backbone[1]
    assert not bn.weight.requires_grad and not bn.bias.requires_grad

    # Functionally: an optimiser over *every* parameter only moves the V's and head 1.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in {id(q) for q in expected}}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x1, y1 = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(call_model(model, x1, 1), y1).backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert torch.count_nonzero(model.task_heads[1].weight.grad) > 0
    assert all(torch.count_nonzero(a.V) > 0 for a in active.values())


def test_rank_zero_layer_is_frozen_reported_and_not_wrapped():
    torch.manual_seed(0)
    model = multi_head_mlp(4, [40, 40], [3, 3])
    eps1 = 0.1
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=eps1))
    g = torch.Generator().manual_seed(5)
    x0, y0 = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    # By hand: 32 Gaussian rows in R^4 have a flat spectrum, every σ far above 0.1·‖X‖_F.
    _, kept, tau, sigma = hand_null_space(x0.double(), eps1, "frobenius")
    assert kept.numel() == 0 and float(sigma.min()) > 2 * tau

    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=3, lr=0.1)
    method.end_task(0, [(x0, y0)])
    method.begin_task(1)
    first = model.get_submodule("backbone.0")
    assert type(first) is nn.Linear
    assert isinstance(model.get_submodule("backbone.2"), NullSpaceAdapter)
    rec = record(method, 1, "backbone.0")
    assert rec["rank"] == 0 and rec["frozen"] is True and rec["sigma_max_U"] == 0.0
    assert math.isclose(rec["threshold"], tau, rel_tol=1e-6)
    rec2 = record(method, 1, "backbone.2")
    assert rec2["rank"] >= 40 - 32 and rec2["frozen"] is False

    w = first.weight.detach().clone()
    params = method.trainable_parameters(1)
    assert id(first.weight) not in {id(p) for p in params}
    x1, y1 = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    train(method, model, 1, x1, y1, steps=5, lr=1.0)
    method.end_task(1, [(x1, y1)])
    assert torch.equal(model.get_submodule("backbone.0").weight.detach(), w)
    assert record(method, 1, "backbone.0")["frozen"] is True


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_replay_and_covariance_memory_give_the_same_bases(kind):
    bases = {}
    for memory in ("covariance", "replay"):
        model, method, _ = run_task0(kind, NESSConfig(transfer_rank=0, eps1=0.01, memory=memory))
        method.begin_task(1)
        bases[memory] = ({n: a.U.double() for n, a in adapters(model).items()}, method.diagnostics())
    cov_bases, cov_records = bases["covariance"]
    rep_bases, rep_records = bases["replay"]
    assert cov_bases.keys() == rep_bases.keys() and cov_bases
    for name, u in cov_bases.items():
        assert u.shape == rep_bases[name].shape
        torch.testing.assert_close(u @ u.T, rep_bases[name] @ rep_bases[name].T, atol=1e-6, rtol=0)
    for a, b in zip(cov_records, rep_records, strict=True):
        assert a["rank"] == b["rank"]
        assert math.isclose(a["threshold"], b["threshold"], rel_tol=1e-9)


def test_covariance_memory_sums_the_tasks_covariances():
    model, method, (x0, _) = run_task0("conv", NESSConfig(transfer_rank=0, eps1=0.01))
    names = method.layer_names
    rows0 = {n: layer_rows(model.get_submodule(n), v) for n, v in record_layer_inputs(model, names, x0, 0).items()}
    method.begin_task(1)
    x1, y1 = task_data("conv", 1, seed=101)
    train(method, model, 1, x1, y1, steps=5, lr=1.0)
    method.end_task(1, batches(x1, y1))
    rows1 = {n: layer_rows(model.get_submodule(n), v) for n, v in record_layer_inputs(model, names, x1, 1).items()}
    for n in names:
        expected = rows0[n].T @ rows0[n] + rows1[n].T @ rows1[n]
        torch.testing.assert_close(method.covariances[n], expected, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_memory_tasks_first_keeps_only_task0_inputs(memory):
    """The official 5-datasets scripts store task 0's data only: task 2's basis must come from task 0 alone."""
    model, method, (x0, _) = run_task0(
        "mlp", NESSConfig(transfer_rank=0, eps1=0.05, memory=memory, memory_tasks="first"), heads=(3, 3, 3)
    )
    names = method.layer_names

    def task0_rows():
        return {n: layer_rows(model.get_submodule(n), v) for n, v in record_layer_inputs(model, names, x0, 0).items()}

    rows_after_task0 = task0_rows()
    method.begin_task(1)
    x1, y1 = task_data("mlp", 1, seed=101)
    train(method, model, 1, x1, y1, steps=5, lr=1.0)
    method.end_task(1, batches(x1, y1))
    # covariance memory keeps task 0's Gram from the end of task 0; replay re-forwards task 0 through today's model.
    rows = task0_rows() if memory == "replay" else rows_after_task0
    method.begin_task(2)
    records = {r["layer"]: r for r in method.diagnostics() if r["task"] == 2}
    for n in names:
        kept, _, tau, _ = hand_null_space(rows[n], 0.05, "frobenius")
        assert records[n]["rank"] == kept.shape[1]
        assert math.isclose(records[n]["threshold"], tau, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# (h) bad inputs raise clear errors
# ---------------------------------------------------------------------------------------------------------


def grouped_conv_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8, bias=False)
    )
    return MultiHeadNet(backbone, 8, [2, 2])


def test_unsupported_layer_is_named_and_exclude_skips_it():
    with pytest.raises(UnsupportedLayerError, match=r"layer 'backbone\.0' is a Conv2d with groups=2"):
        NESS(grouped_conv_model(), NESSConfig(transfer_rank=0))
    model = grouped_conv_model()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.05, exclude=["backbone.0"]))
    assert method.layer_names == ["backbone.3"]
    x = torch.randn(6, 4, 4, 4)
    y = torch.randint(0, 2, (6,))
    method.begin_task(0)
    train(method, model, 0, x, y, steps=2, lr=0.1)
    method.end_task(0, [(x, y)])
    method.begin_task(1)
    assert type(model.get_submodule("backbone.0")) is nn.Conv2d
    assert isinstance(model.get_submodule("backbone.3"), NullSpaceAdapter)  # 6 rows in R^64


def test_model_without_adaptable_layers_is_rejected():
    model = MultiHeadNet(nn.ReLU(), 4, [2])
    with pytest.raises(ValueError, match=r"found no nn\.Linear, nn\.Conv1d(,| or) nn\.Conv2d"):
        NESS(model, NESSConfig(transfer_rank=0))


@pytest.mark.parametrize("eps1", [0.0, -0.1, 1.0, 1, 2.5, float("nan"), float("inf"), "0.01", True])
def test_config_rejects_bad_eps1(eps1):
    expected = rf"NESSConfig\.eps1: got {re.escape(repr(eps1))}; a finite number in \(0, 1\), or None .*paper uses 1e-3"
    with pytest.raises(ValueError, match=expected):
        NESSConfig(transfer_rank=0, eps1=eps1)


def test_config_rejects_unknown_threshold_memory_and_bad_fields():
    with pytest.raises(ValueError, match=r"NESSConfig\.threshold: got 'spectral'; one of .*'frobenius'"):
        NESSConfig(transfer_rank=0, threshold="spectral")
    with pytest.raises(ValueError, match=r"NESSConfig\.memory: got 'disk'; one of .*'covariance'"):
        NESSConfig(transfer_rank=0, memory="disk")
    with pytest.raises(ValueError, match=r"NESSConfig\.memory_tasks: got 'last'; one of .*'all'"):
        NESSConfig(transfer_rank=0, memory_tasks="last")
    with pytest.raises(TypeError, match=r"NESSConfig\.exclude: got 'backbone\.0'; a list of strings"):
        NESSConfig(transfer_rank=0, exclude="backbone.0")
    with pytest.raises(ValueError, match=r"NESSConfig\.probe_samples: got -1; an integer ≥ 0"):
        NESSConfig(transfer_rank=0, probe_samples=-1)
    with pytest.raises(TypeError, match="NESS takes a NESSConfig"):
        NESS(mlp_model(0), {"eps1": 0.01})


@pytest.mark.parametrize("memory", ["covariance", "replay"])
@pytest.mark.parametrize("empty", [[], (), "generator"])
def test_end_task_rejects_an_empty_loader(memory, empty):
    model = mlp_model(0)
    method = NESS(model, NESSConfig(transfer_rank=0, memory=memory))
    method.begin_task(0)
    loader = iter([]) if empty == "generator" else empty
    with pytest.raises(ValueError, match=r"end_task\(0\): the task's loader yielded no batches"):
        method.end_task(0, loader)


@pytest.mark.parametrize("memory", ["covariance", "replay"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_end_task_rejects_non_finite_inputs(memory, bad):
    model = mlp_model(0)
    method = NESS(model, NESSConfig(transfer_rank=0, memory=memory))
    x, y = task_data("mlp", 0, seed=1)
    x_bad = x.clone()
    x_bad[20, 3] = bad
    method.begin_task(0)
    with pytest.raises(ValueError, match=r"end_task\(0\): a batch of inputs holds NaN or Inf"):
        method.end_task(0, batches(x_bad, y))  # the bad value is in the second batch
    assert method.tasks_done == 0
    method.end_task(0, batches(x, y))  # the task can still be closed with clean data
    assert method.tasks_done == 1


def test_end_task_rejects_non_tensor_batches():
    method = NESS(mlp_model(0), NESSConfig(transfer_rank=0))
    method.begin_task(0)
    with pytest.raises(TypeError, match=r"a batch must be a tensor, an \(inputs, labels\) pair or a mapping"):
        method.end_task(0, [([1.0, 2.0], 0)])


def test_task_hooks_must_come_in_order():
    model = mlp_model(0)
    method = NESS(model, NESSConfig(transfer_rank=0))
    with pytest.raises(TaskOrderError, match=r"begin_task\(1\) out of order: 0 task\(s\) finished"):
        method.begin_task(1)
    with pytest.raises(TaskOrderError, match=r"end_task\(0\) called but no task is open: call begin_task\(0\)"):
        method.end_task(0, [torch.zeros(2, 12)])
    with pytest.raises(TaskOrderError, match=r"trainable_parameters\(0\) called but no task is open"):
        method.trainable_parameters(0)
    method.begin_task(0)
    with pytest.raises(TaskOrderError, match=r"begin_task\(0\) while task 0 is open"):
        method.begin_task(0)
    with pytest.raises(TaskOrderError, match=r"begin_task\(1\) while task 0 is open"):
        method.begin_task(1)
    with pytest.raises(TaskOrderError, match=r"trainable_parameters\(1\) called but task 0 is open"):
        method.trainable_parameters(1)
    with pytest.raises(TaskOrderError, match=r"end_task\(1\) called but task 0 is open"):
        method.end_task(1, [torch.zeros(2, 12)])
    x, y = task_data("mlp", 0, seed=1)
    method.end_task(0, [(x, y)])
    with pytest.raises(TaskOrderError, match=r"begin_task\(0\) out of order: 1 task\(s\) finished"):
        method.begin_task(0)
    with pytest.raises(TaskOrderError, match=r"begin_task\(2\) out of order"):
        method.begin_task(2)
    assert isinstance(TaskOrderError("x"), RuntimeError)


def tiny_task(labels, num_classes):
    labels = torch.tensor(labels, dtype=torch.int64)
    split = Split(torch.zeros(len(labels), 12, dtype=torch.uint8), labels)
    return Task("tiny", num_classes, split, split, split, PixelTransform(scale=255.0))


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"task 'tiny': train labels span 0\.\.3 but num_classes is 3"):
        tiny_task([0, 1, 3], num_classes=3)
    model = mlp_model(0)  # both heads give 3 outputs
    check_labels(model, 0, tiny_task([0, 1, 2], num_classes=3), "cpu")
    with pytest.raises(ValueError, match=r"task 1 \('tiny'\), train split: labels span 0\.\.4 .* gives 3 outputs"):
        check_labels(model, 1, tiny_task([0, 4, 1], num_classes=5), "cpu")
