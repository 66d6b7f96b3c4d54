"""Fixtures shared by the test modules. Helpers that take arguments (tiny models, inputs, slice
lists) live in ``_prune_helpers.py`` and ``_tokens_helpers.py`` and are imported by name."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (bitwise-reproducible reductions), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
