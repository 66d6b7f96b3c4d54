"""DeiT and distilled DeiT with per-block widths, registered with timm.

DeiT (Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021) is a ViT trained with a strong recipe; the distilled variant appends a
distillation token after the class token, ``[CLS, DIST, patches]``, read by a second head. In
training the two heads are supervised separately; at eval the logits are averaged:
``y = (head(z_cls) + head_dist(z_dist)) / 2``.

The models here are timm's ``VisionTransformer`` / ``VisionTransformerDistilled`` with one change:
every block may have its own widths, so that a structurally pruned model (NViT) is the same
architecture with other numbers in ``config.json``:

* ``num_heads[i]``  heads of block i,
* ``qk_dim[i]``     query/key width of each head in block i,
* ``v_dim[i]``      value width of each head in block i (decoupled from ``qk_dim``),
* ``mlp_hidden[i]`` hidden width of the MLP of block i,
* ``embed_dim``     the global residual width shared by all blocks,
* ``attn_scale[i]`` the softmax scale (default ``qk_dim[i] ** -0.5``; a pruned model keeps the
  dense model's scale so that removing query/key channels changes nothing else).

With uniform widths the parameter names and the forward pass equal timm's, so timm's DeiT weights
load unchanged and give the same logits.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerScale
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..layers import WidthAttention, WidthBlock
from .registry import register_variant

__all__ = [
    'WidthAttention', 'WidthBlock', 'DeiT', 'DeiTDistilled', 'resolve_widths', 'SMALL_IMAGE_CONFIGS', 'from_timm',
    'WidthMixin', 'install_block_factory', 'json_arch_kwargs',
]

IntOrList = Union[int, Sequence[int]]


def _per_block(name: str, value, depth: int, default) -> list:
    if value is None:
        value = default
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f'{name} has {len(value)} entries but the model has depth {depth}')
        return list(value)
    return [value] * depth


def resolve_widths(
        embed_dim: int,
        depth: int,
        num_heads: IntOrList,
        qk_dim: Optional[IntOrList] = None,
        v_dim: Optional[IntOrList] = None,
        mlp_hidden: Optional[IntOrList] = None,
        mlp_ratio: float = 4.,
        attn_scale=None,
) -> dict:
    """Expand width arguments (an int for every block, or one value per block) into lists.

    ``qk_dim``/``v_dim`` default to ``embed_dim // num_heads[i]`` and ``mlp_hidden`` to
    ``mlp_ratio * embed_dim``.
    """
    heads = [int(h) for h in _per_block('num_heads', num_heads, depth, None)]
    head_dims = [embed_dim // h if h > 0 else 0 for h in heads]
    qk = _per_block('qk_dim', qk_dim, depth, None)
    qk = [int(q) if q is not None else d for q, d in zip(qk, head_dims)]
    vv = _per_block('v_dim', v_dim, depth, None)
    vv = [int(v) if v is not None else d for v, d in zip(vv, head_dims)]
    mlp = [int(m) for m in _per_block('mlp_hidden', mlp_hidden, depth, int(embed_dim * mlp_ratio))]
    scale = _per_block('attn_scale', attn_scale, depth, None)
    scale = [float(s) if s is not None else (q ** -0.5 if q > 0 else 1.0) for s, q in zip(scale, qk)]
    return dict(num_heads=heads, qk_dim=qk, v_dim=vv, mlp_hidden=mlp, attn_scale=scale)


class _BlockFactory:
    """Builds block i with the widths of block i; timm calls it once per block, in order."""

    def __init__(self, widths: dict, depth: int):
        self.widths = widths
        self.depth = depth
        self.i = 0

    def __call__(self, dim, qkv_bias=True, init_values=None, proj_drop=0., attn_drop=0., drop_path=0.,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, qk_norm=False, proj_bias=True, scale_attn_norm=False,
                 scale_mlp_norm=False, device=None, dtype=None, **_):
        unsupported = [name for name, value, default in (
            ('qk_norm', qk_norm, False), ('proj_bias', proj_bias, True), ('scale_attn_norm', scale_attn_norm, False),
            ('scale_mlp_norm', scale_mlp_norm, False)) if value != default]
        if unsupported:
            raise ValueError(f'deitlab DeiT blocks do not support {", ".join(unsupported)}; use timm\'s '
                             f'VisionTransformer for those options')
        i = self.i
        self.i += 1
        w = self.widths
        block = WidthBlock(
            dim, w['num_heads'][i], w['qk_dim'][i], w['v_dim'][i], w['mlp_hidden'][i], qkv_bias=qkv_bias,
            attn_scale=w['attn_scale'][i], init_values=init_values, proj_drop=proj_drop, attn_drop=attn_drop,
            drop_path=drop_path, norm_layer=norm_layer, act_layer=act_layer)
        if device is not None or dtype is not None:
            block.to(device=device, dtype=dtype)
        return block


def install_block_factory(kwargs: dict) -> None:
    """Replace the width kwargs by a block factory that builds each block with its own widths."""
    embed_dim = kwargs.get('embed_dim', 768)
    depth = kwargs.get('depth', 12)
    widths = resolve_widths(
        embed_dim, depth, kwargs.pop('num_heads', 12), kwargs.pop('qk_dim', None), kwargs.pop('v_dim', None),
        kwargs.pop('mlp_hidden', None), kwargs.pop('mlp_ratio', 4.), kwargs.pop('attn_scale', None))
    if kwargs.get('block_fn') is not None:
        raise ValueError('deitlab DeiT models build their own blocks; block_fn is not accepted')
    kwargs['block_fn'] = _BlockFactory(widths, depth)
    # timm's constructor wants one int; the real per-block heads live in the blocks.
    kwargs['num_heads'] = max(widths['num_heads'], default=1)


def json_arch_kwargs(kwargs: dict) -> dict:
    """The JSON-serialisable constructor arguments (stored as config.json's model_args)."""
    out = {}
    for k, v in kwargs.items():
        if k in ('device', 'dtype'):
            continue
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    return out


class WidthMixin:
    """What every per-block-width ViT here shares (DeiT, DeiTDistilled, STViT): its widths and the
    constructor arguments a run directory stores."""
    arch_kwargs: dict

    @property
    def model_args(self) -> dict:
        """Constructor arguments that rebuild this model, including its current per-block widths."""
        args = {k: v for k, v in self.arch_kwargs.items() if k not in ('num_classes', 'mlp_ratio')}
        args.update(self.block_widths)
        args['embed_dim'] = self.embed_dim
        args['depth'] = len(self.blocks)
        args['in_chans'] = self.patch_embed.proj.in_channels
        args['img_size'] = list(self.patch_embed.img_size)
        args['patch_size'] = list(self.patch_embed.patch_size)
        return args

    @property
    def block_widths(self) -> dict:
        """Per-block widths read from the modules (what a pruner edits and config.json stores)."""
        blocks = list(self.blocks)
        return dict(
            num_heads=[b.attn.num_heads for b in blocks],
            qk_dim=[b.attn.qk_dim for b in blocks],
            v_dim=[b.attn.v_dim for b in blocks],
            mlp_hidden=[b.mlp.fc1.out_features for b in blocks],
            attn_scale=[b.attn.scale for b in blocks],
        )

    def set_fused_attn(self, enable: bool) -> None:
        """Switch every attention between fused SDPA and the explicit softmax (same math)."""
        for m in self.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = enable


class DeiT(WidthMixin, VisionTransformer):
    """DeiT (a ViT with the DeiT recipe) with per-block widths; see the module docstring."""

    def __init__(self, **kwargs):
        arch = json_arch_kwargs(kwargs)
        install_block_factory(kwargs)
        super().__init__(**kwargs)
        self.arch_kwargs = arch


class DeiTDistilled(WidthMixin, VisionTransformerDistilled):
    """Distilled DeiT: ``[CLS, DIST, patches]``, two heads, logits averaged at eval.

    ``set_distilled_training(True)`` makes the training forward return ``(cls_logits, dist_logits)``.
    """

    def __init__(self, **kwargs):
        arch = json_arch_kwargs(kwargs)
        install_block_factory(kwargs)
        super().__init__(**kwargs)
        self.arch_kwargs = arch


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        **kwargs,
    }


def _small_cfg(**kwargs) -> dict:
    return _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear',
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kwargs)


_DIST = dict(classifier=('head', 'head_dist'))

default_cfgs = generate_default_cfgs({
    # ImageNet shapes; weights are timm's DeiT releases (same tensors, same names).
    'deitlab_deit_tiny_patch16_224.fb_in1k': _cfg(hf_hub_id='timm/deit_tiny_patch16_224.fb_in1k'),
    'deitlab_deit_small_patch16_224.fb_in1k': _cfg(hf_hub_id='timm/deit_small_patch16_224.fb_in1k'),
    'deitlab_deit_base_patch16_224.fb_in1k': _cfg(hf_hub_id='timm/deit_base_patch16_224.fb_in1k'),
    'deitlab_deit_tiny_distilled_patch16_224.fb_in1k': _cfg(
        hf_hub_id='timm/deit_tiny_distilled_patch16_224.fb_in1k', **_DIST),
    'deitlab_deit_small_distilled_patch16_224.fb_in1k': _cfg(
        hf_hub_id='timm/deit_small_distilled_patch16_224.fb_in1k', **_DIST),
    'deitlab_deit_base_distilled_patch16_224.fb_in1k': _cfg(
        hf_hub_id='timm/deit_base_distilled_patch16_224.fb_in1k', **_DIST),
    # Small-image family for CPU work (no released weights).
    'deitlab_deit_pico_patch4_32': _small_cfg(),
    'deitlab_deit_nano_patch4_32': _small_cfg(),
    'deitlab_deit_micro_patch4_32': _small_cfg(),
    'deitlab_deit_mini_patch4_32': _small_cfg(),
    'deitlab_deit_pico_distilled_patch4_32': _small_cfg(**_DIST),
    'deitlab_deit_nano_distilled_patch4_32': _small_cfg(**_DIST),
    'deitlab_deit_micro_distilled_patch4_32': _small_cfg(**_DIST),
    'deitlab_deit_mini_distilled_patch4_32': _small_cfg(**_DIST),
})

# The small-image family: patch 4 on 28-32 px inputs (7x7 or 8x8 tokens), head width 32.
SMALL_IMAGE_CONFIGS = {
    'pico': dict(embed_dim=64, depth=4, num_heads=2),
    'nano': dict(embed_dim=96, depth=6, num_heads=3),
    'micro': dict(embed_dim=128, depth=8, num_heads=4),
    'mini': dict(embed_dim=192, depth=12, num_heads=6),
}
_IMAGENET_CONFIGS = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
}

# Constructor arguments that describe the architecture, stored in config.json's model_args.
ARCH_KEYS = ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth', 'qkv_bias', 'init_values',
             'class_token', 'global_pool')


def _create(variant: str, pretrained: bool, distilled: bool, **kwargs):
    cls = DeiTDistilled if distilled else DeiT
    model = build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=lambda sd, m: checkpoint_filter_fn(sd, m, adapt_layer_scale=True),
        **kwargs)
    return model


def _register(size: str, dims: dict, patch: int, img: int, distilled: bool):
    tag = '_distilled' if distilled else ''
    return register_variant(
        f'deitlab_deit_{size}{tag}_patch{patch}_{img}',
        lambda name, pretrained, **kw: _create(name, pretrained, distilled, **kw),
        dict(img_size=img, patch_size=patch, **dims),
        f'DeiT-{size}{" distilled" if distilled else ""}: patch {patch}, {img} px, {dims}.', __name__)


for _size, _dims in _IMAGENET_CONFIGS.items():
    for _d in (False, True):
        _register(_size, _dims, 16, 224, _d)
for _size, _dims in SMALL_IMAGE_CONFIGS.items():
    for _d in (False, True):
        _register(_size, _dims, 4, 32, _d)


def from_timm(model: nn.Module) -> nn.Module:
    """A deitlab DeiT holding the weights of a timm ``VisionTransformer`` or
    ``VisionTransformerDistilled`` (uniform widths), with identical logits.

    The structural pruner and the width-aware tools work on deitlab's DeiT; this is how a timm
    model (``timm.create_model('deit_base_distilled_patch16_224', pretrained=True)``) gets there.
    """
    import timm

    if isinstance(model, (DeiT, DeiTDistilled)):
        return model
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise ValueError(f'from_timm converts timm VisionTransformer / VisionTransformerDistilled models, '
                         f'not {type(model).__name__}')
    blk = model.blocks[0]
    attn = blk.attn
    for name in ('q_norm', 'k_norm', 'norm'):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            raise ValueError(f'from_timm: attention with {name} is not supported')
    distilled = isinstance(model, VisionTransformerDistilled)
    pe = model.patch_embed
    init_values = 1e-5 if isinstance(blk.ls1, LayerScale) else None
    args = dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=[b.attn.num_heads for b in model.blocks], mlp_hidden=[b.mlp.fc1.out_features for b in model.blocks],
        qk_dim=[b.attn.head_dim for b in model.blocks], v_dim=[b.attn.head_dim for b in model.blocks],
        attn_scale=[float(b.attn.scale) for b in model.blocks],
        qkv_bias=blk.attn.qkv.bias is not None, init_values=init_values,
        class_token=model.cls_token is not None, global_pool=model.global_pool,
        no_embed_class=model.no_embed_class, reg_tokens=getattr(model, 'num_reg_tokens', 0),
        pre_norm=not isinstance(model.norm_pre, nn.Identity), fc_norm=not isinstance(model.fc_norm, nn.Identity),
    )
    if distilled:
        for k in ('class_token', 'global_pool', 'reg_tokens'):
            args.pop(k)
    arch = f'deitlab_deit_base{"_distilled" if distilled else ""}_patch16_224'
    p = next(model.parameters())
    new = timm.create_model(arch, pretrained=False, **args).to(device=p.device, dtype=p.dtype)
    new.load_state_dict(model.state_dict())
    new.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {}, architecture=arch)
    new.train(model.training)
    return new
