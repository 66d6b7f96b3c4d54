"""NViT: global structural pruning of a DeiT with Hessian-aware saliency and a latency budget.

Yang, Yin, Molchanov, Li, Kautz: "Global Vision Transformer Pruning with Hessian-Aware Saliency",
CVPR 2023. The procedure (``prune_nvit``, ``deitlab prune nvit``):

1. Load the dense DeiT (run directory, deitlab name or timm ViT/DeiT), keep a frozen copy as the
   distillation target, and measure (or load) a latency table of its blocks on this device.
2. Train the model on with ``L = ce_weight * CE(y) + kl_weight * T^2 * KL(p_dense^T || p^T)``
   (plus an optional hard/soft DeiT teacher) while accumulating the saliency of every unit. After
   every optimizer step the masks are enforced: removed weights, their gradients and their AdamW
   moments stay exactly zero.
3. Every ``interval`` steps, rank all groups of all layers by ``I - lambda * dLat`` and remove the
   lowest, one at a time, stopping as soon as the target (latency, GMACs or parameter fraction of
   the dense model) is met: as many as a goal falling linearly to the target over ``prune_steps``
   asks for (``schedule='linear'``, the default, over a budget derived from the data unless given),
   or NViT's ``groups_per_event`` per event (``schedule='nvit'``); see schedule.py. The plan
   (schedule, steps, events, fine-tune steps, expected duration) is logged before the first step.
4. Densify into the compact non-uniform DeiT (widths optionally rounded up to multiples), save it
   as a run directory, and fine-tune it with soft distillation from the dense model.

The same loop prunes the token-mixer families PoolFormer and SpectFormer (deitlab's), in their
MLP hidden widths only (families.py): the masks, saliency, ranking, budget and latency table follow
the model's layout, whose only unit type is ``mlp``. Settings that name the other unit types
(``prune_types``, ``group_sizes``, ``min_keep``, ``lut_grid`` entries for emb / head / qk / v)
raise ``PruneError`` for them; the default ``prune_types`` (all five) means every type the model has.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bench.common import synchronize
from ..rundir import create, is_run_dir, save_run_dir
from ..train.engine import _log, evaluate
from .densify import densify, rounded_masks
from .families import Layout, layout_of
from .groups import GROUP_TYPES, Masks, PruneError, check_prunable, use_masked_layernorm
from .latency import LatencyTable, MLPLatencyTable, grid_for, load_latency_table, lut_path
from .ranking import Budget, default_group_sizes, rank_groups, remove_group
from .saliency import Saliency, per_sample_sq_grads
from .schedule import (NVIT_GROUPS, NVIT_INTERVAL, check_schedule, estimate_nvit_events, expected_seconds,
                       linear_goal, make_plan, plan_line, resolve_schedule)
from .timing import build_latency_table, busy_warning

PRUNE_LOG = 'prune_log.jsonl'
LUT_NAME = 'latency_table.json'


_SCHEDULE_HELP = ('linear: reach the target linearly over --prune-steps (default: 2 epochs of the training '
                  'split, clamped to 200-2000 steps, in ~40 events); nvit: the paper\'s --groups-per-event groups '
                  'every --interval steps until the target. Unset: linear, or nvit when only --groups-per-event '
                  'is given')
_INTERVAL_HELP = 'steps between pruning events (nvit, or with --prune-steps: 100; default linear: steps / 40)'
_LUT_HELP = ('latency table: "measure" times one on this device (the default), or a latency_table.json, or '
             'the name of a table committed in deitlab/prune/tables/')


@dataclass
class NViTConfig:
    """Settings of ``prune_nvit`` (one field per ``deitlab prune nvit`` flag).

    Schedule (schedule.py). ``schedule='linear'`` lowers the budget goal linearly to the target
    over ``prune_steps``; ``schedule='nvit'`` removes ``groups_per_event`` (default 2) groups every
    ``interval`` (default 100) steps until the target, NViT's ImageNet schedule, whose length
    depends on the model (it can take tens of thousands of steps on a small data set). Unset, the
    schedule is ``linear`` when ``prune_steps`` is given (``interval`` default 100, as before),
    ``nvit`` when only ``groups_per_event`` is given, and otherwise ``linear`` over a budget derived
    from the data: 2 epochs of the training split (``2 * len(train_loader)`` steps), clamped to
    200-2000 steps and to half of ``total_steps``, with ``interval`` = steps / 40 (about 40 events)
    unless given. The fine-tune then runs ``finetune_epochs`` epochs, or the rest of ``total_steps``.

    Latency table. ``lut=None`` or ``'measure'`` times a table on this device (``lut_passes``
    interleaved rounds, the fastest per node, at ``lut_batch``); a path or the name of a committed table
    (``deitlab/prune/tables/``) loads one instead, so that pruning does not depend on the load of
    the machine while it runs.
    """
    model: str = field(metadata={'group': 'model', 'help': 'the dense model: run directory, deitlab name or timm ViT/DeiT'})
    data: str = field(metadata={'group': 'data', 'help': 'dataset spec: glyphs[:k=v,...] | fashion-mnist[:PATH] | folder:PATH'})
    out: str = field(metadata={'group': 'run', 'help': 'run directory for the pruned model, its log and plots'})
    # target: exactly one, a fraction of the dense model
    target_latency: Optional[float] = field(default=None, metadata={
        'group': 'pruning', 'help': 'target latency, a fraction of the dense model (give exactly one target)'})
    target_gmacs: Optional[float] = field(default=None, metadata={
        'group': 'pruning', 'help': "target GMACs, a fraction of the dense model's"})
    target_params: Optional[float] = field(default=None, metadata={
        'group': 'pruning', 'help': "target parameters, a fraction of the dense model's"})
    # saliency and ranking
    criterion: str = field(default='nvit', metadata={
        'group': 'pruning', 'help': 'saliency: nvit (Hessian-aware) | taylor | magnitude | fisher'})
    lam: float = field(default=0.02, metadata={
        'group': 'pruning', 'help': 'latency penalty weight lambda in I - lambda * dLat (scale-free, see ranking.py)'})
    momentum: float = field(default=0.9, metadata={
        'group': 'pruning', 'help': 'saliency moving average across events: m * previous + (1 - m) * new'})
    divisors: Optional[str] = field(default='nvit', metadata={
        'group': 'pruning', 'help': "per-type saliency divisors: nvit (the paper's constants) or none"})
    group_sizes: Dict[str, int] = field(default_factory=dict, metadata={
        'group': 'pruning', 'help': 'units per ranking group, per type (emb, head, qk, v, mlp); unset: NViT\'s, '
                                    'scaled to the model'})
    min_keep: Dict[str, int] = field(default_factory=dict, metadata={
        'group': 'pruning', 'help': 'units to keep at least per layer, per type; unset: one group'})
    prune_types: tuple = field(default=GROUP_TYPES, metadata={
        'group': 'pruning', 'help': 'unit types to prune (those the model has)'})
    schedule: Optional[str] = field(default=None, metadata={'group': 'pruning schedule', 'help': _SCHEDULE_HELP})
    interval: Optional[int] = field(default=None, metadata={'group': 'pruning schedule', 'help': _INTERVAL_HELP})
    groups_per_event: Optional[int] = field(default=None, metadata={
        'group': 'pruning schedule', 'help': 'nvit schedule: groups per event (2)'})
    prune_steps: Optional[int] = field(default=None, metadata={
        'group': 'pruning schedule', 'help': 'linear schedule: steps to the target'})
    total_steps: Optional[int] = field(default=None, metadata={
        'group': 'pruning schedule', 'help': 'pruning plus fine-tuning steps (the fine-tune gets the rest)'})
    max_prune_steps: int = field(default=20000, metadata={
        'group': 'pruning schedule', 'help': 'stop with an error when the target is not met in this many steps'})
    fisher_samples: int = field(default=8, metadata={
        'group': 'pruning', 'help': 'per-sample gradients per batch (criterion fisher)'})
    masked_ln: bool = field(default=True, metadata={
        'group': 'pruning', 'help': 'LayerNorm statistics over the kept embedding channels only'})
    round_to: Optional[int] = field(default=None, metadata={
        'group': 'pruning', 'help': 'round the kept widths up to multiples of this'})
    # training while pruning
    batch_size: int = field(default=32, metadata={'group': 'optimiser', 'help': 'batch size'})
    lr: float = field(default=1e-4, metadata={'group': 'optimiser', 'help': 'learning rate while pruning'})
    weight_decay: float = field(default=0.05, metadata={'group': 'optimiser', 'help': 'AdamW weight decay'})
    kl_weight: float = field(default=1.0, metadata={
        'group': 'distillation', 'help': 'weight of the KL term to the dense model while pruning'})
    kl_tau: float = field(default=3.0, metadata={'group': 'distillation', 'help': 'temperature of that KL term'})
    ce_weight: float = field(default=1.0, metadata={
        'group': 'distillation', 'help': 'weight of the cross-entropy (or extra teacher) term'})
    smoothing: float = field(default=0.0, metadata={'group': 'augmentation', 'help': 'label smoothing'})
    teacher: Optional[str] = field(default=None, metadata={
        'group': 'distillation', 'help': 'an extra DeiT teacher (name or run directory), with --distill'})
    distill: str = field(default='none', metadata={
        'group': 'distillation', 'help': 'none | soft | hard: distillation from --teacher'})
    aug: str = field(default='none', metadata={'group': 'augmentation', 'help': 'none | light | deit'})
    # latency table
    lut: Optional[str] = field(default=None, metadata={'group': 'latency table', 'help': _LUT_HELP})
    lut_batch: int = field(default=64, metadata={'group': 'latency table', 'help': 'batch size the table is timed at'})
    lut_passes: int = field(default=5, metadata={
        'group': 'latency table', 'help': 'interleaved timing rounds (the fastest per node; timing.py)'})
    lut_grid: Dict[str, list] = field(default_factory=dict, metadata={
        'group': 'latency table', 'help': 'widths timed, per axis (emb, heads, qk, v, mlp; PoolFormer etc.: mlp), '
                                          'each a JSON list'})
    # fine-tuning of the densified model
    finetune_epochs: int = field(default=1, metadata={
        'group': 'fine-tuning', 'help': 'fine-tuning epochs of the densified model'})
    finetune_steps: Optional[int] = field(default=None, metadata={
        'group': 'fine-tuning', 'help': 'cap on the steps of a fine-tuning epoch'})
    finetune_lr: float = field(default=2e-4, metadata={'group': 'fine-tuning', 'help': 'fine-tuning learning rate'})
    finetune_alpha: float = field(default=0.5, metadata={
        'group': 'fine-tuning', 'help': 'weight of the soft distillation from the dense model'})
    finetune_tau: float = field(default=2.0, metadata={
        'group': 'fine-tuning', 'help': 'temperature of that distillation'})
    # run
    val_batches: int = field(default=20, metadata={
        'group': 'run', 'help': 'validation batches per pruning event (0: none)'})
    measure: bool = field(default=True, metadata={
        'group': 'run', 'help': 'time the dense and the pruned model at the end'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed'})
    device: Optional[str] = field(default=None, metadata={
        'group': 'run', 'help': 'torch device; unset: CUDA when available, else the CPU'})
    progress: Optional[bool] = field(default=None, metadata={
        'group': 'run', 'help': 'progress bars; unset: when attached to a terminal'})

    def validate(self) -> 'NViTConfig':
        if isinstance(self.divisors, str) and self.divisors.lower() in ('none', ''):
            self.divisors = None
        self.prune_types = tuple(self.prune_types)
        targets = {k: v for k, v in (('latency', self.target_latency), ('gmacs', self.target_gmacs),
                                     ('params', self.target_params)) if v is not None}
        if len(targets) != 1:
            raise PruneError(f'give exactly one pruning target (--target-latency, --target-gmacs or '
                             f'--target-params, a fraction of the dense model), got {sorted(targets) or "none"}')
        (kind, value), = targets.items()
        if not 0.0 < value <= 1.0:
            raise PruneError(f'the {kind} target is a fraction of the dense model in (0, 1], got {value}')
        if isinstance(self.schedule, str):
            self.schedule = self.schedule.strip().lower() or None
        check_schedule(self)
        for k in ('interval', 'groups_per_event', 'prune_steps', 'total_steps', 'batch_size', 'max_prune_steps',
                  'lut_batch', 'lut_passes'):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise PruneError(f'{k} must be >= 1, got {getattr(self, k)}')
        interval = self.interval or NVIT_INTERVAL
        if self.prune_steps is not None and self.prune_steps < interval:
            raise PruneError(f'prune_steps ({self.prune_steps}) must be at least one interval ({interval}); '
                             f'lower --interval')
        if self.total_steps is not None and self.prune_steps is not None and self.total_steps <= self.prune_steps:
            raise PruneError(f'total_steps ({self.total_steps}) must exceed prune_steps ({self.prune_steps})')
        lut_path(self.lut)   # a missing table file fails here, before the model and data are loaded
        if self.finetune_epochs < 0:
            raise PruneError(f'finetune_epochs must be >= 0, got {self.finetune_epochs}')
        bad = [t for t in self.prune_types if t not in GROUP_TYPES]
        if bad or not self.prune_types:
            raise PruneError(f'prune_types must be a non-empty subset of {GROUP_TYPES}, got {self.prune_types}')
        for name in ('group_sizes', 'min_keep'):
            bad = [k for k in getattr(self, name) if k not in GROUP_TYPES]
            if bad:
                raise PruneError(f'{name} has unknown unit types {bad}; use {GROUP_TYPES}')
        if self.lam < 0:
            raise PruneError(f'the latency penalty lam must be >= 0, got {self.lam}')
        if self.distill not in ('none', 'soft', 'hard') or (self.distill != 'none') != bool(self.teacher):
            raise PruneError('an extra teacher needs --distill hard|soft and --teacher NAME|RUN_DIR together')
        return self

    def unit_types(self, layout: Layout) -> tuple:
        """The unit types to prune on a model of this layout; ``PruneError`` when a setting names a
        type the family does not prune. The default ``prune_types`` (all five) means all it has."""
        absent = [t for t in GROUP_TYPES if t not in layout.types]
        if not absent:
            return self.prune_types
        why = (f'{layout.family} models are pruned in their MLP hidden widths only (the residual width, heads, '
               f'qk and v stay fixed)')
        asked = {'prune_types': [] if tuple(self.prune_types) == GROUP_TYPES else list(self.prune_types),
                 'group_sizes': list(self.group_sizes), 'min_keep': list(self.min_keep),
                 'lut_grid': [{'heads': 'head'}.get(k, k) for k in self.lut_grid]}
        for name, types in asked.items():
            bad = [t for t in types if t in absent]
            if bad:
                raise PruneError(f'{why}; --{name.replace("_", "-")} names {", ".join(bad)}')
        return tuple(t for t in self.prune_types if t in layout.types)


def load_dense(spec: str) -> nn.Module:
    """A trained deitlab DeiT, PoolFormer or SpectFormer: from a run directory, or a timm / deitlab
    name with released weights (downloaded by timm; a timm ViT/DeiT is converted with ``from_timm``)."""
    from ..models.deit import from_timm
    if not is_run_dir(spec) and not str(spec).startswith('local-dir:'):
        import timm
        cfg = timm.models.get_pretrained_cfg(str(spec).split('.')[0]) if timm.is_model(str(spec)) else None
        if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise PruneError(f'{spec} has no released weights and pruning a random model means nothing; '
                             f'train it first (deitlab train ... --out RUN_DIR) and prune the run directory')
    model = create(spec, pretrained=not is_run_dir(spec))
    try:
        layout_of(model)
    except PruneError:
        try:
            model = from_timm(model)
        except ValueError as e:
            raise PruneError(f'{spec}: {e}; the pruner takes deitlab DeiT models, and deitlab PoolFormer / '
                             f'SpectFormer models (their MLP widths)') from None
    check_prunable(model)
    return model


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch."""
    return F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction='batchmean',
                    log_target=True) * tau * tau


def _loaders(cfg: NViTConfig, model: nn.Module):
    from torch.utils.data import DataLoader
    from ..train.engine import model_datasets
    train_set, val_set = model_datasets(model, cfg.data, aug=cfg.aug)
    if len(train_set) < cfg.batch_size:
        raise PruneError(f'the training split has {len(train_set)} images, fewer than one batch of {cfg.batch_size}')
    g = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=g)
    val = DataLoader(val_set, batch_size=max(64, cfg.batch_size), shuffle=False)
    return train, val, train_set


def _removed_units(groups) -> dict:
    """Units removed at an event, counted per layer: {'emb': 4, 'mlp.3': 12, ...}."""
    out: dict = {}
    for g in groups:
        key = g.kind if g.block is None else f'{g.kind}.{g.block}'
        out[key] = out.get(key, 0) + int(g.units.numel())
    return out


def _forever(loader):
    while True:
        yield from loader


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:   # an iterable-style dataset without a length
        return None


class NViTPruner:
    """The pruning phase on a model in memory: ``run()`` trains, scores and removes groups until
    the budget is met, and returns the masks. ``densified()`` gives the compact model."""

    def __init__(self, model: nn.Module, cfg: NViTConfig, lut: Optional[Union[LatencyTable, MLPLatencyTable]],
                 device: torch.device):
        cfg.validate()
        self.layout = layout_of(model)
        self.prune_types = cfg.unit_types(self.layout)
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.dense = copy.deepcopy(model).eval()
        for p in self.dense.parameters():
            p.requires_grad_(False)
        self.lut = lut
        self.budget = Budget(model, lut, cfg.target_latency, cfg.target_gmacs, cfg.target_params)
        self.group_sizes = {**default_group_sizes(model), **cfg.group_sizes}
        self.min_keep = {k: max(1, int(cfg.min_keep.get(k, self.group_sizes[k]))) for k in self.layout.types}
        if cfg.masked_ln:
            use_masked_layernorm(self.model, True)
        self.masks = Masks(self.model)
        self.saliency = Saliency(cfg.criterion, cfg.momentum, cfg.divisors, depth=self.layout.depth)
        self.scores: Optional[dict] = None
        self.events = 0
        self.steps = 0
        self.log: list = []
        self.schedule = resolve_schedule(cfg)
        self.plan: Optional[dict] = None     # schedule.make_plan's dict, set by make_plan() / run()
        self._check_reachable()

    def floor_widths(self) -> dict:
        """The widths with every prunable layer down to what whole groups and ``min_keep`` allow."""
        floor = self.masks.copy()
        for kind, b in floor.layers():
            if kind in self.prune_types:
                layer = floor.layer(kind, b)
                active = layer.nonzero().flatten()
                n, size = active.numel(), int(self.group_sizes[kind])
                layer[active[n - max(0, (n - self.min_keep[kind]) // size) * size:]] = False
        return floor.kept()

    def _check_reachable(self) -> None:
        """``PruneError`` before any training when the target lies below the floor: e.g. a latency
        target under the part of a PoolFormer's latency that its MLP widths do not touch."""
        floor = self.floor_widths()
        if not self.budget.reached(floor):
            only = '' if 'emb' in self.layout.types else f' ({self.layout.family} models prune MLP widths only)'
            raise PruneError(f'the {self.budget.kind} target {self.budget.target} cannot be reached: with every '
                             f'prunable layer at its minimum{only} the model keeps '
                             f'{self.budget.fraction(floor):.3f} of the dense {self.budget.kind}; raise the target')

    def widths(self) -> dict:
        return self.masks.kept()

    def estimate(self) -> dict:
        rel = self.budget.relative(self.widths())
        ab = self.budget.absolute(self.widths())
        return dict(rel, gmacs_abs=ab['gmacs'], params_abs=ab['params'], **(
            {'latency_ms': ab['latency_ms']} if 'latency_ms' in ab else {}))

    def done(self) -> bool:
        return self.budget.reached(self.widths())

    def make_plan(self, batches_per_epoch: Optional[int] = None) -> dict:
        """The schedule this pruner follows (``schedule.make_plan``) for a training loader of
        ``batches_per_epoch`` batches: steps, interval, events, fine-tune steps."""
        events = None
        if self.schedule == 'nvit':
            interval = self.cfg.interval or NVIT_INTERVAL
            events = estimate_nvit_events(self, max(1, self.cfg.max_prune_steps // interval))
        self.plan = make_plan(self.cfg, batches_per_epoch, events)
        if self.schedule == 'linear' and self.plan['prune_steps'] > self.cfg.max_prune_steps:
            raise PruneError(f'the linear schedule needs {self.plan["prune_steps"]} steps, more than --max-prune-steps '
                             f'({self.cfg.max_prune_steps}); raise it or lower --prune-steps')
        return self.plan

    @property
    def interval(self) -> int:
        return self.plan['interval'] if self.plan else (self.cfg.interval or NVIT_INTERVAL)

    def event_goal(self) -> Optional[float]:
        """Linear schedule: the budget fraction this event should reach, falling linearly from 1 at
        step 0 to the target at the plan's ``prune_steps``. None: NViT's fixed number of groups per
        event."""
        if self.schedule == 'nvit':
            return None
        steps = self.plan['goal_steps'] if self.plan else self.cfg.prune_steps
        return linear_goal(self.steps, steps, self.budget.target)

    def event(self) -> list:
        """Score and rank all groups, then remove the lowest: ``groups_per_event`` of them (``nvit``),
        or as many as the linear schedule asks for; never past the target."""
        self.scores = self.saliency.event(self.model)
        goal = self.event_goal()
        per_event = self.cfg.groups_per_event or NVIT_GROUPS
        removed = []
        while not self.done():
            savings = self.lut.unit_savings(self.widths()) if (self.lut is not None and self.cfg.lam) else None
            groups = rank_groups(self.scores, savings, self.masks, self.cfg.lam, self.group_sizes, self.min_keep,
                                 self.prune_types)
            if not groups:
                break
            # savings change as widths shrink: re-rank after each small batch of removals
            for g in groups[:max(1, per_event if goal is None else 4)]:
                if self.done() or (goal is not None and self.budget.fraction(self.widths()) <= goal):
                    break
                remove_group(self.masks, g)
                removed.append(g)
            if goal is None or self.budget.fraction(self.widths()) <= goal:
                break
        self.events += 1
        return removed

    def _loss(self, out, teacher_out, y, extra_loss=None, x=None):
        loss = self.cfg.kl_weight * kd_kl(out, teacher_out, self.cfg.kl_tau) if self.cfg.kl_weight else 0.0
        if self.cfg.ce_weight:
            if extra_loss is not None:
                loss = loss + self.cfg.ce_weight * extra_loss(x, out, y)
            else:
                loss = loss + self.cfg.ce_weight * F.cross_entropy(out, y, label_smoothing=self.cfg.smoothing)
        return loss

    def run(self, train_loader, val_loader=None, on_event=None) -> Masks:
        from timm.optim import create_optimizer_v2
        from tqdm.auto import tqdm
        cfg = self.cfg
        model = self.model
        model.eval()  # NViT prunes with the student in eval mode (no dropout / drop path)
        optimizer = create_optimizer_v2(model, opt='adamw', lr=cfg.lr, weight_decay=cfg.weight_decay)
        extra = None
        if cfg.teacher:
            from ..train.distill import DistillationLoss
            teacher = create(cfg.teacher, pretrained=not is_run_dir(cfg.teacher)).to(self.device).eval()
            extra = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=cfg.smoothing), teacher, cfg.distill)
        pmasks = self.masks.param_masks(model)
        self.masks.apply(model, optimizer, pmasks)
        # bf16 autocast on CUDA (the saliency is read from fp32 parameters and gradients)
        autocast = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if self.device.type == 'cuda' \
            else contextlib.nullcontext
        batches = _forever(train_loader)
        t0 = time.perf_counter()
        first = next(batches)
        fetch_s = time.perf_counter() - t0
        if self.plan is None:
            self.make_plan(_length(train_loader))
        self._time_step(first, fetch_s, extra, autocast, optimizer, pmasks, val_loader)
        _log(plan_line(self.plan, self.budget.kind, self.budget.target))
        bar = tqdm(total=self.plan['prune_steps'], desc='nvit prune', disable=cfg.progress is False, leave=False)
        t0 = time.perf_counter()
        for x, y in itertools.chain([first], batches):
            if self.done() or self.steps >= cfg.max_prune_steps:
                break
            x, y = x.to(self.device), y.to(self.device)
            loss, t = self._forward(x, y, extra, autocast)
            if not torch.isfinite(loss):
                raise PruneError(f'the loss became {loss.item()} at pruning step {self.steps + 1}; try a lower --lr')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.saliency.needs_grad:
                self.saliency.accumulate(model)
            if self.saliency.needs_per_sample:
                k = min(cfg.fisher_samples, x.shape[0])
                sq = per_sample_sq_grads(model, lambda o, yi, ti: self._loss(o, ti, yi), x[:k], y[:k], t[:k])
                self.saliency.accumulate_sq_grads(sq, k)
            self.masks.apply(model, optimizer, pmasks)   # no update reaches removed slices...
            optimizer.step()
            self.masks.apply(model, optimizer, pmasks)   # ...and they stay exactly zero
            self.steps += 1
            bar.update(1)
            if self.steps % self.interval == 0:
                removed = self.event()
                if self.schedule == 'nvit' and self.events == 1 and not self.done():
                    self._reestimate(bar)
                pmasks = self.masks.param_masks(model)
                self.masks.apply(model, optimizer, pmasks)
                row = dict(event=self.events, step=self.steps, loss=float(loss.detach()), removed=_removed_units(removed),
                           widths=self.widths(), time_s=round(time.perf_counter() - t0, 1), **self.estimate())
                if val_loader is not None and cfg.val_batches:
                    row['val_top1'] = evaluate(model, val_loader, self.device, progress=False,
                                               max_batches=cfg.val_batches)['top1']
                self.log.append(row)
                bar.set_postfix({self.budget.kind: f'{row[self.budget.kind]:.3f}', 'acc': row.get('val_top1', '-')})
                if on_event is not None:
                    on_event(row)
        bar.close()
        if not self.done():
            est = self.estimate()[self.budget.kind]
            raise PruneError(f'the {self.budget.kind} target {self.budget.target} was not reached within '
                             f'{cfg.max_prune_steps} steps (now {est:.3f}); raise --max-prune-steps or '
                             f'--groups-per-event, or lower --interval, or use --schedule linear')
        self.plan['prune_s_measured'] = round(time.perf_counter() - t0, 1)   # against expected_prune_s
        return self.masks

    def _reestimate(self, bar) -> None:
        """The nvit schedule's remaining steps again, ranked by the first event's saliencies (the plan
        used random ones): the bar's total and ``plan['prune_steps_after_first_event']``."""
        cap = max(1, (self.cfg.max_prune_steps - self.steps) // self.interval)
        left = estimate_nvit_events(self, cap, self.scores)
        if left is not None:
            self.plan['prune_steps_after_first_event'] = self.steps + left * self.interval
            bar.total = self.plan['prune_steps_after_first_event']
            bar.refresh()

    def _forward(self, x, y, extra, autocast):
        with autocast():
            with torch.no_grad():
                t = self.dense(x)
            out = self.model(x)
            loss = self._loss(out.float(), t.float(), y, extra, x)
        return loss, t

    def _time_step(self, batch, fetch_s: float, extra, autocast, optimizer, pmasks, val_loader) -> None:
        """Put the expected seconds per pruning step (``step_s``) and per event (``event_s``:
        validation) into the plan: the second of two forward + backward passes on the first batch
        (per-sample gradients too for ``fisher``; no update, gradients cleared), plus the loader's
        time for that batch. Optimizer steps and saliency updates are not counted."""
        x, y = batch[0].to(self.device), batch[1].to(self.device)
        for _ in range(2):
            synchronize(self.device)
            t0 = time.perf_counter()
            loss, t = self._forward(x, y, extra, autocast)
            loss.backward()
            if self.saliency.needs_per_sample:
                k = min(self.cfg.fisher_samples, x.shape[0])
                per_sample_sq_grads(self.model, lambda o, yi, ti: self._loss(o, ti, yi), x[:k], y[:k], t[:k])
            self.masks.apply(self.model, optimizer, pmasks)
            self.masks.apply(self.model, optimizer, pmasks)
            synchronize(self.device)
            step_s = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        event_s = 0.0
        if val_loader is not None and self.cfg.val_batches:
            synchronize(self.device)
            t0 = time.perf_counter()
            with torch.no_grad(), autocast():
                self.model(x)
            synchronize(self.device)
            per_image = (time.perf_counter() - t0 + fetch_s) / x.shape[0]
            val_bs = getattr(val_loader, 'batch_size', None) or x.shape[0]
            event_s = self.cfg.val_batches * val_bs * per_image
        self.plan.update(step_s=round(step_s + fetch_s, 4), event_s=round(event_s, 4))
        self.plan['expected_s'] = expected_seconds(self.plan)
        self.plan['expected_prune_s'] = expected_seconds(dict(self.plan, finetune_steps=0))

    def densified(self) -> nn.Module:
        masks = rounded_masks(self.masks, self.cfg.round_to, self.scores) if self.cfg.round_to else self.masks
        return densify(self.model, masks).eval()


def latency_table(cfg: NViTConfig, dense: nn.Module):
    """The table ``prune_nvit`` prunes against: loaded when ``cfg.lut`` names a file or a committed
    table (checked to cover ``dense``), timed on this device when it is None or ``'measure'`` and
    a latency target or penalty needs one, else None."""
    path = lut_path(cfg.lut)
    if path is not None:
        lut = load_latency_table(path)
        lut.check_covers(dense)
        lut.meta['source'] = str(path)
        return lut
    if cfg.target_latency is None and not cfg.lam:
        return None
    grid = grid_for(dense, cfg.lut_grid) if cfg.lut_grid else None
    lut = build_latency_table(dense, batch_size=cfg.lut_batch, grid=grid, passes=cfg.lut_passes, progress=cfg.progress)
    lut.meta['source'] = 'measure'
    if busy_warning(lut.meta):
        _log(busy_warning(lut.meta))
    return lut


def prune_nvit(cfg: NViTConfig) -> dict:
    """Prune, densify, fine-tune and report (see the module docstring). Writes into ``cfg.out``:
    the fine-tuned run directory, ``pruned/`` (densified, before fine-tuning), ``dense/`` when the
    dense model was not a run directory, ``prune_log.jsonl``, ``latency_table.json``,
    ``report.json`` and ``widths.png``."""
    from ..train.distributed import seed_all
    from .report import finish_report

    cfg.validate()
    out = Path(cfg.out)
    if (out / 'config.json').exists() or (out / PRUNE_LOG).exists():
        raise PruneError(f'{out} already holds a pruning run; choose another --out')
    out.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)
    device = torch.device(cfg.device) if cfg.device else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dense = load_dense(cfg.model).to(device)
    cfg.unit_types(layout_of(dense))   # settings for unit types the family does not prune: fail early
    label_names = (dense.pretrained_cfg or {}).get('label_names')
    dense_dir = cfg.model if is_run_dir(cfg.model) else str(save_run_dir(dense, out / 'dense', label_names))
    train_loader, val_loader, train_set = _loaders(cfg, dense)
    if getattr(train_set, 'classes', None) is not None and len(train_set.classes) != dense.num_classes:
        raise PruneError(f'{cfg.model} predicts {dense.num_classes} classes but {cfg.data} has {len(train_set.classes)}')

    lut = latency_table(cfg, dense)
    if lut is not None:
        lut.save(out / LUT_NAME)

    pruner = NViTPruner(dense, cfg, lut, device)
    t0 = time.perf_counter()
    with open(out / PRUNE_LOG, 'w') as f:
        def write(row):
            f.write(json.dumps(row) + '\n')
            f.flush()
        pruner.run(train_loader, val_loader, on_event=write)
    prune_s = time.perf_counter() - t0
    masked = pruner.model
    compact = pruner.densified()
    check = next(iter(val_loader))[0][:16].to(device)
    with torch.no_grad():
        gap = float((masked(check) - compact(check)).abs().max())
    pruned_dir = save_run_dir(compact, out / 'pruned', label_names)

    finetune = None
    epochs, step_cap = cfg.finetune_epochs, cfg.finetune_steps
    if cfg.total_steps is not None:
        rest = cfg.total_steps - pruner.steps
        if rest < 1:
            raise PruneError(f'pruning took {pruner.steps} steps, the whole --total-steps budget '
                             f'({cfg.total_steps}); raise it or prune faster')
        per_epoch = len(train_loader)
        epochs = -(-rest // per_epoch)
        step_cap = -(-rest // epochs)
    if epochs:
        from ..train import TrainConfig, train
        tcfg = TrainConfig(model=str(pruned_dir), data=cfg.data, out=str(out), epochs=epochs,
                           batch_size=cfg.batch_size, lr=cfg.finetune_lr, warmup_epochs=0.0, min_lr=cfg.finetune_lr / 20,
                           weight_decay=cfg.weight_decay, smoothing=cfg.smoothing, mixup=0.0, cutmix=0.0,
                           drop_path=0.0, aug=cfg.aug, teacher=dense_dir, distill='soft',
                           distill_alpha=cfg.finetune_alpha, distill_tau=cfg.finetune_tau, kd_norm='batch',
                           seed=cfg.seed, device=cfg.device, progress=cfg.progress, tensorboard=False,
                           max_steps_per_epoch=step_cap)
        finetune = train(tcfg)
    else:
        save_run_dir(compact, out, label_names)
    final = create(str(out)).to(device).eval()
    return finish_report(cfg, out, pruner.dense, final, pruner, val_loader, device,
                         dict(prune_steps=pruner.steps, events=pruner.events, prune_time_s=round(prune_s, 1),
                              masked_vs_dense_max_abs=gap, finetune=finetune, dense_dir=dense_dir,
                              config=asdict(cfg)))
