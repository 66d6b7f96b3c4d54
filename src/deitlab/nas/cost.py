"""Closed-form MACs of a sub-network straight from its genes (no model built).

``SearchSpace.macs`` builds the sub-network on the meta device and counts it with
``vitres_macs``, which takes tens of milliseconds; the search draws thousands of candidates
against a budget, so it counts here with the same formula (``vitres_macs``'s docstring), part by
part. ``tests/test_nas_search.py`` checks that both agree.
"""
from __future__ import annotations

from typing import Dict, List

from ..layers.block import block_macs
from ..models.vitres_stems import stem_macs
from .space import Arch, SearchSpace

__all__ = ['arch_macs', 'macs_parts', 'stage_grids', 'stage_tokens']


def stage_grids(space: SearchSpace) -> List[int]:
    """The side of every stage's patch grid (halved at each reduction)."""
    g = space.img_size // space.patch_size
    return [g // 2 ** s for s in range(len(space.depths))]


def stage_tokens(space: SearchSpace) -> List[int]:
    """Tokens per stage: the patch grid plus the class (and distillation) token."""
    prefix = 2 if space.distilled else 1
    return [g * g + prefix for g in stage_grids(space)]


def macs_parts(space: SearchSpace, arch: Arch) -> Dict[str, int]:
    """MACs per image of ``arch`` (validated) by part: ``stem`` (the space's patch stem), ``blocks``
    (the kept blocks), ``reductions`` and ``head``; ``total`` is their sum, ``SearchSpace.macs``."""
    space.validate(arch)
    grids, tokens, prefix = stage_grids(space), stage_tokens(space), 2 if space.distilled else 1
    d, C = space.head_dim, arch.widths
    stem = stem_macs(space.stem, space.img_size, space.patch_size, space.in_chans, C[0])
    blocks = sum(sum(block_macs(tokens[s], C[s], arch.heads[i], d, d, arch.mlp_hidden[i]).values())
                 for i, s in enumerate(space.stage_of) if arch.keep[i])
    reductions = sum(9 * C[s - 1] * C[s] * grids[s] ** 2 + prefix * C[s - 1] * C[s] for s in range(1, len(C)))
    head = C[-1] * space.num_classes * prefix
    return dict(stem=stem, blocks=blocks, reductions=reductions, head=head, total=stem + blocks + reductions + head)


def arch_macs(space: SearchSpace, arch: Arch) -> int:
    """Multiply-accumulates per image of ``arch``: ``SearchSpace.macs`` without building a model."""
    return macs_parts(space, arch)['total']
