"""The settings of the refinement commands, without torch (their ``--help`` reads them).

Turnbull & Mannix (IJDAR 2024) re-classify every fused box with two crop classifiers, a supervised
DeiT and a ResNet-50 pretrained with SimCLR on unlabelled papyrus images, and let the detector and
the two classifiers vote. ``CropsConfig`` is ``deitlab papyri crops``
(:func:`deitlab.papyri.crops.write_crops`: the letters of annotated pages cut out as an image-folder
dataset that ``deitlab train`` trains any model on); ``SimCLRConfig`` is ``deitlab papyri
pretrain-simclr`` (:func:`deitlab.papyri.simclr.pretrain_simclr`: contrastive pretraining of a timm
ResNet on random windows of unlabelled pages). The vote's settings are fields of
:class:`~deitlab.papyri.config.PredictConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .config import (PapyriError, amp_field, annotation_file, device_field, progress_field, resume_field,
                     workers_field)

__all__ = ['CropsConfig', 'SimCLRConfig', 'parse_pair', 'BACKENDS']

BASE_TYPES = ('bt1', 'bt2', 'bt3')
#: Where NT-Xent and the views come from: ``lightly`` (the optional ``simclr`` extra), ``native``
#: (this package's), ``auto`` (lightly when it is installed).
BACKENDS = ('auto', 'native', 'lightly')


def _check(cfg, rules) -> None:
    for name, limit, ok in rules:
        if not ok(getattr(cfg, name)):
            raise PapyriError(f'{name} must be {limit}, got {getattr(cfg, name)}')


def parse_pair(text, what: str, kind=float) -> Tuple:
    """``'A,B'`` (or a 2-tuple) as two numbers ``A <= B``; :class:`PapyriError` naming ``what``."""
    parts = text.split(',') if isinstance(text, str) else list(text)
    try:
        a, b = (kind(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        raise PapyriError(f'{what} must be two numbers LOW,HIGH; got {text!r}') from None
    if a > b:
        raise PapyriError(f'{what}: LOW must not exceed HIGH; got {text!r}')
    return a, b


@dataclass
class CropsConfig:
    """Settings of :func:`deitlab.papyri.crops.write_crops` (one field per ``deitlab papyri crops`` flag)."""
    data: str = field(metadata={'group': 'data', 'help': 'annotated pages: a directory written by deitlab papyri '
                                                         'synth, or any with annotations.json (the competition\'s '
                                                         'COCO schema) and its images'})
    out: str = field(metadata={'group': 'run', 'help': 'output directory: train/<NN-letter>/*.png, val/<NN-letter>/'
                                                       '*.png, manifest.json; train on it with deitlab train --data '
                                                       'folder:OUT'})
    val: Optional[str] = field(default=None, metadata={
        'group': 'data', 'help': 'annotated pages whose letters make the val split; unset: --val-fraction of the '
                                 'letters of --data, drawn at random'})
    val_fraction: float = field(default=0.1, metadata={
        'group': 'data', 'help': 'without --val: the share of the letters held out as the val split'})
    margin: float = field(default=0.15, metadata={
        'group': 'data', 'help': 'context around each box, per side, as a share of its longer side; the window is '
                                 'then made square around the box\'s centre'})
    size: int = field(default=64, metadata={'group': 'data', 'help': 'side of the crops in pixels'})
    base_types: tuple = field(default=('bt1', 'bt2'), metadata={
        'group': 'data', 'help': 'the BaseTypes (preservation) of the letters cut out; bt3, the most damaged, is '
                                 'left out by default, as the organisers leave it out of the score'})
    label_fraction: float = field(default=1.0, metadata={
        'group': 'data', 'help': 'keep this share of the training crops of each letter (at least one of each '
                                 'letter present), drawn with --seed: training with few labels'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed (val letters, label fraction)'})
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace crops this command wrote in --out (a directory holding anything else is '
                                'always refused)'})
    progress: Optional[bool] = progress_field()

    def validate(self) -> 'CropsConfig':
        _check(self, [('val_fraction', 'in (0, 1)', lambda v: 0 < v < 1), ('margin', 'in [0, 2]', lambda v: 0 <= v <= 2),
                      ('size', 'in [8, 1024]', lambda v: 8 <= v <= 1024),
                      ('label_fraction', 'in (0, 1]', lambda v: 0 < v <= 1)])
        self.base_types = tuple(str(b).strip() for b in self.base_types if str(b).strip())
        bad = [b for b in self.base_types if b not in BASE_TYPES]
        if bad or not self.base_types:
            raise PapyriError(f'base_types must be among {", ".join(BASE_TYPES)}, got {",".join(self.base_types)}')
        if not str(self.out).strip():
            raise PapyriError('out is empty: give an output directory')
        annotation_file(self.data, 'data')
        if self.val is not None:
            annotation_file(self.val, 'val')
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SimCLRConfig:
    """Settings of :func:`deitlab.papyri.simclr.pretrain_simclr` (one field per ``deitlab papyri
    pretrain-simclr`` flag). The defaults follow Mannix's SimCLR settings where they carry over
    (temperature 0.2, a two-layer projection head to 128 dimensions, warm-up then cosine) and make
    the views glyph-safe (:mod:`deitlab.papyri.simclr` says which augmentations and why)."""
    images: tuple = field(metadata={
        'group': 'data', 'help': 'unlabelled page images, or directories of them; no annotation is read'})
    out: str = field(metadata={'group': 'run', 'help': 'the run directory: config.json + model.safetensors (the '
                                                       'backbone, projection head dropped: fine-tune it with deitlab '
                                                       'train --model OUT), metrics.jsonl, summary.json, checkpoint.pt'})
    model: str = field(default='resnet50', metadata={
        'group': 'model', 'help': "the backbone, a timm ResNet (resnet18, resnet50, ...) built from scratch; "
                                  "Turnbull & Mannix's is resnet50"})
    model_kwargs: dict = field(default_factory=dict, metadata={
        'group': 'model', 'help': "the backbone's constructor arguments (e.g. channels=[32,64,128,256])"})
    img_size: int = field(default=64, metadata={
        'group': 'model', 'help': 'side of the views in pixels, and the input size the backbone is saved with'})
    proj_dim: int = field(default=128, metadata={'group': 'model', 'help': 'output width of the projection head'})
    window: str = field(default='16,48', metadata={
        'group': 'data', 'help': 'LOW,HIGH: the side in pixels of the random square windows cut from the pages (about '
                                 'one to two letters: pick it from the letter height of your pages)'})
    min_scale: float = field(default=0.5, metadata={
        'group': 'augmentation', 'help': 'each view keeps between this share and all of a window\'s area (random '
                                         'resized crop); mild, since a small part of a letter may look like another'})
    rotation: float = field(default=5.0, metadata={
        'group': 'augmentation', 'help': 'views turned by up to this many degrees either way'})
    jitter: float = field(default=0.4, metadata={
        'group': 'augmentation', 'help': 'colour jitter of brightness, contrast and saturation (no hue), applied '
                                         'with probability 0.8'})
    grayscale: float = field(default=0.2, metadata={'group': 'augmentation', 'help': 'probability of a grey view'})
    blur: float = field(default=0.5, metadata={
        'group': 'augmentation', 'help': 'probability of a Gaussian blur (sigma 0.1 to 1 px of a 32 px view, scaled '
                                         'with --img-size)'})
    temperature: float = field(default=0.2, metadata={'group': 'model', 'help': 'NT-Xent temperature tau'})
    backend: str = field(default='auto', metadata={
        'group': 'model', 'help': "NT-Xent loss and views: lightly's (pip install 'deitlab[simclr]'), native, or "
                                  "auto (lightly when installed); both compute the same loss"})
    epochs: int = field(default=20, metadata={'group': 'schedule', 'help': 'training epochs'})
    steps: int = field(default=50, metadata={'group': 'schedule', 'help': 'updates per epoch'})
    warmup: float = field(default=0.1, metadata={
        'group': 'schedule', 'help': 'share of the updates with a linear warm-up, then a cosine to 1% of the rate'})
    batch_size: int = field(default=128, metadata={
        'group': 'optimiser', 'help': 'windows per update (each gives two views: 2B images, 2B - 2 negatives each)'})
    lr: float = field(default=1e-3, metadata={'group': 'optimiser', 'help': 'peak learning rate'})
    opt: str = field(default='adamw', metadata={'group': 'optimiser', 'help': 'optimizer (a timm optimizer name)'})
    weight_decay: float = field(default=1e-4, metadata={'group': 'optimiser', 'help': 'decoupled weight decay'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed (weights, windows, views)'})
    device: Optional[str] = device_field()
    amp: bool = amp_field()
    workers: int = workers_field()
    resume: bool = resume_field()
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace what --out holds instead of refusing'})
    progress: Optional[bool] = progress_field()

    def validate(self) -> 'SimCLRConfig':
        self.images = tuple(str(p) for p in self.images if str(p).strip())
        if not self.images:
            raise PapyriError('no images given: name unlabelled page images or directories of them')
        if not str(self.out).strip():
            raise PapyriError('out is empty: give the run directory to write')
        if not str(self.model).startswith('resnet'):
            raise PapyriError(f"model must be a timm ResNet (resnet18, resnet50, ...), got {self.model!r}")
        if self.backend not in BACKENDS:
            raise PapyriError(f'backend must be one of {", ".join(BACKENDS)}, got {self.backend!r}')
        _check(self, [('img_size', '>= 16', lambda v: v >= 16), ('proj_dim', '>= 1', lambda v: v >= 1),
                      ('temperature', '> 0', lambda v: v > 0), ('epochs', '>= 1', lambda v: v >= 1),
                      ('steps', '>= 1', lambda v: v >= 1), ('warmup', 'in [0, 1)', lambda v: 0 <= v < 1),
                      ('batch_size', '>= 2', lambda v: v >= 2), ('lr', '> 0', lambda v: v > 0),
                      ('weight_decay', '>= 0', lambda v: v >= 0), ('rotation', 'in [0, 180]', lambda v: 0 <= v <= 180),
                      ('jitter', 'in [0, 1)', lambda v: 0 <= v < 1), ('grayscale', 'in [0, 1]', lambda v: 0 <= v <= 1),
                      ('blur', 'in [0, 1]', lambda v: 0 <= v <= 1), ('workers', '>= 0', lambda v: v >= 0)])
        low, _ = self.window_px
        if low < 4:
            raise PapyriError(f'window: the smallest window must be at least 4 px, got {self.window}')
        if not 0 < self.min_scale <= 1:
            raise PapyriError(f'min_scale must be in (0, 1], got {self.min_scale}')
        return self

    @property
    def window_px(self) -> Tuple[int, int]:
        return parse_pair(self.window, 'window', int)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
