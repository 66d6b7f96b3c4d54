"""P x K batches: every batch holds P labels (identities) and K images of each, for metric losses
such as the batch-hard triplet loss of re-identification (Hermans et al. 2017). Any labelled
dataset: the labels are its ``.targets``.

Epoch ``e`` draws its batches from one generator seeded from ``(seed, e)`` (call
:meth:`PKBatchSampler.set_epoch` before each epoch, as for the ``DistributedSampler`` of
``train_loader``), so an epoch's batches do not depend on the epochs before it and a resumed run
sees the batches an unbroken one saw. Identities are taken in a shuffled order, P distinct ones a
batch (a new shuffled order when one runs out); each identity's images come from its own shuffled
order, K at a time, reshuffled when they run out, so an identity with fewer than K images repeats
some. An epoch has ``len(dataset) // (P * K)`` batches, the number of full batches of that size.
Under ``torchrun`` every process draws the same global batches and takes its slice of
``P * K / world_size`` images (identity-major: P divisible by the processes keeps identities whole).
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch
from torch.utils.data import Sampler

from .base import DataError

__all__ = ['PKBatchSampler']


class _Cycle:
    """Endless shuffled passes over ``items``, from the generator given."""

    def __init__(self, items: List[int], g: torch.Generator):
        self.items, self.g, self.order, self.pos = items, g, [], 0

    def take(self) -> int:
        if self.pos == len(self.order):
            self.order = [self.items[i] for i in torch.randperm(len(self.items), generator=self.g).tolist()]
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


class PKBatchSampler(Sampler):
    """Batches of indices into a dataset with labels ``labels``: P labels x K images each (see the
    module docstring). ``DataError`` when there are fewer than P labels or fewer than P x K images,
    or the processes do not divide P x K."""

    def __init__(self, labels, p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = torch.as_tensor(labels).tolist()
        if p < 1 or k < 1:
            raise DataError(f'P x K batches need P, K >= 1, got {p}, {k}')
        self.by_label: Dict[int, List[int]] = {}
        for i, label in enumerate(labels):
            self.by_label.setdefault(int(label), []).append(i)
        if len(self.by_label) < p:
            raise DataError(f'P x K batches of {p} identities: the data has {len(self.by_label)} labels')
        if len(labels) < p * k:
            raise DataError(f'P x K batches of {p} x {k} images: the data has {len(labels)} images')
        if (p * k) % world_size:
            raise DataError(f'a batch of {p} x {k} images does not split over {world_size} processes')
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.batches = len(labels) // (p * k)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> Iterator[List[int]]:
        """The epoch's batches of all processes together (P x K indices each, identity-major)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        labels = sorted(self.by_label)
        who = _Cycle(labels, g)
        images = {label: _Cycle(self.by_label[label], g) for label in labels}
        for _ in range(self.batches):
            chosen: List[int] = []
            while len(chosen) < self.p:
                label = who.take()
                if label not in chosen:
                    chosen.append(label)
            yield [images[label].take() for label in chosen for _ in range(self.k)]

    def __iter__(self) -> Iterator[List[int]]:
        per = self.p * self.k // self.world_size
        for batch in self.global_batches():
            yield batch[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return self.batches
