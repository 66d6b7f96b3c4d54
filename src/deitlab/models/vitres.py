"""ViT-Res: a multi-stage vision transformer with residual spatial reduction, registered with timm.

ViT-Res is the multi-stage search space of ViT-ResNAS (Liao, Karaman, Sze, "Searching for Efficient
Multi-Stage Vision Transformers", arXiv 2109.00642). This module is the model family only (no
search). The network:

* a patch stem (:mod:`deitlab.models.vitres_stems`): the patch embedding ``Conv2d(in_chans, C_1,
  kernel=patch, stride=patch)`` (``stem='linear'``) or the release's convolutional stem
  (``stem='conv'``: 3x3 conv-BN-ReLU stride 2, a residual pair of 3x3 conv-BN-ReLU, a projection
  with kernel = stride = patch / 2; hidden width ``stem_width``), a class token, optionally a
  distillation token (``distilled=True``: tokens ``[CLS, DIST, patches]``) and a learned position
  embedding over all tokens of stage 1's grid, as timm's ViT;
* S stages; stage s has width ``C_s`` and ``depths[s]`` pre-LN transformer blocks (deitlab's
  ``WidthBlock``), every block with its own heads, head width (``qk_dim = v_dim = head_dim``) and MLP
  hidden width; stochastic depth grows linearly over all blocks of all stages;
* between stages a residual spatial reduction (:class:`ResidualSpatialReduction`) halving the patch
  grid and widening the tokens ``C_in -> C_out``::

      main     = [Linear(LN(prefix tokens)), Conv3x3s2(LN(patch grid))] + new position embedding
      residual = zero-pad channels to C_out([prefix tokens, AvgPool2x2s2(patch grid)])
      out      = main + residual

* a final LayerNorm and a linear ``head`` on the class token (with distillation a second
  ``head_dist`` on the DIST token: averaged logits at eval, both returned in training after
  ``set_distilled_training(True)``, as deitlab's ``DeiTDistilled``);
* optionally (``patch_head=True``, the release's training) an auxiliary ``patch_head``: one Linear
  ``C_S -> K`` applied to every patch token of the last stage, ``(B, h_S w_S, K)``. It is trained by
  ``--mix patchmix`` (:mod:`deitlab.train.patchmix`) and not used at inference: ``forward`` returns
  the class head's logits, with or without it. ``forward_dense`` returns both,
  :meth:`ViTRes.capture_patch_logits` records the patch logits of the forwards run inside it.

The blocks of all stages are one flat ``blocks`` list (stages in order, ``depths`` tells where each
stage starts), so ``block_widths`` (deitlab's ``WidthMixin``) and the class-token attention capture
see them as in DeiT; the S - 1 reductions are ``reductions.{s}``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import init_weights_vit_timm

from ..layers import WidthBlock
from ..layers.block import block_macs
from .deit import _DIST, WidthMixin, _cfg, _small_cfg
from .inputs import resolve_input_size
from .registry import register_closed_form, register_variant
from .vitres_stems import DEFAULT_STEM_WIDTH, build_stem, check_stem, stem_macs

__all__ = ['ViTRes', 'ResidualSpatialReduction', 'PatchLogits', 'VITRES_CONFIGS', 'vitres_macs']

IntOrList = Union[int, Sequence[int], None]


def _per_block(name: str, value: IntOrList, depths: List[int]) -> Optional[List[int]]:
    """``value`` (None, one int for all blocks, or one per block over all stages) as a list or None."""
    n = sum(depths)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f'{name} has {len(value)} entries but the model has {n} blocks (depths {depths}); '
                             f'give one int for every block or one value per block, stages in order')
        out = [int(v) for v in value]
    else:
        out = [int(value)] * n
    if min(out, default=1) < 1:
        raise ValueError(f'{name} must be positive, got {out}')
    return out


class ResidualSpatialReduction(nn.Module):
    """Residual spatial reduction between two stages: grid (h, w) -> (h/2, w/2), width C_in -> C_out.

    Main path: ``LayerNorm(C_in)`` on all tokens; the patch grid through ``conv`` (3x3, stride 2,
    padding 1), the prefix (class / distillation) tokens through ``token_proj`` (Linear), plus a new
    learned ``pos_embed`` (1, prefix + h/2 * w/2, C_out). Residual path: the un-normalised patch grid
    average-pooled 2x2 (stride 2), the prefix tokens unchanged, both zero-padded from C_in to C_out
    channels. The output is their sum, so with ``conv``, ``token_proj`` and ``pos_embed`` at zero the
    block is the pooled, zero-padded identity.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: Tuple[int, int], num_prefix_tokens: int):
        super().__init__()
        in_dim, out_dim = int(in_dim), int(out_dim)
        if out_dim < in_dim:
            raise ValueError(f'a residual spatial reduction cannot narrow the tokens: C_out={out_dim} < C_in={in_dim} '
                             f'(the residual path zero-pads channels); stage widths must not decrease')
        h, w = int(grid[0]), int(grid[1])
        if h % 2 or w % 2:
            raise ValueError(f'a residual spatial reduction halves the patch grid, {h}x{w} is not even')
        self.in_dim, self.out_dim = in_dim, out_dim
        self.grid = (h, w)
        self.out_grid = (h // 2, w // 2)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.norm = nn.LayerNorm(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.token_proj = nn.Linear(in_dim, out_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + (h // 2) * (w // 2), out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        p, (h, w) = self.num_prefix_tokens, self.grid
        if N != p + h * w or C != self.in_dim:
            raise ValueError(f'residual spatial reduction expects {p} + {h}x{w} tokens of width {self.in_dim}, '
                             f'got {N} tokens of width {C}')
        y = self.norm(x)
        patches = y[:, p:].transpose(1, 2).reshape(B, C, h, w)
        main = torch.cat([self.token_proj(y[:, :p]), self.conv(patches).flatten(2).transpose(1, 2)], dim=1)
        main = main + self.pos_embed
        pooled = F.avg_pool2d(x[:, p:].transpose(1, 2).reshape(B, C, h, w), kernel_size=2, stride=2)
        residual = torch.cat([x[:, :p], pooled.flatten(2).transpose(1, 2)], dim=1)
        residual = F.pad(residual, (0, self.out_dim - C))
        return main + residual


class PatchLogits:
    """Where :meth:`ViTRes.capture_patch_logits` puts the patch head's logits ``(B, N_S, K)`` of the
    last forward (``logits`` is None before one)."""

    def __init__(self):
        self.logits: Optional[torch.Tensor] = None


class ViTRes(WidthMixin, nn.Module):
    """Multi-stage ViT with residual spatial reduction (see the module docstring).

    ``widths`` (C_s) and ``depths`` (blocks per stage) give the stages. ``num_heads``, ``head_dim``
    and ``mlp_hidden`` are one int for every block or one value per block (stages in order). Unset,
    ``num_heads`` is ``C_s // head_dim``, ``head_dim`` is ``C_s // num_heads`` (32 when both are
    unset) and ``mlp_hidden`` is ``mlp_ratio * C_s``. The patch grid ``img_size // patch_size`` must
    halve exactly at each of the S - 1 reductions. ``stem`` is 'linear' or 'conv' (the conv stem
    needs an even patch size; ``stem_width`` is its hidden width, see ``vitres_stems``).
    ``patch_head`` adds the auxiliary per-patch classifier of the last stage (module docstring).
    """

    def __init__(
            self,
            img_size: Union[int, Sequence[int]] = 32,
            patch_size: Union[int, Sequence[int]] = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            widths: Sequence[int] = (64, 128, 256),
            depths: Sequence[int] = (2, 2, 2),
            num_heads: IntOrList = None,
            head_dim: IntOrList = None,
            mlp_hidden: IntOrList = None,
            mlp_ratio: float = 4.,
            distilled: bool = False,
            drop_path_rate: float = 0.,
            qkv_bias: bool = True,
            stem: str = 'linear',
            stem_width: int = DEFAULT_STEM_WIDTH,
            patch_head: bool = False,
    ):
        super().__init__()
        check_stem(stem)
        widths, depths = [int(c) for c in widths], [int(d) for d in depths]
        if not widths or len(widths) != len(depths):
            raise ValueError(f'widths {widths} and depths {depths} must have one entry per stage (at least one)')
        if min(widths) < 1 or min(depths) < 0:
            raise ValueError(f'stage widths must be positive and depths non-negative, got {widths} / {depths}')
        img, patch = tuple(int(v) for v in to_2tuple(img_size)), tuple(int(v) for v in to_2tuple(patch_size))
        grid = (img[0] // patch[0], img[1] // patch[1])
        factor = 2 ** (len(widths) - 1)
        if min(grid) < 1 or grid[0] % factor or grid[1] % factor:
            raise ValueError(f'img_size {img[0]}x{img[1]} with patch_size {patch[0]}x{patch[1]} gives a '
                             f'{grid[0]}x{grid[1]} patch grid, which must halve exactly at each of the '
                             f'{len(widths) - 1} residual spatial reductions: both sides must be multiples of '
                             f'{factor}')
        for s in range(1, len(widths)):
            if widths[s] < widths[s - 1]:
                raise ValueError(f'stage {s} is narrower than stage {s - 1} ({widths[s]} < {widths[s - 1]}): a '
                                 f'residual spatial reduction zero-pads C_in to C_out and needs C_out >= C_in')
        stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
        heads = _per_block('num_heads', num_heads, depths)
        hdim = _per_block('head_dim', head_dim, depths)
        if heads is None and hdim is None:
            hdim = [32] * len(stage_of)
        if heads is None:
            heads = [max(widths[s] // d, 1) for s, d in zip(stage_of, hdim)]
        if hdim is None:
            hdim = [max(widths[s] // h, 1) for s, h in zip(stage_of, heads)]
        mlp = _per_block('mlp_hidden', mlp_hidden, depths) or [int(mlp_ratio * widths[s]) for s in stage_of]

        self.num_classes = int(num_classes)
        self.widths, self.depths = widths, depths
        self.distilled = bool(distilled)
        self.num_prefix_tokens = 2 if self.distilled else 1
        self.num_features = self.head_hidden_size = widths[-1]
        self.grid_sizes = [(grid[0] // 2 ** s, grid[1] // 2 ** s) for s in range(len(widths))]
        self.distilled_training = False
        self.in_chans = int(in_chans)
        self.patch_embed = build_stem(stem, img, patch, self.in_chans, widths[0], stem_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, widths[0]))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, widths[0])) if self.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid[0] * grid[1], widths[0]))
        self.reductions = nn.ModuleList([
            ResidualSpatialReduction(widths[s - 1], widths[s], self.grid_sizes[s - 1], self.num_prefix_tokens)
            for s in range(1, len(widths))])
        n = len(stage_of)
        dpr = [drop_path_rate * i / (n - 1) if n > 1 else 0. for i in range(n)]   # no tensors: meta-safe
        self.blocks = nn.ModuleList([
            WidthBlock(widths[s], heads[i], hdim[i], hdim[i], mlp[i], qkv_bias=qkv_bias, drop_path=dpr[i])
            for i, s in enumerate(stage_of)])
        self.norm = nn.LayerNorm(widths[-1])
        self.head = self._new_head()
        self.head_dist = self._new_head() if self.distilled else None
        self.patch_head = self._new_head() if patch_head else None
        self._patch_sink: Optional[PatchLogits] = None
        self.arch_kwargs = dict(distilled=self.distilled, drop_path_rate=float(drop_path_rate),
                                qkv_bias=bool(qkv_bias), stem=stem)
        if stem == 'conv':
            self.arch_kwargs['stem_width'] = int(stem_width)
        if patch_head:
            self.arch_kwargs['patch_head'] = True
        self._init_weights()

    def _new_head(self) -> nn.Module:
        head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            init_weights_vit_timm(head, needs_reset=False)
        return head

    def _init_weights(self) -> None:
        for p in (self.cls_token, self.dist_token, self.pos_embed, *(r.pos_embed for r in self.reductions)):
            if p is not None:
                trunc_normal_(p, std=.02)
        for m in self.modules():
            init_weights_vit_timm(m, needs_reset=False)   # Linear: truncated normal 0.02, zero bias; convs keep their init

    # ------------------------------------------------------------------ what a run directory stores

    @property
    def model_args(self) -> dict:
        """Constructor arguments that rebuild this model (without ``num_classes``), with the per-block
        widths read from the modules."""
        w = self.block_widths
        if w['qk_dim'] != w['v_dim']:
            raise ValueError(f'ViT-Res stores one head_dim per block, but qk_dim {w["qk_dim"]} differs from '
                             f'v_dim {w["v_dim"]}')
        pe = self.patch_embed
        return dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=self.in_chans,
                    widths=list(self.widths), depths=list(self.depths), num_heads=w['num_heads'],
                    head_dim=w['qk_dim'], mlp_hidden=w['mlp_hidden'], **self.arch_kwargs)

    @property
    def patch_grid(self) -> Tuple[int, int]:
        """The last stage's token grid (h_S, w_S): the tokens the patch head classifies, row-major."""
        return tuple(self.grid_sizes[-1])

    def stage_blocks(self, s: int) -> List[nn.Module]:
        """The blocks of stage ``s``."""
        start = sum(self.depths[:s])
        return list(self.blocks[start:start + self.depths[s]])

    # ------------------------------------------------------------------ timm interface

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token', 'dist_token', *(f'reductions.{i}.pos_embed' for i in range(len(self.reductions)))}

    @torch.jit.ignore
    def get_classifier(self):
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, '', 'token'):
            raise ValueError(f'ViT-Res reads the class (and distillation) token; global_pool={global_pool!r} '
                             f'is not supported')
        p = next(self.parameters())
        self.num_classes = int(num_classes)
        self.head = self._new_head().to(device=p.device, dtype=p.dtype).train(self.training)
        if self.distilled:
            self.head_dist = self._new_head().to(device=p.device, dtype=p.dtype).train(self.training)
        if self.patch_head is not None:
            self.patch_head = self._new_head().to(device=p.device, dtype=p.dtype).train(self.training)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """With distillation, make the training forward return ``(cls_logits, dist_logits)``."""
        self.distilled_training = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + self.pos_embed
        for s in range(len(self.depths)):
            if s > 0:
                x = self.reductions[s - 1](x)
            for blk in self.stage_blocks(s):
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if not self.distilled:
            return x[:, 0] if pre_logits else self.head(x[:, 0])
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def forward_patch_head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens (B, P + h_S w_S, C_S) -> the patch head's logits (B, h_S w_S, K)."""
        if self.patch_head is None:
            raise ValueError('this ViT-Res has no patch head; build it with patch_head=True')
        return self.patch_head(x[:, self.num_prefix_tokens:])

    def forward_dense(self, x: torch.Tensor):
        """Images -> ``(forward(x), patch logits (B, h_S w_S, K))``."""
        x = self.forward_features(x)
        return self.forward_head(x), self.forward_patch_head(x)

    @contextlib.contextmanager
    def capture_patch_logits(self) -> Iterator[PatchLogits]:
        """Within the block every ``forward`` also runs the patch head and leaves its logits (with
        their graph) in the yielded :class:`PatchLogits`; the output is unchanged. Runs inside the
        forward, so a DDP wrapper sees the patch head used."""
        if self.patch_head is None:
            raise ValueError('this ViT-Res has no patch head to capture; build it with patch_head=True')
        before, self._patch_sink = self._patch_sink, PatchLogits()
        try:
            yield self._patch_sink
        finally:
            self._patch_sink = before

    def training_gmacs(self) -> float:
        """GMACs per image of a training forward (``train/flops.py``): the inference forward plus the
        patch head, which ``--mix patchmix`` runs on every training forward (closed form)."""
        parts = vitres_macs(self)
        return (parts['total'] + parts.get('patch_head', 0)) / 1e9

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        if self._patch_sink is not None:
            self._patch_sink.logits = self.forward_patch_head(x)
        return self.forward_head(x)


# ----------------------------------------------------------------------------- closed form

def vitres_macs(model: ViTRes, input_size: Optional[Sequence[int]] = None) -> dict:
    """Closed-form multiply-accumulates per image of a ViT-Res, itemised ('matmul' convention).

    With P prefix tokens (1, or 2 with distillation), stage s of width C_s on an h_s x w_s grid
    (N_s = h_s w_s + P tokens), for each block H heads of width d and MLP hidden width M, k x k
    patches of an image with c channels, and K classes::

        patch_embed       the stem (``vitres_stems.stem_macs``): h_1 w_1 * c k k * C_1 for the
                          linear stem; the conv stem adds its 3x3 convolutions at H/2 x W/2
        qkv               per block  N_s * C_s * 3 H d
        attn_qk, attn_av  per block  H * N_s^2 * d   (each)
        proj              per block  N_s * H d * C_s
        mlp               per block  2 * N_s * C_s * M
        reduction_conv    per reduction s-1 -> s   9 * C_{s-1} * C_s * h_s w_s
        reduction_tokens  per reduction s-1 -> s   P * C_{s-1} * C_s
        head              C_S * K per head (two with distillation)
        patch_head        h_S w_S * C_S * K, the training-only patch head (``patch_head=True``;
                          not in ``total``: inference does not run it)

    ``total`` is the sum of the others, what ``count_gmacs`` counts; LayerNorms, softmax, GELU, the
    2x2 average pooling, the zero padding and all adds are free, and so are the conv stem's
    BatchNorms (folded into its convolutions at inference) and ReLUs. Also returned: ``blocks`` (MACs per block),
    ``tokens`` (N_s per stage), ``grids`` and ``input_size``. The position embeddings are sized for
    one input, so another input size raises ``ValueError``.
    """
    if not isinstance(model, ViTRes):
        raise ValueError(f'vitres_macs takes a ViTRes, not {type(model).__name__}')
    size = resolve_input_size(model, input_size)
    pe, c = model.patch_embed, model.in_chans
    if tuple(size) != (c, *pe.img_size):
        raise ValueError(f'input {tuple(size)} does not fit the model ({c}, {pe.img_size[0]}, {pe.img_size[1]}): its '
                         f'position embeddings are sized for that input')
    P = model.num_prefix_tokens
    stem = stem_macs(model.arch_kwargs['stem'], pe.img_size, pe.patch_size, c, model.widths[0],
                     model.arch_kwargs.get('stem_width', DEFAULT_STEM_WIDTH))
    parts = dict(patch_embed=stem, qkv=0, attn_qk=0, attn_av=0, proj=0, mlp=0,
                 reduction_conv=0, reduction_tokens=0, head=0)
    per_block, tokens = [], []
    for s, C in enumerate(model.widths):
        h, w = model.grid_sizes[s]
        N = h * w + P
        tokens.append(N)
        if s > 0:
            prev = model.widths[s - 1]
            parts['reduction_conv'] += 9 * prev * C * h * w
            parts['reduction_tokens'] += P * prev * C
        for blk in model.stage_blocks(s):
            a = blk.attn
            cost = block_macs(N, C, a.num_heads, a.qk_dim, a.v_dim, blk.mlp.fc1.out_features)
            for k, v in cost.items():
                parts[k] += v
            per_block.append(sum(cost.values()))
    heads = [model.head] + ([model.head_dist] if model.distilled else [])
    parts['head'] = sum(hd.in_features * hd.out_features for hd in heads if isinstance(hd, nn.Linear))
    parts['total'] = sum(parts.values())
    if isinstance(model.patch_head, nn.Linear):
        gh, gw = model.patch_grid
        parts['patch_head'] = gh * gw * model.patch_head.in_features * model.patch_head.out_features
    parts.update(blocks=per_block, tokens=tokens, grids=[tuple(g) for g in model.grid_sizes],
                 input_size=tuple(size))
    return parts


register_closed_form(ViTRes, vitres_macs)   # analytic_gmacs / deitlab bench use the closed form


# ----------------------------------------------------------------------------- registered names

def _stages(widths, depths, head_dim) -> dict:
    return dict(widths=list(widths), depths=list(depths), head_dim=head_dim)


# Small-image shapes (patch 4 on 32 px: 8x8, 4x4, 2x2 grids) and 224-px shapes (patch 14: 16, 8, 4).
# Small here is the reference multi-stage shape of the paper, not its searched ViT-ResNAS network.
VITRES_CONFIGS = {
    ('mu', 4, 32): _stages((64, 128, 256), (2, 2, 2), 32),
    ('nano', 4, 32): _stages((96, 192, 384), (2, 2, 2), 32),
    ('tiny', 14, 224): _stages((192, 384, 768), (4, 4, 4), 64),
    ('small', 14, 224): _stages((256, 512, 1024), (4, 4, 4), 64),
}
_DISTILLED = ('mu', 'nano')


def _name(size: str, patch: int, img: int, distilled: bool) -> str:
    return f'deitlab_vitres_{size}{"_distilled" if distilled else ""}_patch{patch}_{img}'


def _variants():
    for (size, patch, img), dims in VITRES_CONFIGS.items():
        for distilled in (False, True) if size in _DISTILLED else (False,):
            yield size, patch, img, dims, distilled


def _variant_cfg(img: int, distilled: bool) -> dict:
    extra = _DIST if distilled else {}
    return _small_cfg(**extra) if img == 32 else _cfg(**extra)


default_cfgs = generate_default_cfgs({_name(sz, p, i, d): _variant_cfg(i, d) for sz, p, i, _, d in _variants()})


def _create(variant: str, pretrained: bool, **kwargs) -> ViTRes:
    return build_model_with_cfg(ViTRes, variant, pretrained, **kwargs)


for _size, _patch, _img, _dims, _d in _variants():
    register_variant(
        _name(_size, _patch, _img, _d), _create, dict(img_size=_img, patch_size=_patch, distilled=_d, **_dims),
        f'ViT-Res-{_size}{" distilled" if _d else ""} (multi-stage ViT, residual spatial reduction): patch '
        f'{_patch}, {_img} px, widths {_dims["widths"]}, depths {_dims["depths"]}, head width {_dims["head_dim"]}, '
        f'MLP 4x' + ('; the reference multi-stage shape, not the searched ViT-ResNAS network' if _size == 'small'
                     else '') + '.', __name__)
