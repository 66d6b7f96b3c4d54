"""The training configuration: one dataclass, defaults from the DeiT recipe.

Defaults follow DeiT's ``main.py`` (Touvron et al. 2021, Table 9): AdamW, ``lr = 5e-4 * batch / 512``,
weight decay 0.05, cosine schedule with warm-up, label smoothing 0.1, Mixup 0.8 / CutMix 1.0
(``--mix`` switches to TransMix or MixPro: :mod:`deitlab.train.mixing`), drop path 0.1, optional EMA, hard or soft distillation.

Named recipes (:data:`RECIPES`, ``--recipe``) are sets of defaults: ``deit`` is the dataclass
defaults above (made for ImageNet's 300 epochs), ``short`` the reference recipe of the project's
benchmarks (batch 32, lr 5e-4, half an epoch of warm-up, no mixing, no drop path, no augmentation),
which learns small data in a few epochs. Precedence, lowest first: dataclass defaults, the recipe,
``--config FILE.yaml`` values, explicit flags (timm's convention for the last two).
:func:`short_run_warning` tells when a run is too short for the recipe it uses.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import yaml

from ..registry import MIX_MODES, TOKEN_FUSION
from .dcal_config import DCALSettings

MIN_MIXING_STEPS = 1000   # fewer optimizer steps than this with batch mixing on: warn


class ConfigError(ValueError):
    """An invalid training configuration, with the reason."""


def _recipe_help() -> str:
    return ('named defaults, lowest precedence (--config values and explicit flags win): '
            + '; '.join(f'{name}: {text} ({describe_recipe(name)})' for name, text in RECIPE_NOTES.items()))


@dataclass
class TrainConfig(DCALSettings):
    """Settings of ``train`` (one field per ``deitlab train`` flag; the ``help`` and ``group`` of each
    field are its ``--help`` line and section); DCAL's and ``--pk`` come from :class:`DCALSettings`."""
    recipe: str = field(default='deit', metadata=dict(group='config', help=_recipe_help))
    model: str = field(default='deitlab_deit_nano_patch4_32', metadata=dict(
        group='model', help='timm or deitlab model name, or a run directory to go on training'))
    data: str = field(default='glyphs', metadata=dict(
        group='data', help='dataset spec: glyphs[:k=v,...] | fashion-mnist[:PATH] | folder:PATH'))
    out: str = field(default='runs/train', metadata=dict(
        group='run', help='run directory: configuration, weights, metrics, checkpoint'))
    epochs: int = field(default=30, metadata=dict(group='schedule', help='training epochs'))
    batch_size: int = field(default=128, metadata=dict(
        group='optimiser', help='global batch size (all processes together)'))
    lr: Optional[float] = field(default=None, metadata=dict(
        group='optimiser', help='peak learning rate; unset: --base-lr * --batch-size / 512'))
    base_lr: float = field(default=5e-4, metadata=dict(
        group='optimiser', help='learning rate per 512 images, used when --lr is unset'))
    min_lr: float = field(default=1e-5, metadata=dict(group='schedule', help='learning rate at the end of the cosine'))
    warmup_lr: float = field(default=1e-6, metadata=dict(group='schedule', help='learning rate at the start of warm-up'))
    warmup_epochs: float = field(default=5.0, metadata=dict(
        group='schedule', help='linear warm-up, in epochs (a tenth of the run when it is not shorter than the run)'))
    weight_decay: float = field(default=0.05, metadata=dict(group='optimiser', help='decoupled weight decay'))
    opt: str = field(default='adamw', metadata=dict(
        group='optimiser', help="optimizer name for timm's create_optimizer_v2 (adamw, sgd, lamb, ...)"))
    grad_clip: Optional[float] = field(default=None, metadata=dict(
        group='optimiser', help='clip the gradient norm to this; unset: no clipping'))
    smoothing: float = field(default=0.1, metadata=dict(group='augmentation', help='label smoothing'))
    mixup: float = field(default=0.8, metadata=dict(group='augmentation', help='Mixup alpha (0: off)'))
    cutmix: float = field(default=1.0, metadata=dict(group='augmentation', help='CutMix alpha (0: off)'))
    mixup_prob: float = field(default=1.0, metadata=dict(
        group='augmentation', help='share of batches that are mixed'))
    mixup_switch_prob: Optional[float] = field(default=None, metadata=dict(
        group='augmentation', help='chance of CutMix rather than Mixup when both are on; unset: 0.5 (0.8 for '
                                   'transmix, its released configuration)'))
    mix: str = field(default='mixup-cutmix', metadata=dict(
        group='augmentation',
        help=f'{MIX_MODES.choices_help()} (deitlab.train.mixing)'))
    maskmix_prob: float = field(default=0.5, metadata=dict(
        group='augmentation', help='maskmix / mixpro: MaskMix on this share of batches, else Mixup / CutMix'))
    maskmix_alpha: float = field(default=1.0, metadata=dict(
        group='augmentation', help='MaskMix lambda ~ Beta(alpha, alpha)'))
    mask_size: Optional[int] = field(default=None, metadata=dict(
        group='augmentation',
        help='MaskMix cell side in pixels, a multiple of the patch size; unset: about a quarter of the image'))
    transmix_area_weight: float = field(default=0.5, metadata=dict(
        group='augmentation', help="TransMix label weight lambda = w * area + (1 - w) * attention (the released "
                                   "code's 0.5)"))
    pal_detach_alpha: bool = field(default=False, metadata=dict(
        group='augmentation', help="MixPro: treat PAL's alpha as a constant (the release does not)"))
    patch_loss_weight: float = field(default=0.5, metadata=dict(
        group='augmentation', help="patchmix: weight of the patch-token loss next to the class token's (Token "
                                   "Labeling's 0.5)"))
    defence: str = field(default='none', metadata=dict(
        group='augmentation',
        help='none | blur[:p=0.3,k=3] | noise[:std=0.25] | adv[:eps=4,steps=3,alpha=...] (deitlab.unlearnable.defences)'))
    drop_path: float = field(default=0.1, metadata=dict(group='model', help='stochastic depth rate'))
    drop: float = field(default=0.0, metadata=dict(group='model', help='dropout rate'))
    ema: bool = field(default=False, metadata=dict(
        group='optimiser', help='keep an exponential moving average of the weights and evaluate it too'))
    ema_decay: float = field(default=0.99996, metadata=dict(group='optimiser', help='EMA decay per step'))
    teacher: Optional[str] = field(default=None, metadata=dict(
        group='distillation', help='teacher: timm or deitlab name, or a run directory'))
    distill: str = field(default='none', metadata=dict(group='distillation', help='none | soft | hard'))
    distill_alpha: float = field(default=0.5, metadata=dict(
        group='distillation', help="weight of the teacher's term in the loss"))
    distill_tau: float = field(default=1.0, metadata=dict(group='distillation', help='soft distillation temperature'))
    kd_norm: str = field(default='numel', metadata=dict(
        group='distillation', help="divide the soft KL sum by numel (batch x classes, DeiT's code) or batch"))
    img_size: Optional[int] = field(default=None, metadata=dict(
        group='model', help="input side; unset: the data's size when the patch size divides it, else the "
                            "model's (rule: engine.build_student)"))
    in_chans: Optional[int] = field(default=None, metadata=dict(
        group='model', help="input channels; unset: the data's"))
    aug: str = field(default='light', metadata=dict(
        group='augmentation', help='none | light (padded random crop and flip) | deit (timm\'s DeiT transform)'))
    hflip: Optional[float] = field(default=None, metadata=dict(
        group='augmentation', help="horizontal flip probability; unset: the data's (0 for glyphs, else 0.5)"))
    pretrained: bool = field(default=False, metadata=dict(
        group='model', help="start from timm's released weights for the model name"))
    pretrained_file: Optional[str] = field(default=None, metadata=dict(
        group='model', help='start from the weights in this file (implies --pretrained)'))
    model_kwargs: dict = field(default_factory=dict, metadata=dict(
        group='model', help='extra arguments for timm.create_model'))
    workers: int = field(default=0, metadata=dict(group='data', help='data loader worker processes'))
    seed: int = field(default=0, metadata=dict(group='run', help='random seed'))
    device: Optional[str] = field(default=None, metadata=dict(
        group='run', help='torch device; unset: CUDA when available, else the CPU'))
    amp: bool = field(default=True, metadata=dict(group='run', help='bf16 autocast on CUDA (ignored on the CPU)'))
    resume: bool = field(default=False, metadata=dict(group='run', help='continue the checkpoint in --out'))
    overwrite: bool = field(default=False, metadata=dict(
        group='run', help='train into a non-empty --out that holds no checkpoint of this run (its files are replaced)'))
    eval_every: int = field(default=1, metadata=dict(
        group='run', help='evaluate every this many epochs (and after the last)'))
    eval_batch_size: Optional[int] = field(default=None, metadata=dict(
        group='run', help='evaluation batch per process; unset: twice the training batch per process'))
    tensorboard: bool = field(default=True, metadata=dict(group='run', help='write TensorBoard logs to --out'))
    progress: Optional[bool] = field(default=None, metadata=dict(
        group='run', help='progress bars; unset: when attached to a terminal'))
    max_steps_per_epoch: Optional[int] = field(default=None, metadata=dict(
        group='schedule', help='cap on the steps of an epoch (quick runs, tests)'))
    token_fusion: str = field(default='none', metadata=dict(
        group='token fusion', help=f'none | {TOKEN_FUSION.choices_help()}: train the model token-reduced'))
    r: Optional[str] = field(default=None, metadata=dict(
        group='token fusion', help="tokens fused per block: int, fraction or comma list; unset: the method's"))
    r_teacher_max: float = field(default=8, metadata=dict(
        group='token fusion', help="MCTF consistency pass at r' in [0, this); 0: off"))
    consistency_weight: float = field(default=3.0, metadata=dict(
        group='token fusion', help='MCTF consistency: lambda of the class-token MSE'))
    consistency_gate: float = field(default=0.4, metadata=dict(
        group='token fusion', help='MCTF consistency: only samples whose true-class probability exceeds this'))
    multilevel: Optional[str] = field(default=None, metadata=dict(
        group='multi-level', help='train with a V-cycle of coalesced models (Zou et al., ICLR 2024): '
                                  'levels=K,down=E,small=E,up=E[,alpha=0.25,lr_scale=1,pairing=adjacent|half,'
                                  'width=1,depth=1]; epochs (K-1) x down + small + (K-1) x up = --epochs '
                                  '(deitlab.train.multilevel)'))

    @classmethod
    def from_recipe(cls, recipe: str = 'deit', **values) -> 'TrainConfig':
        """A configuration with the defaults of ``recipe`` (see :data:`RECIPES`); ``values`` win."""
        check_recipe(recipe)
        return cls(**{**RECIPES[recipe], **values, 'recipe': recipe})

    def validate(self) -> 'TrainConfig':
        check_recipe(self.recipe)
        if self.recipe != 'deit' and all(getattr(self, k) == RECIPES['deit'][k]
                                         for k, v in RECIPES[self.recipe].items() if v != RECIPES['deit'][k]):
            raise ConfigError(f"recipe {self.recipe!r} is named but none of its settings are applied; build the "
                              f"configuration with TrainConfig.from_recipe({self.recipe!r}, ...)")
        if not str(self.model).strip():
            raise ConfigError('model is empty: give a deitlab/timm name or a run directory')
        if not str(self.out).strip():
            raise ConfigError('out is empty: give the run directory to write')
        self._check_ranges()
        if self.epochs < 1:
            raise ConfigError(f'epochs must be >= 1, got {self.epochs}')
        if self.batch_size < 1:
            raise ConfigError(f'batch_size must be >= 1, got {self.batch_size}')
        if self.distill not in ('none', 'soft', 'hard'):
            raise ConfigError(f"distill must be one of none, soft, hard; got {self.distill!r}")
        if self.distill != 'none' and not self.teacher:
            raise ConfigError(f'--distill {self.distill} needs --teacher NAME|RUN_DIR')
        if self.teacher and self.distill == 'none':
            raise ConfigError('a teacher was given but --distill is none; choose --distill hard or soft')
        if self.kd_norm not in ('numel', 'batch'):
            raise ConfigError(f"kd_norm must be 'numel' or 'batch', got {self.kd_norm!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f'distill_alpha must be in [0, 1], got {self.distill_alpha}')
        if self.aug not in ('none', 'light', 'deit'):
            raise ConfigError(f"aug must be one of none, light, deit; got {self.aug!r}")
        if self.token_fusion != 'none':
            TOKEN_FUSION.check(self.token_fusion, ConfigError, 'token_fusion')
        if self.r is not None and self.token_fusion == 'none':
            raise ConfigError(f'--r needs --token-fusion {TOKEN_FUSION.choices_help("|")}')
        if self.r_teacher_max < 0 or self.consistency_weight < 0:
            raise ConfigError('r_teacher_max and consistency_weight must be >= 0')
        if MIX_MODES.get(self.mix, ConfigError)['attention'] and self.token_fusion != 'none':
            raise ConfigError(f'--mix {self.mix} labels from the last block\'s attention over all patch tokens; it '
                              f'does not compose with --token-fusion {self.token_fusion}, which merges tokens '
                              f'before that block (use --mix maskmix or mixup-cutmix)')
        if MIX_MODES[self.mix]['patch'] and self.token_fusion != 'none':
            raise ConfigError(f'--mix {self.mix} labels every patch token of the last stage by its place on the grid; '
                              f'it does not compose with --token-fusion {self.token_fusion}, which merges tokens')
        from ..unlearnable.defences import parse_defence
        try:
            parse_defence(self.defence)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.mask_size is not None and self.mask_size < 1:
            raise ConfigError(f'mask_size must be >= 1, got {self.mask_size}')
        if self.multilevel is not None:
            self._check_multilevel()
        self._check_dcal()
        if self.warmup_epochs < 0:
            raise ConfigError(f'warmup_epochs must be >= 0, got {self.warmup_epochs}')
        if self.warmup_epochs >= self.epochs:
            # A short run with the recipe's 5 warm-up epochs: warm up for a tenth of it instead.
            self.warmup_epochs = self.epochs * 0.1
        return self

    def _check_multilevel(self) -> None:
        plan = parse_multilevel(self.multilevel)
        if plan.total_epochs != self.epochs:
            raise ConfigError(f'--multilevel budgets add up to {plan.total_epochs} epochs ({plan.levels - 1} x down '
                              f'{plan.down} + small {plan.small} + {plan.levels - 1} x up {plan.up}) but --epochs is '
                              f'{self.epochs}; make them agree')
        if self.token_fusion != 'none':
            raise ConfigError(f'--multilevel swaps the model at each stage; it does not compose with --token-fusion '
                              f'{self.token_fusion} (fuse the trained model afterwards: deitlab fuse)')
        if MIX_MODES.get(self.mix, ConfigError)['attention'] or MIX_MODES[self.mix]['patch']:
            what = 'the patch logits' if MIX_MODES[self.mix]['patch'] else 'the attention'
            raise ConfigError(f'--multilevel swaps the model at each stage; --mix {self.mix} reads {what} of '
                              f'the model it was built with: use mixup-cutmix, maskmix or none')

    def _check_ranges(self) -> None:
        """Every number in its range, named with the limit (``ConfigError``)."""
        rules = [('lr', '> 0', lambda v: v > 0), ('base_lr', '> 0', lambda v: v > 0),
                 ('min_lr', '>= 0', lambda v: v >= 0), ('warmup_lr', '>= 0', lambda v: v >= 0),
                 ('weight_decay', '>= 0', lambda v: v >= 0), ('grad_clip', '> 0', lambda v: v > 0),
                 ('smoothing', 'in [0, 1)', lambda v: 0 <= v < 1), ('mixup', '>= 0', lambda v: v >= 0),
                 ('cutmix', '>= 0', lambda v: v >= 0), ('mixup_prob', 'in [0, 1]', lambda v: 0 <= v <= 1),
                 ('mixup_switch_prob', 'in [0, 1]', lambda v: 0 <= v <= 1),
                 ('maskmix_prob', 'in [0, 1]', lambda v: 0 <= v <= 1),
                 ('patch_loss_weight', '>= 0', lambda v: v >= 0),
                 ('drop_path', 'in [0, 1)', lambda v: 0 <= v < 1), ('drop', 'in [0, 1)', lambda v: 0 <= v < 1),
                 ('ema_decay', 'in (0, 1)', lambda v: 0 < v < 1), ('distill_tau', '> 0', lambda v: v > 0),
                 ('img_size', '>= 1', lambda v: v >= 1), ('in_chans', '>= 1', lambda v: v >= 1),
                 ('hflip', 'in [0, 1]', lambda v: 0 <= v <= 1), ('workers', '>= 0', lambda v: v >= 0),
                 ('eval_every', '>= 1', lambda v: v >= 1), ('eval_batch_size', '>= 1', lambda v: v >= 1),
                 ('max_steps_per_epoch', '>= 1', lambda v: v >= 1)]
        for name, limit, ok in rules:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ConfigError(f'{name} must be {limit}, got {value}')

    @property
    def mixing_active(self) -> bool:
        """Whether batches are mixed (they then need an even size per process)."""
        if self.mix == 'none':
            return False
        entry = MIX_MODES[self.mix]
        return entry['maskmix'] or entry['patch'] or (self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0))

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 512

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def with_defaults(saved: dict) -> dict:
    """A saved configuration with every option it lacks at that option's default: a run written
    before the option existed ran with its default."""
    defaults = dataclasses.asdict(TrainConfig())
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def check_resume_settings(saved: dict, cfg, keys: Iterable[str], path, hint: str) -> None:
    """``ConfigError`` when a checkpoint at ``path`` was written with other values of ``keys`` than
    ``cfg`` has (each listed, saved vs now); ``hint`` ends the message (what to do instead)."""
    diff = [k for k in keys if saved.get(k) != getattr(cfg, k)]
    if diff:
        detail = ', '.join(f'{k}: saved {saved.get(k)!r} vs now {getattr(cfg, k)!r}' for k in diff)
        raise ConfigError(f'cannot resume {path}: the run was started with other settings ({detail}); {hint}')


@dataclass(frozen=True)
class Stage:
    """One stage of a V-cycle: ``epochs`` epochs from ``start`` at ``level`` (1: the model as given)."""
    level: int
    start: int
    epochs: int


@dataclass(frozen=True)
class MultilevelPlan:
    """A V-cycle (Zou et al., ICLR 2024, Algorithm 1): ``down`` epochs at each of levels 1..K-1 going
    down, ``small`` epochs at level K, ``up`` epochs at each of levels K-1..1 going up. Level k+1 is
    level k coalesced (half the width and/or depth); its learning rate is ``lr x lr_scale^(k-1)``."""
    levels: int = 2
    down: int = 1
    small: int = 1
    up: int = 1
    alpha: float = 0.25
    lr_scale: float = 1.0
    pairing: str = 'adjacent'
    width: bool = True
    depth: bool = True

    @property
    def total_epochs(self) -> int:
        return (self.levels - 1) * (self.down + self.up) + self.small

    def stages(self) -> list:
        levels = list(range(1, self.levels)) + [self.levels] + list(range(self.levels - 1, 0, -1))
        out, start = [], 0
        for i, level in enumerate(levels):
            epochs = self.down if i < self.levels - 1 else self.small if level == self.levels else self.up
            out.append(Stage(level, start, epochs))
            start += epochs
        return out

    def stage_index(self, epoch: int) -> int:
        """The stage that epoch ``epoch`` (0-based) belongs to (the last one past the end)."""
        stages = self.stages()
        return next((i for i, s in enumerate(stages) if s.start <= epoch < s.start + s.epochs), len(stages) - 1)


PAIRINGS = ('adjacent', 'half')
_PLAN_TYPES = dict(levels=int, down=int, small=int, up=int, alpha=float, lr_scale=float, pairing=str, width=bool,
                   depth=bool)


def parse_multilevel(spec) -> MultilevelPlan:
    """``'levels=2,down=2,small=6,up=4,alpha=0.25'`` (or a mapping, from a YAML block) as a plan;
    ``ConfigError`` naming the key for an unknown key or a value out of range."""
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(','):
            if not part.strip():
                continue
            if '=' not in part:
                raise ConfigError(f'--multilevel takes key=value pairs separated by commas, got {part.strip()!r} '
                                  f'(keys: {", ".join(_PLAN_TYPES)})')
            k, v = part.split('=', 1)
            items.append((k.strip(), v.strip()))
    values = {}
    for k, v in items:
        key = k.replace('-', '_')
        if key not in _PLAN_TYPES:
            close = difflib.get_close_matches(key, list(_PLAN_TYPES), n=1)
            raise ConfigError(f'--multilevel: unknown key {k!r}' + (f' (did you mean {close[0]!r}?)' if close else '')
                              + f'; keys: {", ".join(_PLAN_TYPES)}')
        values[key] = coerce_value(v, _PLAN_TYPES[key], f'--multilevel {key}')
    plan = MultilevelPlan(**values)
    if plan.levels < 2:
        raise ConfigError(f'--multilevel levels must be >= 2 (level 1 is the model itself), got {plan.levels}')
    for key in ('down', 'small', 'up'):
        if getattr(plan, key) < 1:
            raise ConfigError(f'--multilevel {key} must be >= 1 epoch, got {getattr(plan, key)}')
    if not 0.0 <= plan.alpha <= 1.0:
        raise ConfigError(f'--multilevel alpha must be in [0, 1], got {plan.alpha}')
    if plan.lr_scale <= 0:
        raise ConfigError(f'--multilevel lr_scale must be > 0, got {plan.lr_scale}')
    if plan.pairing not in PAIRINGS:
        raise ConfigError(f'--multilevel pairing must be one of {", ".join(PAIRINGS)}, got {plan.pairing!r}')
    if not (plan.width or plan.depth):
        raise ConfigError('--multilevel with width=0 and depth=0 coalesces nothing; keep one of them')
    return plan


RECIPE_KEYS = ('batch_size', 'lr', 'warmup_epochs', 'weight_decay', 'smoothing', 'mix', 'mixup', 'cutmix',
               'drop_path', 'aug')
#: Named sets of defaults; ``deit`` is the dataclass defaults, ``short`` the benchmarks' reference recipe.
RECIPES = {
    'deit': {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in RECIPE_KEYS},
    'short': dict(batch_size=32, lr=5e-4, warmup_epochs=0.5, weight_decay=0.05, smoothing=0.1, mix='none',
                  mixup=0.0, cutmix=0.0, drop_path=0.0, aug='none'),
}
RECIPE_NOTES = {'deit': "the DeiT paper's (DeiT's main.py defaults), made for ImageNet's 300 epochs",
                'short': 'for small data and short runs, the reference recipe of the benchmarks'}


def describe_recipe(name: str) -> str:
    """``'batch 32, lr 5e-4, warm-up 0.5 epochs, ...'``: what a recipe sets."""
    r = RECIPES[name]
    lr = 'lr 5e-4 x batch / 512' if r['lr'] is None else f"lr {r['lr']:g}"
    mix = 'no mixing' if r['mix'] == 'none' else f"{r['mix']} (Mixup {r['mixup']:g}, CutMix {r['cutmix']:g})"
    return (f"batch {r['batch_size']}, {lr}, warm-up {r['warmup_epochs']:g} epochs, {mix}, "
            f"drop path {r['drop_path']:g}, smoothing {r['smoothing']:g}, weight decay {r['weight_decay']:g}, "
            f"aug {r['aug']}")


def check_recipe(name: str) -> str:
    if name not in RECIPES:
        known = '; '.join(f'{n} ({describe_recipe(n)})' for n in RECIPES)
        raise ConfigError(f'unknown recipe {name!r}; known recipes: {known}')
    return name


def short_run_warning(recipe: str, total_steps: int, warmup_steps: int, mixing: bool) -> Optional[str]:
    """One warning line when a run is too short for its recipe, else None.

    Too short: fewer than :data:`MIN_MIXING_STEPS` optimizer steps with batch mixing on (mixed
    labels slow early learning; the DeiT recipe pays that back over hundreds of epochs), or a
    warm-up longer than a third of the run.
    """
    why, fix = [], []
    if mixing and total_steps < MIN_MIXING_STEPS:
        why.append(f'{total_steps} optimizer steps with batch mixing on (fewer than ~{MIN_MIXING_STEPS})')
        fix.append('--mix none')
    if warmup_steps * 3 > total_steps:
        why.append(f'warm-up of {warmup_steps} of {total_steps} steps (more than a third)')
        fix.append('a shorter --warmup-epochs')
    if not why:
        return None
    if recipe != 'short':   # short mixes nothing and warms up for half an epoch
        advice = 'use --recipe short' + (' or a shorter --warmup-epochs' if warmup_steps * 3 > total_steps else '')
    else:
        advice = f"use {' and '.join(fix)}"
    return f"warning: run too short for recipe '{recipe}': {' and '.join(why)}; {advice}, or train longer"


def config_fields() -> dict:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


_TRUE, _FALSE = ('true', 'yes', 'on', '1'), ('false', 'no', 'off', '0')


def coerce_value(value, kind, what: str):
    """A YAML value as the option's type ``kind`` (int, float, bool, str, tuple; anything else is
    kept): YAML reads ``1e-3`` as a string and ``3`` as an int, the option wants a float either
    way. ``ConfigError`` naming ``what`` when it cannot be converted."""
    if value is None or kind is None or kind is dict:
        return value
    bad = ConfigError(f'{what} must be {getattr(kind, "__name__", kind)}, got {value!r}')
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise bad
    if isinstance(value, bool) and kind in (int, float):
        raise bad
    if kind is int:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if kind is tuple:
        if isinstance(value, str):
            return tuple(x for x in value.split(',') if x)
        if isinstance(value, (list, tuple)):
            return tuple(str(x) for x in value)
        raise bad
    if kind is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    return value


def yaml_error(path, e) -> str:
    """``PATH is not valid YAML (line L, column C): PROBLEM`` for a ``yaml.YAMLError``."""
    where = getattr(e, 'problem_mark', None)
    at = f' (line {where.line + 1}, column {where.column + 1})' if where is not None else ''
    return f'{path} is not valid YAML{at}: {getattr(e, "problem", None) or e}'


def load_yaml_defaults(path: str | Path, known: Optional[Iterable[str]] = None) -> dict:
    """Read a YAML file of options (dashes or underscores): TrainConfig fields, or the names in
    ``known``; a key that is not one of them is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file does not exist: {path}')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a mapping of option: value')
    known = list(config_fields() if known is None else known)
    out = {}
    for k, v in data.items():
        key = str(k).replace('-', '_')
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ''
            raise ConfigError(f'{yaml_place(path, key)}: unknown option {k!r}{hint}')
        if key == 'multilevel' and isinstance(v, dict):   # a YAML block: the flag's key=value string
            v = ','.join(f'{mk}={mv}' for mk, mv in v.items())
        out[key] = v
    return out


def yaml_place(path: str | Path, key: str) -> str:
    """``FILE, line N`` of a top-level key of a YAML file (dashes or underscores), for messages;
    ``FILE`` alone when the key is not found."""
    try:
        node = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        node = None
    for k, _ in getattr(node, 'value', None) or []:
        if isinstance(k.value, str) and k.value.replace('-', '_') == key:
            return f'{path}, line {k.start_mark.line + 1}'
    return str(path)
