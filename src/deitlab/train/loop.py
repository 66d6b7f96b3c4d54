"""One training loop for every method: :class:`Trainer` steps a model, :class:`Hooks` make it a method.

The :class:`Trainer` owns what every method shares: the model (and its DDP wrapper under
``torchrun``), the optimizer, an optional per-update scheduler, bf16 autocast (on CUDA only), the
check that the loss is finite, gradient clipping, an optional EMA of the weights, the progress
bar and the mean training loss. It runs epoch-driven (:meth:`Trainer.fit`, ``deitlab train``) or
step-driven (:meth:`Trainer.run_steps` over any iterable of batches until a hook says stop: NViT
pruning). A method is a list of hooks; one update is::

    x, y = batch moved to the device
    x, y = on_batch(x, y)                           each hook in turn (defences, mixing)
    with autocast, every forward_context(x, y):     (MixPro / TransMix attention capture)
        outputs = forward(model, x, y)              one hook at most; default model(x)
        loss = loss(x, outputs, y)                  one hook at most; default cross-entropy
    if loss is not finite: on_nonfinite(loss)       a hook raises its method's error, else TrainingDiverged
    optimizer.zero_grad(); loss.backward()
    after_backward()                                raw gradients, before clipping (saliency)
    clip the gradient norm (grad_clip)
    before_optimizer_step(); optimizer.step(); after_optimizer_step()    (pruning masks)
    scheduler.step_update(updates); ema.update(model)
    after_step(updates, loss)                       (pruning events, logging)

``should_stop()`` is asked before every batch (and epoch), ``before_epoch(epoch)`` /
``after_epoch(epoch, row)`` frame each epoch of :meth:`Trainer.fit` (``row``: the epoch's mean
loss, learning rate, time, images/s; a hook adds its own entries such as validation accuracy).
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..console import progress as _progress
from ..distributed import DistInfo, all_reduce_sum

__all__ = ['Hooks', 'EpochRecords', 'Trainer', 'TrainingDiverged', 'HOOK_POINTS']

HOOK_POINTS = ('before_epoch', 'should_stop', 'on_batch', 'forward_context', 'forward', 'loss', 'on_nonfinite',
               'after_backward', 'before_optimizer_step', 'after_optimizer_step', 'after_step', 'after_epoch')
_SINGLE = ('forward', 'loss')   # at most one hook may define these


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Hooks:
    """The hook points of :class:`Trainer`; subclass and override what a method needs.

    Any object with some of these methods works as a hook; a :class:`Hooks` subclass gets
    ``self.trainer`` (the :class:`Trainer` it was added to: its ``model``, ``optimizer``, ``ema``,
    ``bar``, ``epoch``, ``global_step``, ``batch_index``). Hooks run in the order they were added;
    ``forward`` and ``loss`` may be defined by one hook only.

    * ``before_epoch(epoch)``: reseed, ``sampler.set_epoch`` (the DeiT recipe).
    * ``should_stop() -> bool``: end the run before the next batch (NViT: the budget is met).
    * ``on_batch(x, y) -> (x, y)``: change the batch (defences, Mixup/CutMix/TransMix/MixPro).
    * ``forward_context(x, y) -> context manager or None``: entered around forward and loss.
    * ``forward(model, x, y) -> outputs``: the forward (NViT: dense teacher, then the student).
      ``model`` is the DDP wrapper under ``torchrun``, else the model.
    * ``loss(x, outputs, y) -> loss``: the criterion (label loss, distillation, MCTF consistency).
    * ``on_nonfinite(loss)``: raise the method's error for a NaN/inf loss (with its context).
    * ``after_backward()``: read the gradients (NViT saliency); under DDP they are already averaged.
    * ``before_optimizer_step()`` / ``after_optimizer_step()``: around ``optimizer.step()`` (NViT masks).
    * ``after_step(step, loss)``: ``step`` updates done; pruning events, logging.
    * ``after_epoch(epoch, row)``: evaluation, metrics, run directory, checkpoint.

    How the methods to come plug in:

    *OFB search* (importance and sparsity searched in one stage): its score / mask parameters go
    into the optimizer (build it with their own parameter group and pass the optimizer), a
    ``forward_context`` applies the current soft masks during the forward, ``loss`` adds the
    sparsity and distillation terms, ``after_optimizer_step`` projects the scores, ``after_step``
    advances the sparsity schedule and ``should_stop`` ends the search at the target.

    *ViT-ResNAS supernet training* (``nas/train.py``): ``forward`` draws one sub-network per
    sub-batch and runs them all in one masked pass, ``supernet(x, archs)``, so one backward
    carries all their gradients; ``after_epoch`` rewires the units during the warm-up.

    *Multi-level V-cycle*: ``after_epoch`` (or ``after_step``) coarsens or refines the model at
    the cycle's turning points and hands the new one to :meth:`Trainer.replace_model`, which builds
    its optimizer, scheduler (at the current update), EMA and DDP wrapper; ``should_stop`` ends a
    level early.

    *DCAL* (dual cross-attention learning, ``train/dcal_train.py``): the model is the DCAL wrapper,
    whose training forward draws each image's partner for the pair-wise branch and returns the
    self-, global-local- and pair-wise-attention logits (``forward`` asks for the branch features
    too when the re-ID triplet loss needs them), ``loss`` weighs the branches' losses with the
    wrapper's learnable loss weights (parameters of the model, so in its optimizer and
    checkpoints), ``after_step`` / ``after_epoch`` report each branch's loss and weight.

    *SimCLR* (``papyri/simclr.py``): the loader yields two augmented views of every image,
    ``on_batch`` stacks them into one batch of 2B, ``forward`` returns the projections, ``loss`` is
    NT-Xent over the 2B views (labels unused), ``after_epoch`` saves the backbone without its head
    (``papyri/probe.py`` runs the linear-probe evaluation on it afterwards).
    """

    trainer: Optional['Trainer'] = None

    def before_epoch(self, epoch: int) -> None:
        """Default: nothing before an epoch."""

    def should_stop(self) -> bool:
        return False

    def on_batch(self, x: torch.Tensor, y: Any):
        return x, y

    def forward_context(self, x: torch.Tensor, y: Any):
        return None

    def forward(self, model: nn.Module, x: torch.Tensor, y: Any):
        return _default_forward(model, x, y)

    def loss(self, x: torch.Tensor, outputs: Any, y: Any) -> torch.Tensor:
        return _default_loss(x, outputs, y)

    def on_nonfinite(self, loss: torch.Tensor) -> None:
        """Default: no error of its own (the Trainer raises TrainingDiverged)."""

    def after_backward(self) -> None:
        """Default: the gradients are not read."""

    def before_optimizer_step(self) -> None:
        """Default: nothing before the update."""

    def after_optimizer_step(self) -> None:
        """Default: nothing after the update."""

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        """Default: nothing after a step."""

    def after_epoch(self, epoch: int, row: dict) -> None:
        """Default: the epoch's row is left as it is."""


class EpochRecords(Hooks):
    """A base for a run's per-epoch bookkeeping across resumes: the training time and CPU time so far
    (``time_before`` / ``cpu_before`` from the checkpoint, plus this process's), and :meth:`record`,
    which counts an epoch's ``epoch_cpu_s``, keeps the row as ``last_row`` and appends it to the
    JSON-lines file ``metrics``."""

    def __init__(self, metrics, time_before: float = 0.0, cpu_before: float = 0.0):
        self.metrics = metrics
        self.time_before, self.cpu_before = time_before, cpu_before
        self.t_start, self.cpu_epochs = time.perf_counter(), 0.0
        self.last_row: dict = {}

    def train_time(self) -> float:
        return self.time_before + time.perf_counter() - self.t_start

    def train_cpu(self) -> float:
        return self.cpu_before + self.cpu_epochs

    def record(self, row: dict) -> None:
        self.cpu_epochs += row.get('epoch_cpu_s', 0.0)
        self.last_row = row
        with open(self.metrics, 'a', encoding='utf-8') as f:
            f.write(json.dumps(row) + '\n')


def _default_forward(model: nn.Module, x: torch.Tensor, y: Any):
    return model(x)


def _default_loss(x: torch.Tensor, outputs: Any, y: Any) -> torch.Tensor:
    return F.cross_entropy(outputs, y)


def _defined(hook, name: str):
    """``hook.name`` if the hook defines it (not inherited unchanged from :class:`Hooks`), else None."""
    fn = getattr(hook, name, None)
    if fn is None or getattr(type(hook), name, None) is getattr(Hooks, name):
        return None
    return fn


def build_optimizer(model: nn.Module, spec: dict) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2(model, **spec)``, e.g. ``dict(opt='adamw', lr=1e-3, weight_decay=0.05)``."""
    import timm.optim
    return timm.optim.create_optimizer_v2(model, **spec)


class Trainer:
    """Steps a model with its hooks; see the module docstring for the order of one update.

    Args:
        model: the bare model (never a DDP wrapper: the trainer wraps it when ``dist`` says so).
        optimizer: a torch optimizer, or a dict for ``timm.optim.create_optimizer_v2(model, **dict)``.
        hooks: :class:`Hooks` (more with :meth:`add_hooks`).
        scheduler: a function of the optimizer returning a timm scheduler, stepped after every
            update with ``step_update(updates)``; None: a constant learning rate.
        device: where batches go (default: the model's).
        amp: bf16 autocast around forward and loss, on CUDA only.
        grad_clip: clip the gradient norm to this (None / 0: no clipping).
        ema_decay: keep ``timm.utils.ModelEmaV2`` of the weights with this decay (None: none).
        dist: the process group (:class:`DistInfo`); DDP wraps the model on the first run.
        train_mode: the module mode during the run (NViT prunes in eval mode).
        progress: the bar: None on a terminal, True / False always / never (main process only).
        postfix_every: show loss and learning rate on the bar every this many batches (None: never).
    """

    def __init__(self, model: nn.Module, optimizer: Union[torch.optim.Optimizer, dict], *, hooks=(),
                 scheduler: Optional[Callable] = None, device: Optional[torch.device] = None, amp: bool = True,
                 grad_clip: Optional[float] = None, ema_decay: Optional[float] = None,
                 dist: Optional[DistInfo] = None, train_mode: bool = True, progress: Optional[bool] = None,
                 postfix_every: Optional[int] = None):
        self.dist = dist or DistInfo()
        self.device = device or next(model.parameters()).device
        self.amp, self.grad_clip, self.train_mode = amp, grad_clip, train_mode
        self.progress, self.postfix_every = progress, postfix_every
        self._optimizer_spec, self._scheduler_fn, self._ema_decay = optimizer, scheduler, ema_decay
        self._set_model(model, optimizer)
        self.hooks: list = []
        self._calls: dict = {}
        self.epoch, self.global_step, self.batch_index = 0, 0, 0
        self.bar = None
        self.add_hooks(*hooks)

    def _set_model(self, model: nn.Module, optimizer) -> None:
        self.model = model
        self._run_model: Optional[nn.Module] = None
        self.optimizer = build_optimizer(model, optimizer) if isinstance(optimizer, dict) else optimizer
        self.scheduler = None if self._scheduler_fn is None else self._scheduler_fn(self.optimizer)
        self.ema = None
        if self._ema_decay is not None:
            from timm.utils import ModelEmaV2
            self.ema = ModelEmaV2(model, decay=self._ema_decay)

    def replace_model(self, model: nn.Module, optimizer: Union[None, torch.optim.Optimizer, dict] = None) -> None:
        """Go on training another model (a V-cycle's coarser or finer level): a new optimizer (the
        given one, else built like the first), scheduler at the current update, EMA and DDP wrapper."""
        if optimizer is None and not isinstance(self._optimizer_spec, dict):
            raise ValueError('replace_model needs an optimizer for the new model: the trainer was given an '
                             'optimizer instance, not a dict to build one from')
        self._set_model(model, self._optimizer_spec if optimizer is None else optimizer)
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_step)

    def add_hooks(self, *hooks) -> 'Trainer':
        for h in hooks:
            if isinstance(h, Hooks):
                h.trainer = self
            self.hooks.append(h)
        self._calls = {name: [fn for fn in (_defined(h, name) for h in self.hooks) if fn is not None]
                       for name in HOOK_POINTS}
        for name in _SINGLE:
            if len(self._calls[name]) > 1:
                raise ValueError(f'only one hook may define {name}(), got {len(self._calls[name])}')
        self._forward = (self._calls['forward'] or [_default_forward])[0]
        self._loss = (self._calls['loss'] or [_default_loss])[0]
        return self

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def run_model(self) -> nn.Module:
        """The model the forward runs: its DDP wrapper under ``torchrun`` (made on first use)."""
        if self._run_model is None:
            self._run_model = self.model
            if self.dist.distributed:
                ids = [self.device.index] if self.device.type == 'cuda' else None
                self._run_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        return self._run_model

    def autocast(self):
        if self.amp and self.device.type == 'cuda':
            return torch.autocast('cuda', dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """Model, optimizer, scheduler and EMA weights, for a checkpoint."""
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
                    ema=None if self.ema is None else self.ema.module.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state.get('scheduler') is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if self.ema is not None and state.get('ema') is not None:
            self.ema.module.load_state_dict(state['ema'])

    def should_stop(self) -> bool:
        return any(fn() for fn in self._calls['should_stop'])

    # ------------------------------------------------------------------------------- one update

    def forward_loss(self, x: torch.Tensor, y: Any):
        """``(outputs, loss)`` of a batch already on the device, under autocast and the hooks'
        forward contexts; no backward."""
        with self.autocast(), contextlib.ExitStack() as stack:
            for fn in self._calls['forward_context']:
                ctx = fn(x, y)
                if ctx is not None:
                    stack.enter_context(ctx)
            outputs = self._forward(self.run_model, x, y)
            loss = self._loss(x, outputs, y)
        return outputs, loss

    def train_step(self, x: torch.Tensor, y: Any) -> torch.Tensor:
        """One update on a batch from the loader; returns the loss."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for fn in self._calls['on_batch']:
            x, y = fn(x, y)
        _, loss = self.forward_loss(x, y)
        if not torch.isfinite(loss):
            for fn in self._calls['on_nonfinite']:
                fn(loss)
            raise TrainingDiverged(f'loss became {loss.item()} at update {self.global_step + 1}; training stopped')
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for fn in self._calls['after_backward']:
            fn()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for fn in self._calls['before_optimizer_step']:
            fn()
        self.optimizer.step()
        for fn in self._calls['after_optimizer_step']:
            fn()
        self.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_step)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss

    # ------------------------------------------------------------------------------------ runs

    def _loop(self, batches: Iterable, limit: Optional[int] = None):
        """Updates on ``batches`` until ``limit`` of them or a hook stops it: (loss sum, images, updates)."""
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = done = 0
        for x, y in batches:
            if (limit is not None and done >= limit) or self.should_stop():
                break
            self.batch_index = done
            loss = self.train_step(x, y)
            loss_sum += loss.detach().double().cpu()
            seen += x.shape[0]
            done += 1
            self.bar.update(1)
            if self.postfix_every and (done - 1) % self.postfix_every == 0:
                self.bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}')
            for fn in self._calls['after_step']:
                fn(self.global_step, loss)
        return loss_sum, seen, done

    def run_epoch(self, loader: Iterable, epoch: int, steps: Optional[int] = None, desc: Optional[str] = None) -> dict:
        """At most ``steps`` updates (default: the loader's length) on one pass over ``loader``;
        returns the epoch's row (mean loss over processes, last learning rate, wall time, this process's
        CPU time over all its threads, images/s)."""
        steps = len(loader) if steps is None else steps
        self.run_model.train(self.train_mode)
        t0, c0 = time.perf_counter(), time.process_time()
        self.bar = _progress(self.progress, self.is_main, total=steps, desc=desc or f'epoch {epoch + 1}')
        loss_sum, seen, done = self._loop(loader, steps)
        self.bar.close()
        seconds, cpu, world = time.perf_counter() - t0, time.process_time() - c0, self.dist.world_size
        return dict(epoch=epoch + 1, step=(epoch + 1) * steps,
                    train_loss=all_reduce_sum(loss_sum.to(self.device)).item() / (max(1, done) * world),
                    lr=self.optimizer.param_groups[0]['lr'], epoch_time_s=seconds, epoch_cpu_s=cpu,
                    train_img_per_s=seen * world / max(seconds, 1e-9))

    def fit(self, loader: Iterable, epochs: int, start_epoch: int = 0, steps_per_epoch: Optional[int] = None) -> list:
        """Epochs ``start_epoch .. epochs - 1``: ``before_epoch``, :meth:`run_epoch`, ``after_epoch``.
        Epoch e starts at update ``e * steps_per_epoch``, so a resumed run schedules like an
        uninterrupted one. Returns the epochs' rows."""
        steps = len(loader) if steps_per_epoch is None else steps_per_epoch
        rows = []
        for epoch in range(start_epoch, epochs):
            if self.should_stop():
                break
            self.epoch = epoch
            for fn in self._calls['before_epoch']:
                fn(epoch)
            self.global_step = epoch * steps
            row = self.run_epoch(loader, epoch, steps, desc=f'epoch {epoch + 1}/{epochs}')
            for fn in self._calls['after_epoch']:
                fn(epoch, row)
            rows.append(row)
        return rows

    def run_steps(self, batches: Iterable, total: Optional[int] = None, desc: Optional[str] = None,
                  leave: bool = False) -> int:
        """Updates on ``batches`` (any iterable, e.g. an endless stream over a loader) until a hook's
        ``should_stop()``; ``total`` sizes the bar. Returns the number of updates."""
        self.run_model.train(self.train_mode)
        self.bar = _progress(self.progress, self.is_main, total=total, desc=desc, leave=leave)
        _, _, done = self._loop(batches)
        self.bar.close()
        return done
