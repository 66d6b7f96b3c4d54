"""One path from a model to its data: the input it takes, its normalisation, its datasets and
their loaders. Training (``train.engine``), evaluation (``deitlab.evaluate``), pruning
(``prune.nvit``) and token fusion (``tokens.fuse``) all shape data for a model here.

Loaders come in three kinds, each with its own order of batches:

* :func:`train_loader`: epoch-driven training. A ``DistributedSampler`` (also for one process)
  shuffles with ``(seed, epoch)``: call ``loader.sampler.set_epoch(epoch)`` before each epoch;
  under ``torchrun`` each process takes its share of every global batch. Drops the last partial
  batch.
* :func:`stream_loader`: step-driven training (NViT pruning). One generator seeded once shuffles
  every pass, so iterating the loader again continues one stream of orders. Drops the last
  partial batch.
* :func:`pk_loader`: epoch-driven training in batches of P labels x K images
  (:class:`.pk_sampler.PKBatchSampler`, drawn per ``(seed, epoch)``: call
  ``loader.batch_sampler.set_epoch(epoch)``), for metric losses (re-ID's triplet loss).
* :func:`eval_loader`: in order, no shuffling; under ``torchrun`` each process takes every
  ``world_size``-th image (the evaluation sums its counts over processes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset

from ..bench.common import resolve_input_size
from ..console import log
from . import DatasetInfo, build_dataset, dataset_info, parse_spec
from .pk_sampler import PKBatchSampler

__all__ = ['model_input', 'norm_stats', 'model_datasets', 'train_loader', 'pk_loader', 'stream_loader', 'eval_loader']


def model_input(model: nn.Module) -> tuple[int, int]:
    """(channels, size) of the square input the model takes."""
    chans, size, _ = resolve_input_size(model)
    return chans, size


def norm_stats(model: nn.Module, chans: int):
    """The model's normalisation ``(mean, std)`` (its pretrained config's, else 0.5), averaged over
    the colour channels for a one-channel model."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean = list(cfg.get('mean', (0.5,) * 3))
    std = list(cfg.get('std', (0.5,) * 3))
    if chans == 1 and len(mean) > 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return tuple(mean), tuple(std)


def model_datasets(model: nn.Module, spec: str, splits=('train', 'val'), aug: str = 'none',
                   hflip: Optional[float] = None, info: Optional[DatasetInfo] = None, is_main: bool = True) -> list:
    """The ``splits`` of dataset ``spec`` fed to ``model``: at its input channels, size and
    normalisation, whatever the images' own size. ``aug`` and ``hflip`` apply to the ``train``
    split; the others get no augmentation.

    When the images are of another size, one log line says so, e.g. ``images are 28x28, resized
    to the model's 32x32``.
    """
    chans, size = model_input(model)
    mean, std = norm_stats(model, chans)
    info = info or dataset_info(spec)
    note = info.resize_note(size)
    if note:
        log(note, is_main)
        poisoned = poisoned_at(spec)
        if poisoned and poisoned != [size, size]:
            log(f'warning: {spec} was poisoned (CUDA) at {poisoned} and is resized to {size}x{size}, so the model '
                f'sees resized filters (shrinking blurs them); to poison exactly what it sees, make it again with '
                f'--img-size {size}', is_main)
    return [build_dataset(spec, split, img_size=size, in_chans=chans, mean=mean, std=std,
                          aug=aug if split == 'train' else 'none', hflip=hflip if split == 'train' else None)
            for split in splits]


def poisoned_at(spec: str):
    """For a ``folder:`` written by ``deitlab unlearnable make``: the size it was poisoned at
    (``[H, W]``, from its manifest: ``--img-size``, else the images' own size, or ``'several
    sizes'``); None for any other data."""
    name, arg = parse_spec(spec)
    path = Path(arg or '').expanduser() / 'manifest.json'
    if name != 'folder' or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get('method') != 'CUDA':
        return None
    at = manifest.get('poisoned_at')
    if isinstance(at, list):
        return at
    return manifest.get('image_size') or 'several sizes'


def train_loader(dataset: Dataset, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0, pin: bool = False) -> DataLoader:
    """Shuffled batches of ``batch_size`` (per process) for epoch-driven training; see the module doc."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=pin)


def pk_loader(dataset: Dataset, p: int, k: int, seed: int, *, rank: int = 0, world_size: int = 1, workers: int = 0,
              pin: bool = False) -> DataLoader:
    """Batches of ``p`` labels x ``k`` images (the global batch; each process takes its slice) for
    epoch-driven training; see the module doc."""
    sampler = PKBatchSampler(dataset.targets, p, k, seed, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin)


class _RankSlice(Sampler):
    """Slice ``rank`` of every global batch of a batch sampler (``world_size`` equal slices)."""

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        per = self.batches.batch_size // self.world_size
        for batch in self.batches:
            yield batch[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.batches)


def stream_loader(dataset: Dataset, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Shuffled batches from one generator seeded with ``seed``, for step-driven training.

    ``batch_size`` is per process. Under ``torchrun`` every process draws the same global batches
    of ``batch_size * world_size`` images and takes its slice, so the processes together see
    exactly the batches one process with the global batch would see (DDP then averages the
    gradients of the slices, which is the gradient of the global batch)."""
    g = torch.Generator().manual_seed(seed)
    if world_size == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=g)
    batches = BatchSampler(RandomSampler(dataset, generator=g), batch_size * world_size, drop_last=True)
    return DataLoader(dataset, batch_sampler=_RankSlice(batches, rank, world_size), generator=g)


def eval_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                pin: bool = False) -> DataLoader:
    """Batches in order, this process's share of them under ``torchrun``; see the module doc."""
    part = Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
