"""Densify: cut the zeroed units out of a masked model into the smaller, non-uniform model.

The result is the same deitlab architecture with other per-block widths and so saves as a run
directory whose ``config.json`` rebuilds it. For a DeiT the widths are ``embed_dim``,
``num_heads``, ``qk_dim``, ``v_dim``, ``mlp_hidden`` and the attention scale stays the dense
model's; for PoolFormer and SpectFormer (MLP-only pruning, families.py) only ``mlp_hidden``
changes, and every other tensor is copied unchanged. For head, qk, v and mlp units the densified
model computes exactly the masked model's logits; for the embedding width it does so when the
masked model normalised with ``MaskedLayerNorm``.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from .families import layout_of
from .groups import Masks

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
    ``v``, ``mlp``; an int applies to all four, and to the types the model has). Units switched back
    on have zero weights, so the function of the model is unchanged except through LayerNorm
    statistics for ``emb``."""
    out = masks.copy()
    if isinstance(round_to, int) or round_to is None:
        r = {k: int(round_to or 1) for k in ('emb', 'qk', 'v', 'mlp')}
    else:
        r = {k: int(round_to.get(k, 1)) for k in ('emb', 'qk', 'v', 'mlp')}
    scores = scores or {}
    out.emb = None if masks.emb is None else _round_up(masks.emb, r['emb'], scores.get('emb'))
    out.block = {}
    for kind, ms in masks.block.items():
        sc = scores.get(kind) or [None] * len(ms)
        out.block[kind] = [_round_up(m, r.get(kind, 1), s) for m, s in zip(ms, sc)]
    return out


def _mlp_slices(src: dict, prefix: str, hidden: torch.Tensor, e: Optional[torch.Tensor]) -> dict:
    """The kept parts of one MLP (``prefix`` = its module name plus '.'): fc1 rows / fc2 columns of
    the ``hidden`` units and, with ``e`` (a DeiT's kept residual channels), fc1 columns / fc2 rows
    of those channels. Linear and 1x1-conv weights alike."""
    out = {}
    w1 = src[prefix + 'fc1.weight'][hidden]
    out[prefix + 'fc1.weight'] = w1 if e is None else w1[:, e]
    if src.get(prefix + 'fc1.bias') is not None:
        out[prefix + 'fc1.bias'] = src[prefix + 'fc1.bias'][hidden]
    w2 = src[prefix + 'fc2.weight']
    out[prefix + 'fc2.weight'] = (w2 if e is None else w2[e])[:, hidden]
    if e is not None and src.get(prefix + 'fc2.bias') is not None:
        out[prefix + 'fc2.bias'] = src[prefix + 'fc2.bias'][e]
    return out


@torch.no_grad()
def densify(model: nn.Module, masks: Masks) -> nn.Module:
    """The compact model holding only the kept units of ``model`` (which ``masks`` describes)."""
    layout = layout_of(model)
    weight = next(model.parameters())
    new = layout.build(masks.kept(), device=weight.device).to(dtype=weight.dtype)
    new.pretrained_cfg = dict(model.pretrained_cfg)
    hidden = [m.nonzero().flatten() for m in masks.block['mlp']]
    if masks.emb is None:
        # MLP-only families: every tensor but the MLPs' is copied as it is (strict load checks names)
        sd = model.state_dict()
        for name, h in zip(layout.mlp_names, hidden):
            sd.update(_mlp_slices(sd, name + '.', h, None))
        new.load_state_dict(sd)
        new.train(model.training)
        return new

    e = masks.emb.nonzero().flatten()
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
        for name, value in _mlp_slices(src, p + 'mlp.', hidden[b], e).items():
            put(name, value)
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
    """Every parameter name the DeiT path of densify writes (for the completeness check)."""
    names = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'cls_token', 'dist_token', 'pos_embed',
             'norm.weight', 'norm.bias', 'head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'}
    for b in range(len(model.blocks)):
        for n in ('attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias', 'mlp.fc1.weight',
                  'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias', 'norm1.weight', 'norm1.bias', 'norm2.weight',
                  'norm2.bias', 'ls1.gamma', 'ls2.gamma'):
            names.add(f'blocks.{b}.{n}')
    return [n for n in dst if n in names]
