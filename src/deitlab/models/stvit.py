"""STViT: a semantic-token DeiT, and the STViT-R recover module.

Chang et al., "Making Vision Transformers Efficient from A Token Sparsification View", CVPR 2023
(arXiv 2303.08685). After a few blocks on all image tokens, a handful of *semantic tokens* (cluster
centres) replace the image tokens: they are initialised by spatially pooling the token grid and
refined ("recovered") by attention over the image tokens; every later block runs on them only.

The paper (eqs. 1-3 and 6; P the pooled tokens, G the global cluster centres, X the image tokens)::

    S1 = MHA(P, X, X) + P,              S1 <- FFN(S1) + S1          (STGM, layer 1)
    S2 = MHA(S1 + G, [S1;X], [S1;X]) + S1,  S2 <- FFN(S2) + S2      (STGM, layer 2)
    X' = MHA(X, S, S) + X,              X' <- FFN(X') + X'          (STViT-R recover)

What the paper reports for DeiT (supplement §A.1 and Tables 1, 7, 8, as summarised by a public
reading of the paper; the DeiT code was never released): a 14x14 grid, 4 blocks on all tokens, a
two-layer STGM, 6 blocks on 4x4 = 16 semantic tokens; FLOPs -58% at equal top-1 for DeiT-T/S/B
(DeiT-S 1.91 G); G is learned and Gaussian-initialised, and both initialisations matter (DeiT-S:
pooling only 79.4, G only 78.7, both 79.8); semantic tokens need no position embedding; the head
global-average-pools the last tokens. Its pooling is a learned weighted pooling per window (the
released Swin code uses adaptive max).

This module (one refinement block does eq. 2 with S1 := P, so pooling is the eq.-1 step)::

    X  = blocks[:k]([CLS; patches])[prefix:]            image tokens on an h x w grid
    P  = AdaptivePool_{g x g}(X)                        M = g*g semantic tokens ('avg' or 'max')
    Z  = P + G                                          G: (M, C), one centre per semantic token
    Z' = Z + Attn(LN(Z), LN([P; X]))                    queries: semantic; keys/values: semantic u image
    S  = Z' + MLP(LN(Z'))                               (pre-norm, LayerScale / drop-path as the blocks)
    logits = head(norm(blocks[k:]([CLS; S]))[CLS])      M + 1 tokens from here on

``forward_dense`` (STViT-R, built with ``stvit_recover=True``) returns the image-token map restored
from the final semantic tokens S_L: ``X_R = X' + MLP(LN(X'))``, ``X' = X + Attn(LN(X), LN(S_L))``.

Choices where the paper is silent or this module differs:

* the refinement block is *added*: the model keeps all ``depth`` DeiT blocks (k before, depth - k
  after) plus one refinement block, so a trained DeiT maps onto it tensor for tensor
  (``stvit_from_deit``); default k = 4 for 12-block models, as in the paper (DeiT-S: 1.90 GMACs,
  -58.6%, counting matrix products only);
* pooling is parameter-free adaptive pooling (default 'avg', the uniform case of the paper's
  weighted pooling; 'max' as in the released Swin code); semantic tokens get no position embedding;
* G enters the refinement block's input on the query side (and so its residual, as in the
  released code), not the keys; trunc-normal(0.02) from scratch, zeros when fine-tuning a DeiT;
* the head reads CLS as in DeiT (distilled: CLS and DIST); ``global_pool='avg'`` averages the
  semantic tokens as the paper does; CLS is not a key of the refinement block;
* small-image family (7x7 or 8x8 grids): 3x3 semantic tokens, k = round(depth / 3);
* STViT-R here is one recover block at the end (the paper repeats compress/recover "dumbbell"
  units inside Swin stages).

Pooling to the full grid reproduces the image tokens exactly (``P = X``); with G = 0 the
refinement attention over ``[X; X]`` then equals self-attention over X (duplicated keys cancel).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..layers import CrossBlock
from ..layers.block import block_macs
from .deit import SMALL_IMAGE_CONFIGS, WidthMixin, install_block_factory, json_arch_kwargs
from .inputs import resolve_input_size
from .registry import register_variant

__all__ = ['STViT', 'STViTDistilled', 'stvit_from_deit', 'stvit_filter_fn', 'stvit_macs',
           'STVIT_DEFAULTS']

POOL_TYPES = ('avg', 'max')
# name -> (dims, insertion layer k, semantic grid g)
STVIT_DEFAULTS = {
    'tiny': (dict(embed_dim=192, depth=12, num_heads=3), 4, 4),
    'small': (dict(embed_dim=384, depth=12, num_heads=6), 4, 4),
    'base': (dict(embed_dim=768, depth=12, num_heads=12), 4, 4),
    **{size: (dims, round(dims['depth'] / 3), 3) for size, dims in SMALL_IMAGE_CONFIGS.items()},
}


def _grid(value) -> tuple:
    g = (value, value) if isinstance(value, int) else tuple(value)
    if len(g) != 2 or not all(isinstance(v, int) and v >= 1 for v in g):
        raise ValueError(f'stvit_grid must be a positive int or two positive ints (rows, cols), got {value!r}')
    return g


class _STViTMixin:
    """Builds the DeiT (per-block widths, as deitlab's DeiT) and adds the semantic-token step."""

    def __init__(self, stvit_layer: int = 4, stvit_grid: Union[int, Sequence[int]] = 4, stvit_pool: str = 'avg',
                 stvit_recover: bool = False, **kwargs):
        if stvit_pool not in POOL_TYPES:
            raise ValueError(f'stvit_pool must be one of {POOL_TYPES}, got {stvit_pool!r}')
        if kwargs.get('patch_drop_rate'):
            raise ValueError('STViT pools the full token grid; patch_drop_rate must be 0')
        grid = _grid(stvit_grid)
        arch = json_arch_kwargs(kwargs)
        install_block_factory(kwargs)
        super().__init__(**kwargs)
        self.arch_kwargs = arch
        depth = len(self.blocks)
        if not (isinstance(stvit_layer, int) and 0 <= stvit_layer < depth):
            raise ValueError(f'stvit_layer={stvit_layer!r} is out of range: the semantic tokens go in before one '
                             f'of the blocks 0..{depth - 1} (depth {depth})')
        gh, gw = self.patch_embed.grid_size
        if grid[0] > gh or grid[1] > gw:
            raise ValueError(f'stvit_grid {grid[0]}x{grid[1]} asks for more semantic tokens than image tokens: '
                             f'the patch grid is {gh}x{gw}')
        self.stvit_layer, self.stvit_grid, self.stvit_pool = stvit_layer, grid, stvit_pool
        dev = self.pos_embed.device if self.pos_embed is not None else None
        self.global_centers = nn.Parameter(torch.zeros(1, grid[0] * grid[1], self.embed_dim, device=dev))
        trunc_normal_(self.global_centers, std=.02)
        self.refine = CrossBlock.like(self.blocks[stvit_layer])
        self.recover = CrossBlock.like(self.blocks[-1]) if stvit_recover else None

    @property
    def num_semantic_tokens(self) -> int:
        return self.stvit_grid[0] * self.stvit_grid[1]

    @property
    def model_args(self) -> dict:
        args = super().model_args
        args.update(stvit_layer=self.stvit_layer, stvit_grid=list(self.stvit_grid), stvit_pool=self.stvit_pool,
                    stvit_recover=self.recover is not None)
        return args

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return super().no_weight_decay() | {'global_centers'}

    def _run(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def _embed(self, x: torch.Tensor):
        """Patch embed and prefix tokens: (tokens, grid)."""
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)
        if grid[0] < self.stvit_grid[0] or grid[1] < self.stvit_grid[1]:
            raise ValueError(f'input gives a {grid[0]}x{grid[1]} token grid, smaller than the '
                             f'{self.stvit_grid[0]}x{self.stvit_grid[1]} semantic tokens')
        return self.norm_pre(self.patch_drop(self._pos_embed(x))), grid

    def _image_tokens(self, x: torch.Tensor):
        """Patch embed, prefix tokens, the first k blocks: (prefix tokens, image tokens, grid)."""
        x, grid = self._embed(x)
        x = self._run(self.blocks[:self.stvit_layer], x)
        n = self.num_prefix_tokens
        return x[:, :n], x[:, n:], grid

    def semantic_tokens(self, img: torch.Tensor, grid: tuple) -> torch.Tensor:
        """Pool the image tokens (B, h*w, C) to g x g, add G, refine: (B, g*g, C)."""
        B, N, C = img.shape
        fmap = img.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        pool = F.adaptive_avg_pool2d if self.stvit_pool == 'avg' else F.adaptive_max_pool2d
        p = pool(fmap, self.stvit_grid).flatten(2).transpose(1, 2)
        return self.refine(p + self.global_centers, torch.cat([p, img], dim=1))

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError('STViT changes the token set mid-network; attention masks are not supported')
        prefix, img, grid = self._image_tokens(x)
        x = torch.cat([prefix, self.semantic_tokens(img, grid)], dim=1)
        return self.norm(self._run(self.blocks[self.stvit_layer:], x))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """STViT-R: the image-token map (B, C, h, w) restored from the final semantic tokens by
        cross-attention (image tokens query, semantic tokens are keys/values), before the final norm."""
        if self.recover is None:
            raise RuntimeError('this STViT has no recover block; build it with stvit_recover=True')
        prefix, img, grid = self._image_tokens(x)
        s = self._run(self.blocks[self.stvit_layer:], torch.cat([prefix, self.semantic_tokens(img, grid)], dim=1))
        out = self.recover(img, s[:, self.num_prefix_tokens:])
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], grid[0], grid[1])

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """timm's feature interface: the outputs of the blocks ``indices`` (an int n: the last n;
        None: all), prefix tokens split off. Blocks before ``stvit_layer`` hold the h x w image
        tokens, the later ones the g x g semantic tokens (``stvit_grid``), which the pooling lays out
        on a grid too: in ``NCHW`` the maps are (B, C, h, w) and then (B, C, g, g). Returns
        ``(final features, intermediates)`` (the final norm applied, as ``forward_features``), or the
        intermediates alone; with ``return_prefix_tokens`` each intermediate is ``(tokens, prefix)``."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        n, out = self.num_prefix_tokens, []
        for i, blk in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            if i == self.stvit_layer:
                x = torch.cat([x[:, :n], self.semantic_tokens(x[:, n:], grid)], dim=1)
            x = blk(x)
            if i in take:
                y = self.norm(x) if norm else x
                tokens = y[:, n:]
                if output_fmt == 'NCHW':
                    h, w = grid if i < self.stvit_layer else self.stvit_grid
                    tokens = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                out.append((tokens, y[:, :n]) if return_prefix_tokens else tokens)
        return out if intermediates_only else (self.norm(x), out)


class STViT(_STViTMixin, WidthMixin, VisionTransformer):
    """Semantic-token DeiT: ``[CLS, patches]`` for k blocks, then ``[CLS, semantic tokens]``."""


class STViTDistilled(_STViTMixin, WidthMixin, VisionTransformerDistilled):
    """Distilled STViT: ``[CLS, DIST, patches]``, then ``[CLS, DIST, semantic tokens]``; two heads."""


# ----------------------------------------------------------------------------- DeiT -> STViT

def stvit_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map a DeiT state dict onto ``model`` (an STViT): every DeiT tensor keeps its name (the
    position embedding is resampled if the grid differs), the refinement block takes the weights
    of DeiT block ``stvit_layer``, G is zero, and a recover block keeps the model's own weights.
    An STViT state dict (it has ``refine.*``) passes through unchanged."""
    if any(k.startswith('refine.') for k in state_dict):
        return state_dict
    sd = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    src = f'blocks.{model.stvit_layer}.'
    for name in model.refine.state_dict():
        if src + name not in sd:
            raise ValueError(f'checkpoint has no {src + name} to initialise the refinement block from '
                             f'(is it a DeiT with at least {model.stvit_layer + 1} blocks?)')
        sd['refine.' + name] = sd[src + name].clone()
    sd['global_centers'] = torch.zeros_like(model.global_centers, device='cpu')
    if model.recover is not None:
        sd.update({'recover.' + k: v.detach().clone() for k, v in model.recover.state_dict().items()})
    return sd


def stvit_from_deit(deit_model: nn.Module, **stvit_kwargs) -> nn.Module:
    """An STViT holding every tensor of a trained DeiT (deitlab DeiT or a timm ViT/DeiT), with the
    refinement block copied from the DeiT block at the insertion point and G = 0, ready to fine-tune.

    ``stvit_kwargs``: ``stvit_layer``, ``stvit_grid``, ``stvit_pool``, ``stvit_recover`` (defaults:
    those of the matching ``deitlab_stvit_*`` name). Same device, dtype and train/eval mode.
    """
    import timm
    from .deit import DeiT, DeiTDistilled, from_timm

    if isinstance(deit_model, _STViTMixin):
        raise ValueError('stvit_from_deit takes a DeiT, and this model is already an STViT')
    if not isinstance(deit_model, (DeiT, DeiTDistilled)):
        deit_model = from_timm(deit_model)
    distilled = isinstance(deit_model, DeiTDistilled)
    arch = (getattr(deit_model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    name = arch.replace('deitlab_deit_', 'deitlab_stvit_', 1)
    if not arch.startswith('deitlab_deit_') or not timm.is_model(name):
        name = f'deitlab_stvit_base{"_distilled" if distilled else ""}_patch16_224'
    args = dict(deit_model.model_args, num_classes=deit_model.num_classes)
    args.update(stvit_kwargs)
    p = next(deit_model.parameters())
    model = timm.create_model(name, pretrained=False, **args).to(device=p.device, dtype=p.dtype)
    sd = stvit_filter_fn({k: v.detach() for k, v in deit_model.state_dict().items()}, model)
    model.load_state_dict(sd)
    model.pretrained_cfg = dict(getattr(deit_model, 'pretrained_cfg', None) or {}, architecture=name)
    model.train(deit_model.training)
    return model


# ----------------------------------------------------------------------------- MACs

def _cross_macs(nq: int, nk: int, D: int, H: int, dq: int, dv: int, M: int) -> int:
    return (nq * D * H * dq + nk * D * H * (dq + dv) + H * nq * nk * (dq + dv)
            + nq * H * dv * D + 2 * nq * D * M)


def stvit_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> dict:
    """Closed-form MACs per image of an STViT forward (matmul convention: convolutions and
    matrix products only, as ``deitlab.bench.count_gmacs`` counts them; pooling, norms, softmax and
    adds are free). With N image tokens, n prefix tokens, M = g*g semantic tokens and
    ``block_macs`` per block: patch embed + blocks[:k] on N + n tokens + the refinement block
    (M queries; N + M keys/values) + blocks[k:] on M + n tokens + head(s). Returns the parts
    (``patch_embed``, ``full_blocks``, ``refine``, ``semantic_blocks``, ``head``) and ``total``."""
    if not isinstance(model, _STViTMixin):
        raise ValueError(f'stvit_macs counts STViT models, not {type(model).__name__}')
    if getattr(model, 'attn_pool', None) is not None:
        raise ValueError('stvit_macs does not model attention pooling (global_pool="map"); use count_gmacs')
    C, h, w = resolve_input_size(model, input_size)
    conv = model.patch_embed.proj
    gh, gw = h // conv.stride[0], w // conv.stride[1]
    N, n, D, M = gh * gw, model.num_prefix_tokens, model.embed_dim, model.num_semantic_tokens
    kh, kw = conv.kernel_size

    def widths(blk):
        return blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim, blk.mlp.fc1.out_features

    def blocks(blks, tokens):
        return sum(sum(block_macs(tokens, D, *widths(b)).values()) for b in blks)

    k = model.stvit_layer
    head_tokens = M + n if getattr(model, 'global_pool', 'token') == '' else 1
    heads = [model.head] + ([model.head_dist] if isinstance(model, VisionTransformerDistilled) else [])
    parts = dict(
        patch_embed=N * conv.in_channels * kh * kw * D,
        full_blocks=blocks(model.blocks[:k], N + n),
        refine=_cross_macs(M, N + M, D, *widths(model.refine)),
        semantic_blocks=blocks(model.blocks[k:], M + n),
        head=sum(head_tokens * D * hd.out_features for hd in heads if isinstance(hd, nn.Linear)),
    )
    parts['total'] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- registration

def _cfg(small: bool, distilled: bool) -> dict:
    cfg = dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=.9,
               interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv='patch_embed.proj', classifier='head', license='apache-2.0')
    if small:
        cfg.update(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear',
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if distilled:
        cfg['classifier'] = ('head', 'head_dist')
    return cfg


def _register(size: str, patch: int, img: int, distilled: bool) -> None:
    dims, layer, grid = STVIT_DEFAULTS[size]
    cls = STViTDistilled if distilled else STViT
    register_variant(
        _name(size, patch, img, distilled),
        lambda name, pretrained, **kw: build_model_with_cfg(cls, name, pretrained, pretrained_filter_fn=stvit_filter_fn,
                                                            **kw),
        dict(img_size=img, patch_size=patch, stvit_layer=layer, stvit_grid=grid, **dims),
        f'STViT-{size}{" distilled" if distilled else ""}: patch {patch}, {img} px, {dims}, '
        f'{grid}x{grid} semantic tokens before block {layer}.', __name__)


def _name(size: str, patch: int, img: int, distilled: bool) -> str:
    return f'deitlab_stvit_{size}{"_distilled" if distilled else ""}_patch{patch}_{img}'


_FAMILIES = [(s, 16, 224, d) for s in ('tiny', 'small', 'base') for d in (False, True)]
_FAMILIES += [(s, 4, 32, d) for s in SMALL_IMAGE_CONFIGS for d in (False, True)]
default_cfgs = generate_default_cfgs({_name(*f): _cfg(f[1] == 4, f[3]) for f in _FAMILIES})
for _f in _FAMILIES:
    _register(*_f)
