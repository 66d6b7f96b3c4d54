"""Process-group set-up for ``torchrun`` (DDP: NCCL on CUDA, gloo on CPU) and seeding."""
from __future__ import annotations

import atexit
import gc
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(ValueError):
    """A ``--device`` this machine does not have, or a name torch does not know."""


def resolve_device(device: Optional[str] = None, local_rank: int = 0) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise DeviceError(f'unknown device {device!r}: use cpu, cuda, cuda:N or mps') from None
        if dev.type == 'cuda' and dev.index is None:
            dev = torch.device('cuda', local_rank)
        if dev.type == 'cuda':
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if dev.index >= have:
                raise DeviceError(f'device {device!r} is not on this machine: it has '
                                  f'{have or "no"} CUDA device{"" if have == 1 else "s"}')
        return dev
    if torch.cuda.is_available():
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (or run as one process)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        # leave the group before the interpreter exits: a process that exits with it still up can
        # abort in the backend's teardown ("terminate called without an active exception")
        atexit.register(_leave_group)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _leave_group() -> None:
    """Destroy the process group while the interpreter is still whole.

    A DDP wrapper can sit in a reference cycle (a process's first one can be held through frames
    kept by the lazy imports its constructor triggers), and its reducer keeps the group alive after
    ``destroy_process_group`` has dropped it from the registry. Left to the collection at
    interpreter shutdown, the group's destructor would join gloo worker threads that may still
    need the GIL to release a tensor, and a thread asking for the GIL during finalization aborts
    the process. Collecting first frees those wrappers, so the group dies here."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """Seed Python, NumPy (timm's Mixup draws from it) and torch."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
