"""SpectFormer (vanilla): spectral gating blocks first, then attention blocks.

SpectFormer (Patro, Namboodiri, Agneeswaran, "SpectFormer: Frequency and Attention is what you
need in a Vision Transformer", arXiv 2304.06446) mixes tokens with a GFNet-style *spectral
gating* layer in the first ``alpha`` blocks and with multi-head self-attention in the remaining
``depth - alpha`` blocks:

* ``alpha = 0``     every block is timm's attention ``Block``: a plain ViT;
* ``alpha = depth`` every block is a ``SpectralBlock``: GFNet-style, all spectral.

Spectral gating (``SpectralGating``), for patch tokens (B, N, C) on an h x w grid::

    X  = tokens reshaped to (B, h, w, C), in float32
    Xf = rfft2(X, dims=(h, w), norm='ortho')           # (B, h, w//2+1, C), complex
    Xf = Xf * W                                         # W: learnable complex (h, w//2+1, C)
    X  = irfft2(Xf, s=(h, w), norm='ortho')             # back to (B, h, w, C) -> (B, N, C)

``W`` is stored as a real parameter ``weight`` of shape (h, w//2+1, C, 2) (real, imaginary) and
initialised N(0, 0.02^2) as in the released code. With ``W = 1 + 0j`` the layer is the identity.
It is a per-channel circular convolution over the grid with a learned kernel. The grid may be
non-square (h != w): the filter has h rows and w//2+1 columns.

Class token: the vanilla SpectFormer has no class token; it applies the final LayerNorm to all
tokens and averages them (``class_token=False, global_pool='avg', fc_norm=False`` here, which is
timm's ``norm -> mean -> head`` order). ``class_token=True`` is accepted: prefix tokens (class /
register tokens) are not on the grid, so the spectral mixer passes them through unchanged (its
output for a prefix token equals its input) and only the image tokens are filtered; the prefix
tokens are still mixed by the attention blocks and transformed by every MLP.

Spectral block, as the paper describes it (FFT, gating, iFFT, then LayerNorm and an MLP) and as
the released code and GFNet compute it: one residual around filter and MLP,
``x = x + MLP(LN2(SGN(LN1(x))))``. The other MetaFormer mixers (pooling, identity) use the
two-residual form ``x + mixer(LN1(x))``, ``x + MLP(LN2(x))`` of the attention block.

The model is timm's ``VisionTransformer`` with a per-layer ``block_fn``; the registered names are

* ``deitlab_spectformer_{t,xs,s,b}_patch16_224``: the paper's vanilla shapes (D 256/384/384/512,
  depth 12/12/19/19, alpha 4 as released, heads D/64 = 4/6/6/8; no weights).
* ``deitlab_spectformer_{pico,nano,micro}_patch4_32``: the small-image family with the widths
  of ``deitlab_deit_{pico,nano,micro}_patch4_32`` and alpha = round(depth / 3) (1/2/3, the released
  ratio 4/12). They take
  ``img_size=28, in_chans=1`` (7 x 7 grid) for Fashion-MNIST.

Every name takes ``alpha``. The filter size is tied to the grid, so ``dynamic_img_size`` is not
supported; build the model at the input size it will see.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import Block, VisionTransformer

from .deit import SMALL_IMAGE_CONFIGS, json_arch_kwargs, _cfg, _small_cfg
from .inputs import resolve_input_size
from .registry import register_closed_form, register_variant

__all__ = ['SpectralGating', 'GridPooling', 'MixerBlock', 'SpectralBlock', 'SpectFormer', 'parse_mixers', 'MIXERS',
           'spectformer_macs', 'spectral_mixing_macs', 'SPECTFORMER_CONFIGS']


class SpectralGating(nn.Module):
    """GFNet / SpectFormer global filter on an h x w token grid (see the module docstring).

    ``forward(x)`` takes (B, num_prefix_tokens + h*w, C). The first ``num_prefix_tokens`` tokens
    (class / register tokens) are returned unchanged; the rest are filtered in the 2-D Fourier
    domain. The FFTs run in float32 (also under autocast) and the result is cast back to the
    input dtype.
    """

    def __init__(self, dim: int, grid_size: Sequence[int], num_prefix_tokens: int = 0, device=None, dtype=None):
        super().__init__()
        h, w = (int(s) for s in grid_size)
        if h < 1 or w < 1:
            raise ValueError(f'spectral gating needs a grid of at least 1x1 tokens, got {h}x{w}')
        self.dim = dim
        self.grid_size = (h, w)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.weight = nn.Parameter(torch.empty(h, w // 2 + 1, dim, 2, device=device, dtype=dtype))
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02^2) for the real and imaginary parts (timm's ViT init calls this)."""
        with torch.no_grad():
            self.weight.normal_(0., 0.02)

    def set_identity(self) -> None:
        """Set the filter to 1 + 0j: the layer then returns its input."""
        with torch.no_grad():
            self.weight.zero_()
            self.weight[..., 0] = 1.

    @property
    def complex_weight(self) -> torch.Tensor:
        return torch.view_as_complex(self.weight.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h, w = self.grid_size
        p = self.num_prefix_tokens
        if N != p + h * w or C != self.dim:
            raise ValueError(f'spectral gating expects {p} prefix + {h}x{w} grid tokens of width {self.dim}, '
                             f'got {N} tokens of width {C}')
        prefix, tokens = x[:, :p], x[:, p:]
        dtype = x.dtype
        # FFTs in float32 also under autocast (the meta device has no autocast state)
        no_autocast = (contextlib.nullcontext() if x.device.type == 'meta'
                       else torch.autocast(device_type=x.device.type, enabled=False))
        with no_autocast:
            t = tokens.float().reshape(B, h, w, C)
            t = torch.fft.rfft2(t, dim=(1, 2), norm='ortho')
            t = t * self.complex_weight
            t = torch.fft.irfft2(t, s=(h, w), dim=(1, 2), norm='ortho')
        t = t.reshape(B, h * w, C).to(dtype)
        return torch.cat([prefix, t], dim=1) if p else t


class GridPooling(nn.Module):
    """PoolFormer's token mixer on the token grid: ``AvgPool_3x3(X) - X`` (stride 1, padding 1,
    padding not counted), so a constant input gives exactly zero. Prefix tokens are not on the
    grid and get zero."""

    def __init__(self, grid_size: Sequence[int], num_prefix_tokens: int = 0, pool_size: int = 3):
        super().__init__()
        self.grid_size = tuple(int(v) for v in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        (h, w), p = self.grid_size, self.num_prefix_tokens
        if N != p + h * w:
            raise ValueError(f'grid pooling expects {p} prefix + {h}x{w} grid tokens, got {N} tokens')
        grid = x[:, p:].transpose(1, 2).reshape(B, C, h, w)
        mixed = (self.pool(grid) - grid).flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(x[:, :p]), mixed], dim=1) if p else mixed


class MixerBlock(nn.Module):
    """MetaFormer block: ``x + drop_path(mixer(norm1(x)))`` then ``x + drop_path(mlp(norm2(x)))``,
    with any token ``mixer`` (spectral gating, grid pooling, identity)."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4., proj_drop: float = 0.,
                 drop_path: float = 0., norm_layer=nn.LayerNorm, act_layer=nn.GELU, mlp_layer=Mlp,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class SpectralBlock(MixerBlock):
    """GFNet / SpectFormer spectral block: ``x + drop_path(mlp(norm2(SGN(norm1(x)))))``."""

    def __init__(self, dim: int, grid_size: Sequence[int], num_prefix_tokens: int = 0, device=None, dtype=None,
                 **kwargs):
        super().__init__(dim, SpectralGating(dim, grid_size, num_prefix_tokens, device=device, dtype=dtype),
                         device=device, dtype=dtype, **kwargs)

    @property
    def filter(self) -> SpectralGating:
        return self.mixer

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.drop_path1(self.mlp(self.norm2(self.mixer(self.norm1(x)))))


MIXERS = {'a': 'attention', 's': 'spectral gating', 'p': 'pooling', 'i': 'identity'}


def parse_mixers(pattern, depth: int) -> str:
    """``'s,s,a,a'``, ``'ssaa'`` or a list -> ``'ssaa'``; one letter per block from ``MIXERS``."""
    letters = [c for c in (pattern if isinstance(pattern, str) else ''.join(pattern)).replace(',', '').replace(' ', '')]
    bad = sorted(set(letters) - set(MIXERS))
    if bad:
        raise ValueError(f'mixers: unknown token mixer(s) {bad}; use ' +
                         ', '.join(f'{k} ({v})' for k, v in MIXERS.items()))
    if len(letters) != depth:
        raise ValueError(f'mixers: the pattern has {len(letters)} blocks but depth is {depth}')
    return ''.join(letters)


def _fixed_hidden(mlp_layer, hidden: int):
    """``mlp_layer`` building its MLP with ``hidden`` units whatever ``hidden_features`` it is given."""
    def build(*args, hidden_features=None, **kwargs):
        return mlp_layer(*args, hidden_features=hidden, **kwargs)
    return build


class _MixerBlocks:
    """timm's block_fn: block i gets the token mixer ``pattern[i]`` (attention: timm's Block) and,
    when ``mlp_hidden`` is given, an MLP of ``mlp_hidden[i]`` hidden units."""

    def __init__(self, pattern: str, grid_size: Tuple[int, int], num_prefix_tokens: int,
                 mlp_hidden: Optional[Sequence[int]] = None):
        self.pattern = pattern
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.mlp_hidden = mlp_hidden

    def __call__(self, dim, num_heads, depth=0, mlp_ratio=4., proj_drop=0., drop_path=0., norm_layer=nn.LayerNorm,
                 act_layer=nn.GELU, mlp_layer=Mlp, device=None, dtype=None, **kwargs):
        kind = self.pattern[depth]
        if self.mlp_hidden is not None:
            mlp_layer = _fixed_hidden(mlp_layer, self.mlp_hidden[depth])
        common = dict(mlp_ratio=mlp_ratio, proj_drop=proj_drop, drop_path=drop_path, norm_layer=norm_layer,
                      act_layer=act_layer, mlp_layer=mlp_layer, device=device, dtype=dtype)
        if kind == 'a':
            return Block(dim, num_heads, depth=depth, **common, **kwargs)
        if kind == 's':
            return SpectralBlock(dim, self.grid_size, self.num_prefix_tokens, **common)
        mixer = GridPooling(self.grid_size, self.num_prefix_tokens) if kind == 'p' else nn.Identity()
        return MixerBlock(dim, mixer, **common)


class SpectFormer(VisionTransformer):
    """Vanilla SpectFormer: ``alpha`` spectral blocks, then ``depth - alpha`` attention blocks.

    ``mixers`` (a MetaFormer pattern, one letter per block: ``a`` attention, ``s`` spectral
    gating, ``p`` pooling, ``i`` identity; ``'s,s,p,p,a,a'`` or ``'sspp aa'``) replaces ``alpha``
    and builds any mix, e.g. ``--model-kwargs mixers=p,p,s,s,a,a`` on ``deitlab train``.

    A timm ``VisionTransformer`` (patch_embed, pos_embed, blocks, norm, head, forward_features,
    forward_head) whose defaults follow the paper's vanilla model: no class token, final norm on
    all tokens, mean pooling, linear head. ``model_args`` holds what rebuilds it (alpha included).

    ``mlp_hidden`` gives every block its own MLP hidden width (an int for all, or one per block;
    None: ``mlp_ratio * embed_dim`` everywhere), as a model whose MLPs were pruned has
    (``deitlab prune nvit``); ``model_args`` records it when the widths are not uniform.
    """

    def __init__(self, alpha: int = 4, img_size=224, patch_size=16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, class_token: bool = False, global_pool: str = 'avg',
                 fc_norm: Optional[bool] = False, reg_tokens: int = 0, mixers=None,
                 mlp_hidden: Optional[Union[int, Sequence[int]]] = None, **kwargs):
        if mixers is not None:   # a MetaFormer pattern replaces alpha
            mixers = parse_mixers(mixers, depth)
            k = len(mixers) - len(mixers.lstrip('s'))
            alpha = k if mixers == 's' * k + 'a' * (depth - k) else None   # None: not a SpectFormer pattern
        elif isinstance(alpha, bool) or not isinstance(alpha, int):
            raise ValueError(f'alpha (number of spectral blocks) must be an int, got {alpha!r}')
        elif not 0 <= alpha <= depth:
            raise ValueError(f'alpha (number of spectral blocks) must be between 0 and depth={depth}, got {alpha}')
        for key in ('dynamic_img_size', 'dynamic_img_pad'):
            if kwargs.get(key):
                raise ValueError(f'SpectFormer does not support {key}: the spectral filters are sized for one '
                                 f'token grid; build the model with the img_size it will see')
        if kwargs.get('block_fn') is not None:
            raise ValueError('SpectFormer builds its own blocks; block_fn is not accepted')
        mixers = mixers or 's' * alpha + 'a' * (depth - alpha)
        if mlp_hidden is not None:
            mlp_hidden = [int(mlp_hidden)] * depth if isinstance(mlp_hidden, int) else [int(m) for m in mlp_hidden]
            if len(mlp_hidden) != depth or min(mlp_hidden, default=1) < 1:
                raise ValueError(f'mlp_hidden must be a positive int or {depth} of them (one per block), '
                                 f'got {mlp_hidden}')
        arch = json_arch_kwargs(dict(kwargs, alpha=alpha, img_size=img_size, patch_size=patch_size,
                                 embed_dim=embed_dim, depth=depth, num_heads=num_heads, class_token=class_token,
                                 global_pool=global_pool, fc_norm=fc_norm, reg_tokens=reg_tokens))
        img, patch = to_2tuple(img_size), to_2tuple(patch_size)
        grid = (img[0] // patch[0], img[1] // patch[1])
        prefix = (1 if class_token else 0) + reg_tokens
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, class_token=class_token, global_pool=global_pool, fc_norm=fc_norm,
                         reg_tokens=reg_tokens, block_fn=_MixerBlocks(mixers, grid, prefix, mlp_hidden), **kwargs)
        if tuple(self.patch_embed.grid_size) != grid or self.num_prefix_tokens != prefix:
            raise ValueError(f'patch embedding grid {tuple(self.patch_embed.grid_size)} / {self.num_prefix_tokens} '
                             f'prefix tokens differ from the spectral filters\' {grid} / {prefix}')
        self.alpha = alpha
        self.mixers = mixers
        self.arch_kwargs = arch

    @property
    def model_args(self) -> dict:
        """Constructor arguments that rebuild this model (everything but num_classes)."""
        args = {k: v for k, v in self.arch_kwargs.items() if k != 'num_classes'}
        args.update(alpha=self.alpha, mixers=self.mixers, embed_dim=self.embed_dim, depth=len(self.blocks),
                    in_chans=self.patch_embed.proj.in_channels, img_size=list(self.patch_embed.img_size),
                    patch_size=list(self.patch_embed.patch_size))
        if self.mlp_hidden != [int(self.embed_dim * self.arch_kwargs.get('mlp_ratio', 4.))] * len(self.blocks):
            args['mlp_hidden'] = self.mlp_hidden
        return args

    @property
    def mlp_hidden(self) -> List[int]:
        """Hidden width of every block's MLP (``mlp_ratio * embed_dim`` unless pruned)."""
        return [blk.mlp.fc1.out_features for blk in self.blocks]

    def set_fused_attn(self, enable: bool) -> None:
        """Switch every attention between fused SDPA and the explicit softmax (same math)."""
        for m in self.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = enable


# ----------------------------------------------------------------------------- closed-form MACs

def spectral_mixing_macs(h: int, w: int, D: int) -> Tuple[float, int]:
    """``(fft, filter)`` MACs of one spectral gating over an h x w grid of D channels: rfft2 +
    irfft2 as ``2 * D * h*w * log2(h*w)`` (constant 1, GFNet's convention; 0 for one token) and
    the ``h * (w//2+1) * D`` complex products at 4 real MACs each."""
    n = h * w
    return (2 * D * n * math.log2(n) if n > 1 else 0), 4 * h * (w // 2 + 1) * D


def spectformer_macs(model: SpectFormer, input_size: Optional[Sequence[int]] = None) -> dict:
    """Closed-form MACs per image of a ``SpectFormer``, itemised (ints).

    With P the patch size, C_in input channels, N = h*w grid tokens + prefix tokens, D = embed_dim,
    H heads of width d, M the MLP hidden width of the block (its own in a pruned model, see
    ``mlp_hidden``) and K classes:

    ============  =========================================================================
    patch_embed   h*w * C_in * P * P * D
    qkv           per attention block  N * D * 3*H*d
    attn_qk/av    per attention block  H * N * N * d   (each)
    proj          per attention block  N * H*d * D
    mlp           per block (spectral and attention)  2 * N * D * M
    head          D * K   (one pooled vector; N * D * K with global_pool='')
    ============  =========================================================================

    ``total`` is the sum of these matrix products, which is what ``count_gmacs``
    (``FlopCounterMode``) counts: it counts neither FFTs nor element-wise products, and neither
    does ``total``. The spectral mixing is itemised separately and is *not* in ``total``:

    * ``spectral_fft``: per spectral block, rfft2 + irfft2 over the h x w grid for D channels, each
      taken as ``D * h*w * log2(h*w)`` (the O(N log N) per channel cost with constant 1, the
      convention of GFNet / SpectFormer's complexity statements);
    * ``spectral_filter``: per spectral block, ``h * (w//2+1) * D`` complex multiplies at 4 real
      MACs each.

    ``total_with_spectral = total + spectral_fft + spectral_filter``. Norms, GELU, softmax and adds
    are free. Raises ``ValueError`` for another model or an input size the filters do not fit.
    """
    if not isinstance(model, SpectFormer):
        raise ValueError(f'spectformer_macs takes a SpectFormer, not {type(model).__name__}')
    size = resolve_input_size(model, input_size)
    pe = model.patch_embed
    if tuple(size[1:]) != tuple(pe.img_size) or size[0] != pe.proj.in_channels:
        raise ValueError(f'input {tuple(size)} does not fit the model ({pe.proj.in_channels}, '
                         f'{pe.img_size[0]}, {pe.img_size[1]}): the spectral filters are sized for its grid')
    h, w = pe.grid_size
    kh, kw = pe.proj.kernel_size
    D = int(model.embed_dim)
    N = h * w + int(model.num_prefix_tokens)
    parts = dict(patch_embed=h * w * size[0] * kh * kw * D, qkv=0, attn_qk=0, attn_av=0, proj=0, mlp=0, head=0,
                 spectral_fft=0, spectral_filter=0)
    for blk in model.blocks:
        M = blk.mlp.fc1.out_features
        parts['mlp'] += 2 * N * D * M
        if isinstance(blk, SpectralBlock):
            fft, gate = spectral_mixing_macs(h, w, D)
            parts['spectral_fft'] += fft
            parts['spectral_filter'] += gate
        elif isinstance(blk, Block):   # pooling and identity mixers have no matrix products
            attn = blk.attn
            H, d = int(attn.num_heads), int(attn.head_dim)
            parts['qkv'] += N * attn.qkv.in_features * attn.qkv.out_features
            parts['attn_qk'] += H * N * N * d
            parts['attn_av'] += H * N * N * d
            parts['proj'] += N * attn.proj.in_features * attn.proj.out_features
    if isinstance(model.head, nn.Linear):
        pooled = N if model.global_pool == '' else 1
        parts['head'] = pooled * model.head.in_features * model.head.out_features
    parts['spectral_fft'] = int(round(parts['spectral_fft']))
    matmul = ('patch_embed', 'qkv', 'attn_qk', 'attn_av', 'proj', 'mlp', 'head')
    parts['total'] = sum(parts[k] for k in matmul)
    parts['total_with_spectral'] = parts['total'] + parts['spectral_fft'] + parts['spectral_filter']
    parts.update(tokens=N, grid=(h, w), input_size=tuple(size))
    return parts


# ----------------------------------------------------------------------------- registered names

# The paper's vanilla shapes (patch 16, 224 px). The release hard-codes alpha=4 and 6 heads; heads
# here are D/64 so that every width divides.
SPECTFORMER_CONFIGS = {
    't': dict(embed_dim=256, depth=12, num_heads=4, alpha=4),
    'xs': dict(embed_dim=384, depth=12, num_heads=6, alpha=4),
    's': dict(embed_dim=384, depth=19, num_heads=6, alpha=4),
    'b': dict(embed_dim=512, depth=19, num_heads=8, alpha=4),
}
_SMALL = {k: dict(SMALL_IMAGE_CONFIGS[k], alpha=round(SMALL_IMAGE_CONFIGS[k]['depth'] / 3))   # released alpha/L = 1/3
          for k in ('pico', 'nano', 'micro')}

default_cfgs = generate_default_cfgs({
    **{f'deitlab_spectformer_{s}_patch16_224': _cfg() for s in SPECTFORMER_CONFIGS},
    **{f'deitlab_spectformer_{s}_patch4_32': _small_cfg() for s in _SMALL},
})


def _register(size: str, dims: dict, patch: int, img: int):
    return register_variant(
        f'deitlab_spectformer_{size}_patch{patch}_{img}',
        lambda name, pretrained, **kw: build_model_with_cfg(SpectFormer, name, pretrained, **kw),
        dict(img_size=img, patch_size=patch, **dims),
        f'SpectFormer-{size} (vanilla): patch {patch}, {img} px, {dims}; pass alpha= to change it.', __name__)


for _size, _dims in SPECTFORMER_CONFIGS.items():
    _register(_size, _dims, 16, 224)
for _size, _dims in _SMALL.items():
    _register(_size, _dims, 4, 32)

register_closed_form(SpectFormer, spectformer_macs)   # analytic_gmacs / deitlab bench use the closed form
