"""What NESS keeps between tasks, in bytes: d×d float64 sums per layer, or the raw inputs of earlier tasks."""

from __future__ import annotations

import pytest
import torch

from ness.methods import NESS, NESSConfig
from ness.models import multi_head_mlp


@pytest.mark.parametrize("memory", ["covariance", "replay"])
def test_memory_bytes_counts_what_is_kept(memory):
    torch.manual_seed(0)
    model = multi_head_mlp(7, (5, 3), [2, 2, 2])  # adapted layers: 7→5 (d = 7) and 5→3 (d = 5)
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.5, memory=memory))
    assert method.memory_bytes() == 0
    for t, n in enumerate((30, 20)):
        method.begin_task(t)
        method.end_task(t, [(torch.randn(n, 7), torch.zeros(n, dtype=torch.int64))])
    expected = (7 * 7 + 5 * 5) * 8 if memory == "covariance" else (30 + 20) * 7 * 4  # float64 sums / float32 inputs
    assert method.memory_bytes() == expected
    method.begin_task(2)
    assert {r["memory_bytes"] for r in method.diagnostics() if r["task"] == 2} == {expected}
