"""Tests of FS-DGPM: the rank rule, soft projection and reservoir against written-out references, and whole training
steps against hand-written versions of the official update on an explicit two-layer network."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ness.methods import build_method
from ness.methods.base import StepProgress
from ness.methods.fsdgpm import FSDGPM, FSDGPMConfig, reach_rank, reservoir_writes
from ness.models import multi_head_mlp, shared_head_mlp
from ness.optim import SAM
from ness.subspace import component_in_span, energy_rank, project_gradient, projection_matrix


def no_check(loss):
    assert torch.isfinite(loss)


def make(seed=0, d=4, hidden=3, heads=(2, 2, 2), **options):
    torch.manual_seed(seed)
    model = multi_head_mlp(d, [hidden], list(heads))
    return model, FSDGPM(model, FSDGPMConfig(**options))


def data(seed, n, d=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def step(method, t, x, y, optimizer, epoch=0):
    method.begin_step(t, StepProgress(epoch, 0, 1, 2))
    return method.training_step(t, x, y, optimizer, no_check)


def finish_first_task(method, steps=2, seed=10, n=6):
    """Task 0 trained for a few epoch-0 steps (filling the buffer) and closed (building M)."""
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    for s in range(steps):
        step(method, 0, *data(seed + s, n), optimizer)
    method.end_task(0, [])


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"memories": 0},
        {"mem_batch_size": 2.5},
        {"inner_batches": True},
        {"threshold": 0.0},
        {"threshold": 1.2},
        {"threshold_last": -1.0},
        {"threshold_increment": -0.1},
        {"eta1": math.nan},
        {"eta2": -1.0},
        {"grad_clip": 0.0},
        {"tmp": math.inf},
        {"lam_init": "1"},
        {"second_order": 1},
        {"rewrap_lambdas": "yes"},
        {"exclude": "fc1"},
    ],
)
def test_config_rejects_bad_values(options):
    with pytest.raises((ValueError, TypeError), match="FSDGPMConfig"):
        FSDGPMConfig(**options)


def test_registered_with_the_official_cifar_defaults():
    model = multi_head_mlp(4, [3], [2])
    config = build_method("fsdgpm", model).config
    assert (config.memories, config.mem_batch_size, config.threshold, config.threshold_increment) == (
        1000,
        125,
        0.97,
        0.003,
    )
    assert (config.eta1, config.eta2, config.inner_batches, config.second_order) == (1e-3, 1e-2, 2, True)
    assert (config.grad_clip, config.tmp, config.lam_init, config.rewrap_lambdas) == (2.0, 10.0, 1.0, False)


# ---------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------


def official_rank(energies, threshold):
    """The official set_gpm_by_svd rule, written out: k = searchsorted(cumsum ratio, ε) + 1; ε ≥ 1: all of them."""
    if threshold >= 1:
        return len(energies)
    ratio = torch.cumsum(energies, 0) / energies.sum()
    return next(i for i, r in enumerate(ratio.tolist()) if r >= threshold) + 1


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.85, 0.97, 0.995, 1.5])
def test_reach_rank_is_the_official_rule_one_more_than_gpm(threshold):
    energies = torch.tensor([50.0, 30.0, 14.0, 5.0, 0.7, 0.3], dtype=torch.float64)
    assert reach_rank(energies, threshold) == official_rank(energies, threshold)
    if threshold < 1:
        assert reach_rank(energies, threshold) == energy_rank(energies, threshold) + 1
    assert reach_rank(torch.zeros(3, dtype=torch.float64), 0.9) == 0


def test_soft_projection_is_the_hand_formula():
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64))
    weights = torch.tensor([0.3, 0.9], dtype=torch.float64)
    hand = grad @ basis @ torch.diag(weights) @ basis.T
    by_direction = sum(weights[j] * torch.outer(grad @ basis[:, j], basis[:, j]) for j in range(2))
    torch.testing.assert_close(component_in_span(grad, basis, weights), hand)
    torch.testing.assert_close(component_in_span(grad, basis, weights), by_direction)
    # λ = 1: the real-gradient projection G − G·MMᵀ is GPM's.
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(
        grad - component_in_span(grad, basis, ones), project_gradient(grad, projection_matrix(basis))
    )


def test_reservoir_writes_follow_the_official_loop():
    memories, seen = 5, 3
    writes = reservoir_writes(seen, 6, memories, torch.Generator().manual_seed(4))
    draws = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64).tolist()
    buffer = ["old0", "old1", "old2"]
    age = seen
    for i in range(6):  # official push_to_mem, with randint(0, age) = floor(u·age)
        age += 1
        if len(buffer) < memories:
            buffer.append(i)
        else:
            p = int(draws[i] * age)
            if p < memories:
                buffer[p] = i
    expected = {slot: v for slot, v in enumerate(buffer) if isinstance(v, int)}
    assert writes == expected


def test_reservoir_is_a_uniform_sample_of_the_stream():
    memories, batch, stream, trials = 10, 8, 40, 3000
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(stream)
    for _ in range(trials):
        buffer: list[int] = []
        for start in range(0, stream, batch):
            for slot, i in reservoir_writes(start, batch, memories, generator).items():
                if slot == len(buffer):
                    buffer.append(start + i)
                else:
                    buffer[slot] = start + i
        assert len(buffer) == memories == len(set(buffer))
        counts[buffer] += 1
    frequency = counts / trials
    assert (frequency - memories / stream).abs().max() < 0.04  # 5σ of a frequency estimate of 0.25


# ---------------------------------------------------------------------------------------------------------
# the buffer and the memory
# ---------------------------------------------------------------------------------------------------------


def test_buffer_is_filled_only_in_epoch_zero_with_task_ids():
    _, method = make(memories=50)
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    x, y = data(0, 6)
    step(method, 0, x, y, optimizer, epoch=0)
    torch.testing.assert_close(method.buffer_inputs, x)
    assert torch.equal(method.buffer_labels, y) and torch.equal(method.buffer_tasks, torch.zeros(6, dtype=torch.int64))
    kept = method.buffer_inputs.clone()
    for s in range(3):  # epoch 1: the stream is not offered to the buffer again
        step(method, 0, *data(1 + s, 6), optimizer, epoch=1)
    assert torch.equal(method.buffer_inputs, kept) and method.seen == 6
    method.end_task(0, [])
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1)
    step(method, 1, *data(9, 6), optimizer, epoch=0)
    assert method.seen == 12 and method.buffer_tasks.tolist() == [0] * 6 + [1] * 6


def known_rows(energies, directions):
    """Rows X with XᵀX = Σ e_i q_i q_iᵀ: one row sqrt(e_i)·q_i per direction."""
    return torch.stack([math.sqrt(e) * q for e, q in zip(energies, directions.T, strict=True)]).float()


def test_memory_is_rebuilt_from_the_buffer_with_the_stated_rank():
    torch.manual_seed(0)
    d = 5
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    _, method = make(d=d, threshold=0.85, threshold_increment=0.1, threshold_last=0.93, mem_batch_size=50)
    for t, (energies, directions, expected_k, threshold) in enumerate(
        [
            ((0.5, 0.3, 0.14, 0.05, 0.01), q, 3, 0.85),  # cumulative .5 .8 .94: reaches .85 at the third
            ((0.6, 0.35, 0.05), q[:, 2:], 2, 0.93),  # ε = min(.85 + .1, .93); .6 .95 reaches it at the second
        ]
    ):
        method.begin_task(t)
        rows = known_rows(energies, directions)
        method.buffer_inputs = rows
        method.buffer_labels = torch.zeros(rows.shape[0], dtype=torch.int64)
        method.buffer_tasks = torch.full((rows.shape[0],), t)
        method.end_task(t, [])
        record = method.records[-1]
        assert record["layer"] == "backbone.0" and record["threshold"] == pytest.approx(threshold)
        assert record["basis_size"] == expected_k
        kept = directions[:, :expected_k]  # rebuilt from scratch: task 1's M knows nothing of task 0's
        torch.testing.assert_close(projection_matrix(method.bases["backbone.0"]), kept @ kept.T)
        assert record["energy_captured"] == pytest.approx(sum(energies[:expected_k]) / sum(energies))


def test_shared_output_layer_gets_a_memory():
    torch.manual_seed(0)
    model = shared_head_mlp(4, [3], 2)
    method = FSDGPM(model, FSDGPMConfig(memories=8))
    finish_first_task(method)
    assert set(method.bases) == {"0", "2"} and all(m.shape[1] > 0 for m in method.bases.values())


# ---------------------------------------------------------------------------------------------------------
# the training step
# ---------------------------------------------------------------------------------------------------------


def test_step_without_sharpness_buffer_or_basis_is_a_clipped_sgd_step():
    model, method = make(eta1=0.0)
    reference = copy.deepcopy(model)
    x, y = data(0, 8)
    x = 5 * x  # a gradient norm above the clip
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    loss = step(method, 0, x, y, optimizer)

    params = [p for name, p in reference.named_parameters() if not name.startswith(("task_heads.1", "task_heads.2"))]
    ref_loss = F.cross_entropy(reference(x, 0), y)
    grads = torch.autograd.grad(ref_loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert norm > 2
    torch.testing.assert_close(loss, ref_loss.detach())
    trained = dict(model.named_parameters())
    for (name, p), g in zip(
        [(n, p) for n, p in reference.named_parameters() if not n.startswith(("task_heads.1", "task_heads.2"))],
        grads,
        strict=True,
    ):
        torch.testing.assert_close(trained[name].detach(), p.detach() - 0.1 * g * (2 / (norm + 1e-6)))


def reference_step(snapshot, x, y, bx, by, config, lr, second_order):
    """The official observe() for t = 1 written out on the 2-layer net: W (hidden×d) with basis M, heads H0 (frozen),
    H1. Returns (W, H1, θ) after the step."""
    w, h1, theta = (snapshot[k].clone().requires_grad_(True) for k in ("w", "h1", "theta"))
    h0, m = snapshot["h0"], snapshot["m"]
    lam = torch.sigmoid(config.tmp * theta)

    def logits(w_, h_, inputs):
        return torch.relu(inputs @ w_.T) @ h_.T

    fast = (w, h1)
    metas = []
    for xs, ys in ((x[:3], y[:3]), (x[3:], y[3:])):
        inner = F.cross_entropy(logits(*fast, xs), ys)
        gw, gh = torch.autograd.grad(inner, fast, create_graph=second_order)
        gw = gw @ m @ torch.diag(lam) @ m.T
        fast = (fast[0] + config.eta1 * gw.clamp(-2, 2), fast[1] + config.eta1 * gh.clamp(-2, 2))
        total = F.cross_entropy(logits(*fast, x), y, reduction="sum")
        total = total + F.cross_entropy(logits(fast[0], h0, bx), by, reduction="sum")
        metas.append(total / (x.shape[0] + bx.shape[0]))
    loss = (metas[0] + metas[1]) / 2
    gw, gh, gtheta = torch.autograd.grad(loss, (w, h1, theta))
    norm = torch.sqrt((gw**2).sum() + (gh**2).sum())
    scale = min(1.0, 2 / (float(norm) + 1e-6))
    gw, gh = gw * scale, gh * scale
    gtheta = gtheta * min(1.0, 2 / (float(gtheta.norm()) + 1e-6))
    theta_new = theta.detach() - config.eta2 * gtheta  # the first momentum step is plain
    lam_new = torch.sigmoid(config.tmp * theta_new)
    gw = gw - gw @ m @ torch.diag(lam_new) @ m.T
    return w.detach() - lr * gw, h1.detach() - lr * gh, theta_new


@pytest.mark.parametrize("second_order", [True, False])
def test_step_matches_the_official_update_written_out(second_order):
    options = dict(memories=6, eta1=0.5, eta2=0.5, tmp=1.0, lam_init=0.5, threshold=0.9, second_order=second_order)
    model, method = make(**options)
    finish_first_task(method)
    assert method.bases["backbone.0"].shape[1] > 0
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1, momentum=0.9)
    snapshot = {
        "w": model.backbone[0].weight.detach().clone(),
        "h0": model.task_heads[0].weight.detach().clone(),
        "h1": model.task_heads[1].weight.detach().clone(),
        "theta": method.soft["backbone.0"].detach().clone(),
        "m": method.bases["backbone.0"].float(),
    }
    bx, by = method.buffer_inputs.clone(), method.buffer_labels.clone()  # 6 samples, all replayed with |batch| = 6
    x, y = data(99, 6)
    step(method, 1, x, y, optimizer)
    w, h1, theta = reference_step(snapshot, x, y, bx, by, method.config, 0.1, second_order)
    torch.testing.assert_close(model.backbone[0].weight.detach(), w)
    torch.testing.assert_close(model.task_heads[1].weight.detach(), h1)
    torch.testing.assert_close(method.soft["backbone.0"].detach(), theta)
    assert torch.equal(model.task_heads[0].weight, snapshot["h0"])


@pytest.mark.parametrize(("tmp", "lam_init"), [(10.0, 1.0), (1.0, 0.5)])
def test_soft_weights_are_sigmoid_of_theta_and_move(tmp, lam_init):
    _, method = make(memories=6, eta1=0.5, eta2=0.5, tmp=tmp, lam_init=lam_init)
    finish_first_task(method)
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1, momentum=0.9)
    start = method.soft_weights("backbone.0").detach().clone()
    torch.testing.assert_close(start, torch.sigmoid(torch.tensor(tmp * lam_init)).expand_as(start))  # σ(τ·lam_init)
    for s in range(5):
        step(method, 1, *data(20 + s, 6), optimizer)
    theta = method.soft["backbone.0"].detach()
    torch.testing.assert_close(method.soft_weights("backbone.0").detach(), torch.sigmoid(tmp * theta))
    assert not torch.equal(theta, torch.full_like(theta, lam_init))
    if tmp == 1.0:  # at the defaults σ is saturated (dλ/dθ = τσ(1−σ) ≈ 5e-4): θ moves, λ stays 0.99995 in float32
        assert (method.soft_weights("backbone.0").detach() - start).abs().max() > 1e-4


def rewrap_history(tmp, decay_at):
    """λ after each of 4 steps of task 1 with rewrap_lambdas; the lr is halved before step `decay_at`."""
    _, method = make(memories=6, eta2=0.5, tmp=tmp, rewrap_lambdas=True)
    finish_first_task(method)
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1, momentum=0.9)
    assert torch.equal(method.soft_weights("backbone.0"), torch.ones_like(method.soft["backbone.0"]))  # GPM at first
    history = []
    for s in range(4):
        if s == decay_at:
            optimizer.param_groups[0]["lr"] /= 2
        step(method, 1, *data(30 + s, 6), optimizer)
        history.append(method.soft["backbone.0"].detach().clone())
    return history


def test_rewrap_lambdas_reproduces_the_official_disconnected_lambdas():
    history = rewrap_history(tmp=10.0, decay_at=None)
    for lam in history:  # in practice λ ≈ 1: the projection is GPM's
        assert ((lam > 0.9999) & (lam <= 1)).all()
    # After the optimiser's one step at the task start, λ only iterates λ ← σ(τλ).
    for before, after in itertools.pairwise(history):
        torch.testing.assert_close(after, torch.sigmoid(10 * before), rtol=0, atol=0)
    # With a small τ the gradient steps are visible: at the task start and after an lr decay (the official rebuild).
    history = rewrap_history(tmp=1.0, decay_at=3)
    assert not torch.equal(history[0], torch.sigmoid(torch.ones_like(history[0])))
    torch.testing.assert_close(history[1], torch.sigmoid(history[0]), rtol=0, atol=0)
    torch.testing.assert_close(history[2], torch.sigmoid(history[1]), rtol=0, atol=0)
    assert not torch.equal(history[3], torch.sigmoid(history[2]))


def test_other_heads_never_change_while_replay_uses_them():
    model, method = make(memories=6)
    finish_first_task(method)
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1, momentum=0.9)
    heads = [h.weight.detach().clone() for h in model.task_heads]
    backbone = model.backbone[0].weight.detach().clone()
    for s in range(3):
        step(method, 1, *data(40 + s, 6), optimizer)
    assert torch.equal(model.task_heads[0].weight, heads[0]) and torch.equal(model.task_heads[2].weight, heads[2])
    assert not torch.equal(model.task_heads[1].weight, heads[1])
    assert not torch.equal(model.backbone[0].weight, backbone)


def test_step_sizes_follow_the_lr_decay():
    _, method = make(memories=6, eta1=0.01)
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    step(method, 0, *data(0, 6), optimizer)
    optimizer.param_groups[0]["lr"] = 0.025
    step(method, 0, *data(1, 6), optimizer)
    method.end_task(0, [])
    assert method.records[-1]["final_eta1"] == pytest.approx(0.0025)


# ---------------------------------------------------------------------------------------------------------
# errors and saving
# ---------------------------------------------------------------------------------------------------------


def test_sam_optimiser_and_empty_buffer_are_errors():
    _, method = make()
    method.begin_task(0)
    sam = SAM(torch.optim.SGD(method.trainable_parameters(0), lr=0.1), 0.05)
    with pytest.raises(TypeError, match="sam_rho=0"):
        step(method, 0, *data(0, 6), sam)
    with pytest.raises(ValueError, match="buffer is empty"):
        method.end_task(0, [])


def test_state_dict_mid_task_continues_identically(tmp_path):
    model, method = make(memories=6, eta2=0.5)
    finish_first_task(method)
    method.begin_task(1)
    optimizer = torch.optim.SGD(method.trainable_parameters(1), lr=0.1, momentum=0.9)
    for s in range(2):
        step(method, 1, *data(50 + s, 6), optimizer)
    torch.save(method.state_dict(), tmp_path / "state.pt")

    fresh_model, fresh = make(seed=7, memories=6, eta2=0.5)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    fresh_optimizer = torch.optim.SGD(fresh.trainable_parameters(1), lr=0.1, momentum=0.9)
    fresh_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # torch would share the buffers
    for s in range(2, 4):
        step(method, 1, *data(50 + s, 6), optimizer)
        step(fresh, 1, *data(50 + s, 6), fresh_optimizer)
    for (key, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    torch.testing.assert_close(fresh.soft["backbone.0"], method.soft["backbone.0"])
    assert torch.equal(fresh.buffer_inputs, method.buffer_inputs) and fresh.seen == method.seen

    with pytest.raises(ValueError, match="differs"):
        make(memories=7)[1].load_state_dict(method.state_dict())
