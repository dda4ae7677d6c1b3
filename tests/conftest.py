"""Shared test settings."""

import logging

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


@pytest.fixture(autouse=True)
def ness_logger_restored():
    """`ness.cli.main` configures the `ness` logger (its own handler, no propagation); put it back after each test,
    so that tests reading log records through caplog (which listens at the root logger) see them in any order."""
    logger = logging.getLogger("ness")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
