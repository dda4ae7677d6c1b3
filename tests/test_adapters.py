"""Tests of NullSpaceAdapter: ΔW's layout, both forward paths and merging, against explicit weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.adapters import NullSpaceAdapter, add_low_rank_shift, output_rows
from ness.subspace import UnsupportedLayerError


def orthonormal(d, r, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return q


def make_adapter(base, r, seed):
    """An adapter with a random orthonormal U and a random nonzero V."""
    d = base.weight[0].numel()
    adapter = NullSpaceAdapter(base, orthonormal(d, r, seed), name="layer")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        adapter.V.copy_(torch.randn(adapter.V.shape, generator=g, dtype=torch.float64))
    return adapter


def explicit_delta(u, v, weight_shape):
    """ΔW in PyTorch's weight layout by explicit sums: ΔW[o, (c, p, q)] = Σ_r U[(c, p, q), r] V[r, o],
    with the flattened index c·k_h·k_w + p·k_w + q (the order of a weight's .view(o, -1))."""
    u_list, v_list = u.tolist(), v.tolist()
    o = weight_shape[0]
    inner = weight_shape[1:]
    d = len(u_list)
    flat = [[sum(u_list[i][r] * v_list[r][j] for r in range(len(v_list))) for i in range(d)] for j in range(o)]
    delta = torch.zeros(weight_shape, dtype=u.dtype)
    for j in range(o):
        for i in range(d):
            if len(inner) == 1:
                delta[j, i] = flat[j][i]
            else:
                _, kh, kw = inner
                c, rem = divmod(i, kh * kw)
                p, q = divmod(rem, kw)
                delta[j, c, p, q] = flat[j][i]
    return delta


def force_path(monkeypatch, merged):
    monkeypatch.setattr(NullSpaceAdapter, "_merged_path_is_cheaper", lambda self, x, terms=None, rows=None: merged)


def test_adapter_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    adapter = NullSpaceAdapter(base, orthonormal(6, 2, seed=1))
    assert adapter.rank == 2
    assert isinstance(adapter.V, nn.Parameter) and adapter.V.shape == (2, 4)
    assert torch.count_nonzero(adapter.V) == 0
    assert "U" in dict(adapter.named_buffers()) and "U" not in dict(adapter.named_parameters())
    assert adapter.U.dtype == base.weight.dtype == torch.float32
    torch.testing.assert_close(adapter.U, orthonormal(6, 2, seed=1).float())
    x = torch.randn(5, 6)
    torch.testing.assert_close(adapter(x), base(x))


@pytest.mark.parametrize(
    "base",
    [nn.Linear(7, 5), nn.Conv2d(3, 4, (2, 3)), nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=False)],
    ids=["linear", "conv2x3", "conv3x3"],
)
def test_delta_weight_is_UV_transposed_in_weight_layout(base):
    adapter = make_adapter(base.double(), r=3, seed=2)
    expected = explicit_delta(adapter.U, adapter.V.detach(), tuple(base.weight.shape))
    torch.testing.assert_close(adapter.delta_weight().detach(), expected)


LINEAR_CASES = [
    (True, (5, 7)),
    (False, (5, 7)),
    (True, (3, 4, 7)),  # (B, T, d) sequence input
    (False, (7,)),  # a single unbatched row
]


@pytest.mark.parametrize("merged_path", [True, False], ids=["merged", "low-rank"])
@pytest.mark.parametrize(("bias", "shape"), LINEAR_CASES)
def test_linear_paths_and_merge_match_explicit_weight(monkeypatch, merged_path, bias, shape):
    torch.manual_seed(3)
    base = nn.Linear(7, 5, bias=bias).double()
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone() if bias else None
    adapter = make_adapter(base, r=3, seed=4)
    x = torch.randn(shape, dtype=torch.float64)

    # Explicit x @ (W + (U V)ᵀ)ᵀ (+ b), with U V formed by hand.
    u, v = adapter.U.tolist(), adapter.V.detach().tolist()
    uv = torch.tensor([[sum(u[i][r] * v[r][j] for r in range(3)) for j in range(5)] for i in range(7)]).double()
    expected = x @ (w0 + uv.T).T
    if bias:
        expected = expected + b0

    force_path(monkeypatch, merged_path)
    with torch.no_grad():
        out = adapter(x)
    torch.testing.assert_close(out, expected)

    merged = adapter.merged()
    assert merged is base and type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight.detach(), w0 + uv.T)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out)


CONV_CASES = [
    # kernel, stride, padding, dilation, padding_mode, bias
    (3, 1, 0, 1, "zeros", True),
    (3, 2, 1, 1, "zeros", False),
    ((2, 3), 1, "same", 1, "zeros", True),
    (3, 1, 2, 2, "zeros", False),
    (3, 2, 1, 1, "reflect", True),
    ((2, 3), (1, 2), 1, 1, "circular", False),
    (3, 1, "same", 1, "reflect", True),
    (3, 1, "valid", (1, 2), "zeros", False),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("merged_path", [True, False], ids=["merged", "low-rank"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "mode", "bias"), CONV_CASES)
def test_conv_paths_and_merge_match_explicit_weight(
    monkeypatch, merged_path, kernel, stride, padding, dilation, mode, bias
):
    torch.manual_seed(5)
    base = nn.Conv2d(
        3, 4, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias
    ).double()
    reference = copy.deepcopy(base)  # PyTorch's own conv (its padding logic), given the explicit weight below
    d = base.weight[0].numel()
    adapter = make_adapter(base, r=min(4, d - 1), seed=6)
    with torch.no_grad():
        reference.weight.add_(explicit_delta(adapter.U, adapter.V.detach(), tuple(base.weight.shape)))
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)

    force_path(monkeypatch, merged_path)
    with torch.no_grad():
        expected = reference(x)
        out = adapter(x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(adapter(x[0]), expected[0])  # unbatched (C, H, W) input

    merged = adapter.merged()
    assert merged is base and type(merged) is nn.Conv2d
    torch.testing.assert_close(merged.weight.detach(), reference.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out)


def test_float32_adapter_paths_agree(monkeypatch):
    torch.manual_seed(7)
    base = nn.Conv2d(2, 5, 3, stride=2, padding=1)
    adapter = make_adapter(base, r=4, seed=8)
    x = torch.randn(3, 2, 9, 9)
    with torch.no_grad():
        force_path(monkeypatch, True)
        merged_out = adapter(x)
        force_path(monkeypatch, False)
        low_rank_out = adapter(x)
        expected = F.conv2d(x, base.weight + adapter.delta_weight(), base.bias, stride=2, padding=1)
    torch.testing.assert_close(merged_out, expected)
    torch.testing.assert_close(low_rank_out, expected)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_both_paths_give_the_same_gradient_of_V(monkeypatch, kind):
    torch.manual_seed(9)
    if kind == "linear":
        base, x = nn.Linear(6, 4).double(), torch.randn(8, 6, dtype=torch.float64)
    else:
        base, x = nn.Conv2d(2, 3, 3, stride=2, padding=1).double(), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    base.requires_grad_(False)
    adapter = make_adapter(base, r=2, seed=10)
    g = torch.randn_like(adapter(x))

    grads = []
    for merged_path in (True, False):
        force_path(monkeypatch, merged_path)
        adapter.V.grad = None
        (adapter(x) * g).sum().backward()
        grads.append(adapter.V.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    if kind == "linear":  # d/dV Σ g ⊙ (x W'ᵀ) with W' = W + (U V)ᵀ is (x U)ᵀ g
        torch.testing.assert_close(grads[0], (x @ adapter.U).T @ g)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "mode", "bias"), CONV_CASES)
def test_output_rows_counts_the_conv_output_pixels(kernel, stride, padding, dilation, mode, bias):
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode, bias=bias)
    x = torch.randn(2, 3, 7, 8)
    out = conv(x)
    assert output_rows(conv, x) == out.shape[0] * out.shape[2] * out.shape[3]
    assert output_rows(conv, x[0]) == out.shape[2] * out.shape[3]


def test_output_rows_of_linear_counts_leading_dims():
    assert output_rows(nn.Linear(5, 3), torch.zeros(4, 6, 5)) == 24
    assert output_rows(nn.Linear(5, 3), torch.zeros(5)) == 1


def test_merge_refuses_non_finite_delta():
    base = nn.Linear(4, 3)
    w0 = base.weight.detach().clone()
    adapter = NullSpaceAdapter(base, orthonormal(4, 2, seed=11))
    with torch.no_grad():
        adapter.V[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="ΔW holds NaN or Inf"):
        adapter.merged()
    torch.testing.assert_close(base.weight.detach(), w0)


def test_adapter_rejects_bad_bases_and_layers():
    with pytest.raises(ValueError, match=r"fc: null basis must be \(d=4, r\), got \(5, 2\)"):
        NullSpaceAdapter(nn.Linear(4, 3), torch.zeros(5, 2), name="fc")
    # r = 0: a layer with no null direction can still hold a transfer term; alone it is the base layer.
    conv = nn.Conv2d(2, 3, 3)
    empty = NullSpaceAdapter(conv, torch.zeros(18, 0))
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(empty(x), conv(x))
    with pytest.raises(ValueError, match=r"transfer basis must be \(18, k>0\), got \(18, 0\)"):
        empty.add_transfer(torch.zeros(18, 0))
    with pytest.raises(UnsupportedLayerError, match="layer 'g' is a Conv2d with groups=2"):
        NullSpaceAdapter(nn.Conv2d(4, 4, 3, groups=2), torch.zeros(18, 1), name="g")


@pytest.mark.parametrize("shape", [(7, 6), (2, 5, 6)])
@pytest.mark.parametrize("adapt_bias", [False, True])
def test_add_low_rank_shift_adds_x_b_f_with_and_without_the_fused_path(shape, adapt_bias):
    """The fused addmm (a 2-D batch, no bias row) and the general path must both add x·B·F (+ the bias row's B·F)."""
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(6, 4, dtype=torch.float64)
    basis = torch.randn(6 + int(adapt_bias), 3, generator=g, dtype=torch.float64)
    factor = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    out = torch.randn(*shape[:-1], 4, generator=g, dtype=torch.float64)
    expected = out.clone()
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape[:-1]]).reshape(-1, len(shape) - 1):
        row = x[tuple(index)]  # one input row, by an explicit sum over the basis directions
        shift = sum(row @ basis[:6, j] * factor[j] for j in range(3))
        if adapt_bias:
            shift = shift + sum(basis[6, j] * factor[j] for j in range(3))
        expected[tuple(index)] += shift
    got = add_low_rank_shift(out, layer, x, basis, factor, adapt_bias)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("merged", [False, True])
def test_the_stacked_bases_follow_u_and_u_bar_when_they_change(merged, monkeypatch):
    """U·V + Ū·A is computed as one term [U Ū]·[V; A] with [U Ū] kept between passes: a change of U in place, a
    new Ū, a pickled copy and a disabled transfer term must each give x(W + UV + ŪA)ᵀ of the bases now held."""
    import pickle

    monkeypatch.setattr(NullSpaceAdapter, "_merged_path_is_cheaper", lambda self, x, terms=None, rows=None: merged)
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(6, 3, bias=False, dtype=torch.float64)
    adapter = NullSpaceAdapter(layer, orthonormal(6, 2, 1))
    adapter.add_transfer(orthonormal(6, 3, 2))
    with torch.no_grad():
        adapter.V.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
        adapter.A.copy_(torch.randn(3, 3, generator=g, dtype=torch.float64))
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)

    def explicit(module, transfer=True):
        weight = layer.weight.T + module.U @ module.V + (module.transfer_basis @ module.A if transfer else 0)
        return x @ weight

    torch.testing.assert_close(adapter(x), explicit(adapter))
    adapter.U.copy_(orthonormal(6, 2, 3))  # in place: the same tensor, a new version
    torch.testing.assert_close(adapter(x), explicit(adapter))
    adapter.transfer_basis = orthonormal(6, 3, 5)  # a new tensor
    torch.testing.assert_close(adapter(x), explicit(adapter))
    copied = pickle.loads(pickle.dumps(adapter))
    torch.testing.assert_close(copied(x), explicit(copied))
    adapter.transfer_enabled = False
    torch.testing.assert_close(adapter(x), explicit(adapter, transfer=False))


def test_a_hook_on_the_base_layer_still_runs():
    """The adapter calls a plain nn.Linear base as F.linear; a hook on the base (or on every module) must make it
    call the module instead, so that the hook runs and may change the output."""
    base = nn.Linear(4, 3)
    adapter = NullSpaceAdapter(base, orthonormal(4, 2, 0).float())
    x = torch.randn(5, 4)
    plain = adapter(x)
    torch.testing.assert_close(plain, base(x))  # V = 0: the base's output
    handle = base.register_forward_hook(lambda module, args, out: out + 1)
    torch.testing.assert_close(adapter(x), plain + 1)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out * 2)
    try:
        doubled = adapter(x)  # the base's output doubled, then the adapter's own output doubled
    finally:
        handle.remove()
    torch.testing.assert_close(doubled, plain * 4)


def test_an_adapter_pickled_before_the_stacked_cache_existed_still_runs():
    base = nn.Linear(4, 3)
    adapter = NullSpaceAdapter(base, orthonormal(4, 2, 0).float())
    adapter.add_transfer(orthonormal(4, 4, 1)[:, 2:].float().contiguous())
    x = torch.randn(5, 4)
    state = adapter.__getstate__()
    del state["_stacked"]  # as a checkpoint of an older ness-cl holds it
    old = NullSpaceAdapter.__new__(NullSpaceAdapter)
    old.__setstate__(state)
    torch.testing.assert_close(old(x), adapter(x))


@pytest.mark.parametrize("shape", [(5, 6), (2, 5, 6)], ids=["rows", "batch_of_sequences"])
def test_adapter_under_bf16_autocast_is_the_low_precision_layer(shape):
    """Under CPU autocast F.linear computes in bfloat16: the adapter's output is bfloat16 and, to bfloat16's precision,
    x·(W + U·V)ᵀ + b written out in float32 (a batch of rows takes the short path, a 3-D input the general one)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    adapter = NullSpaceAdapter(base, orthonormal(6, 2, seed=1))
    with torch.no_grad():
        adapter.V.copy_(torch.randn(2, 4))
    x = torch.randn(*shape)
    expected = x @ (base.weight + (adapter.U @ adapter.V).T).T + base.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
