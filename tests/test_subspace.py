"""Tests of ness.subspace against independent computations: explicit im2col loops, hand-computed ranks on
constructed spectra, and the float32 round-off that freezes layers in the official code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ness.subspace
from ness.subspace import (
    CovarianceSum,
    UnsupportedLayerError,
    check_supported,
    covariance_spectrum,
    energy_rank,
    gram,
    input_covariance,
    largest_keys,
    layer_input_rows,
    null_basis,
    null_rank,
    null_threshold,
)

# ---------------------------------------------------------------------------------------------------------
# (b) im2col rows and their covariance against an explicit patch loop
# ---------------------------------------------------------------------------------------------------------


def explicit_pads(kernel, dilation, padding):
    """(top, bottom, left, right) written out by hand; 'same' puts the odd extra pixel bottom/right."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        th = dilation[0] * (kernel[0] - 1)
        tw = dilation[1] * (kernel[1] - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ph, ph, pw, pw


def padded_value(img, c, h, w, mode):
    """Value of the padded image at (c, h, w) given in unpadded coordinates (h, w may be out of range)."""
    height, width = len(img[0]), len(img[0][0])
    if mode == "zeros":
        if 0 <= h < height and 0 <= w < width:
            return img[c][h][w]
        return 0.0
    if mode == "reflect":  # mirror without repeating the edge: -1 -> 1, H -> H-2
        if h < 0:
            h = -h
        if h >= height:
            h = 2 * (height - 1) - h
        if w < 0:
            w = -w
        if w >= width:
            w = 2 * (width - 1) - w
        return img[c][h][w]
    if mode == "circular":
        return img[c][h % height][w % width]
    raise AssertionError(mode)


def explicit_patch_rows(x, kernel, stride, dilation, padding, mode):
    """Nested loops over samples, output rows/cols, channels and kernel offsets: one row per output pixel."""
    data = x.tolist()
    batch, channels, height, width = x.shape
    top, bottom, left, right = explicit_pads(kernel, dilation, padding)
    out_h = (height + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                row = []
                for c in range(channels):
                    for p in range(kernel[0]):
                        for q in range(kernel[1]):
                            h = i * stride[0] + p * dilation[0] - top
                            w = j * stride[1] + q * dilation[1] - left
                            row.append(padded_value(data[b], c, h, w, mode))
                rows.append(row)
    return torch.tensor(rows, dtype=torch.float64), (out_h, out_w)


def explicit_covariance(rows):
    """Σ x xᵀ with plain Python sums."""
    data = rows.tolist()
    d = len(data[0])
    cov = [[0.0] * d for _ in range(d)]
    for row in data:
        for a in range(d):
            for b in range(d):
                cov[a][b] += row[a] * row[b]
    return torch.tensor(cov, dtype=torch.float64)


CONV_CONFIGS = [
    # kernel, stride, padding, dilation, padding_mode
    ((3, 3), (1, 1), 0, (1, 1), "zeros"),
    ((3, 3), (2, 2), 1, (1, 1), "zeros"),
    ((3, 3), (1, 1), "same", (1, 1), "zeros"),
    ((3, 3), (1, 1), "valid", (1, 1), "zeros"),
    ((2, 3), (1, 1), 0, (1, 1), "zeros"),
    ((2, 3), (2, 1), (1, 2), (1, 1), "zeros"),
    ((2, 3), (1, 1), "same", (1, 2), "zeros"),  # uneven 'same' padding (even kernel height)
    ((3, 3), (1, 1), 2, (2, 2), "zeros"),  # dilation 2
    ((3, 3), (1, 1), 1, (1, 1), "reflect"),
    ((3, 3), (2, 2), 1, (1, 1), "circular"),
    ((2, 3), (1, 2), (1, 1), (1, 1), "reflect"),
    ((2, 2), (1, 1), "same", (1, 1), "circular"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "mode"), CONV_CONFIGS)
def test_conv_unfold_covariance_matches_explicit_patch_loop(kernel, stride, padding, dilation, mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode).double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)

    expected_rows, (out_h, out_w) = explicit_patch_rows(x, kernel, stride, dilation, padding, mode)
    # The hand-written loop is itself the conv: rows @ Wᵀ + b reproduces PyTorch's output (checks the loop).
    out = conv(x)
    assert out.shape[-2:] == (out_h, out_w)
    by_rows = expected_rows @ conv.weight.reshape(3, -1).T + conv.bias
    torch.testing.assert_close(by_rows, out.permute(0, 2, 3, 1).reshape(-1, 3))

    rows = layer_input_rows(conv, x)
    torch.testing.assert_close(rows, expected_rows)
    cov = input_covariance(rows)
    assert cov.dtype == torch.float64
    torch.testing.assert_close(cov, explicit_covariance(expected_rows))


@pytest.mark.parametrize("d", [5, 6])
def test_gram_in_blocks_is_the_sum_of_outer_products(monkeypatch, d):
    """XᵀX from its blocks (the lower-left one mirrored) against plain Python sums, on widths odd and even, and
    exactly symmetric; at a real width (600) against einsum's sum of outer products."""
    monkeypatch.setattr(ness.subspace, "GRAM_BLOCKS_FROM", 2)  # blocks from 2 rows and 2 columns
    rows = torch.randn(9, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    product = gram(rows)
    torch.testing.assert_close(product, explicit_covariance(rows), rtol=1e-13, atol=1e-13)
    assert torch.equal(product, product.T)
    monkeypatch.undo()
    wide = torch.randn(600, 600, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    product = gram(wide)
    torch.testing.assert_close(product, torch.einsum("ni,nj->ij", wide, wide), rtol=1e-12, atol=1e-10)
    assert torch.equal(product, product.T)


def test_conv_rows_of_float32_input_accumulate_covariance_in_float64():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    x = 100.0 + torch.randn(3, 2, 6, 6)  # large offset: float32 accumulation would lose digits
    expected_rows, _ = explicit_patch_rows(x.double(), (3, 3), (2, 2), (1, 1), 1, "zeros")
    cov = input_covariance(layer_input_rows(conv, x))
    assert cov.dtype == torch.float64
    torch.testing.assert_close(cov, explicit_covariance(expected_rows), rtol=1e-12, atol=1e-9)


def test_conv_rows_of_unbatched_input_equal_the_batched_rows():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    expected_rows, _ = explicit_patch_rows(x[None], (2, 3), (1, 2), (1, 1), 1, "zeros")
    torch.testing.assert_close(layer_input_rows(conv, x), expected_rows)


def test_linear_rows_of_sequence_input_are_the_flattened_tokens():
    torch.manual_seed(3)
    linear = nn.Linear(5, 4)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    rows = layer_input_rows(linear, x)
    assert rows.shape == (21, 5)
    expected = torch.tensor([x[b, t].tolist() for b in range(3) for t in range(7)], dtype=torch.float64)
    torch.testing.assert_close(rows, expected)
    torch.testing.assert_close(input_covariance(rows), explicit_covariance(expected))


def test_layer_input_rows_rejects_other_layers():
    with pytest.raises(UnsupportedLayerError, match="no layer-input rows for BatchNorm1d"):
        layer_input_rows(nn.BatchNorm1d(3), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------
# (f) both threshold rules on a known spectrum
# ---------------------------------------------------------------------------------------------------------


def random_orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def hand_rank(lams, eps1, rule):
    """Count σᵢ = sqrt(λᵢ) ≤ τ with plain Python math."""
    sigmas = [math.sqrt(v) for v in lams]
    tau = eps1 * math.sqrt(sum(lams)) if rule == "frobenius" else eps1 * sum(sigmas)
    return sum(1 for s in sigmas if s <= tau), tau


def projector(basis):
    return basis @ basis.T


# σ = 1e-4, 1e-3, 1e-2, 0.2, 1, 2: ‖I‖_F = sqrt(Σλ) ≈ 2.2450, Σσ ≈ 3.2111.
KNOWN_LAMBDAS = [1e-8, 1e-6, 1e-4, 0.04, 1.0, 4.0]


@pytest.mark.parametrize(
    ("eps1", "rule", "expected_rank"),
    [
        (0.004, "frobenius", 2),  # τ ≈ 0.00898: keeps 1e-4, 1e-3
        (0.004, "nuclear", 3),  # τ ≈ 0.01284: also keeps 1e-2 -> the two rules differ
        (0.1, "frobenius", 4),  # τ ≈ 0.2245 keeps 0.2
        (0.1, "nuclear", 4),
        (0.5, "frobenius", 5),
        (0.7, "nuclear", 6),  # τ ≈ 2.248 keeps everything
        (1e-5, "frobenius", 0),  # τ ≈ 2.2e-5 < 1e-4: nothing
    ],
)
def test_threshold_rules_pick_the_hand_computed_rank(eps1, rule, expected_rank):
    rank, tau = hand_rank(KNOWN_LAMBDAS, eps1, rule)
    assert rank == expected_rank  # the table above is right
    d = len(KNOWN_LAMBDAS)
    q = random_orthogonal(d, seed=10)
    cov = q @ torch.diag(torch.tensor(KNOWN_LAMBDAS, dtype=torch.float64)) @ q.T

    nb = null_basis(cov, eps1, rule)
    assert nb.rank == rank
    assert nb.basis.shape == (d, rank)
    assert math.isclose(nb.threshold, tau, rel_tol=1e-9)
    torch.testing.assert_close(nb.singular_values, torch.tensor([math.sqrt(v) for v in KNOWN_LAMBDAS]).double())
    torch.testing.assert_close(nb.kept_singular_values, nb.singular_values[:rank])
    torch.testing.assert_close(nb.basis.T @ nb.basis, torch.eye(rank, dtype=torch.float64))
    # Same subspace as the eigenvectors of the `rank` smallest λ (columns of Q in ascending-λ order).
    torch.testing.assert_close(projector(nb.basis), projector(q[:, :rank]), atol=1e-9, rtol=0)


def test_threshold_rules_differ_on_the_same_covariance():
    d = len(KNOWN_LAMBDAS)
    q = random_orthogonal(d, seed=11)
    cov = q @ torch.diag(torch.tensor(KNOWN_LAMBDAS, dtype=torch.float64)) @ q.T
    frob = null_basis(cov, 0.004, "frobenius")
    nuc = null_basis(cov, 0.004, "nuclear")
    assert (frob.rank, nuc.rank) == (2, 3)
    assert nuc.threshold > frob.threshold
    # The nuclear basis contains the Frobenius one.
    torch.testing.assert_close(projector(nuc.basis) @ frob.basis, frob.basis, atol=1e-9, rtol=0)


def test_null_threshold_closed_forms():
    sigma = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert math.isclose(null_threshold(sigma, 0.1, "frobenius"), 0.5)  # 0.1·sqrt(9 + 16)
    assert math.isclose(null_threshold(sigma, 0.1, "nuclear"), 0.7)  # 0.1·(3 + 4)
    with pytest.raises(ValueError, match="unknown threshold rule 'spectral'"):
        null_threshold(sigma, 0.1, "spectral")


@pytest.mark.parametrize("rule", ["frobenius", "nuclear"])
def test_all_zero_covariance_keeps_every_direction(rule):
    d = 5
    nb = null_basis(torch.zeros(d, d, dtype=torch.float64), 1e-3, rule)
    assert nb.rank == d
    assert nb.threshold == 0.0
    torch.testing.assert_close(projector(nb.basis), torch.eye(d, dtype=torch.float64))


def test_eigh_failure_falls_back_to_svd_with_the_same_basis(monkeypatch):
    q = random_orthogonal(6, seed=12)
    cov = q @ torch.diag(torch.tensor(KNOWN_LAMBDAS, dtype=torch.float64)) @ q.T
    expected = null_basis(cov, 0.004, "nuclear")

    def failing_eigh(*args, **kwargs):
        raise RuntimeError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    nb = null_basis(cov, 0.004, "nuclear")
    assert nb.fallback and not expected.fallback
    assert nb.rank == 3
    torch.testing.assert_close(nb.singular_values, expected.singular_values)
    torch.testing.assert_close(projector(nb.basis), projector(q[:, :3]), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# exact ties: a σ equal to τ, a cumulative energy share equal to δ or ε_th. Every value below is exact in binary
# (0.6·5 rounds to exactly 3), so the comparison really is an equality and `≤` vs `<` decides the rank.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "rule", "eps1", "tau", "rank"),
    [
        ((3.0, 4.0), "frobenius", 0.6, 3.0, 1),  # τ = 0.6·‖(3, 4)‖ = 0.6·5 = 3 = σ₁
        ((1.0, 1.0, 1.0, 2.0, 3.0), "frobenius", 0.25, 1.0, 3),  # ‖σ‖ = √16 = 4: three σ = τ = 1
        ((1.0, 3.0), "nuclear", 0.25, 1.0, 1),  # τ = 0.25·(1 + 3) = 1 = σ₁
        ((1.0, 1.0, 2.0, 4.0), "nuclear", 0.125, 1.0, 2),  # τ = 0.125·8 = 1
    ],
)
def test_threshold_rules_keep_a_singular_value_equal_to_tau(sigma, rule, eps1, tau, rank):
    """Eq. 5 keeps σᵢ ≤ τ: a σ exactly at τ is in U."""
    assert rank == sum(1 for s in sigma if s <= tau)  # the table, by hand
    values = torch.tensor(sigma, dtype=torch.float64)
    assert null_threshold(values, eps1, rule) == tau  # the tie is exact
    assert null_rank(values, rule, eps1) == (rank, tau)
    # Through the covariance: diag(σ²) has exactly these eigenvalues, so the tie survives eigh.
    nb = null_basis(torch.diag(values**2), eps1, rule)
    assert nb.singular_values.tolist() == list(sigma) and nb.threshold == tau
    assert nb.rank == rank
    torch.testing.assert_close(projector(nb.basis), torch.diag((values <= tau).double()), atol=1e-12, rtol=0)


# σ = 1, 1, 1, 1, 2, 2, 2: energies 1, 1, 1, 1, 4, 4, 4 (total 16), cumulative 1, 2, 3, 4, 8, 12, 16.
TIED_SIGMA = (1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0)


@pytest.mark.parametrize(("delta", "rank"), [(0.0625, 1), (0.25, 4), (0.5, 5), (0.75, 6)])
def test_energy_rule_keeps_the_directions_whose_share_equals_delta(delta, rank):
    """The energy rule keeps the smallest directions whose cumulative energy is ≤ δ of the total: δ·16 lands
    exactly on a cumulative sum, and the direction that reaches it is kept."""
    cumulative, by_hand = 0.0, 0
    for s in TIED_SIGMA:  # smallest first, stop before the first that would exceed δ·Σσ²
        if cumulative + s * s > delta * 16.0:
            break
        cumulative, by_hand = cumulative + s * s, by_hand + 1
    assert by_hand == rank
    values = torch.tensor(TIED_SIGMA, dtype=torch.float64)
    assert null_rank(values, "energy", 0.5, delta=delta) == (rank, TIED_SIGMA[rank - 1])
    nb = null_basis(torch.diag(values**2), 0.5, "energy", delta=delta)
    assert nb.singular_values.tolist() == list(TIED_SIGMA)
    assert nb.rank == rank


# GPM energies s² = 8, 4, 2, 1, 1 (descending, total 16): cumulative shares 0.5, 0.75, 0.875, 0.9375, 1.
@pytest.mark.parametrize(("threshold", "rank"), [(0.5, 0), (0.75, 1), (0.875, 2), (0.9375, 3), (1.0, 4)])
def test_gpm_first_task_rule_leaves_out_the_direction_that_reaches_the_threshold(threshold, rank):
    """First task: r = #{k : Σ_{i≤k} s_i²/Σs² < ε_th}, strict: a share exactly at ε_th is not counted."""
    assert energy_rank(torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0], dtype=torch.float64), threshold) == rank


# Later task, ‖R‖²_F = 32 and residual energies 8, 4, 2, 1, 1: half is captured already, then 0.75, 0.875, 0.9375,
# 0.96875, 1.
@pytest.mark.parametrize(("threshold", "rank"), [(0.5, 0), (0.75, 1), (0.875, 2), (0.9375, 3), (1.0, 5)])
def test_gpm_later_task_rule_includes_the_direction_that_reaches_the_threshold(threshold, rank):
    """Later tasks: directions are added while the captured share is below ε_th, so the one that brings it exactly
    to ε_th is included and the loop stops there."""
    energies = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert energy_rank(energies, threshold, total=32.0) == rank


# ---------------------------------------------------------------------------------------------------------
# (g) float32 round-off gives negative eigenvalues: they must not freeze the layer
# ---------------------------------------------------------------------------------------------------------


def rank_deficient_cases():
    g = torch.Generator().manual_seed(20)
    wide = torch.randn(5, 40, generator=g)  # n < d: rank 5 in R^40
    base = torch.randn(100, 10, generator=g)
    duplicated = torch.cat([base, base[:, :5], 2 * base[:, 5:8]], dim=1)  # d = 18, rank 10
    return [("n<d", wide, 5), ("duplicated columns", duplicated, 10)]


@pytest.mark.parametrize("rule", ["frobenius", "nuclear"])
@pytest.mark.parametrize("case", rank_deficient_cases(), ids=lambda c: c[0])
def test_round_off_negative_eigenvalues_do_not_freeze_the_layer(case, rule):
    _, x, rank_x = case
    d = x.shape[1]
    cov32 = x.T @ x  # float32 Gram, as the official code forms it
    assert int(torch.linalg.matrix_rank(x.double())) == rank_x
    eig32 = torch.linalg.eigh(cov32.float()).eigenvalues
    assert (eig32 < 0).any(), "the test needs a Gram whose float32 eigenvalues go negative"

    # The official code's bug: sqrt of the unclamped float32 eigenvalues -> NaN, NaN threshold, rank 0.
    sigma_official = eig32.sqrt()
    assert torch.isnan(sigma_official).any()
    tau_official = 1e-2 * sigma_official.sum()
    assert torch.isnan(tau_official)
    assert int((sigma_official <= tau_official).sum()) == 0  # every comparison False: the layer froze

    nb = null_basis(cov32, 0.05, rule)
    assert math.isfinite(nb.threshold) and nb.threshold > 0
    assert not torch.isnan(nb.singular_values).any() and not torch.isnan(nb.basis).any()
    assert nb.rank >= d - rank_x
    # The spectrum has a wide gap (non-null σ ≳ 1, τ ≪ 1), so the rank is exactly the nullity, and the basis
    # is orthogonal to every row of X.
    assert nb.rank == d - rank_x
    assert float((x.double() @ nb.basis).abs().max()) < 1e-2 * float(x.abs().max())


# ---------------------------------------------------------------------------------------------------------
# (h) bad inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_covariance_spectrum_rejects_non_finite_covariance(bad):
    cov = torch.eye(3, dtype=torch.float64)
    cov[1, 2] = bad
    with pytest.raises(ValueError, match=r"conv1: the input covariance holds NaN or Inf"):
        covariance_spectrum(cov, name="conv1")
    with pytest.raises(ValueError, match="NaN or Inf"):
        null_basis(cov, 1e-3)


def test_covariance_spectrum_rejects_non_square():
    with pytest.raises(ValueError, match=r"covariance must be a square matrix, got shape \(2, 3\)"):
        covariance_spectrum(torch.zeros(2, 3))


def test_covariance_spectrum_clamps_and_sorts():
    q = random_orthogonal(4, seed=30)
    lams = torch.tensor([-1e-12, 0.5, 2.0, 9.0], dtype=torch.float64)
    spectrum = covariance_spectrum(q @ torch.diag(lams) @ q.T)
    assert float(spectrum.eigenvalues.min()) >= 0.0
    torch.testing.assert_close(spectrum.singular_values, torch.tensor([0.0, 0.5**0.5, 2**0.5, 3.0]).double())


def test_check_supported_names_the_unsupported_layer():
    with pytest.raises(UnsupportedLayerError, match=r"layer 'features\.2' is a Conv2d with groups=2") as info:
        check_supported("features.2", nn.Conv2d(4, 4, 3, groups=2))
    assert "exclude=['features.2']" in str(info.value)
    assert isinstance(info.value, TypeError)
    with pytest.raises(UnsupportedLayerError, match="layer 'bn' is a BatchNorm1d"):
        check_supported("bn", nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedLayerError, match=r"layer 'lazy' .* is not initialised yet"):
        check_supported("lazy", nn.LazyLinear(3))
    check_supported("ok", nn.Conv2d(4, 4, 3))
    check_supported("ok", nn.Linear(4, 4))


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.float64])
def test_covariance_sum_matches_an_explicit_float64_sum_of_outer_products(rows_dtype):
    """Pooled chunks, float64 products: the exact sum of x xᵀ (one row at a time) to float64 round-off, for batch
    sizes below, across and above the chunk; float32 products are within 1e-6 of it (relative, Frobenius) and keep
    the energy rule's null basis, but lose an exact null direction (the reason NESS multiplies in float64)."""
    g = torch.Generator().manual_seed(5)
    scales = torch.logspace(0, -3, 12, dtype=torch.float64)  # a spectrum over six decades of energy
    batches = [
        (torch.randn(n, 12, generator=g, dtype=torch.float64) * scales).to(rows_dtype) for n in (3, 50, 1, 200, 7, 64)
    ]
    exact_sum, float32_sum = CovarianceSum(chunk=60), CovarianceSum(chunk=60, dtype=torch.float32)
    expected = torch.zeros(12, 12, dtype=torch.float64)
    for rows in batches:
        exact_sum.add(rows)
        float32_sum.add(rows)
        for x in rows.double():  # one row at a time, in float64
            expected += torch.outer(x, x)
    got = exact_sum.result()
    assert got.dtype == torch.float64
    assert float((got - expected).norm() / expected.norm()) < 1e-13
    rough = float32_sum.result()
    assert float((rough - expected).norm() / expected.norm()) < 1e-6
    exact, pooled = null_basis(expected, None, "energy", delta=1e-3), null_basis(rough, None, "energy", delta=1e-3)
    assert pooled.rank == exact.rank > 0
    overlap = torch.linalg.svdvals(exact.basis.T @ pooled.basis)  # cosines of the principal angles
    assert float(overlap.min()) > 1 - 1e-6
    with pytest.raises(ValueError, match="no rows"):
        CovarianceSum().result()


def test_covariance_sum_in_float64_keeps_an_exact_null_direction_that_float32_blurs():
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(3, 8, generator=g)  # rows in a 3-dimensional subspace of R⁸: 5 exact null directions
    rows = (torch.randn(5000, 3, generator=g) @ mix).float()
    smallest = {}
    for dtype in (torch.float64, torch.float32):
        total = CovarianceSum(dtype=dtype)
        for i in range(0, 5000, 64):
            total.add(rows[i : i + 64])
        eigenvalues = torch.linalg.eigvalsh(total.result())
        smallest[dtype] = float(eigenvalues[4].abs() / eigenvalues[-1])  # the largest of the 5 null eigenvalues
    assert smallest[torch.float64] < 1e-12 < 1e-9 < smallest[torch.float32]


def test_largest_keys_are_the_entries_of_the_k_largest_keys_in_descending_order():
    """Against Python's sort of (key, position) pairs, with rows of two tensors kept alongside; k beyond the pool
    keeps everything, sorted."""
    keys = torch.rand(40, generator=torch.Generator().manual_seed(3))
    rows, labels = torch.arange(80.0).reshape(40, 2), torch.arange(40) * 10
    for k in (1, 7, 40, 100):
        order = [i for _, i in sorted(((float(v), i) for i, v in enumerate(keys)), reverse=True)[:k]]
        kept_keys, kept_rows, kept_labels = largest_keys(keys, k, rows, labels)
        assert kept_keys.tolist() == [float(keys[i]) for i in order]
        assert torch.equal(kept_rows, torch.stack([rows[i] for i in order]))
        assert kept_labels.tolist() == [int(labels[i]) for i in order]
