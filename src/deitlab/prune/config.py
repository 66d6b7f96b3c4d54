"""``NViTConfig`` and ``OFBConfig``: the settings of ``deitlab prune nvit`` (nvit.py) and ``deitlab prune
ofb`` (ofb_search.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional

from ..registry import SALIENCY
from .base import GROUP_TYPES, PruneError, lut_path
from .schedule import NVIT_INTERVAL, check_schedule

if TYPE_CHECKING:
    from .families import Layout

__all__ = ['NViTConfig', 'OFBConfig']


_SCHEDULE_HELP = ('linear: reach the target linearly over --prune-steps (default: 2 epochs of the training '
                  'split, clamped to 200-2000 steps, in ~40 events); nvit: the paper\'s --groups-per-event groups '
                  'every --interval steps until the target. Unset: linear, or nvit when only --groups-per-event '
                  'is given')
_INTERVAL_HELP = 'steps between pruning events (nvit, or with --prune-steps: 100; default linear: steps / 40)'
_LUT_HELP = ('latency table: "measure" times one on this device (the default), or a latency_table.json, or '
             'the name of a table committed in deitlab/prune/tables/')



@dataclass
class _CutModel:
    """What ``NViTConfig`` and ``OFBConfig`` share: the dense model, the data, the run directory and
    the fine-tuning of the cut model (with soft distillation from the dense one)."""
    model: str = field(metadata={'group': 'model', 'help': 'the dense model: run directory, deitlab name or timm ViT/DeiT'})
    data: str = field(metadata={'group': 'data', 'help': 'dataset spec: glyphs[:k=v,...] | fashion-mnist[:PATH] | folder:PATH'})
    out: str = field(metadata={'group': 'run', 'help': 'run directory for the smaller model, its log and plots'})
    finetune_epochs: int = field(default=1, metadata={
        'group': 'fine-tuning', 'help': 'fine-tuning epochs of the cut model'})
    finetune_steps: Optional[int] = field(default=None, metadata={
        'group': 'fine-tuning', 'help': 'cap on the steps of a fine-tuning epoch'})
    finetune_lr: float = field(default=2e-4, metadata={'group': 'fine-tuning', 'help': 'fine-tuning learning rate'})
    finetune_alpha: float = field(default=0.5, metadata={
        'group': 'fine-tuning', 'help': 'weight of the soft distillation from the dense model'})
    finetune_tau: float = field(default=2.0, metadata={
        'group': 'fine-tuning', 'help': 'temperature of that distillation'})


@dataclass
class _LatencyTableSettings:
    """The latency table fields ``NViTConfig`` and ``OFBConfig`` share (``lut``: a path, a committed
    table's name, or None / ``'measure'`` to time one on this device)."""
    lut: Optional[str] = field(default=None, metadata={'group': 'latency table', 'help': _LUT_HELP})
    lut_batch: int = field(default=64, metadata={'group': 'latency table', 'help': 'batch size the table is timed at'})
    lut_passes: int = field(default=5, metadata={
        'group': 'latency table',
        'help': 'interleaved timing rounds (each call between two reference calls, the median per node; timing.py)'})
    lut_grid: Dict[str, list] = field(default_factory=dict, metadata={
        'group': 'latency table', 'help': 'widths timed, per axis (emb, heads, qk, v, mlp; PoolFormer etc.: mlp), '
                                          'each a JSON list'})

    def _check_lut(self) -> None:
        """A missing table file or a bad timing setting fails here, before the model and data are loaded."""
        lut_path(self.lut)
        for k in ('lut_batch', 'lut_passes'):
            if getattr(self, k) < 1:
                raise PruneError(f'{k} must be >= 1, got {getattr(self, k)}')


@dataclass
class NViTConfig(_LatencyTableSettings, _CutModel):
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
    interleaved rounds, each call paired with a reference block, the median per node, at
    ``lut_batch``; and the cost of widths off multiples of 8); a path or the name of a committed table
    (``deitlab/prune/tables/``) loads one instead, so that pruning does not depend on the load of
    the machine while it runs.
    """
    # target: exactly one, a fraction of the dense model
    target_latency: Optional[float] = field(default=None, metadata={
        'group': 'pruning', 'help': 'target latency, a fraction of the dense model (give exactly one target)'})
    target_gmacs: Optional[float] = field(default=None, metadata={
        'group': 'pruning', 'help': "target GMACs, a fraction of the dense model's"})
    target_params: Optional[float] = field(default=None, metadata={
        'group': 'pruning', 'help': "target parameters, a fraction of the dense model's"})
    # saliency and ranking
    criterion: str = field(default='nvit', metadata={
        'group': 'pruning', 'help': f'saliency: {SALIENCY.choices_help()} (nvit: Hessian-aware)'})
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
    # run
    val_batches: int = field(default=20, metadata={
        'group': 'run', 'help': 'validation batches per pruning event (0: none)'})
    measure: bool = field(default=True, metadata={
        'group': 'run', 'help': 'time the dense and the pruned model at the end'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed'})
    resume: bool = field(default=False, metadata={
        'group': 'run', 'help': "continue the pruning phase from --out's last event checkpoint (same settings)"})
    device: Optional[str] = field(default=None, metadata={
        'group': 'run', 'help': 'torch device; unset: CUDA when available, else the CPU'})
    progress: Optional[bool] = field(default=None, metadata={
        'group': 'run', 'help': 'progress bars; unset: when attached to a terminal'})

    def validate(self) -> 'NViTConfig':
        if isinstance(self.divisors, str) and self.divisors.lower() in ('none', ''):
            self.divisors = None
        self.prune_types = tuple(self.prune_types)
        if self.criterion not in SALIENCY:
            raise PruneError(f'unknown saliency criterion {self.criterion!r}; choose one of '
                             f'{", ".join(SALIENCY.names())}')
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
        for k in ('interval', 'groups_per_event', 'prune_steps', 'total_steps', 'batch_size', 'max_prune_steps'):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise PruneError(f'{k} must be >= 1, got {getattr(self, k)}')
        interval = self.interval or NVIT_INTERVAL
        if self.prune_steps is not None and self.prune_steps < interval:
            raise PruneError(f'prune_steps ({self.prune_steps}) must be at least one interval ({interval}); '
                             f'lower --interval')
        if self.total_steps is not None and self.prune_steps is not None and self.total_steps <= self.prune_steps:
            raise PruneError(f'total_steps ({self.total_steps}) must exceed prune_steps ({self.prune_steps})')
        self._check_lut()
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


@dataclass
class OFBConfig(_LatencyTableSettings, _CutModel):
    """Settings of ``prune_ofb`` (one field per ``deitlab prune ofb`` flag; ofb.py, ofb_search.py).

    The search trains the model with its masks for ``search_epochs`` epochs of the training split
    (or ``search_steps``): ``lambda`` falls from 0.99 to 0.1 over the first ``warmup`` of it,
    candidates are eliminated ``eliminations_per_epoch`` times an epoch, and it ends early once every
    module has one candidate left. Weights and scores train with AdamW (``lr``; scores without
    weight decay), the candidate logits with Adam betas (0.5, 0.999) and weight decay 1e-3
    (``arch_lr``), as in the paper. The paper's ``arch_lr`` (2.5e-4 per 256 images of batch, 1e-3 at
    its batch of 1024) serves a search of about 100 epochs; a search of a few hundred steps needs a
    faster one: on the Fashion-MNIST DeiT-nano, 800 steps at 1e-3 left all 25 modules undecided,
    at 2e-2 (the default) two. The result is folded, cut to its widths and fine-tuned like NViT's
    (``finetune_*``, ``total_steps``).
    """
    target_gmacs: Optional[float] = field(default=None, metadata={
        'group': 'search', 'help': "target GMACs, a fraction of the dense model's, strictly between 0 and 1"})
    target_latency: Optional[float] = field(default=None, metadata={
        'group': 'search', 'help': "target latency by the latency table, a fraction of the dense model's "
                                   "(instead of --target-gmacs)"})
    grid: str = field(default='ours', metadata={
        'group': 'search', 'help': "candidate widths: ours (heads 1..H) or paper (even head counts)"})
    search_epochs: float = field(default=2.0, metadata={
        'group': 'search', 'help': 'length of the search in epochs of the training split (ends early when done)'})
    search_steps: Optional[int] = field(default=None, metadata={
        'group': 'search', 'help': 'length of the search in steps (instead of --search-epochs)'})
    warmup: float = field(default=0.2, metadata={
        'group': 'search', 'help': 'fraction of the search over which lambda falls from 0.99 to 0.1'})
    eliminations_per_epoch: int = field(default=3, metadata={
        'group': 'search', 'help': 'candidate eliminations per epoch'})
    pmim: bool = field(default=True, metadata={
        'group': 'search', 'help': 'progressive masked image modelling during the search (--no-pmim: the ablation)'})
    adapt_budget: bool = field(default=True, metadata={
        'group': 'search', 'help': "grow the budget term's weight while the expected cost is off the target "
                                   "(--no-adapt-budget: the paper's fixed weight 5)"})
    batch_size: int = field(default=32, metadata={'group': 'optimiser', 'help': 'batch size'})
    lr: float = field(default=2e-4, metadata={'group': 'optimiser', 'help': 'learning rate of weights and scores'})
    arch_lr: float = field(default=2e-2, metadata={
        'group': 'optimiser', 'help': 'learning rate of the candidate logits (Adam betas 0.5, 0.999; wd 1e-3)'})
    weight_decay: float = field(default=0.05, metadata={'group': 'optimiser', 'help': 'AdamW weight decay'})
    kl_weight: float = field(default=1.0, metadata={
        'group': 'distillation', 'help': 'weight of the KL term to the dense model during the search'})
    kl_tau: float = field(default=3.0, metadata={'group': 'distillation', 'help': 'temperature of that KL term'})
    ce_weight: float = field(default=1.0, metadata={'group': 'distillation', 'help': 'weight of the cross-entropy'})
    smoothing: float = field(default=0.0, metadata={'group': 'augmentation', 'help': 'label smoothing'})
    aug: str = field(default='none', metadata={'group': 'augmentation', 'help': 'none | light | deit'})
    total_steps: Optional[int] = field(default=None, metadata={
        'group': 'fine-tuning', 'help': 'search plus fine-tuning steps (the fine-tune gets the rest)'})
    measure: bool = field(default=True, metadata={
        'group': 'run', 'help': 'time the dense and the searched model at the end'})
    resume: bool = field(default=False, metadata={
        'group': 'run', 'help': "continue the search from --out's last elimination checkpoint (same settings)"})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed'})
    device: Optional[str] = field(default=None, metadata={
        'group': 'run', 'help': 'torch device; unset: CUDA when available, else the CPU'})
    progress: Optional[bool] = field(default=None, metadata={
        'group': 'run', 'help': 'progress bars; unset: when attached to a terminal'})

    lam = 0.0   # no latency penalty on units (NViT's); read by nvit.latency_table

    @property
    def target(self) -> tuple:
        """``(kind, fraction)``: ``('gmacs', x)`` or ``('latency', x)``."""
        return ('latency', self.target_latency) if self.target_latency is not None else ('gmacs', self.target_gmacs)

    def validate(self) -> 'OFBConfig':
        given = [k for k in ('target_gmacs', 'target_latency') if getattr(self, k) is not None]
        if len(given) != 1:
            raise PruneError(f'give exactly one OFB target, --target-gmacs or --target-latency (a fraction of '
                             f'the dense model), got {given or "none"}')
        kind, value = self.target
        if not 0.0 < value < 1.0:
            raise PruneError(f'the OFB target is a fraction of the dense model, strictly between 0 and 1; '
                             f'got --target-{kind} {value}')
        self._check_lut()
        if self.grid not in ('ours', 'paper'):
            raise PruneError(f'--grid must be ours or paper, got {self.grid!r}')
        if not self.search_epochs > 0:
            raise PruneError(f'search_epochs must be > 0, got {self.search_epochs}')
        if not 0.0 < self.warmup <= 1.0:
            raise PruneError(f'warmup is a fraction of the search in (0, 1], got {self.warmup}')
        for k in ('search_steps', 'eliminations_per_epoch', 'batch_size', 'total_steps'):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise PruneError(f'{k} must be >= 1, got {getattr(self, k)}')
        if self.finetune_epochs < 0:
            raise PruneError(f'finetune_epochs must be >= 0, got {self.finetune_epochs}')
        for k in ('lr', 'arch_lr'):
            if not getattr(self, k) > 0:
                raise PruneError(f'{k} must be > 0, got {getattr(self, k)}')
        return self
