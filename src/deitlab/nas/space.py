"""The ViT-ResNAS search space: per-stage widths, per-block heads and MLP widths, skippable blocks.

ViT-ResNAS (Liao, Karaman, Sze, "Searching for Efficient Multi-Stage Vision Transformers", arXiv
2109.00642) searches ViT-Res networks (``deitlab.models.vitres``) inside one weight-sharing
supernet. A :class:`SearchSpace` lists the genes:

* per stage, the residual-stream width ``C_s`` (sorted choices; a sub-network uses the first
  ``C_s`` channels of the supernet's stage);
* per block, the number of heads (all of width ``head_dim``; the first ``h`` heads) and the MLP
  hidden width (the first ``m`` units); ``heads * head_dim`` need not equal the stage width;
* per block, whether it is kept; only the blocks in ``skippable`` may be skipped (never the first
  block of a stage, so every stage keeps at least one block).

The patch stem (``stem``: 'linear' or the release's 'conv', ``deitlab.models.vitres_stems``) is
one for the whole space and not searched: only its output channels follow the stage-1 width gene
(sliced and masked like every other width); the conv stem's hidden layers have their default width
in every network of the space.

An :class:`Arch` is one choice of every gene (hashable, JSON via ``to_dict`` / ``from_dict``). The
genes of a skipped block are carried but do not change the network; :meth:`Arch.canonical` sets
them to the block's smallest choices, so two archs name the same network iff their canonical forms
are equal. This module imports no torch (only :meth:`SearchSpace.macs` does, when it runs).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..registry import VITRES_STEMS

__all__ = ['Arch', 'SearchSpace', 'SearchSpaceError', 'SPACES']


class SearchSpaceError(ValueError):
    """An invalid search space or an architecture that is not in its search space, with the reason."""


def _ints(values, name: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise SearchSpaceError(f'{name} must be a list of integers, got {values!r}') from None


@dataclass(frozen=True)
class Arch:
    """One sub-network: ``widths`` per stage, ``heads`` / ``mlp_hidden`` / ``keep`` per block
    (all blocks of all stages in order, skipped ones included)."""

    widths: Tuple[int, ...]
    heads: Tuple[int, ...]
    mlp_hidden: Tuple[int, ...]
    keep: Tuple[bool, ...]

    def __post_init__(self):
        for name in ('widths', 'heads', 'mlp_hidden'):
            object.__setattr__(self, name, _ints(getattr(self, name), name))
        keep = getattr(self, 'keep')
        if not all(isinstance(k, bool) or k in (0, 1) for k in keep):
            raise SearchSpaceError(f'keep must be a list of booleans, got {list(keep)!r}')
        object.__setattr__(self, 'keep', tuple(bool(k) for k in keep))

    def to_dict(self) -> dict:
        return dict(widths=list(self.widths), heads=list(self.heads), mlp_hidden=list(self.mlp_hidden),
                    keep=list(self.keep))

    @classmethod
    def from_dict(cls, d: dict) -> 'Arch':
        missing = {'widths', 'heads', 'mlp_hidden', 'keep'} - set(d)
        if missing:
            raise SearchSpaceError(f'an architecture needs widths, heads, mlp_hidden and keep; missing '
                                   f'{", ".join(sorted(missing))}')
        return cls(d['widths'], d['heads'], d['mlp_hidden'], d['keep'])


def _choice_list(values, name: str) -> List[int]:
    out = sorted(set(_ints(values, name)))
    if not out or out[0] < 1:
        raise SearchSpaceError(f'{name} must be a non-empty list of positive integers, got {list(values)!r}')
    return out


@dataclass
class SearchSpace:
    """A ViT-Res search space (see the module docstring).

    ``heads`` and ``mlp_hidden`` hold one list of choices per block (``sum(depths)`` lists) or one
    per stage (``len(depths)`` lists, expanded to its blocks). ``skippable`` holds global block
    indices (all stages in order). ``model_name``, if set, is the timm name sub-networks and the
    supernet are built through (so that they carry a ``pretrained_cfg`` and can be saved as run
    directories); its distilled form must match ``distilled``. ``stem`` is the patch stem of every
    network of the space (not a gene).
    """

    widths: List[List[int]]
    depths: List[int]
    heads: List[List[int]]
    mlp_hidden: List[List[int]]
    skippable: List[int] = field(default_factory=list)
    head_dim: int = 32
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    distilled: bool = False
    model_name: Optional[str] = None
    stem: str = 'linear'
    _macs: Dict[Arch, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        S = len(self.widths)
        if S < 1 or len(self.depths) != S:
            raise SearchSpaceError(f'widths ({S} stages) and depths {list(self.depths)} must have one entry per '
                                   f'stage (at least one)')
        self.widths = [_choice_list(w, f'stage {s} widths') for s, w in enumerate(self.widths)]
        self.depths = list(_ints(self.depths, 'depths'))
        if min(self.depths) < 1:
            raise SearchSpaceError(f'every stage needs at least one block, got depths {self.depths}')
        for s in range(1, S):
            if self.widths[s][0] < self.widths[s - 1][-1]:
                raise SearchSpaceError(
                    f'stage {s} width choices {self.widths[s]} overlap stage {s - 1}\'s {self.widths[s - 1]}: a '
                    f'residual spatial reduction cannot narrow the tokens, so every width of a stage must be >= '
                    f'every width of the stage before')
        n = self.num_blocks
        self.heads = self._per_block('heads', self.heads)
        self.mlp_hidden = self._per_block('mlp_hidden', self.mlp_hidden)
        self.skippable = sorted(set(_ints(self.skippable, 'skippable')))
        starts = self.stage_starts
        for i in self.skippable:
            if not 0 <= i < n:
                raise SearchSpaceError(f'skippable block {i} is out of range: the space has {n} blocks (0..{n - 1})')
            if i in starts:
                raise SearchSpaceError(f'block {i} is the first block of stage {starts.index(i)} and cannot be '
                                       f'skippable (every stage keeps its first block)')
        self.head_dim = int(self.head_dim)
        if self.head_dim < 1:
            raise SearchSpaceError(f'head_dim must be positive, got {self.head_dim}')
        grid, factor = self.img_size // self.patch_size, 2 ** (S - 1)
        if grid < 1 or grid % factor:
            raise SearchSpaceError(f'img_size {self.img_size} with patch_size {self.patch_size} gives a {grid}x{grid} '
                                   f'grid, which must halve exactly at each of the {S - 1} reductions')
        VITRES_STEMS.check(self.stem, SearchSpaceError, 'stem')
        if VITRES_STEMS[self.stem]['even_patch'] and (self.patch_size % 2 or self.img_size % self.patch_size):
            raise SearchSpaceError(f'the {self.stem} stem needs an even patch size dividing img_size, got patch_size '
                                   f'{self.patch_size} and img_size {self.img_size}')
        if self.model_name is not None and ('_distilled' in self.model_name) != bool(self.distilled):
            raise SearchSpaceError(f'model_name {self.model_name!r} does not match distilled={self.distilled}')

    def _per_block(self, name: str, values) -> List[List[int]]:
        values = list(values)
        if len(values) == len(self.depths):
            return [_choice_list(values[s], f'{name} of stage {s}') for s in self.stage_of]
        if len(values) == self.num_blocks:
            return [_choice_list(v, f'{name} of block {i}') for i, v in enumerate(values)]
        raise SearchSpaceError(f'{name} has {len(values)} lists of choices; give one per stage ({len(self.depths)}) '
                               f'or one per block ({self.num_blocks})')

    # ------------------------------------------------------------------ definition

    _FIELDS = ('widths', 'depths', 'heads', 'mlp_hidden', 'skippable', 'head_dim', 'img_size', 'patch_size',
               'in_chans', 'num_classes', 'distilled', 'model_name', 'stem')

    def to_dict(self) -> dict:
        """The definition as plain JSON values (per-block ``heads`` / ``mlp_hidden``); equal
        definitions give equal dicts, and ``SearchSpace.from_dict(d)`` rebuilds the space."""
        out = {k: getattr(self, k) for k in self._FIELDS}
        for k in ('widths', 'heads', 'mlp_hidden'):
            out[k] = [list(v) for v in out[k]]
        out.update(depths=list(self.depths), skippable=list(self.skippable), distilled=bool(self.distilled))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> 'SearchSpace':
        unknown = set(d) - set(cls._FIELDS)
        if unknown:
            raise SearchSpaceError(f'unknown search space keys {", ".join(sorted(unknown))}; a space has '
                                   f'{", ".join(cls._FIELDS)}')
        return cls(**d)

    # ------------------------------------------------------------------ structure

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    @property
    def stage_of(self) -> List[int]:
        """The stage of every block."""
        return [s for s, d in enumerate(self.depths) for _ in range(d)]

    @property
    def stage_starts(self) -> List[int]:
        """The global index of the first block of every stage."""
        return [sum(self.depths[:s]) for s in range(len(self.depths))]

    def _where(self, i: int) -> str:
        s = self.stage_of[i]
        return f'block {i} (stage {s}, block {i - self.stage_starts[s]})'

    def num_archs(self) -> int:
        """The number of distinct sub-networks (a skipped block counts once, whatever its genes)."""
        n = 1
        for w in self.widths:
            n *= len(w)
        for i in range(self.num_blocks):
            n *= len(self.heads[i]) * len(self.mlp_hidden[i]) + (i in self.skippable)
        return n

    # ------------------------------------------------------------------ architectures

    def largest(self) -> Arch:
        n = self.num_blocks
        return Arch([w[-1] for w in self.widths], [h[-1] for h in self.heads], [m[-1] for m in self.mlp_hidden],
                    [True] * n)

    def smallest(self) -> Arch:
        n = self.num_blocks
        return Arch([w[0] for w in self.widths], [h[0] for h in self.heads], [m[0] for m in self.mlp_hidden],
                    [i not in self.skippable for i in range(n)])

    def sample(self, rng: random.Random) -> Arch:
        """An architecture with every gene drawn uniformly (keep: True or False for skippable blocks)."""
        n = self.num_blocks
        return Arch([rng.choice(w) for w in self.widths], [rng.choice(h) for h in self.heads],
                    [rng.choice(m) for m in self.mlp_hidden],
                    [rng.random() < 0.5 if i in self.skippable else True for i in range(n)])

    def sample_distinct(self, n: int, rng: random.Random, max_tries: int = 100) -> List[Arch]:
        """``n`` architectures drawn with :meth:`sample`, distinct networks while the space has enough
        (a draw that repeats one already taken is redrawn, up to ``max_tries`` times per slot)."""
        if n < 1:
            raise SearchSpaceError(f'sample at least one architecture, got n={n}')
        out, seen = [], set()
        room = self.num_archs()
        for _ in range(n):
            arch = self.sample(rng)
            for _ in range(max_tries if len(seen) < room else 0):
                if self.canonical(arch) not in seen:
                    break
                arch = self.sample(rng)
            seen.add(self.canonical(arch))
            out.append(arch)
        return out

    def canonical(self, arch: Arch) -> Arch:
        """``arch`` with the genes of its skipped blocks set to their smallest choices."""
        return Arch(arch.widths, [h if k else self.heads[i][0] for i, (h, k) in enumerate(zip(arch.heads, arch.keep))],
                    [m if k else self.mlp_hidden[i][0] for i, (m, k) in enumerate(zip(arch.mlp_hidden, arch.keep))],
                    arch.keep)

    def validate(self, arch: Arch) -> Arch:
        """``arch`` if it is in this space, else :class:`SearchSpaceError` saying what is wrong."""
        if not isinstance(arch, Arch):
            raise SearchSpaceError(f'expected an Arch, got {type(arch).__name__}')
        S, n = len(self.depths), self.num_blocks
        if len(arch.widths) != S:
            raise SearchSpaceError(f'the architecture has {len(arch.widths)} stage widths but the space has {S} '
                                   f'stages')
        for name in ('heads', 'mlp_hidden', 'keep'):
            got = len(getattr(arch, name))
            if got != n:
                raise SearchSpaceError(f'the architecture has {got} {name} entries but the space has {n} blocks '
                                       f'(depths {self.depths}); give one per block, skipped ones included')
        for s, (w, choices) in enumerate(zip(arch.widths, self.widths)):
            if w not in choices:
                raise SearchSpaceError(f'stage {s} width {w} is not in the search space; choices: {choices}')
        for i in range(n):
            if arch.heads[i] not in self.heads[i]:
                raise SearchSpaceError(f'{self._where(i)} has {arch.heads[i]} heads, not in the search space; '
                                       f'choices: {self.heads[i]}')
            if arch.mlp_hidden[i] not in self.mlp_hidden[i]:
                raise SearchSpaceError(f'{self._where(i)} has MLP hidden width {arch.mlp_hidden[i]}, not in the '
                                       f'search space; choices: {self.mlp_hidden[i]}')
            if not arch.keep[i] and i not in self.skippable:
                raise SearchSpaceError(f'{self._where(i)} is skipped but is not skippable; skippable blocks: '
                                       f'{self.skippable}')
        return arch

    # ------------------------------------------------------------------ ViT-Res constructor arguments

    def _common_args(self) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    num_classes=self.num_classes, distilled=bool(self.distilled), head_dim=self.head_dim,
                    stem=self.stem)

    def supernet_args(self) -> dict:
        """ViTRes constructor arguments of the largest network (the supernet's shape)."""
        a = self.largest()
        return dict(self._common_args(), widths=list(a.widths), depths=list(self.depths), num_heads=list(a.heads),
                    mlp_hidden=list(a.mlp_hidden))

    def model_args(self, arch: Arch) -> dict:
        """ViTRes constructor arguments of the sub-network ``arch``: skipped blocks removed, so
        ``depths`` count the kept blocks of each stage (``num_classes`` included)."""
        self.validate(arch)
        kept = [i for i in range(self.num_blocks) if arch.keep[i]]
        depths = [sum(1 for i in kept if self.stage_of[i] == s) for s in range(len(self.depths))]
        return dict(self._common_args(), widths=list(arch.widths), depths=depths,
                    num_heads=[arch.heads[i] for i in kept], mlp_hidden=[arch.mlp_hidden[i] for i in kept])

    def macs(self, arch: Arch) -> int:
        """Multiply-accumulates per image of the sub-network ``arch`` (``vitres_macs``'s total, the
        unit of ``count_gmacs * 1e9``), built on the meta device; cached per network."""
        key = self.canonical(self.validate(arch))
        if key not in self._macs:
            import torch
            from ..models.vitres import ViTRes, vitres_macs
            with torch.device('meta'):
                model = ViTRes(**self.model_args(key))
            self._macs[key] = int(vitres_macs(model)['total'])
        return self._macs[key]


def _mu(distilled: bool, stem: str = 'linear') -> SearchSpace:
    """ViT-ResNAS's ``sr_tiny_mh`` shape in miniature for 32 px inputs: patch 4 (grids 8x8, 4x4,
    2x2), three stages of three blocks (the 2nd and 3rd of each skippable), heads of width 32, MLP
    hidden 2x / 3x / 4x the stage's largest width; ``stem`` the patch stem of all its networks."""
    widths = [[48, 56, 64], [96, 112, 128], [192, 224, 256]]
    return SearchSpace(
        widths=widths, depths=[3, 3, 3], heads=[[1, 2], [2, 3, 4], [4, 6, 8]],
        mlp_hidden=[[r * w[-1] for r in (2, 3, 4)] for w in widths], skippable=[1, 2, 4, 5, 7, 8], head_dim=32,
        img_size=32, patch_size=4, in_chans=3, num_classes=10, distilled=distilled,
        model_name=f'deitlab_vitres_mu{"_distilled" if distilled else ""}_patch4_32', stem=stem)


def _nano(distilled: bool) -> SearchSpace:
    """The ``mu`` layout with DeiT-nano's cost inside it (32 px: DeiT-nano is 48.3M MACs; this
    space spans 9.9M to 79.2M): widths up to ViT-Res-nano's 96 / 192 / 384, heads of width 32
    up to 3 / 6 / 12, MLP hidden 2x / 3x / 4x the stage's largest width."""
    widths = [[64, 80, 96], [128, 160, 192], [256, 320, 384]]
    return SearchSpace(
        widths=widths, depths=[3, 3, 3], heads=[[1, 2, 3], [2, 4, 6], [4, 8, 12]],
        mlp_hidden=[[r * w[-1] for r in (2, 3, 4)] for w in widths], skippable=[1, 2, 4, 5, 7, 8], head_dim=32,
        img_size=32, patch_size=4, in_chans=3, num_classes=10, distilled=distilled,
        model_name=f'deitlab_vitres_nano{"_distilled" if distilled else ""}_patch4_32')


# name -> space (the MACs cache a space keeps is a pure function of the architecture, so sharing it is safe);
# mu_conv: the mu space with the release's conv stem
SPACES: Dict[str, SearchSpace] = {'mu': _mu(False), 'mu_distilled': _mu(True), 'nano': _nano(False),
                                  'nano_distilled': _nano(True), 'mu_conv': _mu(False, stem='conv')}
