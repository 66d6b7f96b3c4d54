"""Densify: cut the zeroed units out of a masked DeiT into the smaller, non-uniform DeiT.

The result is the same deitlab architecture with other per-block widths (``embed_dim``,
``num_heads``, ``qk_dim``, ``v_dim``, ``mlp_hidden``) and the dense model's attention scale, so it
saves as a run directory whose ``config.json`` rebuilds it. For head, qk, v and mlp units the
densified model computes exactly the masked model's logits; for the embedding width it does so when
the masked model normalised with ``MaskedLayerNorm``.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from .groups import Masks, check_prunable
from .ranking import build_like

RoundTo = Union[None, int, Dict[str, int]]


def _round_up(mask: torch.Tensor, multiple: int, score: Optional[torch.Tensor]) -> torch.Tensor:
    """Keep-mask with extra units switched back on until the count is a multiple (capped at all).
    Units come back by decreasing ``score`` (lowest index first without scores)."""
    keep = mask.clone()
    if multiple <= 1:
        return keep
    n, k = keep.numel(), int(keep.sum())
    want = min(n, -(-k // multiple) * multiple)
    if want == k:
        return keep
    off = (~keep).nonzero().flatten()
    if score is not None:
        off = off[torch.argsort(score[off].float(), descending=True, stable=True)]
    keep[off[:want - k]] = True
    return keep


def rounded_masks(masks: Masks, round_to: RoundTo, scores: Optional[dict] = None) -> Masks:
    """A copy of ``masks`` whose kept widths are rounded up to multiples (per type: ``emb``, ``qk``,
    ``v``, ``mlp``; an int applies to all four). Units switched back on have zero weights, so the
    function of the model is unchanged except through LayerNorm statistics for ``emb``."""
    out = Masks.__new__(Masks)
    out.depth = masks.depth
    if isinstance(round_to, int) or round_to is None:
        r = {k: int(round_to or 1) for k in ('emb', 'qk', 'v', 'mlp')}
    else:
        r = {k: int(round_to.get(k, 1)) for k in ('emb', 'qk', 'v', 'mlp')}
    scores = scores or {}
    out.emb = _round_up(masks.emb, r['emb'], scores.get('emb'))
    out.block = {}
    for kind, ms in masks.block.items():
        sc = scores.get(kind) or [None] * len(ms)
        out.block[kind] = [_round_up(m, r.get(kind, 1), s) for m, s in zip(ms, sc)]
    return out


@torch.no_grad()
def densify(model: nn.Module, masks: Masks) -> nn.Module:
    """The compact model holding only the kept units of ``model`` (which ``masks`` describes)."""
    check_prunable(model)
    e = masks.emb.nonzero().flatten()
    weight = model.patch_embed.proj.weight
    new = build_like(model, masks.kept(), device=weight.device).to(dtype=weight.dtype)
    new.pretrained_cfg = dict(model.pretrained_cfg)
    src = dict(model.named_parameters())
    dst = dict(new.named_parameters())

    def put(name, value):
        if value.shape != dst[name].shape:
            raise RuntimeError(f'densify: {name} would be {tuple(value.shape)}, the new model has '
                               f'{tuple(dst[name].shape)}')
        dst[name].copy_(value)

    put('patch_embed.proj.weight', src['patch_embed.proj.weight'][e])
    if 'patch_embed.proj.bias' in src:
        put('patch_embed.proj.bias', src['patch_embed.proj.bias'][e])
    for name in ('cls_token', 'dist_token', 'pos_embed'):
        if name in src:
            put(name, src[name][..., e])
    for b, blk in enumerate(model.blocks):
        p = f'blocks.{b}.'
        H, dq, dv = blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim
        heads = masks.block['head'][b].nonzero().flatten()
        qk = masks.block['qk'][b].nonzero().flatten()
        v = masks.block['v'][b].nonzero().flatten()
        q_rows = (heads[:, None] * dq + qk[None, :]).flatten()
        v_cols = (heads[:, None] * dv + v[None, :]).flatten()
        rows = torch.cat([q_rows, H * dq + q_rows, 2 * H * dq + v_cols])
        put(p + 'attn.qkv.weight', src[p + 'attn.qkv.weight'][rows][:, e])
        put(p + 'attn.qkv.bias', src[p + 'attn.qkv.bias'][rows])
        put(p + 'attn.proj.weight', src[p + 'attn.proj.weight'][e][:, v_cols])
        put(p + 'attn.proj.bias', src[p + 'attn.proj.bias'][e])
        hidden = masks.block['mlp'][b].nonzero().flatten()
        put(p + 'mlp.fc1.weight', src[p + 'mlp.fc1.weight'][hidden][:, e])
        put(p + 'mlp.fc1.bias', src[p + 'mlp.fc1.bias'][hidden])
        put(p + 'mlp.fc2.weight', src[p + 'mlp.fc2.weight'][e][:, hidden])
        put(p + 'mlp.fc2.bias', src[p + 'mlp.fc2.bias'][e])
        for n in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'ls1.gamma', 'ls2.gamma'):
            if p + n in src:
                put(p + n, src[p + n][e])
    for n in ('norm.weight', 'norm.bias'):
        if n in src:
            put(n, src[n][e])
    for hname in ('head', 'head_dist'):
        if f'{hname}.weight' in src and f'{hname}.weight' in dst:
            put(f'{hname}.weight', src[f'{hname}.weight'][:, e])
            put(f'{hname}.bias', src[f'{hname}.bias'])
    missing = set(dst) - set(_copied_names(model, dst))
    if missing:
        raise RuntimeError(f'densify does not know how to slice {sorted(missing)}')
    new.train(model.training)
    return new


def _copied_names(model: nn.Module, dst: dict):
    """Every parameter name densify writes (for the completeness check)."""
    names = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'cls_token', 'dist_token', 'pos_embed',
             'norm.weight', 'norm.bias', 'head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'}
    for b in range(len(model.blocks)):
        for n in ('attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias', 'mlp.fc1.weight',
                  'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias', 'norm1.weight', 'norm1.bias', 'norm2.weight',
                  'norm2.bias', 'ls1.gamma', 'ls2.gamma'):
            names.add(f'blocks.{b}.{n}')
    return [n for n in dst if n in names]
