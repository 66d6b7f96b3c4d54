"""``NViTConfig``: the settings of ``prune_nvit`` / ``deitlab prune nvit`` (see nvit.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from .families import Layout
from .groups import GROUP_TYPES, PruneError
from .latency import lut_path
from .schedule import NVIT_INTERVAL, check_schedule

__all__ = ['NViTConfig']


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
    model: str
    data: str
    out: str
    # target: exactly one, a fraction of the dense model
    target_latency: Optional[float] = None
    target_gmacs: Optional[float] = None
    target_params: Optional[float] = None
    # saliency and ranking
    criterion: str = 'nvit'                 # nvit | taylor | magnitude | fisher
    lam: float = 0.02                       # latency penalty weight (scale-free, see ranking.py)
    momentum: float = 0.9
    divisors: Optional[str] = 'nvit'        # NViT's constants, or None
    group_sizes: Dict[str, int] = field(default_factory=dict)   # per type; default: scaled NViT
    min_keep: Dict[str, int] = field(default_factory=dict)      # per type; default: one group
    prune_types: tuple = GROUP_TYPES
    schedule: Optional[str] = field(default=None, metadata={'help': _SCHEDULE_HELP})   # linear | nvit
    interval: Optional[int] = field(default=None, metadata={'help': _INTERVAL_HELP})
    groups_per_event: Optional[int] = field(default=None, metadata={'help': 'nvit schedule: groups per event (2)'})
    prune_steps: Optional[int] = field(default=None, metadata={'help': 'linear schedule: steps to the target'})
    total_steps: Optional[int] = None       # pruning + fine-tuning steps (fine-tune gets the rest)
    max_prune_steps: int = 20000
    fisher_samples: int = 8                 # per-sample gradients per batch (criterion fisher)
    masked_ln: bool = True
    round_to: Optional[int] = None
    # training while pruning
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    kl_weight: float = 1.0
    kl_tau: float = 3.0
    ce_weight: float = 1.0
    smoothing: float = 0.0
    teacher: Optional[str] = None
    distill: str = 'none'
    aug: str = 'none'
    # latency table
    lut: Optional[str] = field(default=None, metadata={'help': _LUT_HELP})   # measure | PATH | committed name
    lut_batch: int = 64
    lut_passes: int = 5                     # interleaved timing rounds (timing.py)
    lut_grid: Dict[str, list] = field(default_factory=dict)   # per axis (emb, heads, qk, v, mlp; PoolFormer etc.: mlp)
    # fine-tuning of the densified model
    finetune_epochs: int = 1
    finetune_steps: Optional[int] = None    # cap on steps per fine-tune epoch
    finetune_lr: float = 2e-4
    finetune_alpha: float = 0.5
    finetune_tau: float = 2.0
    # run
    val_batches: int = 20                   # validation batches per event (0: none)
    measure: bool = True                    # time dense vs pruned at the end
    seed: int = 0
    device: Optional[str] = None
    progress: Optional[bool] = None

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
