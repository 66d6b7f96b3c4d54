"""Token-reduction schedules and their cost, as pure functions of the model's shape.

A schedule says how many tokens each block removes. ``r`` may be

* an int: that many per block (ToMe's constant schedule);
* ``(r, inflect)``: ToMe's linear schedule from ``int(r (1 - inflect))`` to
  ``2 r - int(r (1 - inflect))`` over the blocks (``(r, -1)`` is its decreasing schedule);
* a float in (0, 1): that fraction of the non-protected tokens, ``int((T - p) r)`` (MCTF-Fast
  uses 0.35 at blocks 3, 6 and 9);
* a list: one entry per block (missing entries are 0).

``layers`` restricts reduction to some blocks (MCTF: every block but the first). The clamps are
the papers': ToMe never removes more than half of the non-protected tokens,
``r <= (T - p) // 2``; MCTF first keeps ``T - r >= 10`` (``r = T - 10``), then resolves a
fraction, then applies the same half cap.

ToMe merges between a block's attention and its MLP; MCTF merges at the start of a block with
that block's attention ("one-step-ahead"), so its queries/keys and ``QK^T`` still see ``T``
tokens while V, ``AV``, the projection and the MLP see ``T - r``. ``fusion_macs`` counts both
in closed form (see its docstring), per image.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled

from ..bench.flops import analytic_macs, attention_widths, block_macs, norm_cost
from .config import MCTF_MODES

__all__ = ['parse_r', 'layer_r', 'token_schedule', 'fusion_macs', 'fusion_gmacs', 'METHODS', 'MCTF_MODES']

METHODS = ('tome', 'mctf')
RSpec = Union[int, float, tuple, Sequence[int]]


def parse_r(depth: int, r: RSpec) -> list:
    """Per-block r (before clamps) for the forms in the module docstring."""
    if depth < 1:
        raise ValueError(f'depth must be >= 1, got {depth}')
    if isinstance(r, bool):
        raise ValueError(f'r must be a number, a (r, inflect) pair or a list, got {r!r}')
    if isinstance(r, (list,)) or (isinstance(r, tuple) and len(r) != 2):
        r = list(r)
        if len(r) > depth:
            raise ValueError(f'the r list has {len(r)} entries but the model has {depth} blocks')
        if any(not isinstance(v, (int, float)) or v < 0 for v in r):
            raise ValueError(f'r list entries must be non-negative numbers, got {r}')
        return r + [0] * (depth - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
        if not -1 <= inflect <= 1:
            raise ValueError(f'the inflection of an (r, inflect) schedule must be in [-1, 1], got {inflect}')
        if not float(r).is_integer():
            raise ValueError(f'an (r, inflect) schedule needs an integer r, got {r}')
    if not isinstance(r, (int, float)) or r < 0 or math.isnan(r):
        raise ValueError(f'r must be a non-negative number (int tokens, or a fraction < 1), got {r!r}')
    if isinstance(r, float) and 0 < r < 1:
        return [r] * depth
    r = int(r)
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * i) for i in range(depth)]


def layer_r(tokens: int, r: float, protected: int, method: str) -> int:
    """Tokens one block removes from ``tokens`` under the method's clamps."""
    if method == 'mctf':
        if tokens - r < 10:
            r = tokens - 10
    elif method != 'tome':
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    free = tokens - protected
    if 0 < r < 1:
        r = int(free * r)
    return max(0, min(int(r), free // 2))


def token_schedule(tokens: int, depth: int, r: RSpec, protected: int = 1, method: str = 'tome',
                   layers: Optional[Sequence[int]] = None) -> List[dict]:
    """Per block: ``tokens_in``, ``r`` (after clamps) and ``tokens_out`` -- without running a model.

    >>> [b['tokens_in'] for b in token_schedule(197, 12, 16, method='mctf', layers=range(1, 12))]
    [197, 197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37]
    """
    per = parse_r(depth, r)
    if layers is not None:
        layers = sorted(set(int(i) for i in layers))
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f'active layers {bad} are out of range for a model with {depth} blocks')
        per = [v if i in layers else 0 for i, v in enumerate(per)]
    out, t = [], tokens
    for v in per:
        k = layer_r(t, v, protected, method)
        out.append(dict(tokens_in=t, r=k, tokens_out=t - k))
        t -= k
    return out


def fusion_macs(model: nn.Module, schedule: List[dict], method: str = 'tome', mode: str = 'one_step_ahead',
                input_size=None, convention: str = 'matmul') -> dict:
    """Closed-form MACs per image of ``model`` under a token ``schedule`` (``token_schedule``).

    Block i with H heads, dq / dv query-key / value width per head, M MLP width, on ``T`` input
    and ``T' = T - r`` output tokens, p protected, ``n_a = ceil((T-p)/2)``, ``n_b = floor((T-p)/2)``:

    * unreduced block: ``block_macs(T, ...)`` (qkv ``T D H (2dq+dv)``, ``QK^T`` ``H T^2 dq``, ``AV``
      ``H T^2 dv``, proj ``T H dv D``, MLP ``2 T D M``);
    * ToMe: attention on ``T``, the similarity of head-averaged keys ``n_a n_b dq``, MLP on ``T'``;
    * MCTF one-step-ahead: Q, K and ``QK^T`` on ``T`` (``T D H 2dq + H T^2 dq``), the similarity of
      the block inputs ``n_a n_b D``, then V, ``AV``, proj and MLP on ``T'``; 'precise' adds a
      full attention on ``T'``; 'previous' is an unreduced block plus the similarity.

    Under ``convention='fvcore'`` every LayerNorm adds 5 per element on the tokens it sees (MCTF's
    one-step-ahead applies ``norm1`` on ``T`` and again on ``T'``). Patch embedding and head are
    ``analytic_macs``'s. Leading grid blocks (SpectFormer, see ``patch.grid_blocks``) count their
    MLP on every token (``2 N D M``); as in ``spectformer_macs`` their FFTs are not in ``total``.
    Returns the parts, ``blocks`` (per block) and ``total``.
    """
    from .patch import grid_blocks
    base = analytic_macs(model, input_size, convention)
    start = grid_blocks(model)   # SpectFormer's leading spectral / pooling blocks run unfused
    if len(schedule) != len(model.blocks) - start:
        raise ValueError(f'the schedule has {len(schedule)} blocks, the model {len(model.blocks) - start} '
                         f'attention blocks')
    if schedule[0]['tokens_in'] != base['tokens']:
        raise ValueError(f'the schedule starts at {schedule[0]["tokens_in"]} tokens, the model has {base["tokens"]}')
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    if mode not in MCTF_MODES:
        raise ValueError(f'mode must be one of {MCTF_MODES}, got {mode!r}')
    fv = convention == 'fvcore'
    p = int(model.num_prefix_tokens)
    D = int(model.embed_dim)
    parts = dict(patch_embed=base['patch_embed'], head=base['head'], attention=0, mlp=0, similarity=0, norms=0)
    seen: set = set()
    parts['norms'] = norm_cost(getattr(model, 'norm_pre', None), base['tokens'] * D, seen) if fv else 0
    per_block = []
    for blk in model.blocks[:start]:   # grid blocks: the MLP on every token (their mixers are not matmuls)
        per_block.append(2 * base['tokens'] * D * blk.mlp.fc1.out_features)
        parts['mlp'] += per_block[-1]
    widths = attention_widths(model) if start == 0 else \
        [(int(b.attn.num_heads), int(b.attn.head_dim), int(b.attn.head_dim)) for b in model.blocks[start:]]
    for blk, (H, dq, dv), s in zip(model.blocks[start:], widths, schedule):
        T, r, T2 = s['tokens_in'], s['r'], s['tokens_out']
        M = blk.mlp.fc1.out_features
        sim = ((T - p + 1) // 2) * ((T - p) // 2) if r else 0
        full, out = block_macs(T, D, H, dq, dv, M), block_macs(T2, D, H, dq, dv, M)
        norm_tokens = [T, T2]
        if r == 0:
            attn, mlp, sim = full['qkv'] + full['attn_qk'] + full['attn_av'] + full['proj'], full['mlp'], 0
            norm_tokens = [T, T]
        elif method == 'tome':
            attn, mlp, sim = full['qkv'] + full['attn_qk'] + full['attn_av'] + full['proj'], out['mlp'], sim * dq
        elif mode == 'previous':
            attn, mlp, sim = full['qkv'] + full['attn_qk'] + full['attn_av'] + full['proj'], full['mlp'], sim * D
            norm_tokens = [T, T]
        else:
            qk = T * D * H * 2 * dq + full['attn_qk']
            rest = T2 * D * H * dv + out['attn_av'] + out['proj']
            if mode == 'precise':
                rest = out['qkv'] + out['attn_qk'] + out['attn_av'] + out['proj']
            attn, mlp, sim = qk + rest, out['mlp'], sim * D
            norm_tokens = [T, T2, T2]
        norms = 0
        if fv:
            norms = sum(norm_cost(blk.norm1 if i != len(norm_tokens) - 1 else blk.norm2, n * D, seen)
                        for i, n in enumerate(norm_tokens))
            # q/k-norm where q and k are computed ('precise' twice), the attention-output norm where
            # V is, the MLP's inner norm where the MLP runs (as analytic_macs counts them)
            a = blk.attn
            for n in [T, T2] if r and method == 'mctf' and mode == 'precise' else [T]:
                norms += (norm_cost(getattr(a, 'q_norm', None), n * H * dq, seen)
                          + norm_cost(getattr(a, 'k_norm', None), n * H * dq, seen))
            norms += (norm_cost(getattr(a, 'norm', None), norm_tokens[-2] * H * dv, seen)
                      + norm_cost(getattr(blk.mlp, 'norm', None), norm_tokens[-1] * M, seen))
        parts['attention'] += attn
        parts['mlp'] += mlp
        parts['similarity'] += sim
        parts['norms'] += norms
        per_block.append(attn + mlp + sim + norms)
    if fv:
        parts['norms'] += norm_cost(getattr(model, 'norm', None), schedule[-1]['tokens_out'] * D, seen)
        if not isinstance(model, VisionTransformerDistilled):   # the distilled head never applies fc_norm
            parts['norms'] += norm_cost(getattr(model, 'fc_norm', None), D, seen)   # on the class token
    parts['total'] = sum(parts.values())
    parts.update(blocks=per_block, schedule=schedule, convention=convention)
    return parts


def fusion_gmacs(model: nn.Module, schedule: List[dict], method: str = 'tome', mode: str = 'one_step_ahead',
                 input_size=None, convention: str = 'matmul') -> float:
    """``fusion_macs(...)['total']`` in units of 1e9."""
    return fusion_macs(model, schedule, method, mode, input_size, convention)['total'] / 1e9
