"""Leaving the process group at exit: the group must die while the interpreter is whole, which
means the DDP wrappers that hold it (they sit in reference cycles) are collected first."""
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deitlab.distributed import _leave_group


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_leaving_frees_the_ddp_wrappers_that_hold_the_group(gloo_group):
    gc.disable()   # as between two automatic collections: only an explicit one frees the cycle
    try:
        ddp = DistributedDataParallel(nn.Linear(4, 2))
        ddp(torch.randn(3, 4)).sum().backward()
        # a cycle holds it, as frames kept by the lazy imports of DDP's constructor can hold a
        # process's first wrapper, or a trainer that refers to itself
        cycle = [ddp]
        cycle.append(cycle)
        alive = weakref.ref(ddp)
        del ddp, cycle
        assert alive() is not None
        _leave_group()
        assert alive() is None
        assert not dist.is_initialized()
    finally:
        gc.enable()


def test_leaving_twice_or_without_a_group_is_harmless(gloo_group):
    _leave_group()
    _leave_group()
    assert not dist.is_initialized()
