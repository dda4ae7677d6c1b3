"""NESS's threshold rules beyond ε₁ (energy share δ, rank budget) and per-layer rules by name pattern."""

from __future__ import annotations

import pytest
import torch

from ness.methods import NESS, NESSConfig
from ness.models import multi_head_mlp
from ness.subspace import null_basis, null_rank

SIGMA = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # ascending; energies 0, 1, 4, 9, 16 (sum 30)


def energy_rank_by_loop(sigma: list[float], delta: float) -> int:
    total, kept, r = sum(s * s for s in sigma), 0.0, 0
    for s in sigma:  # smallest first
        if kept + s * s > delta * total:
            break
        kept, r = kept + s * s, r + 1
    return r


@pytest.mark.parametrize(("delta", "expected"), [(0.01, 1), (0.1, 2), (0.2, 3), (0.5, 4), (0.99, 4)])
def test_energy_rule_keeps_the_smallest_directions_within_delta_of_the_energy(delta, expected):
    r, tau = null_rank(SIGMA, "energy", 0.5, delta=delta)
    assert r == expected == energy_rank_by_loop(SIGMA.tolist(), delta)
    assert tau == SIGMA[r - 1]


@pytest.mark.parametrize(("budget", "expected"), [(1, 1), (3, 3), (5, 5), (50, 5)])
def test_rank_rule_keeps_the_budget_capped_at_d(budget, expected):
    r, tau = null_rank(SIGMA, "rank", 0.5, rank=budget)
    assert r == expected and tau == SIGMA[expected - 1]


def test_rules_need_their_knob():
    with pytest.raises(ValueError, match="needs delta"):
        null_rank(SIGMA, "energy", 0.5)
    with pytest.raises(ValueError, match="needs rank"):
        null_rank(SIGMA, "rank", 0.5)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        null_rank(SIGMA, "spectral", 0.5)  # type: ignore[arg-type]


def test_energy_basis_carries_at_most_delta_of_the_inputs_energy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.01, 3.0, 8, dtype=torch.float64)
    for delta in (1e-4, 1e-2, 0.2):
        basis = null_basis(x.T @ x, 0.5, "energy", delta=delta).basis
        captured = float((x @ basis).square().sum())  # Σ‖Uᵀx‖² over the inputs, one by one in effect
        assert captured <= delta * float(x.square().sum()) * (1 + 1e-9)
        # ... and it is the largest such set: one more direction would exceed δ.
        bigger = null_basis(x.T @ x, 0.5, "rank", rank=basis.shape[1] + 1).basis
        assert float((x @ bigger).square().sum()) > delta * float(x.square().sum())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"threshold": "rank"}, "needs rank"),
        ({"rank": 0}, r"NESSConfig\.rank: got 0; an integer ≥ 1"),
        ({"delta": 0.0}, r"NESSConfig\.delta: got 0\.0; a finite number in \(0, 1\)"),
        ({"delta": 1.5}, r"NESSConfig\.delta: got 1\.5; a finite number in \(0, 1\)"),
        ({"layer_rules": {"backbone.0": {"budget": 3}}}, "unknown settings"),
        ({"layer_rules": {"backbone.0": {"threshold": "rank"}}}, "needs rank"),
        ({"layer_rules": {"backbone.0": {"eps1": 2.0}}}, r"layer_rules\['backbone\.0'\]: NESSConfig\.eps1: got 2\.0"),
    ],
)
def test_bad_rule_settings_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        NESSConfig(transfer_rank=0, **options)


def test_a_layer_rule_must_match_a_layer():
    model = multi_head_mlp(6, (5, 5), [2, 2])
    with pytest.raises(ValueError, match="matches no adapted layer"):
        NESS(model, NESSConfig(transfer_rank=0, layer_rules={"encoder.*": {"rank": 2, "threshold": "rank"}}))


def test_layer_rules_apply_to_their_layers_first_match_wins():
    torch.manual_seed(0)
    model = multi_head_mlp(6, (5, 4), [2, 2])
    rules = {"backbone.0": {"threshold": "rank", "rank": 2}, "backbone.*": {"threshold": "rank", "rank": 3}}
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.5, layer_rules=rules))
    x = torch.randn(40, 6)
    method.begin_task(0)
    method.end_task(0, [(x, torch.zeros(40, dtype=torch.int64))])
    method.begin_task(1)
    ranks = {r["layer"]: (r["rule"], r["rank"]) for r in method.diagnostics()}
    assert ranks == {"backbone.0": ("rank", 2), "backbone.2": ("rank", 3)}
    assert NESSConfig(transfer_rank=0, eps1=0.5, layer_rules=rules).layer_config("other").threshold == "frobenius"
