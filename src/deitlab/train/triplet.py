"""``deitlab train --triplet``: the batch-hard triplet loss on the model's features (re-identification).

For an anchor ``a`` with label ``y_a`` in a batch, the hardest positive is the farthest image of
its label and the hardest negative the nearest of another label (Hermans, Beyer, Leibe, "In Defense
of the Triplet Loss for Person Re-Identification", 2017):

    L_tri = mean_a relu( max_{p: y_p = y_a, p != a} d(f_a, f_p) - min_{n: y_n != y_a} d(f_a, f_n) + margin )

over the anchors that have both, with Euclidean distances ``d`` of the features ``f``. A batch of P
labels x K images each (``--pk P,K``) gives every anchor K - 1 positives.

* Plain training: the features are the model's pre-logits (``forward_head(..., pre_logits=True)``,
  the class token after the final norm for a ViT, what ``deitlab eval --retrieval`` ranks by); the
  loss is the run's label loss on the logits plus ``L_tri`` (:class:`TripletCriterion`,
  :class:`TripletHooks`).
* DCAL (``--dcal --triplet``): each branch's loss gets its own ``L_tri`` on that branch's features
  (:mod:`deitlab.train.dcal_train`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum
from .loop import Hooks

__all__ = ['batch_hard_triplet', 'features_and_logits', 'TripletCriterion', 'TripletHooks']


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """``L_tri`` of the module docstring for ``features`` (B, D) and ``labels`` (B,); 0 (with a
    gradient path) when no anchor has both a positive and a negative in the batch."""
    f = features.float()
    sq = (f * f).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2 * f @ f.t()).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not bool(valid.any()):
        return f.sum() * 0.0
    d_ap = dist.masked_fill(~pos, float('-inf')).amax(dim=1)
    d_an = dist.masked_fill(~neg, float('inf')).amin(dim=1)
    return torch.relu(d_ap[valid] - d_an[valid] + margin).mean()


def features_and_logits(model: nn.Module, x: torch.Tensor) -> dict:
    """``dict(logits, features)`` of a timm-style model in one pass through its blocks: the
    pre-logits features and the head applied to them."""
    tokens = model.forward_features(x)
    return dict(logits=model.forward_head(tokens), features=model.forward_head(tokens, pre_logits=True))


class TripletCriterion:
    """``criterion(x, outputs, y)``: the run's criterion on ``outputs['logits']`` plus the batch-hard
    triplet loss on ``outputs['features']``; the last triplet term is kept in ``last``."""

    def __init__(self, criterion: Callable, margin: float = 0.3):
        self.criterion, self.margin = criterion, float(margin)
        self.last = None

    def __call__(self, x: torch.Tensor, outputs: dict, y: torch.Tensor) -> torch.Tensor:
        self.last = batch_hard_triplet(outputs['features'], y, self.margin)
        return self.criterion(x, outputs['logits'], y) + self.last


class TripletHooks(Hooks):
    """The forward gives logits and features (:func:`features_and_logits`); each epoch's mean
    triplet term (over all processes) goes into the metrics row as ``triplet_loss``."""

    def __init__(self, criterion: TripletCriterion):
        self.criterion = criterion
        self._sum, self._steps = 0.0, 0

    def forward(self, model: nn.Module, x: torch.Tensor, y):
        return features_and_logits(model, x)

    def before_epoch(self, epoch: int) -> None:
        self._sum, self._steps = 0.0, 0

    def after_step(self, step: int, loss) -> None:
        if self.criterion.last is not None:
            self._sum += float(self.criterion.last.detach())
            self._steps += 1

    def after_epoch(self, epoch: int, row: dict) -> None:
        sums = all_reduce_sum(torch.tensor([self._sum, float(self._steps)], dtype=torch.float64,
                                           device=self.trainer.device)).cpu()
        row['triplet_loss'] = sums[0].item() / max(sums[1].item(), 1.0)
