"""The supernet warm-up of ViT-ResNAS: growing choices and rewiring by weight magnitude.

*Growing choices.* At warm-up progress ``t`` in [0, 1] a gene with ``n`` sorted choices may take
its ``k = min(n, 1 + floor(t * n))`` largest ones: the largest only at the start, one more
choice every ``1/n`` of the warm-up, all of them over its last ``1/n`` and after it. A skippable
block's keep gene has the choices (keep, skip), keep being the larger, so blocks start being
skipped halfway. :func:`allowed_space` is the search space restricted to those choices (a
:class:`SearchSpace` whose architectures are valid in the full one).

*Rewiring.* Sub-networks use the first heads and MLP units of a block, so after each warm-up
epoch :func:`rewire` sorts every block's heads and MLP hidden units by the L1 norm of their
weights, largest first, and permutes the weights (and the optimizer's moments) to that order:

* a head: its rows of ``qkv`` (query, key and value) and its columns of ``proj``;
* an MLP unit: its row of ``fc1`` and its column of ``fc2``.

The biases of those rows move with them. The full network computes the same function after the
permutation (attention heads and MLP units are independent and their outputs are summed), while
each smaller sub-network now holds the units with the most weight.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .space import SearchSpace

__all__ = ['allowed_count', 'allowed_counts', 'allowed_space', 'head_importance', 'mlp_importance', 'rewire',
           'new_rewiring_state']


def allowed_count(n: int, t: float) -> int:
    """How many of a gene's ``n`` choices (from the top) are allowed at warm-up progress ``t``."""
    t = min(max(float(t), 0.0), 1.0)
    return min(n, 1 + math.floor(t * n))


def allowed_counts(space: SearchSpace, t: float) -> dict:
    """The allowed number of choices of every gene: ``widths`` per stage, ``heads``, ``mlp_hidden``
    and ``keep`` (2 where a skippable block may be skipped, else 1) per block."""
    return dict(widths=[allowed_count(len(w), t) for w in space.widths],
                heads=[allowed_count(len(h), t) for h in space.heads],
                mlp_hidden=[allowed_count(len(m), t) for m in space.mlp_hidden],
                keep=[allowed_count(2, t) if i in space.skippable else 1 for i in range(space.num_blocks)])


def allowed_space(space: SearchSpace, t: float) -> SearchSpace:
    """``space`` restricted to the choices allowed at warm-up progress ``t`` (the space itself at
    the end of the warm-up)."""
    c = allowed_counts(space, t)
    full = (all(k == len(w) for k, w in zip(c['widths'], space.widths))
            and all(k == len(h) for k, h in zip(c['heads'], space.heads))
            and all(k == len(m) for k, m in zip(c['mlp_hidden'], space.mlp_hidden))
            and all(k == 2 for i, k in enumerate(c['keep']) if i in space.skippable))
    if full:
        return space
    return dataclasses.replace(
        space, widths=[w[-k:] for w, k in zip(space.widths, c['widths'])],
        heads=[h[-k:] for h, k in zip(space.heads, c['heads'])],
        mlp_hidden=[m[-k:] for m, k in zip(space.mlp_hidden, c['mlp_hidden'])],
        skippable=[i for i, k in enumerate(c['keep']) if k == 2])


# ----------------------------------------------------------------------------- rewiring

def _head_rows(H: int, dq: int, dv: int, device) -> List[torch.Tensor]:
    """Per head, its rows of a qkv layer ``[Q (H x dq), K (H x dq), V (H x dv)]``."""
    return [torch.cat([torch.arange(h * dq, (h + 1) * dq, device=device),
                       torch.arange(H * dq + h * dq, H * dq + (h + 1) * dq, device=device),
                       torch.arange(2 * H * dq + h * dv, 2 * H * dq + (h + 1) * dv, device=device)])
            for h in range(H)]


def head_importance(attn: nn.Module) -> torch.Tensor:
    """(H,): the L1 norm of every head's qkv rows and proj columns."""
    H, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    W, P = attn.qkv.weight.detach().abs(), attn.proj.weight.detach().abs()
    rows = _head_rows(H, dq, dv, W.device)
    return torch.stack([W[r].sum() + P[:, h * dv:(h + 1) * dv].sum() for h, r in enumerate(rows)])


def mlp_importance(mlp: nn.Module) -> torch.Tensor:
    """(M,): the L1 norm of every hidden unit's fc1 row and fc2 column."""
    return mlp.fc1.weight.detach().abs().sum(1) + mlp.fc2.weight.detach().abs().sum(0)


def _permute(param: Optional[torch.Tensor], index: torch.Tensor, dim: int,
             optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Reorder ``param`` along ``dim`` in place (the tensor stays the optimizer's key), and the
    optimizer's per-element state of it (AdamW's moments) the same way."""
    if param is None:
        return
    with torch.no_grad():
        param.copy_(param.index_select(dim, index))
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.copy_(value.index_select(dim, index))


def _order(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)


def rewire_block(blk: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> tuple:
    """Sort one block's heads and MLP units by importance, descending; returns the two orders
    (position j now holds what was at ``order[j]``)."""
    attn, mlp = blk.attn, blk.mlp
    heads = _order(head_importance(attn))
    H, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    rows = _head_rows(H, dq, dv, heads.device)
    q_rows = torch.cat([rows[h][:dq] for h in heads.tolist()])
    k_rows = torch.cat([rows[h][dq:2 * dq] for h in heads.tolist()])
    v_rows = torch.cat([rows[h][2 * dq:] for h in heads.tolist()])
    qkv_index = torch.cat([q_rows, k_rows, v_rows])
    _permute(attn.qkv.weight, qkv_index, 0, optimizer)
    _permute(attn.qkv.bias, qkv_index, 0, optimizer)
    cols = torch.cat([torch.arange(h * dv, (h + 1) * dv, device=heads.device) for h in heads.tolist()])
    _permute(attn.proj.weight, cols, 1, optimizer)
    units = _order(mlp_importance(mlp))
    _permute(mlp.fc1.weight, units, 0, optimizer)
    _permute(mlp.fc1.bias, units, 0, optimizer)
    _permute(mlp.fc2.weight, units, 1, optimizer)
    return heads, units


def new_rewiring_state(blocks: Sequence[nn.Module]) -> dict:
    """No rewiring yet: every block's heads and units in their original order."""
    return dict(rewirings=0, heads=[list(range(b.attn.num_heads)) for b in blocks],
                mlp=[list(range(b.mlp.fc1.out_features)) for b in blocks])


def rewire(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
           state: Optional[dict] = None) -> dict:
    """Rewire every block of ``model`` (a ``Supernet`` or its ``ViTRes``); returns the rewiring
    state: how many rewirings were done and, per block, the original index of the head / unit at
    every position (``state`` is the one before, updated)."""
    blocks = list(getattr(model, 'model', model).blocks)
    state = state or new_rewiring_state(blocks)
    for i, blk in enumerate(blocks):
        heads, units = rewire_block(blk, optimizer)
        state['heads'][i] = [state['heads'][i][j] for j in heads.tolist()]
        state['mlp'][i] = [state['mlp'][i][j] for j in units.tolist()]
    state['rewirings'] += 1
    return state
