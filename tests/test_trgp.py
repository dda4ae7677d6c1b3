"""Tests of TRGP: the selection rule against a hand-written loop of METHODS_SPEC §5.1 on explicit SVDs, the regimes
against closed-form gradients, the scaled weight against the official formula, and the method's hooks against the
tests' own forward passes (never against the method's own numbers)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches
from ness.methods import TRGP, TRGPConfig
from ness.methods.trgp import (
    SCALES,
    draw_labelled_samples,
    projection_norms,
    regimes,
    scaled_weight,
    select_task_space,
    select_tasks,
)
from ness.models import MultiHeadNet, multi_head_mlp, shared_head_mlp
from ness.subspace import grow_basis, input_covariance

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------


def reference_select(basis, r_mat, eps, off_by_one):
    """The official get_space_and_grad for a task t ≥ 1 on an explicit R (d × n), written out with SVDs."""
    d = r_mat.shape[0]
    r2 = r_mat @ r_mat.T
    delta = [float(basis[:, j] @ r2 @ basis[:, j]) for j in range(basis.shape[1])]
    total = float((torch.linalg.svdvals(r_mat) ** 2).sum())
    u, s, _ = torch.linalg.svd(r_mat - basis @ basis.T @ r_mat, full_matrices=False)
    stack = delta + (s**2).tolist()
    index = sorted(range(len(stack)), key=lambda i: -stack[i])
    r, acc = 0, 0.0
    for i in index:
        if acc < eps * total:
            acc += stack[i]
            r += 1
            if r == d:
                break
        else:
            break
    candidates = torch.cat([basis, u], dim=1)
    selected = index[:r]
    k = basis.shape[1]
    new = [i for i in selected if (i > k if off_by_one else i >= k)]
    return candidates[:, selected], torch.cat([basis, candidates[:, new]], dim=1)


def spectrum_matrix(d, n, singular_values, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=F64))
    return u[:, : len(singular_values)] @ torch.diag(torch.tensor(singular_values, dtype=F64)) @ v.T


def same_columns(a, b, atol=1e-9):
    """Columns equal up to sign, in order."""
    assert a.shape == b.shape
    torch.testing.assert_close((a * b).sum(0).abs(), torch.ones(a.shape[1], dtype=a.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("regime_threshold", -0.1, ValueError),
        ("regime_threshold", 1.5, ValueError),
        ("regime_threshold", float("nan"), ValueError),
        ("top_k", 0, ValueError),
        ("top_k", 2.0, ValueError),
        ("gradient_samples", 0, ValueError),
        ("memory_off_by_one", 1, TypeError),
        ("train_batchnorm", "yes", TypeError),
        ("scales_need_first_layer", None, TypeError),
        ("scale_shortcuts", 0, TypeError),
        ("latest_task_only_at_t2", "no", TypeError),
        ("threshold", 1.2, ValueError),  # GPM's checks still apply
    ],
)
def test_config_rejects_bad_values(field, value, error):
    with pytest.raises(error, match=field):
        TRGPConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------


def test_scaled_weight_equals_w_when_scales_are_the_identity():
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 8), (4, 2, 2, 2)]:  # a Linear and a Conv2d weight, d = 8
        w = torch.randn(*shape, generator=g)
        q1, _ = torch.linalg.qr(torch.randn(8, 3, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(8, 5, generator=g))
        assert torch.equal(scaled_weight(w, [q1, q2], [torch.eye(3), torch.eye(5)]), w)
        assert torch.equal(scaled_weight(w, [], []), w)


def test_scaled_weight_matches_the_official_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)  # d = 12
    q1, _ = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=F64))
    s1, s2 = torch.randn(3, 3, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    flat = w.view(4, -1)
    # layers.py: proj_weight1 − diag_weight1 + proj_weight2 − diag_weight2 + weight
    official = flat @ (q1 @ s1 @ q1.T) - flat @ (q1 @ q1.T) + flat @ (q2 @ s2 @ q2.T) - flat @ (q2 @ q2.T) + flat
    torch.testing.assert_close(scaled_weight(w, [q1, q2], [s1, s2]), official.view_as(w))


def test_selection_rule_on_a_hand_computed_diagonal_example():
    """M = e1; the new task's R = diag(1, 2, 0.5): δ = (1), σ̂² = (4, 0.25), ‖R‖² = 5.25."""
    eye = torch.eye(3, dtype=F64)
    cov = torch.diag(torch.tensor([1.0, 4.0, 0.25], dtype=F64))
    # ε_th 0.9: target 4.725; take 4 (e2), then 1 (e1) reaches it. Q = [e2, e1]; e2 is Û[:, 0], index r_old.
    fixed = select_task_space(eye[:, :1], cov, 0.9)
    same_columns(fixed.space, eye[:, [1, 0]])
    assert fixed.reused == 1 and fixed.memory.added == 1
    same_columns(fixed.memory.basis, eye[:, :2])
    official = select_task_space(eye[:, :1], cov, 0.9, off_by_one=True)
    same_columns(official.space, eye[:, [1, 0]])
    assert official.memory.added == 0 and official.memory.basis.shape == (3, 1)  # Û[:, 0] never joins M
    # ε_th 0.99: target 5.1975 needs all three. Fixed: M = [e1, e2, e3]; official drops e2 only.
    fixed = select_task_space(eye[:, :1], cov, 0.99)
    same_columns(fixed.space, eye[:, [1, 0, 2]])
    same_columns(fixed.memory.basis, eye)
    official = select_task_space(eye[:, :1], cov, 0.99, off_by_one=True)
    same_columns(official.memory.basis, eye[:, [0, 2]])
    assert abs(fixed.memory.captured - 1.0) < 1e-12 and abs(fixed.memory.captured_before - 1 / 5.25) < 1e-12


def test_selection_stops_at_the_entry_that_reaches_the_threshold():
    """M = e1, C = diag(1, 4, 2, 1), ‖R‖² = 8, ε_th = 0.75: 4 then 2 reach 6 exactly, so Q = [e2, e3]."""
    eye = torch.eye(4, dtype=F64)
    update = select_task_space(eye[:, :1], torch.diag(torch.tensor([1.0, 4.0, 2.0, 1.0], dtype=F64)), 0.75)
    same_columns(update.space, eye[:, [1, 2]])
    assert update.reused == 0
    same_columns(update.memory.basis, eye[:, :3])


@pytest.mark.parametrize("off_by_one", [False, True])
@pytest.mark.parametrize("eps", [0.6, 0.9, 0.97])
def test_selection_rule_matches_the_official_loop_on_explicit_svds(eps, off_by_one):
    r0 = spectrum_matrix(10, 40, [6, 4, 3, 1, 0.2], seed=2)
    old = grow_basis(None, r0 @ r0.T, 0.95).basis
    r1 = spectrum_matrix(10, 40, [5, 3, 2.5, 1, 0.5, 0.2], seed=3)
    update = select_task_space(old, r1 @ r1.T, eps, off_by_one=off_by_one)
    space, memory = reference_select(old, r1, eps, off_by_one)
    same_columns(update.space, space)
    same_columns(update.memory.basis, memory)
    torch.testing.assert_close(update.memory.basis[:, : old.shape[1]], old)
    assert update.reused == sum(1 for c in space.T if float((old.T @ c).abs().max()) > 0.999)


def test_first_task_space_is_gpm_basis():
    r0 = spectrum_matrix(8, 30, [4, 2, 1, 0.5], seed=4)
    update = select_task_space(None, r0 @ r0.T, 0.9)
    gpm = grow_basis(None, r0 @ r0.T, 0.9)
    assert torch.equal(update.space, gpm.basis) and torch.equal(update.memory.basis, gpm.basis)


def test_regimes_and_top_k_on_a_constructed_gradient():
    eye = torch.eye(4)
    q = [eye[:, :1], eye[:, 1:3], eye[:, 3:]]
    g = torch.tensor([[3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])  # ‖g‖ = 5
    norms = projection_norms(g, q)
    assert norms == pytest.approx([3.0, 0.0, 4.0])
    assert regimes(norms, 5.0, 0.5) == [2, 1, 2]
    assert regimes([2.5, 2.5000001, 0.0], 5.0, 0.5) == [1, 2, 1]  # ‖gQQᵀ‖ ≤ ε₁‖g‖ is regime 1
    assert regimes([0.0], 0.0, 0.5) == [1]  # no gradient: nothing to transfer
    assert select_tasks(norms, 2) == (2, 0)
    assert select_tasks(norms, 5) == (2, 0, 1)
    assert select_tasks(norms[:1], 2) == (0,)
    assert select_tasks(norms[:2], 2) == (0, 1)
    assert select_tasks(norms[:2], 2, latest_only_at_t2=True) == (1,)
    assert select_tasks(norms, 2, latest_only_at_t2=True) == (2, 0)  # only task 2 is special


def test_draw_labelled_samples_keeps_pairs_and_draws_without_replacement():
    x = torch.arange(30, dtype=torch.float32).view(15, 2) / 2  # row i = (i, i + 0.5)
    y = torch.arange(15)
    gen = torch.Generator().manual_seed(0)
    xs, ys = draw_labelled_samples(batches(x, y, 4), 7, gen, "test")
    assert xs.shape == (7, 2) and xs.dtype == torch.float32 and ys.dtype == torch.int64
    torch.testing.assert_close(xs[:, 0], ys.float())
    assert len(set(ys.tolist())) == 7


# ---------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------


def task_data(t, n=48, d=8, seed=0, dims=None):
    """2 classes separated along a task-specific direction; inputs restricted to `dims` when given."""
    g = torch.Generator().manual_seed(seed * 100 + t)
    x = torch.randn(n, d, generator=g)
    if dims is not None:
        mask = torch.zeros(d)
        mask[list(dims)] = 1.0
        x = x * mask
    y = (x[:, (t + 1) % d] + 0.3 * x[:, t % d] > 0).long()
    return x, y


def mlp(seed=0, hidden=(6, 6), heads=(2, 2, 2)):
    torch.manual_seed(seed)
    return multi_head_mlp(8, list(hidden), heads)


def train_steps(method, model, t, x, y, steps=5, lr=0.2):
    optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(method.predict(x, t), y).backward()
        method.after_backward(t)
        optimizer.step()


def run_task(method, model, t, x, y, steps=5, lr=0.2):
    method.begin_task(t)
    method.preview_task(t, batches(x, y, 16))
    train_steps(method, model, t, x, y, steps, lr)
    method.end_task(t, batches(x, y, 16))


def layer_forward(model, x, weights):
    """The MLP's forward with the given weights (by layer name) in place of its own, written out."""
    h = x
    for name, module in model.backbone.named_children():
        h = F.linear(h, weights.get(f"backbone.{name}", module.weight)) if isinstance(module, nn.Linear) else module(h)
    return h


def two_tasks(config=None, seed=0):
    model = mlp(seed)
    method = TRGP(model, config or TRGPConfig(samples=48, gradient_samples=48, threshold=0.9, regime_threshold=0.1))
    for t in range(2):
        x, y = task_data(t)
        run_task(method, model, t, x, y, steps=8, lr=0.5)
    return model, method


def test_tasks_after_the_first_need_preview():
    model = mlp()
    method = TRGP(model, TRGPConfig(samples=48))
    x, y = task_data(0)
    run_task(method, model, 0, x, y)
    method.begin_task(1)
    with pytest.raises(RuntimeError, match="preview_task"):
        method.trainable_parameters(1)


def test_preview_regimes_follow_the_closed_form_gradient():
    model, method = two_tasks()
    x, y = task_data(2)
    method.begin_task(2)
    method.preview_task(2, batches(x, y, 16))  # gradient_samples = 48 = all examples: the order does not matter
    # The cross-entropy gradient of each layer, written out: backprop through ReLUs and the task's head.
    torch.set_grad_enabled(False)
    w0, w1, head = model.backbone[0].weight, model.backbone[2].weight, model.task_heads[2].weight
    h0 = x @ w0.T
    a0 = h0.relu()
    h1 = a0 @ w1.T
    a1 = h1.relu()
    dz = (F.softmax(a1 @ head.T, dim=1) - F.one_hot(y, 2)) / x.shape[0]
    dh1 = (dz @ head) * (h1 > 0)
    dh0 = (dh1 @ w1) * (h0 > 0)
    grads = {"backbone.0": dh0.T @ x, "backbone.2": dh1.T @ a0}
    torch.set_grad_enabled(True)
    for name, g in grads.items():
        ratios = [float((g @ method.task_spaces[j][name]).norm() / g.norm()) for j in range(2)]
        record = method._trust[name]
        assert record["projection_ratios"] == pytest.approx(ratios, rel=1e-4)
        assert record["regimes"] == [2 if r > 0.1 else 1 for r in ratios]
        ranked = sorted(range(2), key=lambda j: -ratios[j])
        assert record["ranked_tasks"] == ranked
        assert method.region[name] == tuple(j for j in ranked if ratios[j] > 0.1)
        assert [p.shape[0] for p in getattr(model.get_submodule(name), SCALES)] == [
            method.task_spaces[j][name].shape[1] for j in method.region[name]
        ]


def test_preview_uses_eval_mode_and_leaves_the_model_as_it_was():
    """With dropout, a train-mode gradient would be random; the official scripts take it in eval mode."""
    torch.manual_seed(0)
    model = MultiHeadNet(nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Dropout(0.5)), 6, [2, 2])
    method = TRGP(model, TRGPConfig(samples=48, gradient_samples=48))
    x, y = task_data(0)
    run_task(method, model, 0, x, y)
    method.begin_task(1)
    x, y = task_data(1)
    model.train()
    rng = torch.get_rng_state()
    grads = {p: None if p.grad is None else p.grad.clone() for p in model.parameters()}
    method.preview_task(1, batches(x, y, 16))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    for p, g in grads.items():  # .grad left alone (the new scales are extra parameters)
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    with torch.no_grad():
        h = (x @ model.backbone[0].weight.T).relu()
        dz = (F.softmax(model.task_heads[1](h), dim=1) - F.one_hot(y, 2)) / x.shape[0]
        g = ((dz @ model.task_heads[1].weight) * (h > 0)).T @ x
    ratio = float((g @ method.task_spaces[0]["backbone.0"]).norm() / g.norm())
    assert method._trust["backbone.0"]["projection_ratios"] == pytest.approx([ratio], rel=1e-4)


def test_weight_gradient_is_projected_and_scales_train():
    model = mlp()
    method = TRGP(model, TRGPConfig(samples=48, gradient_samples=48, threshold=0.9, regime_threshold=0.0))
    x0, y0 = task_data(0)
    run_task(method, model, 0, x0, y0)
    x, y = task_data(1)
    method.begin_task(1)
    method.preview_task(1, batches(x, y, 16))
    assert all(method.region[name] == (0,) for name in method.layer_names)  # ε₁ = 0: every layer trusts task 0
    before = {name: model.get_submodule(name).weight.detach().clone() for name in method.layer_names}
    params = method.trainable_parameters(1)
    scales = [p for name in method.layer_names for p in getattr(model.get_submodule(name), SCALES)]
    assert all(any(s is p for p in params) for s in scales)
    train_steps(method, model, 1, x, y, steps=3)
    for name in method.layer_names:
        m = method.bases[name].float()
        w = model.get_submodule(name).weight
        torch.testing.assert_close(w.grad @ m, torch.zeros(w.shape[0], m.shape[1]), atol=1e-6, rtol=0)
        torch.testing.assert_close((w.detach() - before[name]) @ m, torch.zeros_like(w @ m), atol=1e-6, rtol=0)
    assert any(not torch.equal(s.detach(), torch.eye(s.shape[0])) for s in scales)


def test_old_tasks_predict_with_their_stored_scales_and_heads_stay():
    model, method = two_tasks()
    assert method.task_regions[1] and any(method.task_regions[1].values()), "task 1 should trust task 0 somewhere"
    stored = copy.deepcopy(method.task_scales[1])
    assert any(not torch.equal(s, torch.eye(s.shape[0])) for v in stored.values() for s in v)
    heads = [model.task_heads[j].weight.detach().clone() for j in range(2)]
    x2, y2 = task_data(2)
    run_task(method, model, 2, x2, y2, steps=5, lr=0.5)
    for j in range(2):
        assert torch.equal(model.task_heads[j].weight, heads[j])
    for name, v in stored.items():
        for s, kept in zip(v, method.task_scales[1][name], strict=True):
            assert torch.equal(s, kept)
    x, _ = task_data(1, n=10, seed=7)
    with torch.no_grad():
        # Task 1 with its own scales on the current W, written out: W + Σ W(QΛQᵀ − QQᵀ).
        weights = {}
        for name, ids in method.task_regions[1].items():
            w = model.get_submodule(name).weight
            for j, s in zip(ids, stored[name], strict=True):
                q = method.task_spaces[j][name]
                w = w + model.get_submodule(name).weight @ (q @ s @ q.T - q @ q.T)
            weights[name] = w
        expected = model.task_heads[1](layer_forward(model, x, weights))
        plain = model(x, 1)
        torch.testing.assert_close(method.predict(x, 1), expected)
        assert not torch.allclose(expected, plain)
        torch.testing.assert_close(method.predict(x, 0), model(x, 0))  # task 0 has no trust region


def test_memory_representations_use_plain_weights():
    model, method = two_tasks()
    old = copy.deepcopy(method.bases)
    old_spaces = {name: method.task_spaces[1][name].clone() for name in method.layer_names}
    x, y = task_data(2)
    method.begin_task(2)
    method.preview_task(2, batches(x, y, 16))
    train_steps(method, model, 2, x, y, steps=5, lr=0.5)
    with torch.no_grad():  # make the open scales far from I: a W_eff representation would differ
        for name in method.layer_names:
            for s in getattr(model.get_submodule(name), SCALES):
                s.mul_(3.0)
    inputs = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
        for n in method.layer_names
    ]
    with torch.no_grad():
        model.eval()
        model(x, 2)  # plain W, all 48 examples (samples = 48)
    for h in hooks:
        h.remove()
    method.end_task(2, batches(x, y, 16))
    for name in method.layer_names:
        expected = select_task_space(old[name], input_covariance(inputs[name]), method.threshold(2, 0))
        same_columns(method.task_spaces[2][name].double(), expected.space, atol=1e-5)
        torch.testing.assert_close(method.bases[name], expected.memory.basis, atol=1e-6, rtol=0)
    assert all(torch.equal(method.task_spaces[1][n], old_spaces[n]) for n in method.layer_names)


def test_state_dict_mid_task_continues_identically():
    model, method = two_tasks()
    x, y = task_data(2)
    method.begin_task(2)
    method.preview_task(2, batches(x, y, 16))
    train_steps(method, model, 2, x, y, steps=2)
    state = copy.deepcopy(method.state_dict())
    fresh_model = mlp(seed=5)
    fresh = TRGP(fresh_model, method.config)
    fresh.load_state_dict(state)
    for m, meth in ((model, method), (fresh_model, fresh)):
        train_steps(meth, m, 2, x, y, steps=3)
        meth.end_task(2, batches(x, y, 16))
    for (key, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    for j in range(3):
        torch.testing.assert_close(method.predict(x, j), fresh.predict(x, j))
    assert method.diagnostics() == fresh.diagnostics()


def test_diagnostics_record_the_regimes_and_the_task_space():
    _, method = two_tasks()
    records = {(r["task"], r["layer"]): r for r in method.diagnostics()}
    first = records[(1, "backbone.0")]
    assert len(first["regimes"]) == 1 and first["ranked_tasks"] == [0]
    assert first["task_space_size"] == method.task_spaces[1]["backbone.0"].shape[1]
    assert len(first["scale_change"]) == len(first["trusted_tasks"])
    assert records[(0, "backbone.0")]["trusted_tasks"] == []


def test_first_layer_gating_flag():
    """Task 1's inputs are orthogonal to task 0's: the first layer's gradient has no part in Q_0 (regime 1)."""

    def regions(flag):
        model = mlp()
        config = TRGPConfig(samples=48, gradient_samples=48, threshold=0.97, scales_need_first_layer=flag)
        method = TRGP(model, config)
        x, y = task_data(0, dims=range(4))
        run_task(method, model, 0, x, y)
        x, y = task_data(1, dims=range(4, 8))
        method.begin_task(1)
        method.preview_task(1, batches(x, y, 16))
        assert method._trust["backbone.0"]["regimes"] == [1]
        assert method._trust["backbone.2"]["regimes"] == [2]
        return method.region

    assert regions(False) == {"backbone.0": (), "backbone.2": (0,)}
    assert regions(True) == {"backbone.0": (), "backbone.2": ()}


def conv_model(seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Conv2d(3, 4, 1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
    )
    return MultiHeadNet(backbone, 4 * 16, [2, 2])


@pytest.mark.parametrize("flag", [True, False])
def test_shortcut_and_batchnorm_flags(flag):
    model = conv_model()
    config = TRGPConfig(
        samples=16, gradient_samples=16, regime_threshold=0.0, scale_shortcuts=flag, train_batchnorm=flag
    )
    method = TRGP(model, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 4, 4, generator=g)
    y = (x[:, 0, 0, 0] > 0).long()
    run_task(method, model, 0, x, y, steps=3, lr=0.1)
    method.begin_task(1)
    method.preview_task(1, batches(x, y, 8))
    assert method.region["backbone.0"] == (0,)
    assert method.region["backbone.3"] == ((0,) if flag else ())
    params = {id(p) for p in method.trainable_parameters(1)}
    assert all((id(p) in params) == flag for p in model.backbone[1].parameters())
    before = model.backbone[1].weight.detach().clone()
    train_steps(method, model, 1, x, y, steps=2, lr=0.1)
    assert torch.equal(model.backbone[1].weight, before) != flag

    def effective(i):
        name = f"backbone.{i}"
        spaces = [method.task_spaces[j][name] for j in method.region[name]]
        return scaled_weight(model.backbone[i].weight, spaces, list(getattr(model.backbone[i], SCALES)))

    # The forward with each conv's W_eff, written out.
    h = model.backbone[2](model.backbone[1](F.conv2d(x, effective(0), padding=1)))
    h = F.conv2d(h, effective(3)).relu().flatten(1)
    torch.testing.assert_close(method.predict(x, 1), model.task_heads[1](h))


def test_shared_head_model_runs_and_trusts_the_shared_output():
    torch.manual_seed(0)
    model = shared_head_mlp(8, [6], 2)
    method = TRGP(model, TRGPConfig(samples=48, gradient_samples=48, regime_threshold=0.0))
    for t in range(3):
        x, y = task_data(t)
        run_task(method, model, t, x, y)
    assert method.layer_names == ["0", "2"] and method.task_regions[2]["2"]
    x, _ = task_data(0)
    for t in range(3):
        assert method.predict(x, t).shape == (48, 2)
