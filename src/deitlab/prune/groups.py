"""Structural groups of a model and the masks that prune them (NViT, Yang et al. CVPR 2023, Sec. 3.1).

A *unit* is the smallest thing NViT removes; every unit couples slices of several tensors that
must go together. Five unit types, keyed by module names (never by position):

========  ==========================  ======================================================
type      unit                        tensors zeroed with it
========  ==========================  ======================================================
``emb``   one residual channel c      patch-embed out-channel; cls/dist/pos tokens; every
          (global, all blocks)        LayerNorm and LayerScale; every qkv and fc1 in-column;
                                      every proj and fc2 out-row; final norm; head in-columns
``head``  head h of block b           Q, K, V rows of head h (weights, biases); proj in-columns
``qk``    q/k index j of block b,     row j of Q and of K in every head of the block
          shared by its heads
``v``     v index j of block b,       row j of V in every head; the matching proj in-columns
          shared by its heads
``mlp``   hidden neuron n of block b  fc1 row n (weight, bias); fc2 in-column n
========  ==========================  ======================================================

Inside a block every head keeps the same qk width and the same v width, and the two are
independent (qk_dim != v_dim). Zeroing a unit silences exactly that channel/head/neuron; with the
attention scale kept at the dense value, a model with head/qk/v/mlp units zeroed computes the
same logits as the smaller model those units are cut out of (``densify``).

The embedding width is the exception: a zeroed residual channel still counts in LayerNorm's mean
and variance. ``MaskedLayerNorm`` normalises over the active channels only, which makes the masked
and the densified model agree for ``emb`` too (NViT's code keeps plain LayerNorm, so its masked
and dense models differ slightly there).

*Criteria slices* (which parameters' ``w * g`` add up to a unit's saliency) follow NViT's code:
``emb``: patch embedding, qkv in-columns, proj out-rows, fc1 in-columns, fc2 out-rows; ``head``:
its Q, K, V rows; ``qk``: its Q rows; ``v``: its V rows; ``mlp``: its fc1 row. Where two zeroed
slices form a bilinear pair (Q and K rows; V rows and proj columns; fc1 row and fc2 column) only
one side is counted, because ``w * dL/dw`` of each side estimates the same first-order change.

Which unit types exist depends on the model's family (``families.layout_of``): a deitlab DeiT has
all five. The token-mixer families PoolFormer and SpectFormer have ``mlp`` units only (their
residual width, heads and qk/v stay fixed; see families.py), with the same coupled slices (fc1
row and bias, fc2 column; 1x1 convolutions in PoolFormer) and the same criteria slice (the fc1
row). ``Masks``, ``reduce_units`` and ``densify`` read block and MLP module names from the layout
and handle the ``emb`` / attention slices only where the family has those units.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.deit import DeiT, DeiTDistilled
from .base import BLOCK_TYPES, GROUP_TYPES, WIDTH_KEYS, PruneError
from .families import layout_of, tokens_of

__all__ = ['GROUP_TYPES', 'BLOCK_TYPES', 'PruneError', 'check_prunable', 'tokens_of', 'MaskedLayerNorm',
           'use_masked_layernorm', 'Masks', 'reduce_units']


def check_prunable(model: nn.Module) -> None:
    """Raise ``PruneError`` unless ``model`` is of a family the pruner knows (families.py: a deitlab
    DeiT, or the MLP widths of a deitlab PoolFormer / SpectFormer) with a layout it can handle."""
    layout_of(model)


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the active channels only: ``y = (x - mu_A) / sqrt(var_A + eps) * w + b`` with
    mean and variance over the set A of active channels and ``y = 0`` outside A. With every channel
    active it equals ``nn.LayerNorm``. Shares its parameters with the LayerNorm it replaces."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         device=norm.weight.device if norm.weight is not None else None)
        self.weight, self.bias = norm.weight, norm.bias
        object.__setattr__(self, 'original', norm)   # not a submodule: its parameters are ours
        self.register_buffer('active', torch.ones(norm.normalized_shape[-1], device=self.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.active.to(x.dtype)
        k = m.sum()
        if int(k.item()) == m.numel():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = (x * m).sum(-1, keepdim=True) / k
        xc = (x - mean) * m
        var = (xc * xc).sum(-1, keepdim=True) / k
        y = xc * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y * m


def _norm_slots(model: nn.Module):
    """(parent, attribute) of every LayerNorm on a DeiT's residual stream (none for the families
    without ``emb`` units)."""
    if not isinstance(model, (DeiT, DeiTDistilled)):
        return []
    slots = [(blk, n) for blk in model.blocks for n in ('norm1', 'norm2')]
    slots.append((model, 'norm'))
    return slots


def use_masked_layernorm(model: nn.Module, enable: bool = True) -> None:
    """Swap the residual-stream LayerNorms for ``MaskedLayerNorm`` (sharing parameters), or back.
    A no-op for families whose residual width is not pruned."""
    for parent, name in _norm_slots(model):
        norm = getattr(parent, name)
        if enable and isinstance(norm, nn.LayerNorm) and not isinstance(norm, MaskedLayerNorm):
            setattr(parent, name, MaskedLayerNorm(norm))
        elif not enable and isinstance(norm, MaskedLayerNorm):
            setattr(parent, name, norm.original)


def _mlp_param_masks(put, named: dict, prefix: str, keep: torch.Tensor, e: Optional[torch.Tensor]) -> None:
    """Element masks of one MLP (``prefix`` = its module name plus '.'): fc1 rows and fc2 columns
    of the removed hidden units, and with ``e`` (a DeiT's residual mask) fc1 columns and fc2 rows
    of the removed residual channels. Linear and 1x1-conv weights alike."""
    w1 = named[prefix + 'fc1.weight']
    tail = (1,) * (w1.dim() - 2)
    M, C = w1.shape[0], w1.shape[1]
    cols = torch.ones(C, device=keep.device) if e is None else e
    put(prefix + 'fc1.weight', (keep[:, None] * cols[None, :]).view(M, C, *tail))
    if named.get(prefix + 'fc1.bias') is not None:
        put(prefix + 'fc1.bias', keep)
    put(prefix + 'fc2.weight', (cols[:, None] * keep[None, :]).view(C, M, *tail))
    if e is not None and named.get(prefix + 'fc2.bias') is not None:
        put(prefix + 'fc2.bias', e)


class Masks:
    """Keep-masks (bool) per unit of the types the model's family has (``layout_of(model).types``):
    for a DeiT ``emb`` (E,) and per block ``head`` (H_b,), ``qk`` (dq_b,), ``v`` (dv_b,), ``mlp``
    (M_b,); for PoolFormer / SpectFormer only ``mlp`` per block (``emb`` is None).
    ``apply(model)`` zeroes every coupled slice of a removed unit."""

    def __init__(self, model: nn.Module):
        layout = layout_of(model)
        dev = next(model.parameters()).device
        counts = layout.unit_counts()
        self.types = tuple(layout.types)
        self.family = layout.family
        self.block_names = list(layout.block_names)
        self.emb = torch.ones(counts['emb'][0], dtype=torch.bool, device=dev) if 'emb' in self.types else None
        self.block: Dict[str, List[torch.Tensor]] = {
            k: [torch.ones(n, dtype=torch.bool, device=dev) for n in counts[k]] for k in BLOCK_TYPES if k in self.types}
        self.depth = layout.depth

    def layer(self, kind: str, block: Optional[int] = None) -> torch.Tensor:
        if kind == 'emb':
            return self.emb
        return self.block[kind][block]

    def layers(self):
        """(kind, block) of every prunable layer: ('emb', None) if the family has it, then
        (type, b) for each block and block type."""
        if self.emb is not None:
            yield 'emb', None
        for b in range(self.depth):
            for kind in self.block:
                yield kind, b

    def kept(self) -> dict:
        """Kept widths in the model's width vocabulary: ``embed_dim`` (DeiT) and per-block lists
        (``num_heads``, ``qk_dim``, ``v_dim``, ``mlp_hidden``; only ``mlp_hidden`` for the MLP-only
        families)."""
        out = {} if self.emb is None else dict(embed_dim=int(self.emb.sum()))
        out.update({WIDTH_KEYS[k]: [int(m.sum()) for m in ms] for k, ms in self.block.items()})
        return out

    def copy(self) -> 'Masks':
        """An independent copy (masks cloned)."""
        out = copy.copy(self)
        out.emb = None if self.emb is None else self.emb.clone()
        out.block = {k: [m.clone() for m in ms] for k, ms in self.block.items()}
        return out

    def state_dict(self) -> dict:
        out = {} if self.emb is None else {'emb': self.emb.cpu()}
        for kind, ms in self.block.items():
            for b, m in enumerate(ms):
                out[f'{kind}.{b}'] = m.cpu()
        return out

    def load_state_dict(self, sd: dict) -> None:
        if self.emb is not None:
            self.emb.copy_(sd['emb'])
        for kind, ms in self.block.items():
            for b, m in enumerate(ms):
                m.copy_(sd[f'{kind}.{b}'])

    # ------------------------------------------------------------------ element masks
    def param_masks(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """A 0/1 mask of the same shape for every parameter a removed unit touches."""
        e = None if self.emb is None else self.emb.float()
        out: Dict[str, torch.Tensor] = {}
        named = dict(model.named_parameters())

        def put(name, mask):
            out[name] = mask.expand_as(named[name]).to(named[name].dtype)

        if e is not None:
            put('patch_embed.proj.weight', e.view(-1, 1, 1, 1))
            if model.patch_embed.proj.bias is not None:
                put('patch_embed.proj.bias', e)
            for pname in ('cls_token', 'dist_token', 'pos_embed'):
                if named.get(pname) is not None:
                    put(pname, e.view(1, 1, -1))
        for b, name in enumerate(self.block_names):
            p = name + '.'
            if 'head' in self.block:
                head = self.block['head'][b].float()
                qk = self.block['qk'][b].float()
                v = self.block['v'][b].float()
                hq = (head[:, None] * qk[None, :]).reshape(-1)
                hv = (head[:, None] * v[None, :]).reshape(-1)
                rows = torch.cat([hq, hq, hv])
                put(p + 'attn.qkv.weight', rows[:, None] * e[None, :])
                put(p + 'attn.qkv.bias', rows)
                put(p + 'attn.proj.weight', e[:, None] * hv[None, :])
                put(p + 'attn.proj.bias', e)
            _mlp_param_masks(put, named, p + 'mlp.', self.block['mlp'][b].float(), e)
            if e is not None:
                for n in ('norm1', 'norm2'):
                    for t in ('weight', 'bias'):
                        if named.get(f'{p}{n}.{t}') is not None:
                            put(f'{p}{n}.{t}', e)
                for n in ('ls1', 'ls2'):
                    if named.get(f'{p}{n}.gamma') is not None:
                        put(f'{p}{n}.gamma', e)
        if e is not None:
            for t in ('weight', 'bias'):
                if named.get(f'norm.{t}') is not None:
                    put(f'norm.{t}', e)
            for hname in ('head', 'head_dist'):
                if isinstance(getattr(model, hname, None), nn.Linear):
                    put(f'{hname}.weight', e[None, :])
        return out

    def sync_layernorms(self, model: nn.Module) -> None:
        """Tell every ``MaskedLayerNorm`` which residual channels are active."""
        if self.emb is None:
            return
        for parent, name in _norm_slots(model):
            norm = getattr(parent, name)
            if isinstance(norm, MaskedLayerNorm):
                norm.active.copy_(self.emb.to(norm.active.dtype))

    @torch.no_grad()
    def apply(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
              masks: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Zero every removed slice of the parameters, their gradients and their optimizer state
        (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's momentum), so they stay zero under any update."""
        masks = self.param_masks(model) if masks is None else masks
        for name, p in model.named_parameters():
            m = masks.get(name)
            if m is None:
                continue
            p.mul_(m)
            if p.grad is not None:
                p.grad.mul_(m)
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.mul_(m)
        self.sync_layernorms(model)


# ---------------------------------------------------------------------------- unit reductions

ElemFn = Callable[[str, nn.Parameter], Optional[torch.Tensor]]


def reduce_units(model: nn.Module, elem: ElemFn) -> Dict[str, object]:
    """Sum an element-wise quantity over the criteria slices of every unit.

    ``elem(name, param)`` returns a tensor shaped like the parameter (e.g. ``w * grad``) or None
    (treated as zero). Returns, for the unit types of the model's family, ``{'emb': (E,), 'head':
    [(H_b,)], 'qk': [(dq_b,)], 'v': [(dv_b,)], 'mlp': [(M_b,)]}`` (PoolFormer / SpectFormer:
    ``{'mlp': [(M_b,)]}``), signed sums taken *before* any squaring (see the module docstring for
    which slices count).
    """
    layout = layout_of(model)
    named = dict(model.named_parameters())
    dev = next(model.parameters()).device

    def get(name):
        p = named.get(name)
        if p is None:
            return None
        t = elem(name, p)
        return None if t is None else t.detach().float()

    def linear(name: str, n_out: int, n_in: int):
        """Per-output-row sums (weight and bias) and per-input-column sums (weight) of a Linear
        (or a 1x1 convolution)."""
        rows, cols = torch.zeros(n_out, device=dev), torch.zeros(n_in, device=dev)
        t = get(name + '.weight')
        if t is not None:
            t = t.reshape(n_out, n_in)
            rows += t.sum(1)
            cols += t.sum(0)
        t = get(name + '.bias')
        if t is not None:
            rows += t
        return rows, cols

    out = {k: [] for k in BLOCK_TYPES if k in layout.types}
    emb = None
    if 'emb' in layout.types:
        E = model.embed_dim
        emb = torch.zeros(E, device=dev)
        t = get('patch_embed.proj.weight')
        if t is not None:
            emb += t.reshape(E, -1).sum(1)
        t = get('patch_embed.proj.bias')
        if t is not None:
            emb += t
        out = {'emb': emb, **out}
    for name, blk in zip(layout.block_names, layout.blocks()):
        p = name + '.'
        fc1 = blk.mlp.fc1
        C, M = (fc1.in_features, fc1.out_features) if isinstance(fc1, nn.Linear) else (fc1.in_channels,
                                                                                          fc1.out_channels)
        if 'head' in out:
            H, dq, dv = blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim
            rows, cols = linear(p + 'attn.qkv', H * (2 * dq + dv), C)
            emb += cols
            q = rows[:H * dq].view(H, dq)
            k = rows[H * dq:2 * H * dq].view(H, dq)
            v = rows[2 * H * dq:].view(H, dv)
            out['head'].append(q.sum(1) + k.sum(1) + v.sum(1))
            out['qk'].append(q.sum(0))
            out['v'].append(v.sum(0))
        mlp, cols = linear(p + 'mlp.fc1', M, C)
        out['mlp'].append(mlp)
        if emb is not None:
            emb += cols
            emb += linear(p + 'attn.proj', C, H * dv)[0] + linear(p + 'mlp.fc2', C, M)[0]
    return out
