"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """The tensors in the tests are tiny: one intra-op thread avoids OpenMP spin-waits when the cores are shared,
    and makes results independent of the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
