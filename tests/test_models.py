"""Tests of the paper's two networks against METHODS_SPEC §1.3 and §1.6: every expected number below is copied
from the spec or written out by hand from the layer shapes, and observed through forward hooks, never taken from
the models' own attributes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness import NESS, NESSConfig, NullSpaceAdapter
from ness.methods.base import adaptable_layers
from ness.models import alexnet, call_model, reduced_resnet18
from ness.subspace import input_dim

# ---------------------------------------------------------------------------------------------------------
# the spec's numbers
# ---------------------------------------------------------------------------------------------------------

ALEXNET_LAYERS = ["backbone.conv1", "backbone.conv2", "backbone.conv3", "backbone.fc1", "backbone.fc2"]
ALEXNET_D = [48, 576, 512, 1024, 2048]

RESNET_LAYERS = [
    "backbone.conv1",
    "backbone.layer1.0.conv1",
    "backbone.layer1.0.conv2",
    "backbone.layer1.1.conv1",
    "backbone.layer1.1.conv2",
    "backbone.layer2.0.conv1",
    "backbone.layer2.0.conv2",
    "backbone.layer2.0.shortcut.0",
    "backbone.layer2.1.conv1",
    "backbone.layer2.1.conv2",
    "backbone.layer3.0.conv1",
    "backbone.layer3.0.conv2",
    "backbone.layer3.0.shortcut.0",
    "backbone.layer3.1.conv1",
    "backbone.layer3.1.conv2",
    "backbone.layer4.0.conv1",
    "backbone.layer4.0.conv2",
    "backbone.layer4.0.shortcut.0",
    "backbone.layer4.1.conv1",
    "backbone.layer4.1.conv2",
]
RESNET_D = [27, 180, 180, 180, 180, 180, 360, 20, 360, 360, 360, 720, 40, 720, 720, 720, 1440, 80, 1440, 1440]

# §1.6: the 17 3×3 convolutions (stem, then each block's conv1, conv2): input channels, input side, stride.
RESNET_3X3_CHANNELS = [3, 20, 20, 20, 20, 20, 40, 40, 40, 40, 80, 80, 80, 80, 160, 160, 160]
RESNET_3X3_SIDES = {
    32: [32, 32, 32, 32, 32, 32, 16, 16, 16, 16, 8, 8, 8, 8, 4, 4, 4],
    84: [84, 42, 42, 42, 42, 42, 21, 21, 21, 21, 11, 11, 11, 11, 6, 6, 6],
}
RESNET_3X3_STRIDES = {
    32: [1, 1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1],
    84: [2, 1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1],
}


def bn(c: int) -> int:
    """Affine BatchNorm parameters: a weight and a bias per channel."""
    return 2 * c


# Parameter counts written out from the layer shapes (out · in · k_h · k_w per bias-free conv or linear).
ALEXNET_10_HEADS_OF_10 = (
    (64 * 3 * 4 * 4 + bn(64))  # conv1, bn1
    + (128 * 64 * 3 * 3 + bn(128))  # conv2, bn2
    + (256 * 128 * 2 * 2 + bn(256))  # conv3, bn3
    + (2048 * 1024 + bn(2048))  # fc1, bn4
    + (2048 * 2048 + bn(2048))  # fc2, bn5
    + 10 * (10 * 2048)  # heads
)
RESNET_BACKBONE = (
    (20 * 3 * 3 * 3 + bn(20))  # stem
    + 4 * (20 * 20 * 3 * 3 + bn(20))  # layer1: four 3×3 convs 20→20
    + (40 * 20 * 3 * 3 + bn(40)) + (40 * 40 * 3 * 3 + bn(40)) + (40 * 20 + bn(40))  # layer2.0: conv1, conv2, shortcut
    + 2 * (40 * 40 * 3 * 3 + bn(40))  # layer2.1
    + (80 * 40 * 3 * 3 + bn(80)) + (80 * 80 * 3 * 3 + bn(80)) + (80 * 40 + bn(80))  # layer3.0
    + 2 * (80 * 80 * 3 * 3 + bn(80))  # layer3.1
    + (160 * 80 * 3 * 3 + bn(160)) + (160 * 160 * 3 * 3 + bn(160)) + (160 * 80 + bn(160))  # layer4.0
    + 2 * (160 * 160 * 3 * 3 + bn(160))  # layer4.1
)  # fmt: skip
RESNET32_5_HEADS_OF_10 = RESNET_BACKBONE + 5 * (10 * 640)
RESNET84_20_HEADS_OF_5 = RESNET_BACKBONE + 20 * (5 * 1440)


def images(n: int, side: int, seed: int) -> Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def record_outputs(model: nn.Module, names: list[str], x: Tensor, task: int = 0) -> dict[str, tuple[int, ...]]:
    """Output shape of each named module in one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: shapes.__setitem__(n, tuple(out.shape)))
        for n in names
    ]
    with torch.no_grad():
        model(x, task)
    for h in handles:
        h.remove()
    return shapes


def weight_layer_call_order(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the non-head Conv2d/Linear modules in the order the forward pass calls them."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith("task_heads")
    ]
    with torch.no_grad():
        model(x, 0)
    for h in handles:
        h.remove()
    return order


# ---------------------------------------------------------------------------------------------------------
# AlexNet
# ---------------------------------------------------------------------------------------------------------


def test_alexnet_heads_give_one_logit_per_class_of_their_task():
    torch.manual_seed(0)
    model = alexnet([3, 7, 2])
    x = images(4, 32, seed=1)
    for t, n in enumerate([3, 7, 2]):
        assert model(x, t).shape == (4, n)
        head = model.task_heads[t]
        assert (head.in_features, head.out_features, head.bias) == (2048, n, None)


def test_alexnet_layer_inventory_and_input_dims():
    model = alexnet([10] * 10)
    layers = adaptable_layers(model)
    assert list(layers) == ALEXNET_LAYERS
    assert weight_layer_call_order(model, images(4, 32, seed=0)) == ALEXNET_LAYERS
    assert [input_dim(m) for m in layers.values()] == ALEXNET_D


def test_alexnet_block_order_and_spatial_sizes():
    """Conv → BN → ReLU → Dropout → MaxPool per block, in forward order, with the maps of §1.3."""
    torch.manual_seed(0)
    model = alexnet([10])
    calls: list[tuple[str, type, tuple[int, ...]]] = []
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [
        m.register_forward_hook(lambda m, a, out, n=n: calls.append((n, type(m), tuple(out.shape)))) for n, m in leaves
    ]
    with torch.no_grad():
        model(images(4, 32, seed=1), 0)
    for h in handles:
        h.remove()

    conv_block = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.MaxPool2d]
    fc_block = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert [kind for _, kind, _ in calls] == 3 * conv_block + [nn.Flatten] + 2 * fc_block + [nn.Linear]
    assert [n for n, _, _ in calls] == [n for n, _ in leaves]  # registration order is forward order
    shapes = {n: s for n, _, s in calls}
    assert shapes["backbone.conv1"] == (4, 64, 29, 29) and shapes["backbone.pool1"] == (4, 64, 14, 14)
    assert shapes["backbone.conv2"] == (4, 128, 12, 12) and shapes["backbone.pool2"] == (4, 128, 6, 6)
    assert shapes["backbone.conv3"] == (4, 256, 5, 5) and shapes["backbone.pool3"] == (4, 256, 2, 2)
    assert shapes["backbone.flatten"] == (4, 1024)
    assert shapes["backbone.fc1"] == shapes["backbone.fc2"] == (4, 2048)


def test_alexnet_parameter_count():
    assert ALEXNET_10_HEADS_OF_10 == 6_713_216
    assert sum(p.numel() for p in alexnet([10] * 10).parameters()) == ALEXNET_10_HEADS_OF_10


def dropout_rates(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


def test_alexnet_dropout_rates_and_train_only():
    """Rates (0.2, 0.2, 0.5, 0.5, 0.5); in train each drops about p of its live inputs and rescales the rest by
    1/(1 − p); in eval it passes its input through and the network is deterministic."""
    assert dropout_rates(alexnet([10], dropout=(0.1, 0.3))) == [0.1, 0.1, 0.3, 0.3, 0.3]
    rates = [0.2, 0.2, 0.5, 0.5, 0.5]
    torch.manual_seed(0)
    model = alexnet([10])
    assert dropout_rates(model) == rates
    seen: list[tuple[Tensor, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
        for m in model.modules()
        if isinstance(m, nn.Dropout)
    ]
    x = images(8, 32, seed=1)

    model.train()
    with torch.no_grad():
        first = model(x, 0)
        for (inp, out), p in zip(seen, rates, strict=True):
            alive = inp != 0
            dropped = (out == 0) & alive
            assert abs(dropped.sum().item() / alive.sum().item() - p) < 0.05
            kept = alive & ~dropped
            torch.testing.assert_close(out[kept], inp[kept] / (1 - p))
        assert not torch.allclose(first, model(x, 0))

    seen.clear()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0), model(x, 0), rtol=0, atol=0)
    assert len(seen) == 2 * len(rates) and all(torch.equal(inp, out) for inp, out in seen)
    for h in handles:
        h.remove()


def test_alexnet_rejects_other_input_shapes():
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        alexnet([10])(torch.zeros(2, 3, 28, 28), 0)


# ---------------------------------------------------------------------------------------------------------
# Reduced ResNet-18
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "features"), [(32, 640), (84, 1440)])
def test_resnet_heads_give_one_logit_per_class_of_their_task(side, features):
    torch.manual_seed(0)
    model = reduced_resnet18([4, 6], input_size=side)
    x = images(4, side, seed=1)
    for t, n in enumerate([4, 6]):
        assert model(x, t).shape == (4, n)
        head = model.task_heads[t]
        assert (head.in_features, head.out_features, head.bias) == (features, n, None)


@pytest.mark.parametrize("side", [32, 84])
def test_resnet_layer_inventory_and_input_dims(side):
    model = reduced_resnet18([10], input_size=side)
    layers = adaptable_layers(model)
    assert list(layers) == RESNET_LAYERS
    assert weight_layer_call_order(model, images(2, side, seed=0)) == RESNET_LAYERS
    assert [input_dim(m) for m in layers.values()] == RESNET_D


@pytest.mark.parametrize(
    ("side", "maps"),
    [
        (32, [(20, 32), (20, 32), (40, 16), (80, 8), (160, 4), (160, 2)]),
        (84, [(20, 42), (20, 42), (40, 21), (80, 11), (160, 6), (160, 3)]),
    ],
)
def test_resnet_stage_maps_and_pooled_features(side, maps):
    torch.manual_seed(0)
    model = reduced_resnet18([10], input_size=side)
    names = [f"backbone.{n}" for n in ["conv1", "layer1", "layer2", "layer3", "layer4", "pool", "flatten"]]
    shapes = record_outputs(model, names, images(2, side, seed=1))
    assert [shapes[n] for n in names[:-1]] == [(2, c, s, s) for c, s in maps]
    channels, pooled = maps[-1]
    assert shapes["backbone.flatten"] == (2, channels * pooled * pooled)


@pytest.mark.parametrize("side", [32, 84])
def test_resnet_conv_geometry_of_section_1_6(side):
    """Each 3×3 conv sees the channels and map side of §1.6 and outputs floor((m + 2 − 3)/s) + 1 per side;
    each shortcut sees its block's input and outputs floor((m − 1)/2) + 1."""
    torch.manual_seed(0)
    model = reduced_resnet18([10], input_size=side)
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(n, (tuple(a[0].shape), tuple(out.shape)))
        )
        for n in RESNET_LAYERS
    ]
    with torch.no_grad():
        model(images(2, side, seed=1), 0)
    for h in handles:
        h.remove()

    three_by_three = [n for n in RESNET_LAYERS if "shortcut" not in n]
    for n, c, m, s in zip(
        three_by_three, RESNET_3X3_CHANNELS, RESNET_3X3_SIDES[side], RESNET_3X3_STRIDES[side], strict=True
    ):
        (_, c_in, h_in, w_in), (_, _, h_out, w_out) = seen[n]
        assert (c_in, h_in, w_in) == (c, m, m), n
        assert h_out == w_out == (m + 2 - 3) // s + 1, n
    for stage in (2, 3, 4):
        shortcut = seen[f"backbone.layer{stage}.0.shortcut.0"]
        assert shortcut[0] == seen[f"backbone.layer{stage}.0.conv1"][0]
        m = shortcut[0][-1]
        assert shortcut[1][-2:] == ((m - 1) // 2 + 1,) * 2


def batch_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """BatchNorm2d written out: this batch's per-channel mean and biased variance, then the affine map."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def test_resnet_forward_is_the_spec_formula():
    """Stem relu(BN(conv)), an identity block, a projection block, and the 2×2 average pool, each recomputed
    from the captured input with the spec's strides and paddings."""
    torch.manual_seed(0)
    model = reduced_resnet18([10], input_size=32)
    net = model.backbone
    io: dict[str, tuple[Tensor, Tensor]] = {}
    names = ["backbone", "backbone.layer1", "backbone.layer1.0", "backbone.layer2.0", "backbone.layer4"]
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: io.__setitem__(n, (a[0], out)))
        for n in names
    ]
    with torch.no_grad():
        model(images(4, 32, seed=1), 0)
        for h in handles:
            h.remove()

        x = io["backbone"][0]
        stem = F.relu(batch_norm(F.conv2d(x, net.conv1.weight, stride=1, padding=1), net.bn1))
        torch.testing.assert_close(io["backbone.layer1"][0], stem)

        def block(x: Tensor, b: nn.Module, stride: int, shortcut: Tensor) -> Tensor:
            out = F.relu(batch_norm(F.conv2d(x, b.conv1.weight, stride=stride, padding=1), b.bn1))
            return F.relu(batch_norm(F.conv2d(out, b.conv2.weight, stride=1, padding=1), b.bn2) + shortcut)

        b, (x, y) = net.layer1[0], io["backbone.layer1.0"]
        torch.testing.assert_close(y, block(x, b, 1, x))
        b, (x, y) = net.layer2[0], io["backbone.layer2.0"]
        projection = batch_norm(F.conv2d(x, b.shortcut[0].weight, stride=2), b.shortcut[1])
        torch.testing.assert_close(y, block(x, b, 2, projection))

        last = io["backbone.layer4"][1]  # (4, 160, 4, 4)
        pooled = last.reshape(4, 160, 2, 2, 2, 2).mean(dim=(3, 5))  # (4, 160, 2, 2): mean of each 2×2 window
        torch.testing.assert_close(io["backbone"][1], pooled.reshape(4, 640))


def test_resnet_stem_stride():
    """Stride 1 keeps 32×32, stride 2 halves 84×84 to 42×42 (pad 1)."""
    for side, stride, out in [(32, 1, 32), (84, 2, 42)]:
        model = reduced_resnet18([10], input_size=side)
        assert model.backbone.conv1.stride == (stride, stride)
        assert record_outputs(model, ["backbone.conv1"], images(2, side, seed=0))["backbone.conv1"] == (2, 20, out, out)


def test_resnet_parameter_counts():
    assert RESNET32_5_HEADS_OF_10 == 1_125_140
    assert RESNET84_20_HEADS_OF_5 == 1_237_140
    assert sum(p.numel() for p in reduced_resnet18([10] * 5, input_size=32).parameters()) == RESNET32_5_HEADS_OF_10
    assert sum(p.numel() for p in reduced_resnet18([5] * 20, input_size=84).parameters()) == RESNET84_20_HEADS_OF_5


def test_resnet_rejects_unsupported_sizes_and_widths():
    with pytest.raises(ValueError, match=r"32 \(5-datasets.*84 \(miniImageNet"):
        reduced_resnet18([10], input_size=64)
    with pytest.raises(ValueError, match="nf"):
        reduced_resnet18([10], nf=0)
    with pytest.raises(ValueError, match=r"\(B, 3, 84, 84\)"):
        reduced_resnet18([10], input_size=84)(torch.zeros(2, 3, 32, 32), 0)


# ---------------------------------------------------------------------------------------------------------
# both networks
# ---------------------------------------------------------------------------------------------------------

NETWORKS = {
    "alexnet": (lambda: alexnet([5, 5]), 32, ALEXNET_LAYERS),
    "resnet32": (lambda: reduced_resnet18([5, 5], input_size=32), 32, RESNET_LAYERS),
    "resnet84": (lambda: reduced_resnet18([5, 5], input_size=84), 84, RESNET_LAYERS),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_no_bias_except_batch_norm(name):
    build, _, _ = NETWORKS[name]
    model = build()
    owners = dict(model.named_modules())
    for param_name, _ in model.named_parameters():
        if param_name.rsplit(".", 1)[-1] == "bias":
            assert isinstance(owners[param_name.rsplit(".", 1)[0]], (nn.BatchNorm1d, nn.BatchNorm2d)), param_name
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.bias is None


@pytest.mark.parametrize("name", list(NETWORKS))
def test_parameters_are_registered_in_forward_order(name):
    """named_parameters() meets the backbone's conv, linear and BN modules in the order the forward pass calls
    them, which GPM-style parameter walks and NESS's layer walk assume."""
    build, side, _ = NETWORKS[name]
    model = build()
    owners = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in model.named_parameters()))
    owners = [n for n in owners if not n.startswith("task_heads")]
    calls: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n)) for n in owners]
    with torch.no_grad():
        model(images(2, side, seed=0), 0)
    for h in handles:
        h.remove()
    assert calls == owners


@pytest.mark.parametrize("name", list(NETWORKS))
def test_batch_norm_uses_batch_statistics_in_eval(name):
    build, side, _ = NETWORKS[name]
    torch.manual_seed(0)
    model = build()
    assert list(model.buffers()) == []  # no running_mean, running_var or num_batches_tracked
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == (5 if name == "alexnet" else 1 + 8 * 2 + 3)
    assert all(m.running_mean is None and m.affine for m in norms)

    shared = images(1, side, seed=1)
    batch_a = torch.cat([shared, images(3, side, seed=2)])  # (4, 3, side, side)
    batch_b = torch.cat([shared, 3 * images(3, side, seed=3) + 1])
    model.eval()
    with torch.no_grad():
        out_a, out_b = model(batch_a, 0), model(batch_b, 0)
    assert not torch.allclose(out_a[0], out_b[0], atol=1e-4)


@pytest.mark.parametrize("name", ["alexnet", "resnet32"])
def test_train_and_eval_agree_without_dropout(name):
    """With dropout off, only BN could tell the modes apart, and it normalises with batch statistics in both."""
    torch.manual_seed(0)
    model = alexnet([5], dropout=(0.0, 0.0)) if name == "alexnet" else reduced_resnet18([5])
    x = images(4, 32, seed=1)
    with torch.no_grad():
        trained = model.train()(x, 0)
        evaluated = model.eval()(x, 0)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["alexnet", "resnet32"])
def test_ness_wraps_the_network(name):
    """Task 0 trains, then at task 1 every non-head conv/linear holds an adapter or is reported frozen."""
    build, side, expected = NETWORKS[name]
    torch.manual_seed(0)
    model = build()
    method = NESS(model, NESSConfig(eps1=1e-3, transfer_rank=0))
    g = torch.Generator().manual_seed(1)

    def batch() -> tuple[Tensor, Tensor]:
        return torch.randn(6, 3, side, side, generator=g), torch.randint(0, 5, (6,), generator=g)

    method.begin_task(0)
    optimizer = torch.optim.SGD(method.trainable_parameters(0), lr=0.01)
    x, y = batch()
    F.cross_entropy(call_model(model, x, 0), y).backward()
    optimizer.step()
    method.end_task(0, [batch() for _ in range(3)])

    method.begin_task(1)
    adapted = {n for n, m in model.named_modules() if isinstance(m, NullSpaceAdapter)}
    frozen = {r["layer"] for r in method.diagnostics() if r["task"] == 1 and r["frozen"]}
    assert adapted | frozen == set(expected) and not adapted & frozen
    assert adapted  # 18 samples cannot span a 2048-d (fc2) or 1440-d (layer4) input space

    params = method.trainable_parameters(1)
    x, y = batch()
    logits = call_model(model, x, 1)
    assert logits.shape == (6, 5)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in params)


def test_task_heads_are_found_as_a_submodule_or_a_property_and_absent_otherwise():
    from torch import nn

    from ness.models.heads import task_heads

    class Registered(nn.Module):
        def __init__(self):
            super().__init__()
            self.task_heads = nn.ModuleList([nn.Linear(2, 2)])

    class AsProperty(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 3)])

        @property
        def task_heads(self):
            return self.heads

    registered, as_property = Registered(), AsProperty()
    assert task_heads(registered) is registered.task_heads
    assert task_heads(as_property) is as_property.heads
    assert task_heads(nn.Sequential(nn.Linear(2, 2))) is None
