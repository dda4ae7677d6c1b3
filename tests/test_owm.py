"""Tests of OWM: the projector update against the recursive-least-squares closed form and the official rank-1 loop,
the conv patches against the official stride-2 loop, the step against the hand formula G·P, the α schedule, and the
protection it gives an earlier task's inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.methods import OWM, OWMConfig, StepProgress
from ness.methods.owm import conv_patch_rows, rls_update_, scheduled_alpha
from ness.models import MultiHeadNet, alexnet, call_model, multi_head_mlp, shared_head_mlp
from ness.optim import SAM


def no_check(loss):
    """The trainer's loss check, not needed here."""


def step(method, t, x, y, optimizer, progress=None):
    """One training step through the hooks, as the trainer makes it (at the start of the task by default)."""
    method.begin_step(t, progress or StepProgress(0, 0, 1, 1))
    return method.training_step(t, x, y, optimizer, no_check)


def official_rank1(projector, r, alpha):
    """The official update of one vector: k = P r, P ← P − k kᵀ/(α + rᵀk)."""
    k = projector @ r
    return projector - torch.outer(k, k) / (alpha + r @ k)


def small_net(seed=0):
    torch.manual_seed(seed)
    return multi_head_mlp(6, [5, 4], [2, 2])


# -- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"conv_alpha": 0.0}, "conv_alpha"),
        ({"first_linear_alpha": float("nan")}, "first_linear_alpha"),
        ({"linear_alpha": -1.0}, "linear_alpha"),
        ({"output_alpha": True}, "output_alpha"),
        ({"layer_alphas": (1e-3, 0.0)}, "layer_alphas"),
        ({"layer_alphas": ()}, "layer_alphas"),
        ({"conv_patch_stride": 0}, "conv_patch_stride"),
        ({"conv_patch_stride": 2.0}, "conv_patch_stride"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        OWMConfig(**options)


def test_config_rejects_a_string_sequence_and_wrong_layer_count():
    with pytest.raises(TypeError, match="exclude"):
        OWMConfig(exclude="backbone.0")
    with pytest.raises(ValueError, match="2 projected layers"):
        OWM(small_net(), OWMConfig(layer_alphas=(0.1, 0.1, 0.1)))


# -- the maths -----------------------------------------------------------------------------------------------


def test_projector_update_equals_the_recursive_least_squares_closed_form():
    """From P₀ = I, n updates with one α give P = (I + Σ r rᵀ/α)⁻¹ (Sherman–Morrison, applied n times)."""
    gen = torch.Generator().manual_seed(0)
    d, alpha = 7, 0.3
    rows = torch.randn(12, d, generator=gen, dtype=torch.float64)
    closed_form = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + rows.T @ rows / alpha)
    one_by_one = torch.eye(d, dtype=torch.float64)
    for r in rows:
        rls_update_(one_by_one, r[None], alpha)
    torch.testing.assert_close(one_by_one, closed_form)
    torch.testing.assert_close(rls_update_(torch.eye(d, dtype=torch.float64), rows, alpha), closed_form)


def test_batched_update_equals_the_official_rank1_loop_and_stays_symmetric():
    gen = torch.Generator().manual_seed(1)
    d = 6
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    start = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + a @ a.T)  # a P that has already absorbed inputs
    rows = torch.randn(9, d, generator=gen, dtype=torch.float64)
    loop = start
    for r in rows:
        loop = official_rank1(loop, r, 1e-3)
    batched = rls_update_(start.clone(), rows, 1e-3)
    torch.testing.assert_close(batched, loop, rtol=1e-7, atol=1e-9)
    assert torch.equal(batched, batched.T)


@pytest.mark.parametrize("kernel, padding, stride, size", [(2, 1, 1, 7), (3, 1, 1, 8), (3, 0, 2, 11)])
def test_conv_patches_are_the_official_stride_2_loop(kernel, padding, stride, size):
    """Every 2nd output position of the conv's own grid; for a stride-1 conv, x[:, :, 2i:2i+k, 2j:2j+k] of the
    padded batch-mean input, rows i outer, as the official loop visits them."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, bias=False)
    mean = torch.randn(3, size, size)
    padded = F.pad(mean, (padding,) * 4)[None]
    step_ = 2 * stride  # official S = 2 in pixels for stride 1; 2 output positions in general
    positions = (padded.shape[-1] - kernel) // stride + 1
    expected = [
        padded[:, :, i * step_ : i * step_ + kernel, j * step_ : j * step_ + kernel].reshape(-1)
        for i in range((positions + 1) // 2)
        for j in range((positions + 1) // 2)
    ]
    torch.testing.assert_close(conv_patch_rows(conv, mean, 2), torch.stack(expected))
    assert conv_patch_rows(conv, mean, 1).shape[0] == positions**2


def test_alpha_defaults_by_layer_kind_and_position_and_schedule():
    shared = OWM(shared_head_mlp(6, [5, 4], 3))
    assert shared.alpha_finals == (1e-4, 1e-2, 0.1)  # fc1, fc2, shared output: the official fc1, fc2, fc3
    assert OWM(small_net()).alpha_finals == (1e-4, 1e-2)  # task heads are not projected
    assert OWM(alexnet([10, 10])).alpha_finals == (1e-5, 1e-5, 1e-5, 1e-4, 1e-2)
    custom = OWM(small_net(), OWMConfig(layer_alphas=(0.5, 0.25)))
    assert custom.alpha_finals == (0.5, 0.25)

    shared.begin_task(0)
    shared.begin_step(0, StepProgress(epoch=1, batch=5, batches_per_epoch=10, max_epochs=4))  # λ = 1.5/4
    assert shared.alphas() == pytest.approx({"0": 1e-4**0.375, "2": 1e-2**0.375, "4": 0.1**0.375})
    shared.begin_step(0, StepProgress(0, 0, 10, 4))
    assert shared.alphas() == {"0": 1.0, "2": 1.0, "4": 1.0}
    assert scheduled_alpha(1e-5, 0.5) == pytest.approx(10**-2.5)


# -- the method ----------------------------------------------------------------------------------------------


def test_step_is_the_hand_formula_and_the_head_is_not_projected():
    """After one step with SGD lr 1: P' = I − r rᵀ/(α + rᵀr) with r the batch mean, ΔW = −G·P' per layer,
    and the current head moves by −G unprojected."""
    model = small_net()
    method = OWM(model, OWMConfig(clip_grad_norm=None))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=gen), torch.tensor([0, 1] * 4)
    reference = copy.deepcopy(model)
    inputs = {}
    hooks = [
        reference.backbone[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i in (0, 2)
    ]
    F.cross_entropy(call_model(reference, x, 0), y).backward()
    for h in hooks:
        h.remove()

    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=1.0)
    progress = StepProgress(0, 2, 4, 1)  # λ = 0.5
    step(method, 0, x, y, optimizer, progress)
    for i, alpha in ((0, 1e-4**0.5), (2, 1e-2**0.5)):
        r = inputs[i].mean(0).double()
        projector = torch.eye(r.numel(), dtype=torch.float64) - torch.outer(r, r) / (alpha + r @ r)
        torch.testing.assert_close(method.projectors[f"backbone.{i}"], projector)
        grad = reference.backbone[i].weight.grad.double()
        expected = reference.backbone[i].weight.double() - grad @ projector
        torch.testing.assert_close(model.backbone[i].weight.double(), expected, rtol=1e-5, atol=1e-6)
    head = reference.task_heads[0]
    torch.testing.assert_close(model.task_heads[0].weight, head.weight - head.weight.grad)


def test_evaluation_forward_leaves_the_projectors_alone_and_sam_absorbs_once():
    model = small_net()
    method = OWM(model)
    method.begin_task(0)
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    before = {n: p.clone() for n, p in method.projectors.items()}
    with torch.no_grad():
        method.predict(x, 0)
    assert all(torch.equal(method.projectors[n], p) for n, p in before.items())

    sam = SAM(torch.optim.SGD(method.trainable_parameters(0), lr=0.1), rho=0.05)
    step(method, 0, x, y, sam)
    r = x.mean(0).double()
    once = torch.eye(6, dtype=torch.float64) - torch.outer(r, r) / (1.0 + r @ r)
    torch.testing.assert_close(method.projectors["backbone.0"], once)


def test_after_backward_outside_the_training_step_is_an_error():
    model = small_net()
    method = OWM(model)
    method.begin_task(0)
    F.cross_entropy(call_model(model, torch.randn(4, 6), 0), torch.tensor([0, 1, 0, 1])).backward()
    with pytest.raises(RuntimeError, match="training_step"):
        method.after_backward(0)


def test_batchnorm_and_biases_freeze_after_task_0_and_clip_bounds_the_step():
    torch.manual_seed(4)
    backbone = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    model = MultiHeadNet(backbone, 5, [2, 2])
    method = OWM(model, OWMConfig(clip_grad_norm=1e-3))
    method.begin_task(0)
    assert len(method.trainable_parameters(0)) == 5  # weight, bias, BN γ and β, head 0
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    before = [p.detach().clone() for p in model.parameters()]
    step(method, 0, x, y, torch.optim.SGD(method.trainable_parameters(0), lr=1.0))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert 0 < float(moved.norm()) <= 1e-3 * (1 + 1e-5)
    method.end_task(0, [(x, y)])
    method.begin_task(1)
    trainable = method.trainable_parameters(1)
    assert {id(p) for p in trainable} == {id(backbone[0].weight), id(model.task_heads[1].weight)}


def test_a_later_task_barely_moves_the_outputs_of_inputs_the_projector_absorbed():
    """Task 0's inputs lie in a 3-dim subspace; after task 0, one task-1 step changes the first layer's outputs on
    them by a tiny fraction of what the same step does without projection (fine-tuning)."""
    gen = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=gen)).Q
    old_x = torch.randn(64, 3, generator=gen) @ basis.T
    old_y = (old_x[:, 0] > 0).long()
    torch.manual_seed(6)
    model = multi_head_mlp(10, [8], [2, 2])
    method = OWM(model)
    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.1, momentum=0.9)
    steps = 40
    for s in range(steps):
        rows = torch.randperm(64, generator=gen)[:8]
        step(method, 0, old_x[rows], old_y[rows], optimizer, StepProgress(0, s, steps, 1))
    method.end_task(0, [(old_x, old_y)])

    new_x = torch.randn(8, 10, generator=gen)
    new_y = torch.tensor([0, 1] * 4)
    finetuned = copy.deepcopy(model)
    layer = model.backbone[0]
    start = layer(old_x).detach()
    method.begin_task(1)
    step(method, 1, new_x, new_y, torch.optim.SGD(method.trainable_parameters(1), lr=0.1))
    owm_change = (layer(old_x) - start).norm()

    F.cross_entropy(call_model(finetuned, new_x, 1), new_y).backward()
    with torch.no_grad():
        finetuned.backbone[0].weight -= 0.1 * finetuned.backbone[0].weight.grad
    finetune_change = (finetuned.backbone[0](old_x) - start).norm()
    assert finetune_change > 1e-2
    assert owm_change < 1e-3 * finetune_change
    # P along the absorbed subspace is at most α_final-sized: ‖P U‖ ≪ 1 while P keeps the orthogonal complement.
    projector = method.projectors["backbone.0"].float()
    assert torch.linalg.matrix_norm(projector @ basis, ord=2) < 1e-3
    assert method.diagnostics()[0]["free_fraction"] == pytest.approx(7 / 10, abs=0.02)


def test_projectors_are_in_the_state_dict_and_resume_exactly():
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 6, generator=gen), torch.tensor([0, 1] * 4)
    model = small_net()
    method = OWM(model)
    method.begin_task(0)
    step(method, 0, x, y, torch.optim.SGD(method.trainable_parameters(0), lr=0.1))
    state = copy.deepcopy(method.state_dict())
    assert set(state["projectors"]) == {"backbone.0", "backbone.2"}
    torch.testing.assert_close(state["projectors"]["backbone.0"], method.projectors["backbone.0"])

    fresh_model = small_net(seed=9)
    fresh = OWM(fresh_model)
    fresh.load_state_dict(state)
    for m in (method, fresh):
        step(m, 0, x, y, torch.optim.SGD(m.trainable_parameters(0), lr=0.1), StepProgress(0, 1, 2, 1))
        m.end_task(0, [(x, y)])
    for name in method.projectors:
        assert torch.equal(method.projectors[name], fresh.projectors[name])
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert method.diagnostics() == fresh.diagnostics()
    with pytest.raises(ValueError, match="differs"):
        OWM(small_net(), OWMConfig(conv_patch_stride=1)).load_state_dict(state)
