"""Multi-level training (Zou, Zhang, Deng, "A Multi-Level Framework for Accelerating Training
Transformer Models", ICLR 2024): a V-cycle of coalesced models on the one training loop.

Algorithm 1 of the paper, with ``M_1`` the model being trained and ``M_{k+1} = C(M_k)`` (half the
width and/or depth; the operators are in :mod:`deitlab.train.multilevel_maps`):

1. going down, for k = 1 .. K-1: train ``M_k`` for ``down`` epochs, keep its weights ``theta_k``,
   coalesce it to ``M_{k+1}``;
2. train ``M_K`` for ``small`` epochs;
3. going up, for k = K-1 .. 1: de-coalesce ``M_{k+1}`` and interpolate with the kept weights,
   ``theta_k <- (1 - alpha) theta_k + alpha D(theta_{k+1})`` (alpha = 0.25 for DeiT), and train
   ``M_k`` for ``up`` epochs.

Every stage starts a fresh optimizer and its own cosine schedule over its epochs at the level's
learning rate ``lr x lr_scale^(k-1)`` (the paper's release reloads checkpoints, so AdamW's moments
start from zero); only the first stage warms up. The coarser models cost about an eighth (half the
width and depth) of the large one per image, which is where the saving comes from; every run
counts its training FLOPs (:mod:`deitlab.train.flops`). :class:`VCycle` is the hook: at the first
epoch of a stage it maps the model and hands it to ``Trainer.replace_model``; its state (the
current level, the kept weights, the trace) goes into the epoch checkpoint, so ``--resume``
continues across a stage boundary. ``multilevel.json`` in the run directory holds the plan and
per stage its level, epochs, steps, learning rate, training GFLOPs, wall time and the validation
top-1 at its end (and, after a mapping, of the mapped model before it trains); ``time_s`` is the
training wall time at the stage's end (the epochs' ``epoch_time_s``, so a resumed run adds up).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ..console import log as _log
from ..rundir import atomic_write_bytes
from .config import ConfigError, MultilevelPlan
from .flops import TrainFlops
from .loop import Hooks
from .multilevel_maps import check_coalescible, coalesce, decoalesce, interpolate

TRACE_NAME = 'multilevel.json'


class StageSchedule:
    """A timm scheduler that counts updates from the start of its stage (``step_update(n)`` steps the
    inner one at ``n - start``), so each stage has its own schedule on the trainer's global count."""

    def __init__(self, inner, start: int):
        self.inner, self.start = inner, start

    def step_update(self, num_updates: int, metric=None) -> None:
        self.inner.step_update(max(0, num_updates - self.start), metric)

    def state_dict(self) -> dict:
        return dict(self.inner.state_dict(), stage_start=self.start)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.start = int(state.pop('stage_start', self.start))
        self.inner.load_state_dict(state)


def check_plan(model: nn.Module, plan: MultilevelPlan) -> None:
    """``ConfigError`` (from the maps) unless ``model`` can be coalesced ``levels - 1`` times."""
    for i in range(plan.levels - 1):
        try:
            check_coalescible(model, plan.width, plan.depth, plan.pairing)
        except ConfigError as e:
            raise ConfigError(f'--multilevel levels={plan.levels}: level {i + 2} halves the level-{i + 1} model, '
                              f'but {e}') from None
        if i < plan.levels - 2:
            model = coalesce(model, plan.width, plan.depth, plan.pairing)


class VCycle(Hooks):
    """The V-cycle as a hook (module docstring).

    Args:
        plan: the levels, epochs per stage, alpha, learning-rate scale, pairing.
        steps_per_epoch: updates per epoch (a stage's schedule length is its epochs times this).
        lr: the learning rate of level 1.
        make_schedule: ``(optimizer, stage_steps, warmup) -> timm scheduler`` for one stage.
        optimizer_spec: the dict ``Trainer`` builds an optimizer from; ``lr`` is set per level.
        evaluate: ``model -> {'top1': ...}`` on the validation split (main process's view).
        flops: the run's :class:`TrainFlops`, read for each stage's share.
        out: the run directory (``multilevel.json``); None: no file.
    """

    def __init__(self, plan: MultilevelPlan, steps_per_epoch: int, lr: float, make_schedule: Callable,
                 optimizer_spec: dict, evaluate: Callable[[nn.Module], dict], flops: TrainFlops,
                 out: Optional[Path] = None):
        self.plan, self.steps_per_epoch, self.lr = plan, steps_per_epoch, lr
        self.make_schedule, self.optimizer_spec = make_schedule, optimizer_spec
        self.evaluate_fn, self.flops, self.out = evaluate, flops, out
        self.stages = plan.stages()
        self.stage = 0                      # the stage the trainer's model and schedule belong to
        self.kept: Dict[int, Dict[str, torch.Tensor]] = {}
        self.trace: list = [self._row(0)]
        self.elapsed = 0.0                  # training wall time so far (the epochs' epoch_time_s)

    # ------------------------------------------------------------------ schedule
    def level_lr(self, level: int) -> float:
        return self.lr * self.plan.lr_scale ** (level - 1)

    def scheduler(self, optimizer) -> StageSchedule:
        """The schedule of the current stage (the trainer's ``scheduler`` factory)."""
        s = self.stages[self.stage]
        return StageSchedule(self.make_schedule(optimizer, s.epochs * self.steps_per_epoch, self.stage == 0),
                             s.start * self.steps_per_epoch)

    def _optimizer(self, level: int) -> dict:
        return dict(self.optimizer_spec, lr=self.level_lr(level))

    # ------------------------------------------------------------------ the cycle
    def _row(self, i: int) -> dict:
        s = self.stages[i]
        return dict(stage=i, level=s.level, start_epoch=s.start, epochs=s.epochs, steps=s.epochs * self.steps_per_epoch,
                    lr=self.level_lr(s.level))

    def before_epoch(self, epoch: int) -> None:
        i = self.plan.stage_index(epoch)
        if i == self.stage:
            return
        t = self.trainer
        row = self.trace[-1]
        row.update(gflops_end=round(self.flops.total_gflops, 3), time_s=round(self.elapsed, 1),
                   val_top1_end=self.evaluate_fn(t.model)['top1'])
        new = self.map(t.model, self.stages[self.stage].level, self.stages[i].level)
        self.stage = i
        self.trace.append(dict(self._row(i), gflops_start=round(self.flops.total_gflops, 3),
                               val_top1_mapped=self.evaluate_fn(new)['top1']))
        _log(f'multi-level: level {self.stages[self.stage - 1].level} -> {self.stages[i].level} at epoch {epoch + 1} '
             f'(val top-1 {row["val_top1_end"]:.2f} before, {self.trace[-1]["val_top1_mapped"]:.2f} after the '
             f'mapping); {self.stages[i].epochs} epoch(s) at lr {self.level_lr(self.stages[i].level):.2e}', t.is_main)
        t.replace_model(new, self._optimizer(self.stages[i].level))
        self.write()

    @torch.no_grad()
    def map(self, model: nn.Module, level: int, to: int) -> nn.Module:
        """One level down (keep ``theta_level``, coalesce) or up (de-coalesce, interpolate with the kept
        ``theta_to``)."""
        p = self.plan
        if to == level + 1:
            self.kept[level] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return coalesce(model, p.width, p.depth, p.pairing)
        if to != level - 1:
            raise RuntimeError(f'a V-cycle moves one level at a time, not {level} -> {to}')
        mapped = decoalesce(model, p.width, p.depth, p.pairing)
        large = copy.deepcopy(mapped)
        large.load_state_dict(self.kept.pop(to))
        return interpolate(large, mapped, p.alpha)

    def after_epoch(self, epoch: int, row: dict) -> None:
        row['multilevel_level'] = self.stages[self.stage].level
        self.elapsed += float(row.get('epoch_time_s', 0.0))

    def finish(self, val_top1: float) -> None:
        """Close the last stage's row (its FLOPs, time and the final validation top-1) and write the trace."""
        self.trace[-1].update(gflops_end=round(self.flops.total_gflops, 3),
                              time_s=round(self.elapsed, 1), val_top1_end=val_top1)
        self.write()

    def write(self) -> None:
        if self.out is None or not self.trainer.is_main:
            return
        data = dict(plan=self.plan.__dict__, stages=self.trace,
                    gflops_by_level=self.gflops_by_level(), total_gflops=round(self.flops.total_gflops, 3))
        atomic_write_bytes(self.out / TRACE_NAME, json.dumps(data, indent=2).encode())

    def gflops_by_level(self) -> dict:
        out: dict = {}
        for r in self.trace:
            if 'gflops_end' in r:
                spent = r['gflops_end'] - r.get('gflops_start', 0.0)
                out[str(r['level'])] = round(out.get(str(r['level']), 0.0) + spent, 3)
        return out

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return dict(stage=self.stage, kept=self.kept, trace=self.trace, elapsed=self.elapsed)

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Back to a checkpoint's stage: the trainer's model is rebuilt at that stage's level (its weights
        then come from the checkpoint, loaded after this) with that stage's optimizer and schedule."""
        if not state:
            return
        t = self.trainer
        self.kept, self.trace, self.elapsed = state['kept'], state['trace'], float(state.get('elapsed', 0.0))
        level = self.stages[int(state['stage'])].level
        model = t.model
        for _ in range(level - 1):
            model = coalesce(model, self.plan.width, self.plan.depth, self.plan.pairing)
        self.stage = int(state['stage'])
        t.replace_model(model, self._optimizer(level))
