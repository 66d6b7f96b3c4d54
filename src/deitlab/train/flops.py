"""Training FLOPs, counted for every run (``train_gflops`` in ``metrics.jsonl`` and the summary).

Per image: the trained model's forward and backward, taken as three forwards (the backward
computes the gradients of the activations and of the weights, each about one forward's MACs),
plus one forward of the distillation teacher when there is one; two FLOPs per MAC. The forward's
MACs come from the GMACs counter (``deitlab.bench.count_gmacs``: one counted forward of the
model as it is, so a coarser level of a multi-level V-cycle or a token-fused model is priced as
it runs; a model whose training forward does more than its inference, DCAL with its pair-wise
branch, counts it itself with ``training_gmacs()``), recounted whenever the trainer's model
changes. Element-wise work (norms, softmax, activations, the optimizer update) is left out, as in
the GMACs the rest of the tool reports.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..bench import count_gmacs
from .loop import Hooks

BACKWARD_FACTOR = 3.0   # forward + backward = 3 forwards


class TrainFlops(Hooks):
    """Adds ``batch x (3 x student + teacher) x 2 x GMACs`` after every update (``total_gflops``);
    each epoch's row gets the running total as ``train_gflops``. ``world_size`` processes each see
    their share of the global batch."""

    def __init__(self, world_size: int = 1, teacher: Optional[nn.Module] = None, start_gflops: float = 0.0):
        self.world_size = world_size
        self.teacher_gflops = 0.0 if teacher is None else 2.0 * count_gmacs(teacher)
        self.total_gflops = float(start_gflops)
        self._model_id: Optional[int] = None
        self._per_image = 0.0
        self._batch = 0

    def per_image_gflops(self) -> float:
        """Training GFLOPs of one image through the trainer's current model (and the teacher)."""
        model = self.trainer.model
        if id(model) != self._model_id:
            self._model_id = id(model)
            own = getattr(model, 'training_gmacs', None)   # a forward that trains otherwise than it infers (DCAL)
            gmacs = own() if callable(own) else count_gmacs(model)
            self._per_image = BACKWARD_FACTOR * 2.0 * gmacs + self.teacher_gflops
        return self._per_image

    def on_batch(self, x, y):
        self._batch = int(x.shape[0]) * self.world_size
        return x, y

    def after_step(self, step: int, loss) -> None:
        self.total_gflops += self._batch * self.per_image_gflops()

    def after_epoch(self, epoch: int, row: dict) -> None:
        row['train_gflops'] = round(self.total_gflops, 3)

    def state_dict(self) -> dict:
        return dict(total_gflops=self.total_gflops)

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.total_gflops = float((state or {}).get('total_gflops', 0.0))
