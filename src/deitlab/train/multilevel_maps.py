"""Width and depth coalescing operators of multi-level training, for deitlab DeiTs.

Zou, Zhang and Deng, "A Multi-Level Framework for Accelerating Training Transformer Models",
ICLR 2024. A large model is *coalesced* into a smaller one (half the width and/or depth), the
small model is trained, *de-coalesced* back to the large shape and *interpolated* into the large
model, which then trains on. This module holds the maps; the schedule lives elsewhere.

Width (PyTorch convention, a Linear weight is ``W`` (out x in)). Halving an axis of size ``n``
pairs index ``j`` with ``j + n/2`` (``j < n/2``): embedding channel ``j`` with ``j + D/2``, head
``i`` with head ``i + H/2`` (whole heads, inside each of the Q, K and V row sections of ``qkv``;
the head width ``qk_dim``/``v_dim`` and the softmax scale are kept) and MLP unit ``j`` with
``j + M/2``. With ``A`` (n/2 x n) the averaging matrix (1/2 on both merged indices) and ``S`` the
summing matrix (1 on both):

* coalescing ``C_w``:  ``W' = A_out W S_in^T``, ``b' = A_out b``; LayerNorm ``gamma, beta``,
  LayerScale ``gamma``, the patch-embedding output channels, ``cls_token``/``dist_token`` and
  ``pos_embed`` (along D) are averaged; the classifiers' input side is summed, classes untouched;
* de-coalescing ``D_w``:  ``W = (2 A_out)^T W' (S_in / 2)``: outputs duplicated (``j`` and
  ``j + n/2`` both get small index ``j``), inputs halved (1/2 on both copies); vectors, tokens and
  ``pos_embed`` duplicated, classifier input weights halved.

``C_w(D_w(theta)) = theta`` exactly (``(a + a) / 2 = a`` and ``a/2 + a/2 = a`` in floating point).
``D_w`` preserves the function of these pre-LN blocks: a duplicated residual stream has the same
LayerNorm mean and variance, duplicated heads compute the same context, and halved inputs sum back
to the small model's pre-activations, so the logits agree up to rounding.

Depth (after, and independent of, width), for a model of depth ``L``:

* coalescing ``C_d``: small layer ``i = (layer a_i + layer b_i) / 2`` for every block parameter,
  with ``(a_i, b_i) = (2i, 2i+1)`` ('adjacent', the default) or ``(i, i + L/2)`` ('half');
* de-coalescing ``D_d``: every large layer copies a small one, in the order ``0,0,1,1,2,2,...``
  ('adjacent') or ``0,1,...,L/2-1,0,1,...,L/2-1`` ('half'); ``C_d(D_d(theta)) = theta`` exactly.
  ``D_d`` is not function-preserving (every block then runs twice).

Interpolation: ``theta_large <- (1 - alpha) theta_large + alpha D(theta_small)`` for every
parameter and floating buffer, ``alpha`` in [0, 1]; ``alpha = 0`` and ``alpha = 1`` give the two
ends exactly.

The operators work on state-dict tensors by index pairing (halves of an axis), build the result
through timm's registry with the changed widths (an ordinary deitlab model: ``save_run_dir`` and
``local-dir:`` reload it) and keep device, dtype, train/eval mode and the distilled-training flag.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from .config import ConfigError

__all__ = ['PAIRINGS', 'check_coalescible', 'coalesce', 'decoalesce', 'interpolate']

PAIRINGS = ('adjacent', 'half')
OUT, IN = 'out', 'in'   # an output axis is averaged / duplicated, an input axis summed / halved

_BLOCK_KEY = re.compile(r'blocks\.(\d+)\.(.+)')
_TOKENS = ('cls_token', 'dist_token', 'reg_token', 'pos_embed')
_EMBED_VECTORS = ('patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
                  'norm_pre.weight', 'norm_pre.bias', 'fc_norm.weight', 'fc_norm.bias')
_HEADS = ('head', 'head_dist')
_BLOCK_VECTORS = ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'ls1.gamma', 'ls2.gamma',
                  'attn.proj.bias', 'mlp.fc2.bias')
_WIDTH_KEYS = ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'attn_scale')


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def _check_pairing(pairing: str) -> None:
    if pairing not in PAIRINGS:
        raise ConfigError(f'multi-level depth pairing must be one of {", ".join(PAIRINGS)}, got {pairing!r}')


def _check_type(model: nn.Module) -> None:
    from ..models.deit import DeiT, DeiTDistilled
    if type(model) not in (DeiT, DeiTDistilled):
        raise ConfigError(f'multi-level training cannot coalesce a {type(model).__name__}: only deitlab DeiT / '
                          f'distilled DeiT models can be coalesced (timm ViTs convert with '
                          f'deitlab.models.deit.from_timm)')


def _layout(model: nn.Module) -> dict:
    """For every state-dict key, the axes width maps act on: ``(axis, OUT or IN, section sizes)``.

    An axis is split into sections (``qkv`` rows: ``[H qk_dim, H qk_dim, H v_dim]``; otherwise one
    section) and each section pairs its first half with its second half."""
    D = model.embed_dim
    layout, unknown = {}, []
    for key in model.state_dict():
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            blk = model.blocks[int(m.group(1))]
            rest = m.group(2)
            H, dq, dv, M = blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim, blk.mlp.fc1.out_features
            rules = {
                'attn.qkv.weight': ((0, OUT, [H * dq, H * dq, H * dv]), (1, IN, [D])),
                'attn.qkv.bias': ((0, OUT, [H * dq, H * dq, H * dv]),),
                'attn.proj.weight': ((0, OUT, [D]), (1, IN, [H * dv])),
                'mlp.fc1.weight': ((0, OUT, [M]), (1, IN, [D])),
                'mlp.fc1.bias': ((0, OUT, [M]),),
                'mlp.fc2.weight': ((0, OUT, [D]), (1, IN, [M])),
                **{name: ((0, OUT, [D]),) for name in _BLOCK_VECTORS},
            }
            rule = rules.get(rest)
        elif key in _TOKENS:
            rule = ((-1, OUT, [D]),)
        elif key in _EMBED_VECTORS:
            rule = ((0, OUT, [D]),)
        elif key.split('.')[0] in _HEADS and key.count('.') == 1:
            rule = ((1, IN, [D]),) if key.endswith('.weight') else ()
        else:
            rule = None
        if rule is None:
            unknown.append(key)
        else:
            layout[key] = rule
    if unknown:
        raise ConfigError(f'multi-level training does not know how to map {", ".join(unknown[:4])}'
                          f'{" ..." if len(unknown) > 4 else ""} of this {type(model).__name__}')
    return layout


def check_coalescible(model: nn.Module, width: bool = True, depth: bool = True, pairing: str = 'adjacent') -> None:
    """Raise a :class:`ConfigError` naming what cannot be halved, if ``coalesce`` cannot map ``model``.

    Width needs an even ``embed_dim`` and, in every block, an even number of heads and an even MLP
    width; depth needs an even depth (at least 2) whose paired blocks (by ``pairing``) have equal
    widths, so that their parameters can be averaged."""
    _check_pairing(pairing)
    _check_type(model)
    _layout(model)
    widths = model.block_widths
    if width:
        if model.embed_dim % 2:
            raise ConfigError(f'multi-level training halves the embedding width: embed_dim {model.embed_dim} is odd')
        for i, (h, m) in enumerate(zip(widths['num_heads'], widths['mlp_hidden'])):
            if h % 2:
                raise ConfigError(f'block {i} has {h} head{"s" if h != 1 else ""}, which cannot be halved')
            if m % 2:
                raise ConfigError(f'block {i} has MLP hidden width {m}, which is odd and cannot be halved')
    if depth:
        L = len(model.blocks)
        if L < 2 or L % 2:
            why = 'a single block cannot be halved' if L < 2 else 'it is odd'
            raise ConfigError(f'multi-level training halves the depth: depth {L} cannot be halved ({why})')
        for a, b in _depth_pairs(L, pairing):
            wa, wb = ({k: widths[k][i] for k in _WIDTH_KEYS} for i in (a, b))
            if wa != wb:
                raise ConfigError(f'blocks {a} and {b} have different widths ({wa} vs {wb}); depth coalescing '
                                  f'({pairing}) averages them and needs equal widths')


# ---------------------------------------------------------------------------------------------
# tensor maps
# ---------------------------------------------------------------------------------------------

def _halve_axis(t: torch.Tensor, axis: int, mode: str, sizes: list) -> torch.Tensor:
    """C_w on one axis: each section's two halves averaged (OUT) or summed (IN)."""
    parts = []
    for sec in t.split(sizes, dim=axis):
        a, b = sec.chunk(2, dim=axis)
        parts.append((a + b) / 2 if mode == OUT else a + b)
    return torch.cat(parts, dim=axis)


def _double_axis(t: torch.Tensor, axis: int, mode: str, sizes: list) -> torch.Tensor:
    """D_w on one axis: each section repeated twice, as is (OUT) or halved (IN)."""
    parts = []
    for sec in t.split(sizes, dim=axis):
        if mode == IN:
            sec = sec / 2
        parts += [sec, sec]
    return torch.cat(parts, dim=axis)


def _map_width(sd: dict, layout: dict, halve: bool) -> dict:
    op = _halve_axis if halve else _double_axis
    out = {}
    for key, t in sd.items():
        for axis, mode, sizes in layout[key]:
            t = op(t, axis, mode, sizes)
        out[key] = t
    return out


def _depth_pairs(L: int, pairing: str) -> list:
    """The large layers ``(a_i, b_i)`` averaged into small layer i (depth L -> L/2)."""
    half = L // 2
    return [(2 * i, 2 * i + 1) if pairing == 'adjacent' else (i, i + half) for i in range(half)]


def _depth_sources(L: int, pairing: str) -> list:
    """The small layer each large layer copies (depth L -> 2L)."""
    return [i // 2 if pairing == 'adjacent' else i % L for i in range(2 * L)]


def _split_blocks(sd: dict):
    blocks, rest = {}, {}
    for key, t in sd.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            rest[key] = t
    return blocks, rest


def _map_depth(sd: dict, L: int, pairing: str, halve: bool) -> dict:
    blocks, out = _split_blocks(sd)
    if halve:
        for i, (a, b) in enumerate(_depth_pairs(L, pairing)):
            for name, t in blocks[a].items():
                out[f'blocks.{i}.{name}'] = (t + blocks[b][name]) / 2
    else:
        for i, src in enumerate(_depth_sources(L, pairing)):
            for name, t in blocks[src].items():
                out[f'blocks.{i}.{name}'] = t   # load_state_dict copies
    return out


def _rebuild(model: nn.Module, sd: dict, embed_dim: int, widths: dict) -> nn.Module:
    """A fresh deitlab model of ``model``'s architecture with other widths, holding ``sd``."""
    import timm
    from .. import register_models
    from ..rundir import architecture_of
    register_models()
    args = dict(model.model_args)
    args.update(embed_dim=embed_dim, depth=len(widths['num_heads']), **widths)
    p = next(model.parameters())
    new = timm.create_model(architecture_of(model), pretrained=False, num_classes=model.num_classes, **args)
    new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(sd)
    new.pretrained_cfg = dict(model.pretrained_cfg)
    new.train(model.training)
    if hasattr(model, 'distilled_training'):
        new.distilled_training = model.distilled_training
    return new


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def coalesce(model: nn.Module, width: bool = True, depth: bool = True, pairing: str = 'adjacent') -> nn.Module:
    """A new model of half the width and/or depth: ``C_d(C_w(theta))`` (module docstring).

    Width: Linear ``W' = A_out W S_in^T``, ``b' = A_out b``; norms, LayerScale, patch-embedding
    output channels, tokens and ``pos_embed`` averaged; classifier inputs summed. Head count and
    MLP width halve, head widths and softmax scale stay. Depth: small layer i is the average of
    large layers ``(2i, 2i+1)`` ('adjacent') or ``(i, i + L/2)`` ('half')."""
    check_coalescible(model, width, depth, pairing)
    sd = model.state_dict()
    widths = model.block_widths
    D = model.embed_dim
    if width:
        sd = _map_width(sd, _layout(model), halve=True)
        D //= 2
        widths = dict(widths, num_heads=[h // 2 for h in widths['num_heads']],
                      mlp_hidden=[m // 2 for m in widths['mlp_hidden']])
    if depth:
        L = len(model.blocks)
        sd = _map_depth(sd, L, pairing, halve=True)
        keep = [a for a, _ in _depth_pairs(L, pairing)]
        widths = {k: [v[i] for i in keep] for k, v in widths.items()}
    return _rebuild(model, sd, D, widths)


@torch.no_grad()
def decoalesce(model: nn.Module, width: bool = True, depth: bool = True, pairing: str = 'adjacent') -> nn.Module:
    """A new model of double the width and/or depth: ``D_w(D_d(theta))`` (module docstring).

    Depth: large layer i copies small layer ``i // 2`` ('adjacent') or ``i mod L`` ('half'). Width:
    outputs duplicated (index j and j + n/2 get small index j), inputs halved; norms, LayerScale,
    tokens, ``pos_embed`` and patch-embedding output channels duplicated, classifier inputs halved.
    The width map preserves the logits; the depth map does not. ``coalesce`` inverts it exactly."""
    _check_pairing(pairing)
    _check_type(model)
    layout = _layout(model)
    sd = model.state_dict()
    widths = model.block_widths
    D = model.embed_dim
    if width:   # before the depth copy, so that the layout's block indices are the model's own
        sd = _map_width(sd, layout, halve=False)
        D *= 2
        widths = dict(widths, num_heads=[h * 2 for h in widths['num_heads']],
                      mlp_hidden=[m * 2 for m in widths['mlp_hidden']])
    if depth:
        L = len(model.blocks)
        sd = _map_depth(sd, L, pairing, halve=False)
        src = _depth_sources(L, pairing)
        widths = {k: [v[i] for i in src] for k, v in widths.items()}
    return _rebuild(model, sd, D, widths)


def _float_tensors(model: nn.Module) -> dict:
    out = dict(model.named_parameters())
    out.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    return out


@torch.no_grad()
def interpolate(large: nn.Module, mapped: nn.Module, alpha: float = 0.25) -> nn.Module:
    """``theta_large <- (1 - alpha) theta_large + alpha theta_mapped`` in place for every parameter
    and floating buffer (``mapped`` is ``decoalesce(small)``); returns ``large``.

    ``alpha = 0`` leaves ``large`` untouched and ``alpha = 1`` copies ``mapped``, both exactly."""
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
        raise ConfigError(f'multi-level interpolation alpha must be in [0, 1], got {alpha}')
    own, other = _float_tensors(large), _float_tensors(mapped)
    missing = sorted(set(own) ^ set(other))
    if missing:
        raise ConfigError(f'multi-level interpolation needs models with the same tensors; '
                          f'{", ".join(missing[:4])} in only one of them')
    for name, t in own.items():
        if t.shape != other[name].shape:
            raise ConfigError(f'multi-level interpolation needs models of the same shape: {name} is '
                              f'{tuple(t.shape)} in the large model but {tuple(other[name].shape)} in the mapped one')
    if alpha == 0.0:
        return large
    for name, t in own.items():
        src = other[name].to(device=t.device, dtype=t.dtype)
        if alpha == 1.0:
            t.copy_(src)
        else:
            t.lerp_(src, alpha)
    return large
