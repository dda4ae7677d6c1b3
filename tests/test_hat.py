"""Tests of HAT: the gates, regulariser, gradient masks and compensation against hand formulas and explicit
per-element loops (never the method's own numbers), the protection of fully used units, and the gate placement on
the library's networks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.methods import StepProgress
from ness.methods.hat import HAT, HATConfig, annealed_s, gate_placements
from ness.models import MultiHeadNet, alexnet, multi_head_mlp, reduced_resnet18, shared_head_mlp

DIM = 6


def mlp(seed: int = 0) -> MultiHeadNet:
    torch.manual_seed(seed)
    return multi_head_mlp(DIM, [8, 8], [3, 3, 3], bias=True)


def conv_net(seed: int = 0) -> MultiHeadNet:
    """Conv(bias) → BN (batch statistics) → ReLU → MaxPool → Flatten → Linear(bias) → ReLU, three heads."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 5, [2, 2, 2])


def data(t: int, shape: tuple[int, ...] = (DIM,), n: int = 16, classes: int = 3):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, *shape, generator=g) + 0.5 * t, torch.randint(0, classes, (n,), generator=g)


def train(method: HAT, t: int, x, y, steps: int = 4, lr: float = 0.1) -> None:
    """`steps` SGD steps through the method's hooks, as the trainer runs them (one epoch of `steps` batches)."""
    optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=lr)
    method.model.train()
    for step in range(steps):
        method.begin_step(t, StepProgress(0, step, steps, 1))
        method.training_step(t, x, y, optimizer, lambda loss: None)


def set_embedding(method: HAT, t: int, values) -> None:
    with torch.no_grad():
        method.embedding(t).copy_(torch.as_tensor(values, dtype=torch.float32))


def finish_task_with(method: HAT, t: int, x, y, embedding) -> None:
    """Train task t briefly, then fix its embedding (so its final gates are known) and end it."""
    method.begin_task(t)
    train(method, t, x, y)
    set_embedding(method, t, embedding)
    method.end_task(t, [(x, y)])


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("c", -0.1, r"HATConfig\.c: got -0\.1; a finite number ≥ 0"),
        ("c", float("nan"), r"HATConfig\.c: got nan"),
        ("s_max", 0.5, r"HATConfig\.s_max: got 0\.5; a finite number ≥ 1"),
        ("s_max", True, r"HATConfig\.s_max: got True"),
        ("clip_grad_norm", 0.0, r"HATConfig\.clip_grad_norm: got 0\.0; a finite number > 0, or None"),
        ("clip_grad_norm", float("inf"), r"HATConfig\.clip_grad_norm: got inf"),
        ("embedding_bound", -6.0, r"HATConfig\.embedding_bound: got -6\.0"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        HATConfig(**{field: value})


def test_config_defaults_are_the_official_ones():
    config = HATConfig()
    assert (config.c, config.s_max, config.clip_grad_norm, config.embedding_bound) == (0.75, 400.0, 10000.0, 6.0)


# ---------------------------------------------------------------------------------------------------------
# gates and s
# ---------------------------------------------------------------------------------------------------------


def test_masks_saturate_as_s_grows():
    """σ(s·e) tends to the step function of e: the distance to it shrinks with s, and at s_max it is ~0."""
    e = torch.tensor([-2.0, -0.3, -0.05, 0.05, 0.3, 2.0])
    step = (e > 0).float()
    gaps = [float((torch.sigmoid(s * e) - step).abs().max()) for s in (1 / 400, 1.0, 10.0, 100.0, 400.0)]
    assert all(a > b for a, b in itertools.pairwise(gaps))
    assert gaps[0] == pytest.approx(0.5, abs=0.01)  # s = 1/s_max: every gate about 1/2
    assert gaps[-1] < 2.1e-9  # σ(−400·0.05) = σ(−20)
    method = HAT(mlp())
    method.begin_task(0)
    set_embedding(method, 0, [6.0, -6.0, 0.5, -0.5] * 4)
    assert torch.equal(method.gates(0, 400.0), torch.tensor([1.0, 0.0, 1.0, sigmoid(-200.0)] * 4))


@pytest.mark.parametrize("batch", [0, 1, 3, 7])
def test_s_anneals_inside_every_epoch(batch):
    method = HAT(mlp())
    method.begin_task(0)
    assert method.s == pytest.approx(1 / 400)
    for epoch in (0, 5):  # the same value in every epoch: the schedule restarts each epoch
        method.begin_step(0, StepProgress(epoch, batch, 8, 10))
        assert method.s == pytest.approx(1 / 400 + (400 - 1 / 400) * batch / 8)
    assert annealed_s(0.5, 25.0) == pytest.approx(0.04 + 24.96 * 0.5)


def manual_mlp(model: MultiHeadNet, x, j, m1, m2):
    """The gated MLP by hand: h = relu(W x + b)·m per hidden layer, then head j."""
    b = model.backbone
    h1 = torch.relu(x @ b[0].weight.T + b[0].bias) * m1
    h2 = torch.relu(h1 @ b[2].weight.T + b[2].bias) * m2
    head = model.task_heads[j]
    return h2 @ head.weight.T + head.bias


def test_predict_uses_the_tasks_own_gates_at_s_max():
    model = mlp()
    method = HAT(model, HATConfig(s_max=3.0))
    x, y = data(0)
    finish_task_with(method, 0, x, y, torch.linspace(-1, 1, 16))
    method.begin_task(1)
    set_embedding(method, 1, torch.linspace(1, -1, 16))
    model.eval()
    for j in (0, 1):
        e = method.embedding(j).detach()
        m = torch.sigmoid(3.0 * e)
        expected = manual_mlp(model, x, j, m[:8], m[8:])
        torch.testing.assert_close(method.predict(x, j), expected)
    assert not torch.allclose(method.predict(x, 0), manual_mlp(model, x, 0, *torch.sigmoid(3.0 * e).split(8)))
    with pytest.raises(ValueError, match="no embeddings"):
        method.predict(x, 2)


# ---------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------


def test_loss_is_ce_plus_c_times_the_hand_regulariser():
    model = mlp()
    method = HAT(model, HATConfig(c=0.6, s_max=4.0))
    x, y = data(0)
    method.begin_task(0)
    method.begin_step(0, StepProgress(0, 1, 4, 1))
    s = 1 / 4 + (4 - 1 / 4) / 4
    e0 = method.embedding(0).detach().clone()
    m0 = torch.sigmoid(s * e0)
    reg0 = sum(float(v) for v in m0) / 16  # task 0: Σ m / units
    expected = F.cross_entropy(manual_mlp(model, x, 0, m0[:8], m0[8:]), y) + 0.6 * reg0
    torch.testing.assert_close(method.training_loss(0, x, y), expected)
    set_embedding(method, 0, torch.linspace(-1, 1, 16))
    method.end_task(0, [(x, y)])

    m_prev = [sigmoid(4.0 * float(v)) for v in torch.linspace(-1, 1, 16)]
    method.begin_task(1)
    method.begin_step(1, StepProgress(0, 2, 4, 1))
    s = 1 / 4 + (4 - 1 / 4) * 2 / 4
    m1 = torch.sigmoid(s * method.embedding(1).detach())
    numerator = denominator = 0.0
    for layer in (range(0, 8), range(8, 16)):  # Σ_ℓ Σ_i m(1 − m_prev) / Σ_ℓ Σ_i (1 − m_prev)
        for i in layer:
            numerator += float(m1[i]) * (1 - m_prev[i])
            denominator += 1 - m_prev[i]
    expected = F.cross_entropy(manual_mlp(model, x, 1, m1[:8], m1[8:]), y) + 0.6 * numerator / denominator
    torch.testing.assert_close(method.training_loss(1, x, y), expected)
    with pytest.raises(ValueError, match="mixed tasks"):
        method.training_loss(1, x, y, torch.zeros_like(y))


def test_regulariser_is_zero_when_no_unit_is_free():
    model = mlp()
    method = HAT(model)
    x, y = data(0)
    finish_task_with(method, 0, x, y, torch.full((16,), 6.0))  # every unit fully used
    method.begin_task(1)
    m1 = torch.sigmoid(method.embedding(1).detach() / 400)  # s = 1/s_max at the start of an epoch
    ce = F.cross_entropy(manual_mlp(model, x, 1, m1[:8], m1[8:]), y)
    torch.testing.assert_close(method.training_loss(1, x, y), ce)  # reg = 0, not 0/0


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------


def raw_and_masked_grads(method: HAT, t: int, x, y):
    """The gradients of the loss before and after `after_backward`, by parameter name."""
    model = method.model
    method.trainable_parameters(t)
    model.zero_grad(set_to_none=True)
    method.training_loss(t, x, y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.after_backward(t)
    return raw, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_masks_match_an_explicit_loop_on_a_conv_net():
    """conv weight (o, i, kh, kw): 1 − m_prev[conv o] (first layer: out-gate only); Linear after the flattened conv
    (o, i): 1 − min(m_prev[fc o], m_prev[conv channel of input i]); biases 1 − m_prev[o]."""
    model = conv_net()
    method = HAT(model, HATConfig(s_max=2.0, clip_grad_norm=None))
    x, y = data(0, (1, 8, 8), classes=2)
    embedding = torch.tensor([0.9, -0.4, 0.1, 2.0, -1.5, 0.3, 0.0, 1.2, -0.7])
    finish_task_with(method, 0, x, y, embedding)
    m_prev = [sigmoid(2.0 * float(v)) for v in embedding]
    conv_used, fc_used = m_prev[:4], m_prev[4:]
    method.begin_task(1)
    method.begin_step(1, StepProgress(0, 2, 4, 1))
    raw, masked = raw_and_masked_grads(method, 1, x, y)

    conv_w = raw["backbone.0.weight"].clone()
    for o in range(4):
        conv_w[o] *= 1 - conv_used[o]
    fc_w = raw["backbone.5.weight"].clone()
    for o in range(5):
        for i in range(64):
            fc_w[o, i] *= 1 - min(fc_used[o], conv_used[i // 16])  # input i = (channel, row, col), 16 per channel
    torch.testing.assert_close(masked["backbone.0.weight"], conv_w)
    torch.testing.assert_close(masked["backbone.5.weight"], fc_w)
    torch.testing.assert_close(masked["backbone.0.bias"], raw["backbone.0.bias"] * (1 - torch.tensor(conv_used)))
    torch.testing.assert_close(masked["backbone.5.bias"], raw["backbone.5.bias"] * (1 - torch.tensor(fc_used)))
    torch.testing.assert_close(masked["task_heads.1.weight"], raw["task_heads.1.weight"])  # heads unmasked
    assert "backbone.1.weight" not in masked  # BatchNorm frozen after task 0


def test_shared_output_is_ungated_and_masked_by_its_input_gate():
    torch.manual_seed(0)
    model = shared_head_mlp(DIM, [5], 3, bias=True)
    method = HAT(model, HATConfig(s_max=2.0, clip_grad_norm=None))
    assert [(p.layer, p.gate_after, p.input_gate) for p in method.placements] == [("0", "0", None), ("2", None, "0")]
    x, y = data(0)
    embedding = torch.tensor([1.0, -1.0, 0.2, 3.0, -0.5])
    finish_task_with(method, 0, x, y, embedding)
    used = [sigmoid(2.0 * float(v)) for v in embedding]
    method.begin_task(1)
    raw, masked = raw_and_masked_grads(method, 1, x, y)
    expected = raw["2.weight"].clone()
    for o in range(3):
        for i in range(5):
            expected[o, i] *= 1 - used[i]
    torch.testing.assert_close(masked["2.weight"], expected)
    assert torch.equal(masked["2.bias"], torch.zeros(3))


def test_embedding_gradient_compensation_matches_the_formula():
    model = mlp()
    method = HAT(model, HATConfig(s_max=50.0, clip_grad_norm=None))
    x, y = data(0)
    method.begin_task(0)
    set_embedding(method, 0, torch.linspace(-2.5, 2.5, 16))
    for step, s in ((0, 1 / 50), (3, 1 / 50 + (50 - 1 / 50) * 3 / 4)):
        method.begin_step(0, StepProgress(0, step, 4, 1))
        raw, masked = raw_and_masked_grads(method, 0, x, y)
        e = method.embedding(0).detach()
        expected = raw[f"hat_embedding_{0}"].clone()
        for k in range(16):
            v = float(e[k])
            expected[k] *= (50 / s) * (math.cosh(max(-50.0, min(50.0, s * v))) + 1) / (math.cosh(v) + 1)
        torch.testing.assert_close(masked["hat_embedding_0"], expected)


def test_gradient_norm_is_clipped_and_embeddings_clamped():
    model = mlp()
    method = HAT(model, HATConfig(clip_grad_norm=1e-3))
    x, y = data(0)
    method.begin_task(0)
    _, masked = raw_and_masked_grads(method, 0, x, y)
    assert math.sqrt(sum(float((g**2).sum()) for g in masked.values())) == pytest.approx(1e-3, rel=1e-4)
    set_embedding(method, 0, torch.linspace(-9, 9, 16))
    method.after_step(0)
    assert float(method.embedding(0).detach().abs().max()) == 6.0


# ---------------------------------------------------------------------------------------------------------
# protection
# ---------------------------------------------------------------------------------------------------------


def test_fully_used_units_get_zero_gradient_and_the_old_task_is_unchanged():
    """Task 0's gates exactly 0/1: weights between units it uses get exactly zero gradient, its outputs (BatchNorm on
    batch statistics included) do not move while task 1 trains, and nothing of task 0 (e_0, head 0, BN) changes."""
    model = conv_net()
    method = HAT(model)
    x0, y0 = data(0, (1, 8, 8), classes=2)
    used_conv, used_fc = [6.0, -6.0, 6.0, -6.0], [6.0, 6.0, -6.0, -6.0, 6.0]
    finish_task_with(method, 0, x0, y0, used_conv + used_fc)
    model.eval()
    before = method.predict(x0, 0).detach().clone()
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not n.startswith(("task_heads.1", "hat_embedding_1"))
    }

    method.begin_task(1)
    x1, y1 = data(1, (1, 8, 8), classes=2)
    _, masked = raw_and_masked_grads(method, 1, x1, y1)
    conv_w, fc_w = masked["backbone.0.weight"], masked["backbone.5.weight"]
    for o in (0, 2):
        assert torch.equal(conv_w[o], torch.zeros_like(conv_w[o]))
    for o in (0, 1, 4):
        for i in range(64):
            if i // 16 in (0, 2):
                assert fc_w[o, i] == 0
    assert conv_w[1].abs().sum() > 0 and fc_w[2].abs().sum() > 0  # free units still learn

    train(method, 1, x1, y1, steps=10, lr=0.5)
    model.eval()
    assert torch.equal(method.predict(x0, 0), before)
    for name in ("hat_embedding_0", "task_heads.0.weight", "backbone.1.weight", "backbone.1.bias"):
        assert torch.equal(dict(model.named_parameters())[name], frozen[name]), name
    assert not torch.equal(model.backbone[5].weight, frozen["backbone.5.weight"])


def test_trainable_parameters_hold_the_tasks_own_embedding_only():
    model = conv_net()
    method = HAT(model)
    x, y = data(0, (1, 8, 8), classes=2)
    method.begin_task(0)
    names = {id(p): n for n, p in model.named_parameters()}
    first = {names[id(p)] for p in method.trainable_parameters(0)}
    assert "hat_embedding_0" in first and "backbone.1.weight" in first and "task_heads.1.weight" not in first
    train(method, 0, x, y)
    method.end_task(0, [(x, y)])
    method.begin_task(1)
    second = {names.get(id(p), "hat_embedding_1") for p in method.trainable_parameters(1)}
    assert second == {
        "backbone.0.weight", "backbone.0.bias", "backbone.5.weight", "backbone.5.bias",
        "task_heads.1.weight", "hat_embedding_1",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# placement on the library's networks
# ---------------------------------------------------------------------------------------------------------


def test_alexnet_gates_after_each_batch_norm_and_chains_input_gates():
    placements = gate_placements(alexnet([10, 10]))
    table = [(p.layer, p.units, p.gate_after, p.input_gate) for p in placements]
    b = "backbone."
    assert table == [
        (b + "conv1", 64, b + "bn1", None),
        (b + "conv2", 128, b + "bn2", b + "conv1"),
        (b + "conv3", 256, b + "bn3", b + "conv2"),
        (b + "fc1", 2048, b + "bn4", b + "conv3"),
        (b + "fc2", 2048, b + "bn5", b + "fc1"),
    ]


def test_a_closed_gate_silences_its_channel_after_batch_norm():
    """The gate sits after BN: a channel with gate 0 is exactly 0 after ReLU/dropout/pool, which a gate before a
    batch-statistics BN could not achieve (BN would rescale it back)."""
    model = alexnet([10])
    method = HAT(model)
    method.begin_task(0)
    e = torch.ones(method.total_units)
    e[:3] = -6.0  # conv1 channels 0–2 off
    set_embedding(method, 0, e)
    seen = []
    handle = model.backbone.pool1.register_forward_hook(lambda m, a, out: seen.append(out))
    model.eval()
    method.predict(torch.randn(4, 3, 32, 32), 0)
    handle.remove()
    assert torch.equal(seen[0][:, :3], torch.zeros_like(seen[0][:, :3]))
    assert seen[0][:, 3:].abs().sum() > 0


def test_resnet_blocks_use_conv1_as_conv2s_input_gate_and_out_gates_elsewhere():
    placements = {p.layer: p for p in gate_placements(reduced_resnet18([5], input_size=32))}
    b = "backbone."
    assert len(placements) == 20
    assert placements[b + "conv1"].gate_after == b + "bn1" and placements[b + "conv1"].input_gate is None
    block = b + "layer2.0."
    assert placements[block + "conv1"].gate_after == block + "bn1" and placements[block + "conv1"].input_gate is None
    assert placements[block + "conv2"].input_gate == block + "conv1"
    assert placements[block + "shortcut.0"].gate_after == block + "shortcut.1"
    assert placements[block + "shortcut.0"].input_gate is None


def test_mlp_without_batch_norm_gates_the_layer_output():
    table = [(p.layer, p.gate_after, p.input_gate) for p in gate_placements(multi_head_mlp(4, [3, 3], [2]))]
    assert table == [("backbone.0", "backbone.0", None), ("backbone.2", "backbone.2", "backbone.0")]


# ---------------------------------------------------------------------------------------------------------
# saving and diagnostics
# ---------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_restores_embeddings_masks_and_records():
    model = conv_net()
    method = HAT(model)
    x, y = data(0, (1, 8, 8), classes=2)
    finish_task_with(method, 0, x, y, torch.linspace(-1, 1, 9))
    method.begin_task(1)
    method.begin_step(1, StepProgress(0, 1, 4, 1))
    state = method.state_dict()

    fresh = HAT(conv_net(seed=7))
    fresh.load_state_dict(state)
    assert fresh.active_task == 1 and fresh.s == method.s
    torch.testing.assert_close(fresh.m_prev, method.m_prev)
    for n, p in method.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[n], p)
    for layer, (w, bias) in method._gradient_masks.items():
        torch.testing.assert_close(fresh._gradient_masks[layer][0], w)
        torch.testing.assert_close(fresh._gradient_masks[layer][1], bias)
    assert fresh.diagnostics() == method.diagnostics()
    with pytest.raises(ValueError, match="differs"):
        HAT(conv_net(), HATConfig(c=0.1)).load_state_dict(state)


def test_diagnostics_record_placement_and_usage():
    model = conv_net()
    method = HAT(model)
    x, y = data(0, (1, 8, 8), classes=2)
    finish_task_with(method, 0, x, y, [6.0, -6.0, 6.0, 6.0] + [-6.0] * 5)
    records = {r["layer"]: r for r in method.diagnostics()}
    conv = records["backbone.0"]
    assert conv["gate_after"] == "backbone.1" and conv["input_gate"] is None
    assert conv["units_used"] == 0.75 and conv["weights_frozen"] == 0.75
    assert records["backbone.5"]["units_used"] == 0.0 and records["backbone.5"]["input_gate"] == "backbone.0"
