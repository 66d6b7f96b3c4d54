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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

MIN_MIXING_STEPS = 1000   # fewer optimizer steps than this with batch mixing on: warn


class ConfigError(ValueError):
    """An invalid training configuration, with the reason."""


def _recipe_help() -> str:
    return ('named defaults, lowest precedence (--config values and explicit flags win): '
            + '; '.join(f'{name}: {text} ({describe_recipe(name)})' for name, text in RECIPE_NOTES.items()))


@dataclass
class TrainConfig:
    recipe: str = field(default='deit', metadata=dict(help=_recipe_help))
    model: str = 'deitlab_deit_nano_patch4_32'
    data: str = 'glyphs'
    out: str = 'runs/train'
    epochs: int = 30
    batch_size: int = 128            # global batch (all processes together)
    lr: Optional[float] = None       # None: base_lr * batch_size / 512
    base_lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    opt: str = 'adamw'
    grad_clip: Optional[float] = None
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: Optional[float] = None   # None: 0.5 (0.8 for transmix, its released config)
    mix: str = field(default='mixup-cutmix', metadata=dict(
        help='none | mixup | cutmix | mixup-cutmix | transmix | maskmix | mixpro (deitlab.train.mixing)'))
    maskmix_prob: float = 0.5         # maskmix/mixpro: MaskMix on this share of batches, else Mixup/CutMix
    maskmix_alpha: float = 1.0        # MaskMix lambda ~ Beta(a, a)
    mask_size: Optional[int] = field(default=None, metadata=dict(
        help='MaskMix cell side in pixels, a multiple of the patch size; None: about a quarter of the image'))
    transmix_area_weight: float = 0.5  # TransMix lambda = w area + (1 - w) attention (released code: 0.5)
    pal_detach_alpha: bool = False    # MixPro: treat PAL's alpha as a constant (the release does not)
    defence: str = field(default='none', metadata=dict(
        help='none | blur[:p=0.3,k=3] | noise[:std=0.25] | adv[:eps=4,steps=3,alpha=...] (deitlab.train.defences)'))
    drop_path: float = 0.1
    drop: float = 0.0
    ema: bool = False
    ema_decay: float = 0.99996
    teacher: Optional[str] = None     # timm name or run directory
    distill: str = 'none'             # none | soft | hard
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    kd_norm: str = 'numel'            # numel (DeiT's code) | batch
    img_size: Optional[int] = None    # None: the model's input size (rule: engine.build_student)
    in_chans: Optional[int] = None    # None: the data's channels
    aug: str = 'light'                # none | light | deit
    hflip: Optional[float] = None
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    model_kwargs: dict = field(default_factory=dict)
    workers: int = 0
    seed: int = 0
    device: Optional[str] = None
    amp: bool = True                  # bf16 autocast on CUDA; ignored on CPU
    resume: bool = False
    eval_every: int = 1
    eval_batch_size: Optional[int] = None
    tensorboard: bool = True
    progress: Optional[bool] = None   # None: progress bars when attached to a terminal
    max_steps_per_epoch: Optional[int] = None   # cap steps (quick runs, tests)
    token_fusion: str = 'none'        # none | tome | mctf | mctf-fast: train the model token-reduced
    r: Optional[str] = None           # tokens per block (int, fraction or comma list); None: method default
    r_teacher_max: float = 8          # MCTF consistency pass at r' in [0, r_teacher_max); 0: off
    consistency_weight: float = 3.0   # lambda of the class-token MSE
    consistency_gate: float = 0.4     # only samples whose true-class probability exceeds this

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
        if self.token_fusion not in ('none', 'tome', 'mctf', 'mctf-fast'):
            raise ConfigError(f"token_fusion must be one of none, tome, mctf, mctf-fast; got {self.token_fusion!r}")
        if self.r is not None and self.token_fusion == 'none':
            raise ConfigError('--r needs --token-fusion tome|mctf|mctf-fast')
        if self.r_teacher_max < 0 or self.consistency_weight < 0:
            raise ConfigError('r_teacher_max and consistency_weight must be >= 0')
        from .mixing import ATTENTION_MODES, MIX_MODES
        if self.mix not in MIX_MODES:
            raise ConfigError(f"mix must be one of {', '.join(MIX_MODES)}; got {self.mix!r}")
        if self.mix in ATTENTION_MODES and self.token_fusion != 'none':
            raise ConfigError(f'--mix {self.mix} labels from the last block\'s attention over all patch tokens; it '
                              f'does not compose with --token-fusion {self.token_fusion}, which merges tokens '
                              f'before that block (use --mix maskmix or mixup-cutmix)')
        from .defences import parse_defence
        try:
            parse_defence(self.defence)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.mask_size is not None and self.mask_size < 1:
            raise ConfigError(f'mask_size must be >= 1, got {self.mask_size}')
        if self.warmup_epochs < 0:
            raise ConfigError(f'warmup_epochs must be >= 0, got {self.warmup_epochs}')
        if self.warmup_epochs >= self.epochs:
            # A short run with the recipe's 5 warm-up epochs: warm up for a tenth of it instead.
            self.warmup_epochs = self.epochs * 0.1
        return self

    @property
    def mixing_active(self) -> bool:
        """Whether batches are mixed (they then need an even size per process)."""
        if self.mix == 'none':
            return False
        return self.mix in ('maskmix', 'mixpro') or (self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0))

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 512

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def load_yaml_defaults(path: str | Path) -> dict:
    """Read a YAML file of TrainConfig fields (dashes or underscores); unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file does not exist: {path}')
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a mapping of option: value')
    known = config_fields()
    out = {}
    for k, v in data.items():
        key = str(k).replace('-', '_')
        if key not in known:
            raise ConfigError(f'{path}: unknown option {k!r}')
        out[key] = v
    return out
