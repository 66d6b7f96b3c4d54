"""NViT's pruning phase as hooks of the shared :class:`~deitlab.train.loop.Trainer` (see nvit.py).

Under ``torchrun`` the Trainer wraps the student in DDP, and each process takes its slice of the
same global batches (``data.for_model.stream_loader``). ``after_backward`` then sees gradients
already averaged over the processes, so the ``nvit`` and ``taylor`` saliencies (sums of
``p * grad``) are the global batch's and agree on every process; the ``fisher`` per-sample squared
gradients and their sample count are summed over processes here. Every process therefore removes
the same units at every event (``tests/test_prune_ddp.py`` checks this against one process with
the global batch). Validation at events is sharded and summed (``evaluate``); the log is written
by the main process only.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ..distributed import all_reduce_sum
from ..evaluate import evaluate
from ..rundir import atomic_torch_save
from ..train.loop import Hooks
from .groups import PruneError

if TYPE_CHECKING:
    from .nvit import NViTPruner

__all__ = ['PruningHooks']


def _removed_units(groups) -> dict:
    """Units removed at an event, counted per layer: {'emb': 4, 'mlp.3': 12, ...}."""
    out: dict = {}
    for g in groups:
        key = g.kind if g.block is None else f'{g.kind}.{g.block}'
        out[key] = out.get(key, 0) + int(g.units.numel())
    return out


class PruningHooks(Hooks):
    """NViT's pruning phase as :class:`~deitlab.train.loop.Trainer` hooks: the frozen dense model
    as KL teacher (forward, loss), saliency from the raw gradients (after_backward), the masks
    enforced before and after every optimizer step (removed weights, gradients and AdamW moments
    stay exactly zero), a pruning event every ``interval`` steps (after_step), and the end of the
    run at the budget or ``max_prune_steps`` (should_stop)."""

    def __init__(self, pruner: 'NViTPruner', extra, val_loader, on_event, checkpoint: Optional[Path] = None):
        self.pruner, self.extra, self.val_loader, self.on_event = pruner, extra, val_loader, on_event
        self.checkpoint = checkpoint
        self.pmasks = pruner.masks.param_masks(pruner.model)
        self.teacher_out: Optional[torch.Tensor] = None
        self.x = self.y = None
        self.t0 = time.perf_counter()

    def should_stop(self) -> bool:
        return self.pruner.done() or self.pruner.steps >= self.pruner.cfg.max_prune_steps

    def forward(self, model, x, y):
        with torch.no_grad():
            self.teacher_out = self.pruner.dense(x)
        self.x, self.y = x, y
        return model(x)

    def loss(self, x, outputs, y):
        return self.pruner._loss(outputs.float(), self.teacher_out.float(), y, self.extra, x)

    def on_nonfinite(self, loss) -> None:
        raise PruneError(f'the loss became {loss.item()} at pruning step {self.pruner.steps + 1}; try a lower --lr')

    def after_backward(self) -> None:
        p = self.pruner
        if p.saliency.needs_grad:
            p.saliency.accumulate(p.model)
        if p.saliency.needs_per_sample:
            sq, n = p._per_sample_sq_grads(self.x, self.y, self.teacher_out)
            if self.trainer.dist.distributed:
                sq = {k: all_reduce_sum(v) for k, v in sq.items()}
                n = int(all_reduce_sum(torch.tensor(float(n))))
            p.saliency.accumulate_sq_grads(sq, n)

    def apply_masks(self) -> None:
        self.pruner.masks.apply(self.pruner.model, self.trainer.optimizer, self.pmasks)

    def before_optimizer_step(self) -> None:
        self.apply_masks()   # no update reaches removed slices...

    def after_optimizer_step(self) -> None:
        self.apply_masks()   # ...and they stay exactly zero

    def after_step(self, step: int, loss) -> None:
        p = self.pruner
        p.steps += 1
        if p.steps % p.interval == 0:
            self.event(loss)

    def event(self, loss) -> None:
        """Remove groups, re-mask, and log the event's row (``p.log``, ``on_event``)."""
        p, bar = self.pruner, self.trainer.bar
        removed = p.event()
        if p.schedule == 'nvit' and p.events == 1 and not p.done():
            p._reestimate(bar)
        self.pmasks = p.masks.param_masks(p.model)
        self.apply_masks()
        row = dict(event=p.events, step=p.steps, loss=float(loss.detach()), removed=_removed_units(removed),
                   widths=p.widths(), time_s=round(time.perf_counter() - self.t0, 1), **p.estimate())
        if self.val_loader is not None and p.cfg.val_batches:
            row['val_top1'] = evaluate(p.model, self.val_loader, p.device, progress=False,
                                       max_batches=p.cfg.val_batches)['top1']
        p.log.append(row)
        bar.set_postfix({p.budget.kind: f'{row[p.budget.kind]:.3f}', 'acc': row.get('val_top1', '-')})
        if self.on_event is not None:
            self.on_event(row)
        if self.checkpoint is not None and self.trainer.is_main:
            atomic_torch_save(dict(pruner=p.state_dict(), trainer=self.trainer.state_dict()), self.checkpoint)
