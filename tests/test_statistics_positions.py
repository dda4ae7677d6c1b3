"""NESSConfig.statistics_positions: a random m of each sample's convolution positions summed into Σxxᵀ, weighted P/m.

Checked against explicit computations: the rows chosen are each sample's m largest keys (a loop over samples), the
weighted sum is w·Σxxᵀ of those rows, its mean over many draws is the exact full sum (each row is kept with
probability m/P), a sample's choice depends on its own keys only (so a rank of a distributed pass chooses what one
process does), and through NESS a one-position sample gives P·rrᵀ of one of the layer's own im2col rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness.methods import NESS, NESSConfig
from ness.models import multi_head_mlp
from ness.subspace import CovarianceSum, sample_positions
from ness.validation import ConfigError


def test_each_sample_keeps_the_rows_with_its_largest_keys():
    g = torch.Generator().manual_seed(0)
    samples, per_sample, kept = 5, 9, 3
    rows = torch.randn(samples * per_sample, 4, generator=g)
    keys = torch.rand(samples * per_sample, generator=g)
    chosen, weight = sample_positions(rows, keys, per_sample, kept)
    expected = []
    for s in range(samples):  # explicitly: sort each sample's keys, take the rows of the top three
        own = list(range(s * per_sample, (s + 1) * per_sample))
        expected += sorted(own, key=lambda i: -float(keys[i]))[:kept]
    assert weight == per_sample / kept == 3.0
    assert chosen.shape == (samples * kept, 4)
    assert sorted(map(tuple, chosen.tolist())) == sorted(map(tuple, rows[expected].tolist()))


def test_enough_positions_keep_every_row_with_weight_one():
    rows, keys = torch.randn(12, 3), torch.rand(12)
    for kept in (4, 7):
        chosen, weight = sample_positions(rows, keys, 4, kept)
        assert chosen is rows and weight == 1.0


def test_a_sample_s_choice_depends_on_its_own_keys_only():
    # A rank of a distributed pass gets some samples and their keys (ness.distributed.shard_keys): it must choose
    # for them what one process choosing over the whole batch does.
    g = torch.Generator().manual_seed(1)
    rows, keys = torch.randn(6 * 5, 2, generator=g), torch.rand(6 * 5, generator=g)
    whole, _ = sample_positions(rows, keys, 5, 2)
    mine = torch.cat([torch.arange(5, 10), torch.arange(20, 25)])  # samples 1 and 4
    part, _ = sample_positions(rows[mine], keys[mine], 5, 2)
    torch.testing.assert_close(part, torch.cat([whole[2:4], whole[8:10]]), rtol=0, atol=0)


def test_misshapen_rows_or_keys_are_refused():
    with pytest.raises(ValueError, match="whole samples of 4 positions"):
        sample_positions(torch.randn(10, 3), torch.rand(10), 4, 2)
    with pytest.raises(ValueError, match="one key per row"):
        sample_positions(torch.randn(8, 3), torch.rand(6), 4, 2)
    with pytest.raises(ValueError, match="kept must be ≥ 1"):
        sample_positions(torch.randn(8, 3), torch.rand(8), 4, 0)


def test_a_weighted_sum_adds_w_times_x_xT():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    total = CovarianceSum(chunk=100)  # both batches pooled into one chunk
    total.add(a)
    total.add(b, weight=3.5)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for row, w in [*((r, 1.0) for r in a), *((r, 3.5) for r in b)]:
        r = row.double()
        expected += w * torch.outer(r, r)
    torch.testing.assert_close(total.result(), expected, rtol=1e-13, atol=1e-13)


def test_the_weighted_sample_is_an_unbiased_estimate_of_the_full_sum():
    g = torch.Generator().manual_seed(3)
    samples, per_sample, kept, draws = 4, 12, 3, 4000
    rows = torch.randn(samples * per_sample, 3, generator=g, dtype=torch.float64)
    rows[:, 0] += 2.0  # a mean, so the sum is not isotropic
    exact = rows.T @ rows
    mean = torch.zeros(3, 3, dtype=torch.float64)
    for _ in range(draws):
        chosen, weight = sample_positions(rows, torch.rand(rows.shape[0], generator=g), per_sample, kept)
        mean += weight * (chosen.T @ chosen) / draws
    assert float((mean - exact).norm() / exact.norm()) < 0.02  # Monte Carlo error ~ 1/√4000 of the spread


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def pass_statistics(config: NESSConfig, x: torch.Tensor, batch: int, keys_seed: int = 0) -> dict[str, torch.Tensor]:
    method = NESS(conv_model(), config)
    method._probe_generator.manual_seed(keys_seed)  # the stream of row keys (probes and positions), 0 by default
    method.begin_task(0)
    method.end_task(0, [(x[i : i + batch],) for i in range(0, len(x), batch)])
    return method.covariances


def test_through_ness_a_one_position_sample_is_p_times_one_of_the_layer_s_own_rows():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 6, 6)
    covariances = pass_statistics(NESSConfig(transfer_rank=0, statistics_positions=1), x, 1)
    patches = F.unfold(x, 3)[0].T.double()  # the conv's 16 im2col rows, explicitly
    conv = covariances["0"]
    matches = [i for i, r in enumerate(patches) if torch.allclose(conv, 16 * torch.outer(r, r), rtol=1e-6)]
    assert len(matches) == 1  # P·rrᵀ for exactly one of its own rows
    linear = pass_statistics(NESSConfig(transfer_rank=0), x, 1)["3"]
    torch.testing.assert_close(covariances["3"], linear, rtol=0, atol=0)  # Linear layers: every row, unchanged


def test_through_ness_the_conv_sum_averages_to_the_exact_one_and_enough_positions_change_nothing():
    torch.manual_seed(5)
    x = torch.randn(12, 2, 6, 6)
    exact = pass_statistics(NESSConfig(transfer_rank=0), x, 4)["0"]
    assert torch.equal(pass_statistics(NESSConfig(transfer_rank=0, statistics_positions=16), x, 4)["0"], exact)
    mean, draws, single_errors = torch.zeros_like(exact), 300, []
    for seed in range(draws):
        estimate = pass_statistics(NESSConfig(transfer_rank=0, statistics_positions=4), x, 4, 100 + seed)["0"]
        mean += estimate / draws
        single_errors.append(float((estimate - exact).norm() / exact.norm()))
    single = sum(single_errors) / draws
    assert single > 0.2  # one draw is an estimate (4 of 16 positions)...
    # ...whose mean is the exact sum: its error shrinks as 1/√draws (0.06 of one draw's here), where a missing
    # weight P/m would leave 3/4 of the sum out and a biased choice of positions a fixed error
    assert float((mean - exact).norm() / exact.norm()) < 0.15 * single


def test_a_certificate_is_refused_on_sampled_statistics():
    with pytest.raises(ConfigError, match=r"max_output_shift.*statistics_positions=8.*drop statistics_positions"):
        NESSConfig(statistics_positions=8, max_output_shift=0.1)
    with pytest.raises(ConfigError, match="statistics_positions"):
        NESSConfig(statistics_positions=0)


def test_a_model_without_convolutions_is_told_the_setting_does_nothing():
    with pytest.raises(ValueError, match=r"statistics_positions=8 samples a convolution.*leave it unset"):
        NESS(multi_head_mlp(7, (5,), [2]), NESSConfig(statistics_positions=8))
