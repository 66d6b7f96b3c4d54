"""PoolFormer (MetaFormer with a pooling token mixer), registered with timm.

PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022) is the
MetaFormer block ``x + ls1 * Pool(GN(x))`` then ``x + ls2 * MLP(GN(x))`` in four stages, where
``Pool(t) = AvgPool3x3(t, stride 1, count_include_pad=False) - t`` has no parameters, GN is a
GroupNorm with one group and MLP is 1x1 conv (C -> 4C), GELU, 1x1 conv (4C -> C).

Everything is timm's ``MetaFormer`` (timm.models.metaformer) with the PoolFormer v1 settings of
timm's ``poolformer_*``; this module only adds:

* ``deitlab_poolformer_{s12,s24,s36,m36,m48}``: the ImageNet shapes, same parameter names and
  forward as timm's ``poolformer_*`` (their state dicts load unchanged; pretrained weights are
  timm's hub releases);
* ``deitlab_poolformer_{pico,nano,micro}_32``: small-image variants for 28-32 px inputs. The
  official stem (conv k7 s4) followed by three stride-2 downsamplings leaves a 1x1 map in stage 4
  at 32 px, where the pooling mixer is identically zero. These use a conv k3 s2 p1 stem instead,
  so the four stages see 16/8/4/2 px at 32 px input (14/7/4/2 at 28 px);
* ``mlp_hidden``: per-block MLP hidden widths (None: 4 x the stage width, timm's layout), so that
  a model whose MLPs were pruned (``deitlab prune nvit``) is the same architecture with other
  numbers in ``config.json``;
* ``model_args``, the JSON constructor arguments a run directory stores in ``config.json``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm1, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.metaformer import MetaFormer, Pooling, checkpoint_filter_fn

from .inputs import resolve_input_size
from .registry import register_closed_form, register_variant

__all__ = ['PoolFormer', 'SMALL_IMAGE_CONFIGS', 'IMAGENET_CONFIGS', 'analytic_macs', 'analytic_gmacs']


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class PoolFormer(MetaFormer):
    """timm's ``MetaFormer`` with PoolFormer v1 settings and a configurable stem convolution.

    With the default stem (k7 s4 p2) the modules, parameter names and forward pass are those of
    timm's ``poolformer_*``. ``img_size`` is not needed by the network (it is fully
    convolutional); it is recorded as the default input size of the model's ``pretrained_cfg``.
    ``mlp_hidden`` (an int, or one per block over all stages in order) replaces, after timm has
    built the model, the MLP of every block whose hidden width differs (fresh weights).
    """

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 6, 2),
            dims: Sequence[int] = (64, 128, 320, 512),
            layer_scale_init_values: Optional[float] = 1e-5,
            stem_kernel: int = 7,
            stem_stride: int = 4,
            stem_padding: int = 2,
            pool_size: int = 3,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Optional[int] = None,
            mlp_hidden: Optional[Union[int, Sequence[int]]] = None,
            drop_path_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        depths, dims = [int(d) for d in depths], [int(d) for d in dims]
        if len(depths) != len(dims):
            raise ValueError(f'depths {depths} and dims {dims} must have one entry per stage')
        super().__init__(
            in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, depths=depths, dims=dims,
            token_mixers=Pooling, mlp_act=nn.GELU, mlp_bias=True, drop_path_rate=drop_path_rate,
            proj_drop_rate=proj_drop_rate, drop_rate=drop_rate, layer_scale_init_values=layer_scale_init_values,
            res_scale_init_values=None, downsample_norm=None, norm_layers=GroupNorm1, use_mlp_head=False,
            pool_size=pool_size, device=device, dtype=dtype)
        if (stem_kernel, stem_stride, stem_padding) != (7, 4, 2):
            conv = nn.Conv2d(in_chans, dims[0], kernel_size=stem_kernel, stride=stem_stride, padding=stem_padding,
                             device=device, dtype=dtype)
            trunc_normal_(conv.weight, std=.02)
            nn.init.zeros_(conv.bias)
            self.stem.conv = conv
            for i, info in enumerate(self.feature_info):
                info['reduction'] = stem_stride * 2 ** i
        if mlp_hidden is not None:
            self._set_mlp_hidden(mlp_hidden, proj_drop_rate, device, dtype)
        if img_size is not None:
            img_size = int(img_size[0] if isinstance(img_size, (list, tuple)) else img_size)
        self.img_size = img_size
        self.arch_kwargs = dict(
            depths=depths, dims=dims, layer_scale_init_values=layer_scale_init_values, stem_kernel=stem_kernel,
            stem_stride=stem_stride, stem_padding=stem_padding, pool_size=pool_size, global_pool=global_pool,
            drop_path_rate=drop_path_rate, proj_drop_rate=proj_drop_rate, drop_rate=drop_rate)

    def _set_mlp_hidden(self, mlp_hidden, proj_drop: float, device, dtype) -> None:
        """Rebuild (with fresh weights, timm's MetaFormer init) the MLP of every block whose hidden
        width differs from ``mlp_hidden`` (one int for all blocks, or one per block, stages in order)."""
        blocks = [blk for stage in self.stages for blk in stage.blocks]
        widths = [mlp_hidden] * len(blocks) if isinstance(mlp_hidden, int) else [int(m) for m in mlp_hidden]
        if len(widths) != len(blocks):
            raise ValueError(f'mlp_hidden has {len(widths)} entries but the model has {len(blocks)} blocks '
                             f'(depths {[len(s.blocks) for s in self.stages]})')
        if min(widths) < 1:
            raise ValueError(f'every MLP needs at least one hidden unit, got mlp_hidden={widths}')
        for blk, m in zip(blocks, widths):
            old = blk.mlp
            if old.fc1.out_channels == m:
                continue
            blk.mlp = Mlp(old.fc1.in_channels, m, act_layer=type(old.act), bias=old.fc1.bias is not None,
                          drop=proj_drop, use_conv=True, device=device, dtype=dtype)
            blk.mlp.apply(self._init_weights)

    @property
    def mlp_hidden(self) -> List[int]:
        """Hidden width of every block's MLP (stages in order); 4 x the stage width unless pruned."""
        return [blk.mlp.fc1.out_channels for stage in self.stages for blk in stage.blocks]

    @property
    def model_args(self) -> dict:
        """Constructor arguments that rebuild this model (without ``num_classes``); ``mlp_hidden``
        only when some block's MLP is not 4 x its stage width (a pruned model)."""
        args = dict(self.arch_kwargs)
        args['in_chans'] = self.stem.conv.in_channels
        args['img_size'] = self.img_size
        uniform = [4 * d for d, n in zip(self.arch_kwargs['dims'], self.arch_kwargs['depths']) for _ in range(n)]
        if self.mlp_hidden != uniform:
            args['mlp_hidden'] = self.mlp_hidden
        return args


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc', 'license': 'apache-2.0',
        **kwargs,
    }


def _small_cfg(**kwargs) -> dict:
    return _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0, interpolation='bilinear',
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kwargs)


# PoolFormer v1 shapes (timm's poolformer_*); LayerScale 1e-5 for S12/S24, 1e-6 for the deeper ones.
IMAGENET_CONFIGS = {
    's12': dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), layer_scale_init_values=1e-5),
    's24': dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), layer_scale_init_values=1e-5),
    's36': dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512), layer_scale_init_values=1e-6),
    'm36': dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768), layer_scale_init_values=1e-6),
    'm48': dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768), layer_scale_init_values=1e-6),
}
_SMALL_STEM = dict(stem_kernel=3, stem_stride=2, stem_padding=1, layer_scale_init_values=1e-5)
# Parameter counts (3 channels, 10 classes) close to deitlab_deit_{pico,nano,micro}_patch4_32.
SMALL_IMAGE_CONFIGS = {
    'pico': dict(depths=(2, 2, 4, 2), dims=(16, 32, 48, 64), **_SMALL_STEM),
    'nano': dict(depths=(2, 2, 6, 2), dims=(24, 48, 80, 112), **_SMALL_STEM),
    'micro': dict(depths=(2, 2, 6, 2), dims=(32, 64, 128, 160), **_SMALL_STEM),
}

default_cfgs = generate_default_cfgs({
    **{f'deitlab_poolformer_{s}.sail_in1k': _cfg(hf_hub_id=f'timm/poolformer_{s}.sail_in1k',
                                                 crop_pct=0.9 if s.startswith('s') else 0.95)
       for s in IMAGENET_CONFIGS},
    **{f'deitlab_poolformer_{s}_32': _small_cfg() for s in SMALL_IMAGE_CONFIGS},
})


def _create(variant: str, pretrained: bool, **kwargs) -> PoolFormer:
    model = build_model_with_cfg(
        PoolFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(kwargs['depths'])))),
        **kwargs)
    # Keep the recorded default input (size, channels, normalisation) in step with the model.
    cfg = dict(model.pretrained_cfg)
    chans = model.stem.conv.in_channels
    size = model.img_size or cfg['input_size'][-1]
    cfg['input_size'] = (chans, size, size)
    for key in ('mean', 'std'):
        if key in cfg and len(cfg[key]) != chans:
            cfg[key] = tuple([cfg[key][0]] * chans)
    model.pretrained_cfg = cfg
    return model


def _register(name: str, dims: dict, doc: str):
    return register_variant(name, _create, dims, doc, __name__)


for _size, _dims in IMAGENET_CONFIGS.items():
    _register(f'deitlab_poolformer_{_size}', _dims, f'PoolFormer-{_size.upper()} (timm poolformer_{_size}), 224 px.')
for _size, _dims in SMALL_IMAGE_CONFIGS.items():
    _register(f'deitlab_poolformer_{_size}_32', _dims,
              f'PoolFormer-{_size} for 28-32 px inputs: conv k3 s2 stem, {_dims["depths"]} x {_dims["dims"]}.')


def analytic_macs(model: PoolFormer, img_size: int) -> int:
    """Closed-form multiply-accumulates per image of a PoolFormer on a square ``img_size`` input.

    Convolutions and the classifier only (FlopCounterMode's convention: pooling, GroupNorm,
    GELU, LayerScale, adds and biases are free). With stem kernel k, Cin input channels, stage i
    of width d_i and depth n_i on an H_i x W_i map, and K classes::

        stem        k * k * Cin * d_0 * H_0 * W_0
        downsample  9 * d_{i-1} * d_i * H_i * W_i      (stages whose width changes; k3 s2 p1)
        blocks      sum_j 2 * M_ij * d_i * H_i * W_i   (the two 1x1 convs of the MLP of block j,
                    hidden width M_ij: 4 d_i, or the per-block ``mlp_hidden`` of a pruned model)
        head        d_last * K
    """
    args = model.model_args
    k, s, p = args['stem_kernel'], args['stem_stride'], args['stem_padding']
    h = _conv_out(img_size, k, s, p)
    w = h
    dims = args['dims']
    macs = k * k * args['in_chans'] * dims[0] * h * w
    prev = dims[0]
    for stage, d in zip(model.stages, dims):
        if d != prev:
            h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
            macs += 9 * prev * d * h * w
        macs += sum(2 * blk.mlp.fc1.out_channels * d * h * w for blk in stage.blocks)
        prev = d
    if model.num_classes > 0:
        macs += dims[-1] * model.num_classes
    return macs


def analytic_gmacs(model: PoolFormer, img_size: int) -> float:
    return analytic_macs(model, img_size) / 1e9


def _closed_form(model: PoolFormer, input_size: Optional[Sequence[int]] = None) -> dict:
    size = resolve_input_size(model, input_size)
    if size[1] != size[2]:
        raise ValueError(f'the PoolFormer closed form takes square inputs, got {tuple(size)}')
    return dict(total=analytic_macs(model, size[1]), input_size=tuple(size))


register_closed_form(PoolFormer, _closed_form)   # analytic_gmacs / deitlab bench use the closed form
