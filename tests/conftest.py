"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run far faster on one torch thread than on an oversubscribed pair (two
    OpenMP threads on a busy 2-core machine run them many times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
