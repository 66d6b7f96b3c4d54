"""Parameters and multiply-accumulates (MACs): counted by running the model, and in closed form.

Two numbers that must agree (DESIGN principle 4): ``count_gmacs`` runs one forward under
``torch.utils.flop_counter.FlopCounterMode`` with fused attention switched off (FLOP counters
do not see inside ``scaled_dot_product_attention`` on the CPU and silently leave the attention
matmuls out), and ``analytic_gmacs`` adds up the closed form from the model's widths.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from ..layers.block import block_macs
from ..models.deit import DeiT, DeiTDistilled
from ..models.registry import closed_form_of, register_closed_form
from .common import (eval_mode, fused_attention, model_device, model_dtype, random_input,
                     resolve_input_size)

__all__ = ['count_params', 'count_gmacs', 'analytic_macs', 'analytic_gmacs', 'block_macs', 'CONVENTIONS',
           'register_closed_form', 'attention_widths', 'norm_cost']

# 'matmul': multiply-accumulates of convolutions and matrix products only (what FlopCounterMode,
#   timm and most papers count; norms, softmax, GELU, scaling and adds are free).
# 'fvcore': the same plus fvcore's estimate for LayerNorm, 5 per normalised element (4 without
#   an affine transform). fvcore's total is what the DeiT paper tables and later papers quote
#   (DeiT-T 1.258, DeiT-S 4.608, DeiT-B 17.58 "GFLOPs"), so this reproduces those figures.
CONVENTIONS = ('matmul', 'fvcore')

def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``trainable=True`` counts only those
    with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def count_gmacs(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1) -> float:
    """MACs per image, in units of 1e9, counted by ``FlopCounterMode`` on one forward pass.

    The forward runs in eval mode under ``torch.no_grad()`` on a random batch of
    ``batch_size`` images of ``input_size`` (C, H, W; default: what the model takes, see
    ``resolve_input_size``), on the model's device and dtype (the meta device works and is
    fastest). ``fused_attn`` is set to False on every submodule that has it for the duration, so
    the attention matmuls are counted; those flags and the train/eval mode of every submodule are
    restored afterwards, also when the forward raises. MACs = counted FLOPs / 2.
    """
    size = resolve_input_size(model, input_size)
    x = random_input(size, batch_size, model_device(model), model_dtype(model))
    counter = FlopCounterMode(display=False)
    with fused_attention(model, False), eval_mode(model), torch.no_grad():
        with counter:
            model(x)
    return counter.get_total_flops() / 2 / batch_size / 1e9


# ----------------------------------------------------------------------------- closed form

_SUPPORTED = (VisionTransformer, VisionTransformerDistilled, DeiT, DeiTDistilled)


def _linear_ids(module: nn.Module) -> set:
    return {id(m) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def norm_cost(norm: Optional[nn.Module], elements: int, counted: set) -> int:
    """fvcore's LayerNorm estimate; any other module (Identity, RMSNorm, ...) costs nothing."""
    if isinstance(norm, nn.LayerNorm):
        counted.add(id(norm))
        return elements * (5 if norm.weight is not None else 4)
    return 0


def attention_widths(model: nn.Module) -> list:
    """(heads, qk_dim, v_dim) per block: deitlab's ``block_widths``, or timm's uniform
    ``attn.num_heads`` / ``attn.head_dim``."""
    if isinstance(model, (DeiT, DeiTDistilled)):
        w = model.block_widths
        return list(zip(w['num_heads'], w['qk_dim'], w['v_dim']))
    out = []
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, 'attn', None)
        _check(attn is not None and hasattr(attn, 'num_heads') and hasattr(attn, 'head_dim'),
               f'block {i} ({type(blk).__name__}) has no attn.num_heads / attn.head_dim')
        out.append((int(attn.num_heads), int(attn.head_dim), int(attn.head_dim)))
    return out


def analytic_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                  convention: str = 'matmul') -> dict:
    """Closed-form MACs per image of a DeiT / ViT, itemised (ints).

    Supported: deitlab's ``DeiT`` / ``DeiTDistilled`` (per-block widths) and timm's plain
    ``VisionTransformer`` / ``VisionTransformerDistilled`` (uniform widths), plus every family that
    registered its own closed form (``register_closed_form``: PoolFormer, SpectFormer, ...; their
    parts are their own, 'matmul' convention only). Anything else,
    including subclasses that add modules, raises ``ValueError``. With N = patches + prefix
    tokens, D = embed_dim and, for block i, H heads, dq / dv the query-key / value width per
    head and M the MLP hidden width (see ``analytic_gmacs`` for the formula), the parts are
    ``patch_embed``, ``qkv``, ``attn_qk``, ``attn_av``, ``proj``, ``mlp``, ``head`` and
    ``norms`` (0 under the 'matmul' convention), plus ``blocks`` (total per block), ``tokens``
    (N) and ``total``. The widths are cross-checked against the Linear layers' shapes, and every
    Linear / Conv layer of the model must be accounted for, so a stale width or an extra layer
    raises instead of giving a wrong number.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
    family = closed_form_of(model)
    if family is not None:
        if convention != 'matmul':
            raise ValueError(f'the closed form of {type(model).__name__} counts matrix products only '
                             f"(convention='matmul'); fvcore's norm estimate is not modelled")
        parts = dict(family(model, input_size))
        parts.setdefault('convention', convention)
        return parts
    # a wrapper class that runs the same layers differently (token fusion) names its plain class
    if getattr(type(model), 'plain_class', type(model)) not in _SUPPORTED:
        raise ValueError(
            f'analytic_gmacs supports deitlab DeiT / DeiTDistilled and timm VisionTransformer / '
            f'VisionTransformerDistilled models only, not {type(model).__name__}; '
            f'use count_gmacs for other models')
    distilled = isinstance(model, VisionTransformerDistilled)
    _check(getattr(model, 'attn_pool', None) is None,
           'analytic_gmacs does not model attention pooling (global_pool="map"); use count_gmacs')
    seen, seen_norms = set(), set()

    # patch embedding: one conv, kernel = stride = patch
    pe = model.patch_embed
    conv = getattr(pe, 'proj', None)
    _check(isinstance(conv, nn.Conv2d) and conv.groups == 1,
           f'patch embedding {type(pe).__name__} is not a single Conv2d; use count_gmacs')
    size = resolve_input_size(model, input_size)
    _check(size[0] == conv.in_channels,
           f'input has {size[0]} channels but the patch embedding takes {conv.in_channels}')
    if hasattr(pe, 'dynamic_feat_size'):
        gh, gw = pe.dynamic_feat_size((size[1], size[2]))
    else:
        gh, gw = size[1] // conv.stride[0], size[2] // conv.stride[1]
    num_patches = int(gh) * int(gw)
    kh, kw = conv.kernel_size
    D = int(model.embed_dim)
    _check(conv.out_channels == D, f'patch embedding gives {conv.out_channels} channels, embed_dim is {D}')
    N = num_patches + int(model.num_prefix_tokens)
    seen |= _linear_ids(pe)
    parts = dict(patch_embed=num_patches * conv.in_channels * kh * kw * D,
                 qkv=0, attn_qk=0, attn_av=0, proj=0, mlp=0, head=0, norms=0)
    norms = (norm_cost(getattr(model, 'norm_pre', None), N * D, seen_norms)
             + norm_cost(getattr(model, 'norm', None), N * D, seen_norms))

    per_block = []
    for i, (blk, (H, dq, dv)) in enumerate(zip(model.blocks, attention_widths(model))):
        attn, mlp = blk.attn, getattr(blk, 'mlp', None)
        qkv, proj = getattr(attn, 'qkv', None), getattr(attn, 'proj', None)
        fc1, fc2 = getattr(mlp, 'fc1', None), getattr(mlp, 'fc2', None)
        _check(all(isinstance(m, nn.Linear) for m in (qkv, proj, fc1, fc2)),
               f'block {i} ({type(blk).__name__}) is not attn.qkv/attn.proj + mlp.fc1/mlp.fc2; use count_gmacs')
        M = fc1.out_features
        _check(qkv.in_features == D and qkv.out_features == H * (2 * dq + dv),
               f'block {i}: qkv is {qkv.in_features}->{qkv.out_features} but D={D}, heads={H}, '
               f'qk_dim={dq}, v_dim={dv} need {D}->{H * (2 * dq + dv)} (stale widths?)')
        _check(proj.in_features == H * dv and proj.out_features == D,
               f'block {i}: proj is {proj.in_features}->{proj.out_features}, expected {H * dv}->{D}')
        _check(fc1.in_features == D and fc2.in_features == M and fc2.out_features == D,
               f'block {i}: mlp is {fc1.in_features}->{M}->{fc2.out_features}, expected {D}->{M}->{D}')
        _check(_linear_ids(blk) == {id(qkv), id(proj), id(fc1), id(fc2)},
               f'block {i} ({type(blk).__name__}) has layers the closed form does not know; use count_gmacs')
        seen |= _linear_ids(blk)
        cost = block_macs(N, D, H, dq, dv, M)
        for k, v in cost.items():
            parts[k] += v
        block_norms = (norm_cost(blk.norm1, N * D, seen_norms) + norm_cost(blk.norm2, N * D, seen_norms)
                       + norm_cost(getattr(attn, 'q_norm', None), N * H * dq, seen_norms)
                       + norm_cost(getattr(attn, 'k_norm', None), N * H * dq, seen_norms)
                       + norm_cost(getattr(attn, 'norm', None), N * H * dv, seen_norms)
                       + norm_cost(getattr(mlp, 'norm', None), N * M, seen_norms))
        norms += block_norms
        per_block.append(sum(cost.values()) + (block_norms if convention == 'fvcore' else 0))

    # classifier head(s) on the pooled token(s); the distilled model adds a second head
    head_tokens = N if (not distilled and getattr(model, 'global_pool', 'token') == '') else 1
    if not distilled:
        norms += norm_cost(getattr(model, 'fc_norm', None), head_tokens * D, seen_norms)
    else:  # the distilled forward never applies fc_norm
        seen_norms.add(id(getattr(model, 'fc_norm', None)))
    for name in ('head', 'head_dist') if distilled else ('head',):
        head = getattr(model, name)
        if isinstance(head, nn.Linear):
            _check(head.in_features == D, f'{name} takes {head.in_features} features, embed_dim is {D}')
            parts['head'] += head_tokens * D * head.out_features
        else:
            _check(isinstance(head, nn.Identity), f'{name} is {type(head).__name__}, not a Linear; use count_gmacs')
        seen |= _linear_ids(head)
    _check(_linear_ids(model) <= seen, f'{type(model).__name__} has Linear/Conv layers outside the patch '
                                       f'embedding, blocks and heads; use count_gmacs')
    if convention == 'fvcore':
        stray = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and id(m) not in seen_norms]
        _check(not stray, f'the fvcore convention does not know where these LayerNorms apply: {stray}')
        parts['norms'] = norms
    parts['total'] = sum(parts.values())
    parts.update(blocks=per_block, tokens=N, input_size=size, convention=convention)
    return parts


def analytic_gmacs(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                   convention: str = 'matmul') -> float:
    """Closed-form MACs per image of a DeiT / ViT in units of 1e9.

    Per image, with P the patch size, C input channels, N = num_patches + prefix tokens (1 for
    DeiT: CLS; 2 for distilled DeiT: CLS + DIST), D = embed_dim, and for each block H heads,
    dq query/key width per head, dv value width per head, M MLP hidden width, and K classes::

        patch embed  num_patches * C * P * P * D
        per block    qkv   N * D * H * (2 dq + dv)
                     QK^T  H * N * N * dq
                     AV    H * N * N * dv
                     proj  N * H * dv * D
                     MLP   2 * N * D * M
        head(s)      D * K per head (the distilled model has two)

    Norms, softmax, GELU, scaling and adds are free (``convention='matmul'``, the default), as
    in timm and in ``FlopCounterMode``, so this equals ``count_gmacs`` exactly. Under
    ``convention='fvcore'`` each LayerNorm adds fvcore's estimate of 5 per element; that is how
    the published figures were counted (DeiT-T/S/B: 1.258 / 4.608 / 17.58; the 'matmul' values
    are 1.254 / 4.599 / 17.56). deitlab DeiT widths come from ``model.block_widths``; timm ViTs
    use ``attn.num_heads`` and ``attn.head_dim``. Raises ``ValueError`` for other models.
    """
    return analytic_macs(model, input_size, convention)['total'] / 1e9
