"""``SupernetConfig``: the settings of ``deitlab nas train-supernet`` (:func:`deitlab.nas.train.train_supernet`).

Torch-free (the command's ``--help`` imports it): the search spaces come from ``space.py``, the
error for a bad number from ``train/config.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..train.config import ConfigError
from .space import SPACES, SearchSpaceError

__all__ = ['SupernetConfig']


def _space_help() -> str:
    return f'the search space: {", ".join(SPACES)} (deitlab/nas/space.py)'


@dataclass
class SupernetConfig:
    """Settings of ``train_supernet`` (one field per ``deitlab nas train-supernet`` flag).

    Every step splits the batch into ``batch_size / ex_per_arch`` sub-batches, each trained as its
    own sub-network (drawn without repeats within the step). Over the first
    ``width_warmup_epochs`` (unset: a quarter of the run) the choices a gene may take grow from
    its largest one to all of them; after each of those epochs the heads and MLP units of every
    block are rewired (sorted by the L1 norm of their weights), so that small sub-networks keep
    the important ones. ``holdout`` images of every class are kept out of the training split for
    the search's fitness.
    """
    data: str = field(metadata={'group': 'data', 'help': 'dataset spec: glyphs[:k=v,...] | fashion-mnist[:PATH] | '
                                                         'folder:PATH'})
    out: str = field(metadata={'group': 'run', 'help': 'output directory: supernet weights, checkpoint, space, '
                                                       'held-out indices, metrics'})
    space: str = field(default='mu', metadata={'group': 'nas', 'help': _space_help})
    epochs: int = field(default=10, metadata={'group': 'schedule', 'help': 'training epochs'})
    batch_size: int = field(default=64, metadata={'group': 'optimiser', 'help': 'batch size (all sub-batches)'})
    ex_per_arch: int = field(default=16, metadata={
        'group': 'nas', 'help': 'examples per sub-network: a step trains batch_size / ex_per_arch sub-networks, '
                                'which must divide the batch'})
    lr: float = field(default=1e-3, metadata={'group': 'optimiser', 'help': 'peak AdamW learning rate'})
    weight_decay: float = field(default=0.05, metadata={'group': 'optimiser', 'help': 'decoupled weight decay'})
    warmup_epochs: float = field(default=0.5, metadata={
        'group': 'schedule', 'help': 'linear learning-rate warm-up, in epochs (then a per-step cosine)'})
    width_warmup_epochs: Optional[float] = field(default=None, metadata={
        'group': 'nas', 'help': 'supernet warm-up, in epochs: the allowed choices grow from the largest only to all, '
                                'and heads and MLP units are rewired by L1 norm after each of its epochs; unset: a '
                                'quarter of --epochs'})
    drop_path: float = field(default=0.1, metadata={'group': 'model', 'help': 'stochastic depth rate'})
    smoothing: float = field(default=0.1, metadata={'group': 'augmentation', 'help': 'label smoothing'})
    aug: str = field(default='none', metadata={'group': 'augmentation', 'help': 'none | light | deit'})
    holdout: int = field(default=50, metadata={
        'group': 'data', 'help': 'images per class held out of the training split for the search (their indices go '
                                 'to holdout.json)'})
    max_steps_per_epoch: Optional[int] = field(default=None, metadata={
        'group': 'schedule', 'help': 'cap on the steps of an epoch (quick runs)'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed'})
    device: Optional[str] = field(default=None, metadata={
        'group': 'run', 'help': 'torch device; unset: CUDA when available, else the CPU'})
    progress: Optional[bool] = field(default=None, metadata={
        'group': 'run', 'help': 'progress bars; unset: when attached to a terminal'})
    resume: bool = field(default=False, metadata={
        'group': 'run', 'help': "continue from --out's supernet_checkpoint.pt (same settings)"})

    def validate(self) -> 'SupernetConfig':
        if self.space not in SPACES:
            raise SearchSpaceError(f'unknown search space {self.space!r}; known spaces: {", ".join(SPACES)}')
        rules = [('epochs', '>= 1', lambda v: v >= 1), ('batch_size', '>= 1', lambda v: v >= 1),
                 ('ex_per_arch', '>= 1', lambda v: v >= 1), ('lr', '> 0', lambda v: v > 0),
                 ('weight_decay', '>= 0', lambda v: v >= 0), ('warmup_epochs', '>= 0', lambda v: v >= 0),
                 ('width_warmup_epochs', '>= 0', lambda v: v >= 0), ('drop_path', 'in [0, 1)', lambda v: 0 <= v < 1),
                 ('smoothing', 'in [0, 1)', lambda v: 0 <= v < 1), ('holdout', '>= 0', lambda v: v >= 0),
                 ('max_steps_per_epoch', '>= 1', lambda v: v >= 1)]
        for name, limit, ok in rules:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ConfigError(f'{name} must be {limit}, got {value}')
        if self.batch_size % self.ex_per_arch:
            raise ConfigError(f'batch_size {self.batch_size} is not divisible by ex_per_arch {self.ex_per_arch}: '
                              f'every step splits the batch into sub-batches of ex_per_arch examples, one '
                              f'sub-network each; make --batch-size a multiple of --ex-per-arch')
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f'warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs}')
        if self.width_warmup_epochs is not None and self.width_warmup_epochs > self.epochs:
            raise ConfigError(f'width_warmup_epochs must be <= epochs ({self.epochs}), got {self.width_warmup_epochs}')
        if self.aug not in ('none', 'light', 'deit'):
            raise ConfigError(f"aug must be none, light or deit, got {self.aug!r}")
        return self

    @property
    def archs_per_step(self) -> int:
        return self.batch_size // self.ex_per_arch

    @property
    def width_warmup(self) -> float:
        """The supernet warm-up in epochs (a quarter of the run when unset)."""
        return self.epochs / 4 if self.width_warmup_epochs is None else float(self.width_warmup_epochs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
