"""``deitlab train --dcal``: DCAL (:mod:`deitlab.train.dcal`) on the one training loop.

The engine wraps the student in :class:`~deitlab.train.dcal.DCAL` (:func:`dcal_student`) and adds
two pieces of this module:

* :class:`DCALCriterion`, the run's criterion: ``DCAL.loss`` over the branches, each branch's loss
  the run's label loss (cross-entropy with label smoothing) plus, with ``--triplet``, the
  batch-hard triplet loss on the branch's features (:func:`deitlab.train.triplet.batch_hard_triplet`); the learnable
  loss weights w_k are parameters of the wrapper (kept out of weight decay by its
  ``no_weight_decay``, saved in every checkpoint and run directory);
* :class:`DCALHooks`: ``forward`` asks the wrapper for the branch features when the triplet loss
  needs them, ``after_step`` / ``after_epoch`` put each branch's mean loss (``dcal_loss_<branch>``,
  and ``dcal_triplet_<branch>``) and w_k (``dcal_w_<branch>``) into the epoch's metrics row.

Evaluation runs the wrapper in eval mode, i.e. its inference output; :func:`dcal_summary` gives
the GMACs of both inference modes for the run's summary. Training FLOPs count the training forward
(``DCAL.training_gmacs``: with PWCA).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum
from .config import ConfigError, TrainConfig
from .dcal import DCAL, dcal_inference_gmacs
from .loop import Hooks
from .triplet import batch_hard_triplet

__all__ = ['dcal_student', 'DCALCriterion', 'DCALHooks', 'dcal_summary']


def dcal_student(model: nn.Module, cfg: TrainConfig) -> DCAL:
    """The model to train wrapped in DCAL with the run's options; a DCAL run directory (going on
    training) is kept as it is and must have the same options."""
    if isinstance(model, DCAL):
        if not cfg.dcal:
            raise ConfigError(f'{cfg.model} is a DCAL model (architecture deitlab_dcal): go on training it with --dcal')
        saved, wanted = model.model_args, cfg.dcal_options()
        diff = [f'{k}: saved {saved[k]!r} vs now {v!r}' for k, v in wanted.items() if saved[k] != v]
        if diff:
            raise ConfigError(f'{cfg.model} is a DCAL model with other options ({", ".join(diff)}); give its '
                              f'options, or train its backbone anew')
        return model
    try:
        return DCAL(model, **cfg.dcal_options())
    except ValueError as e:
        raise ConfigError(f'--dcal: {cfg.model}: {e}') from None


class DCALCriterion:
    """``criterion(x, outputs, y)`` of the training hooks: ``model.loss(outputs, y, label_loss,
    feature_loss)`` with the batch-hard triplet loss as the feature loss when ``margin`` is given."""

    def __init__(self, model: DCAL, label_loss: Callable, margin: Optional[float] = None):
        self.model, self.label_loss, self.margin = model, label_loss, margin

    def _triplet(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return batch_hard_triplet(features, y, self.margin)

    def __call__(self, x: torch.Tensor, outputs: dict, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(outputs, y, self.label_loss, self._triplet if self.margin is not None else None)


class DCALHooks(Hooks):
    """The branch features in the forward when the triplet loss needs them; each epoch's mean loss
    of every branch and its loss weight w_k in the metrics row (means over all processes)."""

    def __init__(self, triplet: bool = False):
        self.triplet = triplet
        self._sums: dict = {}
        self._steps = 0

    def forward(self, model: nn.Module, x: torch.Tensor, y):
        return model(x, features=True) if self.triplet else model(x)

    def before_epoch(self, epoch: int) -> None:
        self._sums, self._steps = {}, 0

    def after_step(self, step: int, loss) -> None:
        model = self.trainer.model
        parts = [(f'dcal_loss_{k}', v) for k, v in model.last_losses.items()]
        parts += [(f'dcal_triplet_{k}', v) for k, v in model.last_feature_losses.items()]
        for key, value in parts:
            self._sums[key] = self._sums.get(key, 0.0) + value.detach().double().cpu()
        self._steps += 1

    def after_epoch(self, epoch: int, row: dict) -> None:
        model = self.trainer.model
        keys = sorted(self._sums)
        if keys:
            device = self.trainer.device
            sums = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float64) for k in keys]
                               + [torch.tensor(float(self._steps), dtype=torch.float64)])
            sums = all_reduce_sum(sums.to(device)).cpu()
            row.update({k: sums[i].item() / max(sums[-1].item(), 1.0) for i, k in enumerate(keys)})
        row.update({f'dcal_w_{k}': float(w.detach()) for k, w in model.loss_weights.items()})


def dcal_summary(model: DCAL) -> dict:
    """GMACs per image of both inference modes (``gmacs_sa``: the backbone alone; ``gmacs_sa_glca``:
    SA + rollout + GLCA, None without GLCA) and the loss weights w_k at the end."""
    saved = model.inference
    try:
        model.inference = 'sa'
        sa = dcal_inference_gmacs(model)
        model.inference = 'sa+glca'
        both = dcal_inference_gmacs(model) if model.glca else None
    finally:
        model.inference = saved
    return dict(dcal_inference=saved, gmacs_sa=round(sa, 6), gmacs_sa_glca=None if both is None else round(both, 6),
                dcal_w={k: float(w.detach()) for k, w in model.loss_weights.items()})
