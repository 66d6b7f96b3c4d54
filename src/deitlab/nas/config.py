"""The settings of the ``deitlab nas`` commands: ``SupernetConfig`` (``train-supernet``,
:func:`deitlab.nas.train.train_supernet`), ``SearchConfig`` (``search``,
:func:`deitlab.nas.search.search`) and ``ExportConfig`` (``export``,
:func:`deitlab.nas.export.export_arch`).

Torch-free (the command's ``--help`` imports it): the search spaces come from ``space.py``, the
error for a bad number from ``train/config.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..train.config import ConfigError
from .space import SPACES, SearchSpaceError

__all__ = ['SupernetConfig', 'SearchConfig', 'ExportConfig']


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


def _check(cfg, rules) -> None:
    for name, limit, ok in rules:
        value = getattr(cfg, name)
        if value is not None and not ok(value):
            raise ConfigError(f'{name} must be {limit}, got {value}')


@dataclass
class SearchConfig:
    """Settings of ``search`` (one field per ``deitlab nas search`` flag).

    The fitness of a sub-network is its top-1 on the supernet's held-out training images
    (``holdout.json``). The budget is a MACs window ``macs_window * macs <= MACs <= macs`` and / or
    a predicted latency ``<= latency`` ms from a latency table (``lut``: read when the file
    exists, else timed now and written there; unset: timed into ``OUT/latency_table.json``).
    """
    supernet: str = field(metadata={'group': 'nas', 'help': 'a directory written by deitlab nas train-supernet'})
    out: str = field(metadata={'group': 'run', 'help': 'output directory: search.json, best_arch.json, search.png'})
    macs: Optional[float] = field(default=None, metadata={
        'group': 'nas', 'help': 'MACs budget C per image (e.g. 1.6e7): candidates have macs_window*C <= MACs <= C '
                                '(NSGA-II: MACs <= C)'})
    macs_window: float = field(default=0.975, metadata={
        'group': 'nas', 'help': 'lower end of the MACs window as a fraction of --macs (the paper: 0.975)'})
    latency: Optional[float] = field(default=None, metadata={
        'group': 'nas', 'help': 'latency budget in ms: the predicted latency of a candidate must not exceed it'})
    lut: Optional[str] = field(default=None, metadata={
        'group': 'latency table', 'help': 'latency table JSON of this space on this device: read when it exists, '
                                          'else timed now and written there; unset with --latency: timed into '
                                          'OUT/latency_table.json'})
    lut_rounds: int = field(default=5, metadata={
        'group': 'latency table', 'help': 'timing rounds of every table entry when a table is timed'})
    lut_batch: int = field(default=1, metadata={
        'group': 'latency table', 'help': 'batch size the latency table is timed at when one is timed'})
    nsga2: bool = field(default=False, metadata={
        'group': 'nas', 'help': 'NSGA-II (needs pymoo) on fitness and predicted latency (MACs without a table) '
                                'instead of the evolution; writes the Pareto front'})
    population: int = field(default=16, metadata={'group': 'nas', 'help': 'initial population (NSGA-II: population '
                                                                          'and offspring per generation)'})
    iterations: int = field(default=3, metadata={'group': 'nas', 'help': 'generations after the initial population'})
    parents: int = field(default=4, metadata={'group': 'nas', 'help': 'the fittest networks that breed each '
                                                                      'generation'})
    mutations: int = field(default=4, metadata={'group': 'nas', 'help': 'children by mutation per generation'})
    crossovers: int = field(default=4, metadata={'group': 'nas', 'help': 'children by uniform crossover per '
                                                                         'generation'})
    mutation_prob: float = field(default=0.3, metadata={'group': 'nas', 'help': 'probability that a mutation '
                                                                                'changes each gene'})
    random_baseline: int = field(default=0, metadata={
        'group': 'nas', 'help': 'also evaluate the best of this many random networks within the budget (0: no '
                                'baseline)'})
    max_tries: int = field(default=500, metadata={
        'group': 'nas', 'help': 'draws per candidate before giving up (duplicates and networks outside the budget '
                                'are drawn again)'})
    batch_size: int = field(default=64, metadata={'group': 'data', 'help': 'batch size of the fitness evaluation'})
    max_batches: Optional[int] = field(default=None, metadata={
        'group': 'data', 'help': 'fitness on this many batches of the held-out images (a fixed random subset); '
                                 'unset: all of them'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed of the search'})
    device: Optional[str] = field(default=None, metadata={
        'group': 'run', 'help': 'torch device of the fitness evaluation; unset: CUDA when available, else the CPU'})

    def validate(self) -> 'SearchConfig':
        _check(self, [('macs', '> 0', lambda v: v > 0), ('macs_window', 'in (0, 1]', lambda v: 0 < v <= 1),
                      ('latency', '> 0', lambda v: v > 0), ('lut_rounds', '>= 1', lambda v: v >= 1),
                      ('lut_batch', '>= 1', lambda v: v >= 1), ('population', '>= 1', lambda v: v >= 1),
                      ('iterations', '>= 0', lambda v: v >= 0), ('parents', '>= 1', lambda v: v >= 1),
                      ('mutations', '>= 0', lambda v: v >= 0), ('crossovers', '>= 0', lambda v: v >= 0),
                      ('mutation_prob', 'in [0, 1]', lambda v: 0 <= v <= 1),
                      ('random_baseline', '>= 0', lambda v: v >= 0), ('max_tries', '>= 1', lambda v: v >= 1),
                      ('batch_size', '>= 1', lambda v: v >= 1), ('max_batches', '>= 1', lambda v: v >= 1)])
        if self.macs is None and self.latency is None and not self.nsga2:
            raise ConfigError('give a budget: --macs C (MACs per image) and / or --latency L (ms, predicted)')
        if self.parents > self.population:
            raise ConfigError(f'parents ({self.parents}) must be <= population ({self.population})')
        if self.nsga2 and self.population < 2:
            raise ConfigError(f'NSGA-II needs population >= 2, got {self.population}')
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ExportConfig:
    """Settings of ``export_arch`` (one field per ``deitlab nas export`` flag): an architecture
    (``best_arch.json`` of a search, or a bare architecture dict) as an ordinary ViT-Res run
    directory, freshly initialised or with the supernet's weights."""
    arch: str = field(metadata={'group': 'model', 'help': 'architecture JSON: best_arch.json of deitlab nas search, '
                                                          'or {widths, heads, mlp_hidden, keep}'})
    out: str = field(metadata={'group': 'run', 'help': 'the run directory to write (config.json, model.safetensors)'})
    supernet: Optional[str] = field(default=None, metadata={
        'group': 'model', 'help': "inherit the supernet's weights (sliced) from this train-supernet directory; unset: "
                                  'freshly initialised weights'})
    space: Optional[str] = field(default=None, metadata={
        'group': 'nas', 'help': lambda: f'the search space of the architecture ({", ".join(SPACES)}); unset: the '
                                        f"supernet's, else the one recorded in --arch, else mu"})
    num_classes: Optional[int] = field(default=None, metadata={
        'group': 'model', 'help': "classifier classes; unset: the supernet's or the recorded space's"})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed of the fresh initialisation'})
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace the model in an --out that already holds one'})

    def validate(self) -> 'ExportConfig':
        if self.space is not None and self.space not in SPACES:
            raise SearchSpaceError(f'unknown search space {self.space!r}; known spaces: {", ".join(SPACES)}')
        _check(self, [('num_classes', '>= 1', lambda v: v >= 1)])
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_json_file(path, what: str, error=ValueError):
    """The JSON in the file ``path``, or ``error`` naming ``what`` the file should be (missing file,
    not JSON)."""
    import json
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise error(f'{what} {path} does not exist')
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f'{path} is not a {what} (not JSON: {e})') from None
