"""Hierarchical SpectFormer (SpectFormer-H): spectral stages first, then attention stages.

SpectFormer (Patro, Namboodiri, Agneeswaran, "SpectFormer: Frequency and Attention is what you
need in a Vision Transformer", arXiv 2304.06446) also comes as a four-stage pyramid (built on
WaveViT's skeleton). The token mixer of the first ``num_spectral_stages`` stages (2 in the paper)
is the spectral gating network (SGN); the other stages use multi-head self-attention. For tokens
X (B, N, C) on an h x w grid the SGN is::

    X <- iFFT2( W ⊙ FFT2(X) )        FFT2 = rfft2 over (h, w), norm='ortho'; W: (h, w//2+1, C) complex

i.e. a learned per-channel circular convolution over the whole grid (``SpectralGating`` of
``deitlab.models.spectformer``, reused as is: the released H model has the same filter layout,
real tensor (h, w//2+1, C, 2), init N(0, 0.02^2)). With W = 1 + 0j it is the identity.

Network, for an H x W input (shapes at 224 px for H-S)::

    stem        conv k7 s2 (no bias) BN ReLU, 2 x [conv k3 s1 BN ReLU], conv k3 s2 + LayerNorm  -> 56x56
    stage i     (i > 0) conv k3 s2 p1 + LayerNorm (downsampling)                   -> 28, 14, 7
                depth_i blocks:  X = X + DropPath(Mixer(LN(X)))
                                 X = X + DropPath(FFN(LN(X)))
                Mixer = SGN (spectral stages) or MHSA (attention stages, full, no spatial reduction)
                FFN   = PVTv2's fc1 -> depthwise conv 3x3 -> GELU -> fc2   (hidden = mlp_ratio_i * C_i)
                stages 1..3 end with a LayerNorm
    class token x_cls = mean of the last stage's tokens (not a learned parameter), prepended
    class attention (CaiT, ``cls_attn_blocks`` of them, 1 in the paper):
                x_cls = x_cls + CA(LN([x_cls, X]))     (query: class token; keys / values: all tokens)
                x_cls = x_cls + MLP(LN(x_cls))         (plain MLP; patch tokens pass unchanged)
    LayerNorm on all tokens; head on x_cls; token-labelling aux head on every patch token.

Unlike the vanilla SpectFormer's spectral block (one residual around LN, SGN, LN, MLP), the
hierarchical block is the MetaFormer two-residual block for both mixers, as released.

Class token: the spectral stages (and the attention stages) see only grid tokens; the class token
exists only from the class-attention block(s) on. Non-square inputs work: every stage grid is
computed from ``img_size`` = (H, W) by the convolution arithmetic, and each filter has h_i rows
and w_i//2+1 columns. The filters are sized for one input size, so ``dynamic_img_size`` is
rejected and, with spectral stages, another input size raises a ValueError. LayerNorm eps is
1e-6 in the blocks, stage ends and class blocks and 1e-5 after the stem / downsampling convs,
as released.

Token labelling (LV-ViT; ``token_label=True``, the released default): ``aux_head`` classifies
every last-stage patch token, and the released inference logits are
``head(x_cls) + 0.5 * max_over_tokens(aux_head(X))``. ``forward`` returns these logits in train
and eval mode (deitlab's trainer takes one tensor; the aux head is then trained through the max);
``forward_dense`` returns ``(head(x_cls), aux_head(X))`` for a token-labelling loss.

Where this differs from the released code (filters sized from ``img_size``, MixToken left to the
recipe, timm's ``ClassAttn`` with split k / v, full attention in every attention stage) and how a
released checkpoint maps onto it (same eval logits to 2e-6): ``docs/spectformer_h.md``. The
README's GFLOPs (3.9 / 6.3 / 12.7) leave out the attention matrix products q.k and a.v; see
``spectformer_h_macs``.

Registered names (no weights): ``deitlab_spectformer_h_{s,b,l}_224`` (released shapes) and
``deitlab_spectformer_h_{pico,nano}_32`` for 28-32 px inputs, whose stem's first conv has stride 1
(k3) so the stages see 14/7/4/2 px at 28 px (16/8/4/2 at 32 px) instead of 7/4/2/1.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.cait import ClassAttn
from timm.models.pvt_v2 import Attention as GridAttention
from timm.models.pvt_v2 import MlpWithDepthwiseConv

from .inputs import resolve_input_size
from .registry import register_closed_form, register_variant
from .spectformer import SpectralGating, spectral_mixing_macs

__all__ = ['SpectFormerH', 'SpectFormerHBlock', 'ClassAttentionBlock', 'spectformer_h_macs', 'stage_grids',
           'SPECTFORMER_H_CONFIGS', 'SMALL_IMAGE_CONFIGS']

Grid = Tuple[int, int]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_grids(img_size, stem_kernel: int = 7, stem_stride: int = 2, num_stages: int = 4) -> Tuple[Grid, List[Grid]]:
    """(grid of the stem's hidden convs, [token grid of each stage]) for an (H, W) input."""
    h, w = to_2tuple(img_size)
    p = stem_kernel // 2
    stem = (_conv_out(h, stem_kernel, stem_stride, p), _conv_out(w, stem_kernel, stem_stride, p))
    grids = [(_conv_out(stem[0], 3, 2, 1), _conv_out(stem[1], 3, 2, 1))]
    for _ in range(num_stages - 1):
        grids.append((_conv_out(grids[-1][0], 3, 2, 1), _conv_out(grids[-1][1], 3, 2, 1)))
    return stem, grids


def _check_pool(global_pool: Optional[str]) -> None:
    if global_pool not in (None, 'token'):
        raise ValueError(f"SpectFormerH pools with its class token: global_pool must be 'token', got {global_pool!r}")


class Stem(nn.Module):
    """WaveViT / SpectFormer-H stem: conv kxk stride s (no bias) + BN + ReLU, two conv 3x3 + BN + ReLU,
    then a conv 3x3 stride 2 projection to tokens and a LayerNorm."""

    def __init__(self, in_chans: int, hidden: int, dim: int, kernel: int = 7, stride: int = 2):
        super().__init__()
        layers = []
        for i in range(3):
            k, s = (kernel, stride) if i == 0 else (3, 1)
            layers += [nn.Conv2d(in_chans if i == 0 else hidden, hidden, k, s, k // 2, bias=False),
                       nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        x = self.proj(self.conv(x))
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class Downsample(nn.Module):
    """Tokens on an h x w grid -> conv 3x3 stride 2 -> LayerNorm, on the ceil(h/2) x ceil(w/2) grid."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, Grid]:
        B, N, C = x.shape
        x = self.proj(x.transpose(1, 2).reshape(B, C, grid[0], grid[1]))
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class SpectFormerHBlock(nn.Module):
    """``x + DropPath(mixer(LN(x)))`` then ``x + DropPath(FFN(LN(x)))`` with FFN = PVTv2's MLP with a
    depthwise conv. ``mixer`` is ``SpectralGating`` (``spectral=True``) or full MHSA (timm's PVTv2
    ``Attention`` with sr_ratio 1, i.e. separate q and kv projections, as released)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid_size: Grid, spectral: bool,
                 drop_path: float = 0., proj_drop: float = 0., attn_drop: float = 0., norm_layer=nn.LayerNorm):
        super().__init__()
        self.spectral = spectral
        self.norm1 = norm_layer(dim)
        if spectral:
            self.mixer = SpectralGating(dim, grid_size)
        else:
            self.mixer = GridAttention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def mix(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The token mixer alone, on already normalised tokens."""
        return self.mixer(x) if self.spectral else self.mixer(x, grid)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.drop_path1(self.mix(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x), grid))


class ClassAttentionBlock(nn.Module):
    """CaiT class-attention block without LayerScale (as released): only the class token (index 0)
    is updated, ``c = c + CA(LN([c, X]))``, ``c = c + MLP(LN(c))``; the patch tokens pass through."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttn(dim, num_heads, qkv_bias=True)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class Stage(nn.Module):
    """Optional downsampling, then the blocks on one h x w grid, then the stage's end norm."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module], norm: nn.Module, grid: Grid):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.grid_size = grid

    def forward(self, x: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, Grid]:
        if self.downsample is not None:
            x, grid = self.downsample(x, grid)
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(x), grid


class SpectFormerH(nn.Module):
    """Hierarchical SpectFormer (see the module docstring for the equations and the layout).

    ``num_spectral_stages`` (default 2, the paper's) leading stages use spectral gating, the rest
    attention: 0 is all attention, ``len(depths)`` all spectral. ``cls_attn_blocks`` class-attention
    blocks (default 1) follow the last stage. ``token_label`` adds the aux head (inference logits
    ``head(x_cls) + aux_weight * max_tokens(aux_head(X))``). ``img_size`` (int or (H, W)) sizes the
    spectral filters; with spectral stages the model only takes that input size (an all-attention
    model takes any). ``model_args`` rebuilds the model.
    """

    def __init__(
            self,
            img_size=224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            stem_hidden_dim: int = 32,
            stem_kernel: int = 7,
            stem_stride: int = 2,
            embed_dims: Sequence[int] = (64, 128, 320, 448),
            num_heads: Sequence[int] = (2, 4, 10, 14),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_spectral_stages: int = 2,
            cls_attn_blocks: int = 1,
            token_label: bool = True,
            aux_weight: float = 0.5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
    ):
        super().__init__()
        if dynamic_img_size:
            raise ValueError('SpectFormerH does not support dynamic_img_size: the spectral filters are sized for '
                             'one token grid per stage; build the model with the img_size it will see')
        embed_dims, num_heads = [int(v) for v in embed_dims], [int(v) for v in num_heads]
        depths = [int(v) for v in depths]
        mlp_ratios = [float(v) if float(v) != int(v) else int(v) for v in mlp_ratios]
        stages = len(depths)
        if not stages or not len(embed_dims) == len(num_heads) == len(mlp_ratios) == stages:
            raise ValueError(f'depths {depths}, embed_dims {embed_dims}, num_heads {num_heads} and mlp_ratios '
                             f'{mlp_ratios} must have one entry per stage')
        for d, h in zip(embed_dims, num_heads):
            if h < 1 or d % h:
                raise ValueError(f'embed dim {d} is not divisible by {h} heads')
        if isinstance(num_spectral_stages, bool) or not isinstance(num_spectral_stages, int) \
                or not 0 <= num_spectral_stages <= stages:
            raise ValueError(f'num_spectral_stages must be an int between 0 and {stages} (the number of stages), '
                             f'got {num_spectral_stages!r}')
        if isinstance(cls_attn_blocks, bool) or not isinstance(cls_attn_blocks, int) or cls_attn_blocks < 0:
            raise ValueError(f'cls_attn_blocks must be an int >= 0, got {cls_attn_blocks!r}')
        _check_pool(global_pool)
        self.img_size = tuple(int(v) for v in to_2tuple(img_size))
        self.stem_grid, grids = stage_grids(self.img_size, stem_kernel, stem_stride, stages)
        if min(min(g) for g in grids) < 1 or min(self.stem_grid) < 1:
            raise ValueError(f'img_size {self.img_size} is too small: stage grids {grids}')
        self.grid_sizes = grids
        self.in_chans = int(in_chans)
        self.num_classes = int(num_classes)
        self.global_pool = 'token'
        self.num_spectral_stages = num_spectral_stages
        self.aux_weight = float(aux_weight)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        self.arch_kwargs = dict(
            stem_hidden_dim=int(stem_hidden_dim), stem_kernel=int(stem_kernel), stem_stride=int(stem_stride),
            embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths,
            num_spectral_stages=num_spectral_stages, cls_attn_blocks=cls_attn_blocks, token_label=bool(token_label),
            aux_weight=self.aux_weight, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)   # noqa: E731  (blocks, stage ends, class blocks)

        self.stem = Stem(in_chans, stem_hidden_dim, embed_dims[0], stem_kernel, stem_stride)
        dpr = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]   # linear rule
        self.stages = nn.ModuleList()
        for i in range(stages):
            blocks = [SpectFormerHBlock(embed_dims[i], num_heads[i], mlp_ratios[i], grids[i],
                                        spectral=i < num_spectral_stages, drop_path=dpr[sum(depths[:i]) + j],
                                        proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer)
                      for j in range(depths[i])]
            self.stages.append(Stage(Downsample(embed_dims[i - 1], embed_dims[i]) if i else None, blocks,
                                     norm_layer(embed_dims[i]) if i < stages - 1 else nn.Identity(), grids[i]))
        self.cls_blocks = nn.ModuleList([ClassAttentionBlock(embed_dims[-1], num_heads[-1], mlp_ratios[-1], norm_layer)
                                         for _ in range(cls_attn_blocks)])
        self.norm = norm_layer(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.token_label = bool(token_label)
        self.head = self.aux_head = None
        self.reset_classifier(num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """As released: Linear trunc-normal(0.02), LayerNorm (1, 0), conv normal(0, sqrt(2 / fan_out)).
        The spectral filters keep SpectralGating's N(0, 0.02^2)."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0., math.sqrt(2. / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def model_args(self) -> dict:
        """Constructor arguments that rebuild this model (everything but num_classes)."""
        return dict(self.arch_kwargs, in_chans=self.in_chans, img_size=list(self.img_size))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        _check_pool(global_pool)
        self.num_classes = int(num_classes)
        dim = self.num_features
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(dim, num_classes) if num_classes > 0 and self.token_label else None
        for m in (self.head, self.aux_head):
            if isinstance(m, nn.Linear):
                self._init_weights(m)

    def set_fused_attn(self, enable: bool) -> None:
        """Switch every attention between fused SDPA and the explicit softmax (same math)."""
        for m in self.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = enable

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or (self.num_spectral_stages and
                                                         tuple(x.shape[2:]) != self.img_size):
            raise ValueError(f'SpectFormerH was built for ({self.in_chans}, {self.img_size[0]}, {self.img_size[1]}) '
                             f'inputs (its spectral filters are sized for that grid), got {tuple(x.shape)}; '
                             f'build it with img_size=/in_chans= for this input')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, 1 + h*w, D): class token first, then the last
        stage's h x w patch tokens."""
        self._check_input(x)
        x, grid = self.stem(x)
        for stage in self.stages:
            x, grid = stage(x, grid)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)   # class token = mean of the patch tokens
        for blk in self.cls_blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits ``head(x_cls) + aux_weight * max_tokens(aux_head(X))`` (just ``head(x_cls)``
        without the aux head); ``pre_logits=True`` returns the class token's features."""
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        out = self.head(cls)
        if self.aux_head is not None:
            out = out + self.aux_weight * self.aux_head(x[:, 1:]).amax(dim=1)
        return out

    def forward_dense(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(head(x_cls) (B, K), aux_head(X) (B, h*w, K) or None)``: the two outputs token labelling trains."""
        x = self.forward_features(x)
        cls = self.head(self.head_drop(x[:, 0]))
        return cls, (self.aux_head(x[:, 1:]) if self.aux_head is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- closed-form MACs

def spectformer_h_macs(model: SpectFormerH, input_size: Optional[Sequence[int]] = None) -> dict:
    """Closed-form MACs per image of a ``SpectFormerH``, itemised (ints).

    Convolutions count ``out_elements * in_ch / groups * kh * kw`` and a linear layer on N tokens
    ``N * in * out`` (FlopCounterMode's convention). With stage i of width D_i, MLP hidden width
    M_i, H_i heads of width d_i on an h_i x w_i grid (N_i tokens), N' = 1 + N_last and K classes:

    ==========  ===========================================================================
    stem        conv kxk, 2 x conv 3x3 at the stem's grid, projection 3x3 to D_0 on grid 0
    downsample  N_i * 9 * D_{i-1} * D_i  (i > 0)
    qkv / proj  per attention block  3 * N_i * D_i^2  /  N_i * D_i^2
    attn_qk/av  per attention block  H_i * N_i^2 * d_i  (each)
    mlp         per block  2 * N_i * D_i * M_i;  ``dwconv`` per block  9 * N_i * M_i
    cls_attn    per class block  q D^2, k and v 2 N' D^2, q.k and a.v 2 N' D, proj D^2
    cls_mlp     per class block  2 * D * M_last
    head        D * K;  ``aux_head`` N_last * D * K
    ==========  ===========================================================================

    ``total`` sums these and equals what ``count_gmacs`` counts (norms, BN, activations, adds,
    FFTs and element-wise products are free). The spectral mixing is itemised but *not* in
    ``total``, as in ``spectformer_macs``: ``spectral_fft`` = per spectral block
    ``2 * D * h*w * log2(h*w)`` (rfft2 + irfft2), ``spectral_filter`` = per spectral block
    ``4 * h * (w//2+1) * D`` (complex products); ``total_with_spectral`` adds them.
    Raises ``ValueError`` for another model or an input size the filters do not fit.

    At 224 px ``total`` is 4.07 / 6.61 / 13.20 G for H-S / H-B / H-L; ``total - attn_qk - attn_av``
    (3.91 / 6.31 / 12.67 G) is the release README's 3.9 / 6.3 / 12.7 "GFLOPs", which a
    module-hook counter gives (it does not see the attention's functional matmuls).
    """
    if not isinstance(model, SpectFormerH):
        raise ValueError(f'spectformer_h_macs takes a SpectFormerH, not {type(model).__name__}')
    size = resolve_input_size(model, input_size)
    if size[0] != model.in_chans or (model.num_spectral_stages and tuple(size[1:]) != model.img_size):
        raise ValueError(f'input {tuple(size)} does not fit the model ({model.in_chans}, {model.img_size[0]}, '
                         f'{model.img_size[1]}): the spectral filters are sized for its grids')
    args = model.model_args
    k, s, hid = args['stem_kernel'], args['stem_stride'], args['stem_hidden_dim']
    stem_grid, grids = stage_grids(size[1:], k, s, len(model.stages))
    sg = stem_grid[0] * stem_grid[1]
    keys = ('stem', 'downsample', 'qkv', 'attn_qk', 'attn_av', 'proj', 'mlp', 'dwconv', 'cls_attn', 'cls_mlp',
            'head', 'aux_head', 'spectral_fft', 'spectral_filter')
    parts = dict.fromkeys(keys, 0)
    dims = args['embed_dims']
    parts['stem'] = sg * hid * (size[0] * k * k + 2 * 9 * hid) + grids[0][0] * grids[0][1] * 9 * hid * dims[0]
    for i, stage in enumerate(model.stages):
        (h, w), D = grids[i], dims[i]
        N = h * w
        if i:
            parts['downsample'] += N * 9 * dims[i - 1] * D
        for blk in stage.blocks:
            M = blk.mlp.fc1.out_features
            parts['mlp'] += 2 * N * D * M
            parts['dwconv'] += 9 * N * M
            if blk.spectral:
                fft, gate = spectral_mixing_macs(h, w, D)
                parts['spectral_fft'] += fft
                parts['spectral_filter'] += gate
            else:
                H, d = blk.mixer.num_heads, blk.mixer.head_dim
                parts['qkv'] += 3 * N * D * D
                parts['attn_qk'] += H * N * N * d
                parts['attn_av'] += H * N * N * d
                parts['proj'] += N * D * D
    D, N = dims[-1], grids[-1][0] * grids[-1][1]
    for blk in model.cls_blocks:
        parts['cls_attn'] += 2 * D * D + 2 * (N + 1) * D * D + 2 * (N + 1) * D
        parts['cls_mlp'] += 2 * D * blk.mlp.fc1.out_features
    if isinstance(model.head, nn.Linear):
        parts['head'] = D * model.head.out_features
    if model.aux_head is not None:
        parts['aux_head'] = N * D * model.aux_head.out_features
    parts['spectral_fft'] = int(round(parts['spectral_fft']))
    parts['total'] = sum(parts[k] for k in keys[:-2])
    parts['total_with_spectral'] = parts['total'] + parts['spectral_fft'] + parts['spectral_filter']
    parts.update(grids=[tuple(g) for g in grids], input_size=tuple(size))
    return parts


# ----------------------------------------------------------------------------- registered names

# Released shapes (hierarchical_architecture/spectformer.py): S 22.2M / 3.9G, B 33.1M / 6.3G,
# L 54.7M / 12.7G in the release's README.
SPECTFORMER_H_CONFIGS = {
    's': dict(stem_hidden_dim=32, embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14),
              mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3)),
    'b': dict(stem_hidden_dim=64, embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
              mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 12, 3)),
    'l': dict(stem_hidden_dim=64, embed_dims=(96, 192, 384, 512), num_heads=(3, 6, 12, 16),
              mlp_ratios=(8, 8, 4, 4), depths=(3, 6, 18, 3)),
}
# 28-32 px inputs: stride-1 k3 first stem conv (stage grids 14/7/4/2 at 28 px), head width 16;
# 0.25M / 0.74M parameters at 1 x 28 x 28, 10 classes (deitlab_deit_{pico,nano}: 0.21M / 0.68M).
_SMALL_STEM = dict(stem_kernel=3, stem_stride=1, mlp_ratios=(8, 8, 4, 4))
SMALL_IMAGE_CONFIGS = {
    'pico': dict(stem_hidden_dim=16, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 2, 1),
                 **_SMALL_STEM),
    'nano': dict(stem_hidden_dim=16, embed_dims=(32, 64, 80, 96), num_heads=(2, 4, 5, 6), depths=(2, 2, 2, 1),
                 **_SMALL_STEM),
}


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': .9,
        'interpolation': 'bicubic', 'fixed_input_size': True, 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'first_conv': 'stem.conv.0', 'classifier': ('head', 'aux_head'),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f'deitlab_spectformer_h_{s}_224': _cfg() for s in SPECTFORMER_H_CONFIGS},
    **{f'deitlab_spectformer_h_{s}_32': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                                             interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3)
       for s in SMALL_IMAGE_CONFIGS},
})


def _create(variant: str, pretrained: bool, **kwargs) -> SpectFormerH:
    model = build_model_with_cfg(SpectFormerH, variant, pretrained, **kwargs)
    # keep the recorded default input (channels, size, normalisation) in step with the model
    cfg = dict(model.pretrained_cfg)
    chans = model.in_chans
    cfg['input_size'] = (chans, *model.img_size)
    for key in ('mean', 'std'):
        if key in cfg and len(cfg[key]) != chans:
            cfg[key] = tuple([cfg[key][0]] * chans)
    model.pretrained_cfg = cfg
    return model


for _size, _dims in SPECTFORMER_H_CONFIGS.items():
    register_variant(f'deitlab_spectformer_h_{_size}_224', _create, dict(img_size=224, **_dims),
                     f'SpectFormer-H-{_size.upper()} (hierarchical, released shapes, 224 px, no weights).', __name__)
for _size, _dims in SMALL_IMAGE_CONFIGS.items():
    register_variant(f'deitlab_spectformer_h_{_size}_32', _create, dict(img_size=32, **_dims),
                     f'SpectFormer-H-{_size} for 28-32 px inputs (stride-1 stem conv): {_dims}.', __name__)

register_closed_form(SpectFormerH, spectformer_h_macs)   # analytic_gmacs / deitlab bench use the closed form
