"""Structural groups of a DeiT and the masks that prune them (NViT, Yang et al. CVPR 2023, Sec. 3.1).

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
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.deit import DeiT, DeiTDistilled

GROUP_TYPES = ('emb', 'head', 'qk', 'v', 'mlp')
BLOCK_TYPES = ('head', 'qk', 'v', 'mlp')


class PruneError(ValueError):
    """A model or setting the pruner cannot handle, with the reason."""


def check_prunable(model: nn.Module) -> None:
    """Raise ``PruneError`` unless ``model`` is a deitlab DeiT with the layout the registry knows."""
    if not isinstance(model, (DeiT, DeiTDistilled)):
        raise PruneError(f'structural pruning works on deitlab DeiT models, not {type(model).__name__}; '
                         f'convert a timm ViT/DeiT with deitlab.models.deit.from_timm(model)')
    for name in ('norm_pre', 'fc_norm'):
        if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
            raise PruneError(f'models with {name} are not supported by the pruner')
    if not isinstance(model.patch_embed.norm, nn.Identity):
        raise PruneError('patch embeddings with a norm layer are not supported by the pruner')
    if getattr(model, 'num_reg_tokens', 0):
        raise PruneError('models with register tokens are not supported by the pruner')
    if getattr(model, 'attn_pool', None) is not None:
        raise PruneError('attention pooling (global_pool="map") is not supported by the pruner')
    for i, blk in enumerate(model.blocks):
        if blk.attn.qkv.bias is None:
            raise PruneError(f'block {i}: qkv without bias is not supported by the pruner')


def tokens_of(model: nn.Module) -> int:
    """Tokens a block sees: patches plus prefix tokens (class, distillation)."""
    return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)


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
    """(parent, attribute) of every LayerNorm on the residual stream."""
    slots = [(blk, n) for blk in model.blocks for n in ('norm1', 'norm2')]
    slots.append((model, 'norm'))
    return slots


def use_masked_layernorm(model: nn.Module, enable: bool = True) -> None:
    """Swap the residual-stream LayerNorms for ``MaskedLayerNorm`` (sharing parameters), or back."""
    for parent, name in _norm_slots(model):
        norm = getattr(parent, name)
        if enable and isinstance(norm, nn.LayerNorm) and not isinstance(norm, MaskedLayerNorm):
            setattr(parent, name, MaskedLayerNorm(norm))
        elif not enable and isinstance(norm, MaskedLayerNorm):
            setattr(parent, name, norm.original)


class Masks:
    """Keep-masks (bool) per unit: ``emb`` (E,), and per block ``head`` (H_b,), ``qk`` (dq_b,),
    ``v`` (dv_b,), ``mlp`` (M_b,). ``apply(model)`` zeroes every coupled slice of a removed unit."""

    def __init__(self, model: nn.Module):
        check_prunable(model)
        dev = model.cls_token.device if getattr(model, 'cls_token', None) is not None else \
            model.patch_embed.proj.weight.device
        w = model.block_widths
        self.emb = torch.ones(model.embed_dim, dtype=torch.bool, device=dev)
        self.block: Dict[str, List[torch.Tensor]] = {
            'head': [torch.ones(h, dtype=torch.bool, device=dev) for h in w['num_heads']],
            'qk': [torch.ones(d, dtype=torch.bool, device=dev) for d in w['qk_dim']],
            'v': [torch.ones(d, dtype=torch.bool, device=dev) for d in w['v_dim']],
            'mlp': [torch.ones(m, dtype=torch.bool, device=dev) for m in w['mlp_hidden']],
        }
        self.depth = len(model.blocks)

    def layer(self, kind: str, block: Optional[int] = None) -> torch.Tensor:
        if kind == 'emb':
            return self.emb
        return self.block[kind][block]

    def layers(self):
        """(kind, block) of every prunable layer: ('emb', None) then (type, b) for each block."""
        yield 'emb', None
        for b in range(self.depth):
            for kind in BLOCK_TYPES:
                yield kind, b

    def kept(self) -> dict:
        """Kept widths: ``embed_dim`` and per-block lists, in the model's width vocabulary."""
        return dict(embed_dim=int(self.emb.sum()),
                    num_heads=[int(m.sum()) for m in self.block['head']],
                    qk_dim=[int(m.sum()) for m in self.block['qk']],
                    v_dim=[int(m.sum()) for m in self.block['v']],
                    mlp_hidden=[int(m.sum()) for m in self.block['mlp']])

    def state_dict(self) -> dict:
        out = {'emb': self.emb.cpu()}
        for kind, ms in self.block.items():
            for b, m in enumerate(ms):
                out[f'{kind}.{b}'] = m.cpu()
        return out

    def load_state_dict(self, sd: dict) -> None:
        self.emb.copy_(sd['emb'])
        for kind, ms in self.block.items():
            for b, m in enumerate(ms):
                m.copy_(sd[f'{kind}.{b}'])

    # ------------------------------------------------------------------ element masks
    def param_masks(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """A 0/1 mask of the same shape for every parameter a removed unit touches."""
        e = self.emb.float()
        out: Dict[str, torch.Tensor] = {}
        named = dict(model.named_parameters())

        def put(name, mask):
            out[name] = mask.expand_as(named[name]).to(named[name].dtype)

        put('patch_embed.proj.weight', e.view(-1, 1, 1, 1))
        if model.patch_embed.proj.bias is not None:
            put('patch_embed.proj.bias', e)
        for pname in ('cls_token', 'dist_token', 'pos_embed'):
            if named.get(pname) is not None:
                put(pname, e.view(1, 1, -1))
        for b, blk in enumerate(model.blocks):
            p = f'blocks.{b}.'
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
            mlp = self.block['mlp'][b].float()
            put(p + 'mlp.fc1.weight', mlp[:, None] * e[None, :])
            put(p + 'mlp.fc1.bias', mlp)
            put(p + 'mlp.fc2.weight', e[:, None] * mlp[None, :])
            put(p + 'mlp.fc2.bias', e)
            for n in ('norm1', 'norm2'):
                for t in ('weight', 'bias'):
                    if named.get(f'{p}{n}.{t}') is not None:
                        put(f'{p}{n}.{t}', e)
            for n in ('ls1', 'ls2'):
                if named.get(f'{p}{n}.gamma') is not None:
                    put(f'{p}{n}.gamma', e)
        for t in ('weight', 'bias'):
            if named.get(f'norm.{t}') is not None:
                put(f'norm.{t}', e)
        for hname in ('head', 'head_dist'):
            if isinstance(getattr(model, hname, None), nn.Linear):
                put(f'{hname}.weight', e[None, :])
        return out

    def sync_layernorms(self, model: nn.Module) -> None:
        """Tell every ``MaskedLayerNorm`` which residual channels are active."""
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
    (treated as zero). Returns ``{'emb': (E,), 'head': [(H_b,)], 'qk': [(dq_b,)], 'v': [(dv_b,)],
    'mlp': [(M_b,)]}``, signed sums taken *before* any squaring (see the module docstring for
    which slices count).
    """
    named = dict(model.named_parameters())

    def get(name):
        p = named.get(name)
        if p is None:
            return None
        t = elem(name, p)
        return None if t is None else t.detach().float()

    E = model.embed_dim
    dev = model.patch_embed.proj.weight.device
    emb = torch.zeros(E, device=dev)
    t = get('patch_embed.proj.weight')
    if t is not None:
        emb += t.reshape(E, -1).sum(1)
    t = get('patch_embed.proj.bias')
    if t is not None:
        emb += t
    def linear(name: str, n_out: int, n_in: int):
        """Per-output-row sums (weight and bias) and per-input-column sums (weight) of a Linear."""
        rows, cols = torch.zeros(n_out, device=dev), torch.zeros(n_in, device=dev)
        t = get(name + '.weight')
        if t is not None:
            rows += t.sum(1)
            cols += t.sum(0)
        t = get(name + '.bias')
        if t is not None:
            rows += t
        return rows, cols

    out = {'emb': emb, 'head': [], 'qk': [], 'v': [], 'mlp': []}
    for b, blk in enumerate(model.blocks):
        p = f'blocks.{b}.'
        H, dq, dv = blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim
        rows, cols = linear(p + 'attn.qkv', H * (2 * dq + dv), E)
        emb += cols
        q = rows[:H * dq].view(H, dq)
        k = rows[H * dq:2 * H * dq].view(H, dq)
        v = rows[2 * H * dq:].view(H, dv)
        out['head'].append(q.sum(1) + k.sum(1) + v.sum(1))
        out['qk'].append(q.sum(0))
        out['v'].append(v.sum(0))
        mlp, cols = linear(p + 'mlp.fc1', blk.mlp.fc1.out_features, E)
        emb += cols
        out['mlp'].append(mlp)
        emb += linear(p + 'attn.proj', E, H * dv)[0] + linear(p + 'mlp.fc2', E, blk.mlp.fc1.out_features)[0]
    return out
