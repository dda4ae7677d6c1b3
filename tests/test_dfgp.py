"""Tests of DFGP: the mixup maths against hand formulas, whole steps against a hand-written DFGP / GPM+SAM step
(independent autograd calls, the official order of operations), and the bookkeeping (RNG, state, diagnostics)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches, train
from ness.methods import DFGP, DFGPConfig, build_method
from ness.methods.dfgp import ascend_lambda, mix_inputs, mixup_loss
from ness.models import MultiHeadNet, alexnet, call_model, multi_head_mlp, reduced_resnet18, shared_head_mlp
from ness.optim import SAM

# ---------------------------------------------------------------------------------------------------------
# tiny models, data and hand-written references
# ---------------------------------------------------------------------------------------------------------


def conv_bn_model(seed: int) -> MultiHeadNet:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 6, bias=False),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 6, [3, 3])


def task_data(t: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + t)
    return torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def log_softmax_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written out: −mean_i log softmax(z_i)[y_i]."""
    z = logits - logits.max(dim=1, keepdim=True).values
    log_p = z - z.exp().sum(dim=1, keepdim=True).log()
    return -log_p[torch.arange(labels.shape[0]), labels].mean()


def hand_loss(model, t, x, y, lam, perm, weight, swapped):
    """L = CE(f(x), y) + w·[a·CE(f(x_mix), y) + b·CE(f(x_mix), y_π)], (a, b) = (mean(1−λ), mean(λ)) or swapped;
    λ enters the weights detached, x_mix through an explicit per-example loop."""
    clean = log_softmax_ce(call_model(model, x, t), y)
    if weight == 0:
        return clean
    x_mix = torch.stack([(1 - lam[i]) * x[i] + lam[i] * x[perm[i]] for i in range(x.shape[0])])
    logits = call_model(model, x_mix, t)
    lam_d = lam.detach()
    a, b = (lam_d.mean(), (1 - lam_d).mean()) if swapped else ((1 - lam_d).mean(), lam_d.mean())
    return clean + weight * (a * log_softmax_ce(logits, y) + b * log_softmax_ce(logits, y[perm]))


def replay_draw(state, alpha, n):
    """λ and π as the method's NumPy generator will draw them, from a copy of its saved state."""
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n).astype(np.float32))
    return lam, torch.from_numpy(rng.permutation(n))


def reference_step(model, method, t, x, y, lr):
    """The official DFGP step, written out: λ and weight ascent from the raw gradient at w, the gradient at
    (w + e, λ_adv), unperturb, GPM projection G − G·MMᵀ of the projected layers, SGD. Works on a copy."""
    cfg = method.config
    trained = {id(p) for p in method.trainable_parameters(t)}
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    model = copy.deepcopy(model)
    params = [(n, model.get_parameter(n)) for n in names]
    lam, perm = replay_draw(method._mixup_generator.bit_generator.state, cfg.mixup_alpha, x.shape[0])
    lam.requires_grad_(True)
    loss = hand_loss(model, t, x, y, lam, perm, cfg.mixup_weight, cfg.swapped_label_weights)
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=cfg.mixup_weight > 0)
    if cfg.mixup_weight > 0:
        (g_lam,) = torch.autograd.grad(loss, lam)  # an autograd call of its own for ∇λ
        lam = torch.clamp(lam.detach() + cfg.lambda_rho * g_lam / g_lam.norm(), 0, 1)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        eps = [cfg.rho * g / norm for g in grads]
        for (_, p), e in zip(params, eps, strict=True):
            p.add_(e)
    second = hand_loss(model, t, x, y, lam.detach(), perm, cfg.mixup_weight, cfg.swapped_label_weights)
    grads2 = torch.autograd.grad(second, [p for _, p in params])
    with torch.no_grad():
        for (name, p), e, g in zip(params, eps, grads2, strict=True):
            p.sub_(e)
            layer = name.removesuffix(".weight")
            if t > 0 and layer in method.bases and method.bases[layer].shape[1] > 0:
                m = method.bases[layer]
                flat = g.reshape(g.shape[0], -1).double()
                g = (flat - flat @ m @ m.T).to(g.dtype).view_as(g)
            p.sub_(lr * g)
    return model, loss.detach()


def method_step(model, method, t, x, y, lr):
    optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=lr)
    seen = []
    loss = method.training_step(t, x, y, optimizer, seen.append)
    return loss, seen


def finished_first_task(config: DFGPConfig, seed: int = 0):
    model = conv_bn_model(seed)
    method = DFGP(model, config)
    x0, y0 = task_data(0, 40)
    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=5)
    method.end_task(0, batches(x0, y0, 10))
    return model, method


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_cifar100_column():
    c = DFGPConfig()
    assert (c.threshold, c.threshold_increment, c.mixup_alpha, c.mixup_weight) == (0.95, 0.0, 20.0, 0.1)
    assert (c.rho, c.lambda_rho, c.swapped_label_weights) == (0.05, 0.05, False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mixup_alpha": 0.0}, r"DFGPConfig\.mixup_alpha: got 0\.0; a finite number > 0"),
        ({"mixup_alpha": float("inf")}, r"DFGPConfig\.mixup_alpha: got inf"),
        ({"mixup_weight": -0.1}, r"DFGPConfig\.mixup_weight: got -0\.1; a finite number ≥ 0"),
        ({"mixup_weight": True}, r"DFGPConfig\.mixup_weight: got True"),
        ({"rho": 0.0}, r"DFGPConfig\.rho: got 0\.0; a finite number > 0"),
        ({"lambda_rho": -1.0}, r"DFGPConfig\.lambda_rho: got -1\.0; a finite number ≥ 0"),
        ({"lambda_rho": float("nan")}, r"DFGPConfig\.lambda_rho: got nan"),
        ({"threshold": 1.5}, r"DFGPConfig\.threshold: got 1\.5; a finite number in \(0, 1\]"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        DFGPConfig(**options)


def test_config_rejects_a_non_bool_swap_flag():
    with pytest.raises(TypeError, match=r"DFGPConfig\.swapped_label_weights: got 1; True or False"):
        DFGPConfig(swapped_label_weights=1)


# ---------------------------------------------------------------------------------------------------------
# the mixup maths
# ---------------------------------------------------------------------------------------------------------


def test_mix_inputs_matches_a_per_example_loop():
    x = torch.randn(5, 2, 3, 3)
    lam, perm = torch.rand(5), torch.randperm(5)
    expected = torch.stack([(1 - lam[i]) * x[i] + lam[i] * x[perm[i]] for i in range(5)])
    torch.testing.assert_close(mix_inputs(x, perm, lam), expected)


@pytest.mark.parametrize("swapped", [False, True])
def test_mixup_loss_matches_the_hand_formula(swapped):
    torch.manual_seed(0)
    logits, y, lam = torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.rand(6)
    perm = torch.randperm(6)
    ce_y, ce_p = log_softmax_ce(logits, y), log_softmax_ce(logits, y[perm])
    if swapped:  # the official mixup_criterion: mean(λ·CE(y)) + mean((1 − λ)·CE(y_π))
        expected = (lam * ce_y).mean() + ((1 - lam) * ce_p).mean()
    else:
        expected = sum((1 - lam[i]) / 6 for i in range(6)) * ce_y + sum(lam[i] / 6 for i in range(6)) * ce_p
    torch.testing.assert_close(mixup_loss(logits, y, y[perm], lam, swapped), expected)


def test_fixed_label_weights_follow_the_image_weights():
    """λ = 0 leaves x_mix = x: the fixed loss is then CE(f(x), y), the swapped one CE(f(x), y_π)."""
    logits, y, perm = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 0])
    zero = torch.zeros(4)
    torch.testing.assert_close(mixup_loss(logits, y, y[perm], zero), F.cross_entropy(logits, y))
    torch.testing.assert_close(mixup_loss(logits, y, y[perm], zero, swapped=True), F.cross_entropy(logits, y[perm]))


def test_lambda_ascent_is_the_normalised_clamped_step():
    torch.manual_seed(1)
    model = conv_bn_model(0)
    x, y = task_data(0, 8)
    lam = torch.tensor([0.5, 0.99, 0.01, 0.3, 0.7, 0.5, 0.2, 0.98], requires_grad=True)
    perm = torch.randperm(8)
    (grad,) = torch.autograd.grad(hand_loss(model, 0, x, y, lam, perm, 1.0, False), lam)
    step = 0.3
    norm = math.sqrt(sum(float(g) ** 2 for g in grad))
    expected = torch.tensor(
        [min(max(v + step * float(g) / norm, 0.0), 1.0) for v, g in zip(lam.tolist(), grad, strict=True)]
    )
    result = ascend_lambda(lam.detach(), grad, step)
    torch.testing.assert_close(result, expected)
    assert 0 < float((result - lam.detach()).norm()) <= step + 1e-6
    torch.testing.assert_close(ascend_lambda(lam.detach(), torch.zeros(8), step), lam.detach())


# ---------------------------------------------------------------------------------------------------------
# whole steps against the hand-written references
# ---------------------------------------------------------------------------------------------------------


def test_without_mixup_a_step_is_gpm_with_sam():
    """mixup_weight = 0: e from the unprojected gradient at w, the projected gradient at w + e, SGD from w."""
    model, method = finished_first_task(DFGPConfig(samples=40, mixup_weight=0.0, rho=0.5))
    method.begin_task(1)
    x, y = task_data(1)
    expected, expected_loss = reference_step(model, method, 1, x, y, lr=0.3)
    raw_first = copy.deepcopy(model)
    loss, seen = method_step(model, method, 1, x, y, lr=0.3)
    torch.testing.assert_close(loss, expected_loss)
    assert len(seen) == 2, "check_loss must see both losses"
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    # The SAM step differs from a plain projected step, and BatchNorm and the old head stay put.
    plain = dict(raw_first.named_parameters())
    assert not torch.allclose(model.backbone[4].weight, plain["backbone.4.weight"])
    for name in ("backbone.1.weight", "backbone.1.bias", "task_heads.0.weight"):
        assert torch.equal(dict(model.named_parameters())[name], plain[name]), name


@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("task", [0, 1])
def test_a_step_is_the_official_dfgp_step(swapped, task):
    config = DFGPConfig(
        samples=40, mixup_weight=0.7, mixup_alpha=2.0, rho=0.2, lambda_rho=0.3, swapped_label_weights=swapped
    )
    model, method = finished_first_task(config)
    if task == 0:  # a fresh method: task 0 trains everything, unprojected
        model = conv_bn_model(3)
        method = DFGP(model, config)
    method.begin_task(task)
    x, y = task_data(task)
    expected, expected_loss = reference_step(model, method, task, x, y, lr=0.2)
    loss, seen = method_step(model, method, task, x, y, lr=0.2)
    torch.testing.assert_close(loss, expected_loss)
    assert len(seen) == 2
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_the_two_label_conventions_give_different_steps():
    results = []
    for swapped in (False, True):
        model, method = finished_first_task(DFGPConfig(samples=40, mixup_weight=1.0, mixup_alpha=1.0,
                                                       swapped_label_weights=swapped))  # fmt: skip
        method.begin_task(1)
        method_step(model, method, 1, *task_data(1), lr=0.3)
        results.append(model.backbone[4].weight.detach().clone())
    assert not torch.allclose(results[0], results[1])


def test_the_final_gradient_is_orthogonal_to_the_memory():
    model, method = finished_first_task(DFGPConfig(samples=40, mixup_weight=0.5, rho=0.5))
    method.begin_task(1)
    method_step(model, method, 1, *task_data(1), lr=0.1)
    for name in method.layer_names:
        m = method.bases[name]
        assert m.shape[1] > 0
        grad = model.get_submodule(name).weight.grad
        assert float(grad.abs().max()) > 1e-3
        assert float((grad.reshape(grad.shape[0], -1).double() @ m).abs().max()) < 1e-6, name


def test_a_sam_optimiser_or_mixed_tasks_are_refused():
    model = conv_bn_model(0)
    method = DFGP(model)
    method.begin_task(0)
    x, y = task_data(0)
    sam = SAM(torch.optim.SGD(method.trainable_parameters(0), lr=0.1), 0.05)
    with pytest.raises(ValueError, match=r"TrainConfig\.sam_rho = 0"):
        method.training_step(0, x, y, sam, lambda loss: None)
    sgd = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)
    with pytest.raises(ValueError, match="several tasks' data"):
        method.training_step(0, x, y, sgd, lambda loss: None, tasks=torch.zeros(12, dtype=torch.long))


def test_a_non_finite_loss_is_reported_through_check_loss():
    model = conv_bn_model(0)
    method = DFGP(model)
    method.begin_task(0)
    x, y = task_data(0)
    sgd = torch.optim.SGD(method.trainable_parameters(0), lr=0.1)

    def check(loss):
        raise FloatingPointError("caught")

    with pytest.raises(FloatingPointError, match="caught"):
        method.training_step(0, x, y, sgd, check)


# ---------------------------------------------------------------------------------------------------------
# randomness, state and diagnostics
# ---------------------------------------------------------------------------------------------------------


def test_beta_draws_follow_the_torch_seed_and_the_distribution():
    draws = []
    for seed in (0, 0, 1):
        model = conv_bn_model(0)
        torch.manual_seed(seed)
        draws.append(DFGP(model).draw_mixup(20000))
    torch.testing.assert_close(draws[0][0], draws[1][0], atol=0, rtol=0)
    assert torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0])
    lam, perm = draws[0]
    assert sorted(perm.tolist()) == list(range(20000))
    # Beta(20, 20): mean 1/2, variance 1/(4·(2α + 1)) = 1/164.
    assert abs(float(lam.mean()) - 0.5) < 3e-3 and abs(float(lam.var()) - 1 / 164) < 3e-4


def test_state_dict_restores_the_mixup_draws_and_the_steps(tmp_path):
    model, method = finished_first_task(DFGPConfig(samples=40))
    method.begin_task(1)
    x, y = task_data(1)
    method_step(model, method, 1, x, y, lr=0.1)
    torch.save(method.state_dict(), tmp_path / "state.pt")
    twin_model = conv_bn_model(7)
    torch.manual_seed(123)  # another seed for the twin's generators: the state must override it
    twin = DFGP(twin_model, DFGPConfig(samples=40))
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for m, meth in ((model, method), (twin_model, twin)):
        for _ in range(2):
            method_step(m, meth, 1, x, y, lr=0.1)
        meth.end_task(1, batches(x, y, 6))
    for (name, p), q in zip(model.named_parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    assert torch.equal(method.draw_mixup(8)[0], twin.draw_mixup(8)[0])
    a, b = method.diagnostics(), twin.diagnostics()
    assert len(a) == len(b) and all(str(r) == str(s) for r, s in zip(a, b, strict=True))


def test_diagnostics_report_the_steps_of_each_task():
    model, method = finished_first_task(DFGPConfig(samples=40, lambda_rho=0.05))
    method.begin_task(1)
    x, y = task_data(1)
    for _ in range(3):
        method_step(model, method, 1, x, y, lr=0.1)
    method.end_task(1, batches(x, y, 6))
    steps = [r for r in method.diagnostics() if r["layer"] is None]
    assert [r["task"] for r in steps] == [0, 1]
    assert steps[0]["steps"] == 0 and math.isnan(steps[0]["mean_loss"])  # task 0 trained outside training_step
    last = steps[1]
    assert last["steps"] == 3 and last["mean_loss"] > last["mean_mixup_ce"] * 0.1
    assert 0 <= last["mean_lambda_drawn"] <= 1 and 0 <= last["mean_lambda_adversarial"] <= 1
    # ‖Δλ‖₂ ≤ ρ_λ, so the mean |Δλ| over 12 examples is at most ρ_λ/√12.
    assert 0 < last["mean_lambda_shift"] <= 0.05 / math.sqrt(12) + 1e-7
    layer_records = [r for r in method.diagnostics() if r["layer"] is not None]
    assert {r["threshold"] for r in layer_records} == {0.95}


# ---------------------------------------------------------------------------------------------------------
# every model of the library
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["multi_head_mlp", "shared_head_mlp", "alexnet", "reduced_resnet18"])
def test_runs_on_every_library_model(kind):
    torch.manual_seed(0)
    shape, model = {
        "multi_head_mlp": ((12,), lambda: multi_head_mlp(12, [10, 8], [3, 3])),
        "shared_head_mlp": ((12,), lambda: shared_head_mlp(12, [10, 8], 3)),
        "alexnet": ((3, 32, 32), lambda: alexnet([3, 3])),
        "reduced_resnet18": ((3, 32, 32), lambda: reduced_resnet18([3, 3], input_size=32, nf=4)),
    }[kind]
    model = model()
    method = build_method("dfgp", model, {"samples": 6})
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, *shape, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    method.begin_task(0)
    loss, _ = method_step(model, method, 0, x, y, lr=0.05)
    assert math.isfinite(float(loss))
    method.end_task(0, [(x, y)])
    method.begin_task(1)
    trained = {id(p) for p in method.trainable_parameters(1)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trained}
    method_step(model, method, 1, x, y, lr=0.05)
    for name, value in frozen.items():
        assert torch.equal(model.get_parameter(name), value), f"{kind}: {name} moved in task 1"
