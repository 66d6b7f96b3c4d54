"""Tests for the deitlab DeiT models (plain and distilled, per-block widths)."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
from deitlab.models.deit import DeiT, DeiTDistilled, WidthAttention, WidthBlock, resolve_widths

ALL_MODELS = timm.list_models('deitlab_deit_*')
DISTILLED_MODELS = [n for n in ALL_MODELS if '_distilled_' in n]
SMALL_IMAGE_MODELS = [n for n in ALL_MODELS if n.endswith('_patch4_32')]

EXPECTED_MODELS = sorted(
    [f'deitlab_deit_{s}{d}_patch16_224' for s in ('tiny', 'small', 'base') for d in ('', '_distilled')]
    + [f'deitlab_deit_{s}{d}_patch4_32' for s in ('pico', 'nano', 'micro', 'mini') for d in ('', '_distilled')])

# The widths of a structurally pruned model: every block different, qk_dim != v_dim.
NONUNIFORM = dict(
    img_size=28, in_chans=1,
    num_heads=[3, 2, 3, 1, 3, 3],
    qk_dim=[8, 16, 32, 32, 32, 32],
    v_dim=[32, 8, 16, 32, 32, 32],
    mlp_hidden=[10, 20, 30, 40, 50, 60],
)
NANO = 'deitlab_deit_nano_patch4_32'
NANO_DIST = 'deitlab_deit_nano_distilled_patch4_32'


def _marked(names):
    """ImageNet-size base models take seconds per forward/backward on CPU: mark them slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if '_base_' in n else n for n in names]


def _is_distilled(model) -> bool:
    return isinstance(model, DeiTDistilled)


def _input(model, batch: int = 1, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chans = model.patch_embed.proj.in_channels
    h, w = model.patch_embed.img_size
    return torch.randn(batch, chans, h, w, generator=g).to(dtype)


def _set_timm_fused(model: nn.Module, enable: bool) -> None:
    n = 0
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = enable
            n += 1
    assert n > 0


def _assert_all_grads_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f'{name} got no gradient'
        assert torch.isfinite(p.grad).all(), f'{name} has a non-finite gradient'


# ---------------------------------------------------------------------------------------------
# 1. Every registered model
# ---------------------------------------------------------------------------------------------

def test_registry_lists_every_variant():
    assert sorted(ALL_MODELS) == EXPECTED_MODELS
    assert len(DISTILLED_MODELS) == 7


@pytest.mark.parametrize('name', _marked(ALL_MODELS))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    assert isinstance(model, DeiTDistilled if '_distilled_' in name else DeiT)
    cfg = model.pretrained_cfg
    assert tuple(cfg['input_size']) == (3, *model.patch_embed.img_size)
    x = _input(model)
    model.train()
    y = model(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (1, model.num_classes) == (1, cfg['num_classes'])
    y.sum().backward()
    _assert_all_grads_finite(model)
    if _is_distilled(model):
        # Averaged heads in ordinary train mode: both heads receive a gradient.
        assert model.head.weight.grad.abs().sum() > 0
        assert model.head_dist.weight.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
        model.set_distilled_training(True)
        out = model(x)
        assert isinstance(out, tuple) and len(out) == 2
        (out[0].sum() + out[1].sum()).backward()
        _assert_all_grads_finite(model)
        assert model.head.weight.grad.abs().sum() > 0
        assert model.head_dist.weight.grad.abs().sum() > 0
        assert model.dist_token.grad.abs().sum() > 0


@pytest.mark.parametrize('name', _marked(ALL_MODELS))
def test_reset_classifier(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _input(model)
    model.reset_classifier(0)
    with torch.no_grad():
        feats = model(x)
    assert model.num_features == model.embed_dim
    assert feats.shape == (1, model.num_features)
    model.reset_classifier(5)
    assert model.num_classes == 5
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 5)
    if _is_distilled(model):
        assert model.head_dist.out_features == 5
        model.train()
        model.set_distilled_training(True)
        with torch.no_grad():
            a, b = model(x)
        assert a.shape == b.shape == (1, 5)


@pytest.mark.parametrize('name', _marked(ALL_MODELS))
def test_cfg_names_real_modules(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    first = model.get_submodule(cfg['first_conv'])
    assert isinstance(first, nn.Conv2d)
    assert first.in_channels == cfg['input_size'][0]
    classifiers = cfg['classifier']
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    if '_distilled_' in name:
        assert set(classifiers) == {'head', 'head_dist'}
    else:
        assert classifiers == ('head',)
    for c in classifiers:
        head = model.get_submodule(c)
        assert isinstance(head, nn.Linear)
        assert head.out_features == model.num_classes
        assert head.in_features == model.num_features


# ---------------------------------------------------------------------------------------------
# 2. Distilled models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', _marked(DISTILLED_MODELS))
def test_distilled_heads(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = _input(model, batch=2)
    n_patches = model.patch_embed.num_patches
    assert model.num_prefix_tokens == 2
    assert model.pos_embed.shape == (1, n_patches + 2, model.embed_dim)
    assert model.dist_token.shape == (1, 1, model.embed_dim)
    assert model.head is not model.head_dist
    with torch.no_grad():
        model.eval()
        f = model.forward_features(x)
        assert f.shape == (2, n_patches + 2, model.embed_dim)
        cls_logits = model.head(f[:, 0])
        dist_logits = model.head_dist(f[:, 1])
        assert not torch.allclose(cls_logits, dist_logits)  # two different heads
        expected = (cls_logits + dist_logits) / 2
        assert torch.equal(model(x), expected)
        # distilled_training only changes the output in train mode
        model.set_distilled_training(True)
        assert torch.equal(model(x), expected)

        model.train()
        pair = model(x)
        assert isinstance(pair, tuple) and len(pair) == 2
        assert pair[0].shape == pair[1].shape == (2, model.num_classes)
        assert torch.equal(pair[0], cls_logits)
        assert torch.equal(pair[1], dist_logits)

        model.set_distilled_training(False)
        y = model(x)
        assert isinstance(y, torch.Tensor)
        assert torch.equal(y, expected)


# ---------------------------------------------------------------------------------------------
# 3. timm weight compatibility
# ---------------------------------------------------------------------------------------------

SMALL_VIT_ARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)

COMPAT_PAIRS = [
    ('deit_tiny_patch16_224', {}, 'deitlab_deit_tiny_patch16_224', {}),
    ('deit_tiny_distilled_patch16_224', {}, 'deitlab_deit_tiny_distilled_patch16_224', {}),
    ('vit_tiny_patch16_224', SMALL_VIT_ARGS, 'deitlab_deit_pico_patch4_32', {}),
    # constructor options shared with timm's blocks: layer scale, no qkv bias, other mlp ratio
    ('vit_tiny_patch16_224', dict(SMALL_VIT_ARGS, init_values=0.1, qkv_bias=False, mlp_ratio=2.),
     'deitlab_deit_pico_patch4_32', dict(init_values=0.1, qkv_bias=False, mlp_ratio=2.)),
]


@pytest.mark.parametrize('timm_name,timm_kw,ours,our_kw', COMPAT_PAIRS,
                         ids=['tiny', 'tiny_distilled', 'pico', 'pico_ls_noqkvbias'])
def test_timm_state_dict_loads_strictly_and_matches(timm_name, timm_kw, ours, our_kw):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, **timm_kw).eval()
    torch.manual_seed(1)
    model = timm.create_model(ours, pretrained=False, **our_kw).eval()
    ref_sd = ref.state_dict()
    own_sd = model.state_dict()
    assert list(own_sd) == list(ref_sd)
    assert all(own_sd[k].shape == v.shape for k, v in ref_sd.items())
    x = _input(model, batch=2)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref(x))  # different init before loading
    model.load_state_dict(ref_sd, strict=True)
    with torch.no_grad():
        for fused in (True, False):
            _set_timm_fused(ref, fused)
            model.set_fused_attn(fused)
            assert all(b.attn.fused_attn == fused for b in model.blocks)
            assert torch.equal(model(x), ref(x)), f'fused_attn={fused}'


@pytest.mark.parametrize('fmt', ['safetensors', 'pth'])
@pytest.mark.parametrize('timm_name,ours', [
    ('deit_tiny_patch16_224', 'deitlab_deit_tiny_patch16_224'),
    ('deit_tiny_distilled_patch16_224', 'deitlab_deit_tiny_distilled_patch16_224'),
], ids=['tiny', 'tiny_distilled'])
def test_timm_weights_through_file_overlay(tmp_path, timm_name, ours, fmt):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False).eval()
    sd = ref.state_dict()
    if fmt == 'safetensors':
        path = tmp_path / 'weights.safetensors'
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / 'checkpoint.pth'
        torch.save({'model': sd}, path)  # the layout of the original DeiT release
    model = timm.create_model(ours, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    x = _input(model, batch=1)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# ---------------------------------------------------------------------------------------------
# 4. Per-block widths
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', [NANO, NANO_DIST])
def test_nonuniform_widths_shapes(arch):
    model = timm.create_model(arch, **NONUNIFORM)
    dim = model.embed_dim
    assert dim == 96 and len(model.blocks) == 6
    assert model.patch_embed.proj.in_channels == 1
    assert tuple(model.patch_embed.img_size) == (28, 28)
    prefix = 2 if arch == NANO_DIST else 1
    assert model.pos_embed.shape == (1, 49 + prefix, dim)
    for i, blk in enumerate(model.blocks):
        H, dq, dv, mlp = (NONUNIFORM[k][i] for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden'))
        assert isinstance(blk, WidthBlock) and isinstance(blk.attn, WidthAttention)
        assert (blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim) == (H, dq, dv)
        assert blk.attn.qkv.weight.shape == (H * (2 * dq + dv), dim)
        assert blk.attn.qkv.bias.shape == (H * (2 * dq + dv),)
        assert blk.attn.proj.weight.shape == (dim, H * dv)
        assert blk.mlp.fc1.weight.shape == (mlp, dim)
        assert blk.mlp.fc1.bias.shape == (mlp,)
        assert blk.mlp.fc2.weight.shape == (dim, mlp)
        assert blk.attn.scale == dq ** -0.5
    widths = model.block_widths
    for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden'):
        assert widths[k] == NONUNIFORM[k]
    assert widths['attn_scale'] == [d ** -0.5 for d in NONUNIFORM['qk_dim']]


@pytest.mark.parametrize('arch', [NANO, NANO_DIST])
def test_nonuniform_widths_forward_backward(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, **NONUNIFORM).train()
    x = _input(model, batch=2)
    assert x.shape == (2, 1, 28, 28)
    if arch == NANO_DIST:
        model.set_distilled_training(True)
        a, b = model(x)
        assert a.shape == b.shape == (2, 10)
        (a.sum() + b.sum()).backward()
    else:
        y = model(x)
        assert y.shape == (2, 10)
        y.sum().backward()
    _assert_all_grads_finite(model)


@pytest.mark.parametrize('arch', [NANO, NANO_DIST])
def test_fused_and_explicit_attention_agree(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, **NONUNIFORM).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        model.set_fused_attn(True)
        assert all(b.attn.fused_attn for b in model.blocks)
        fused = model(x)
        model.set_fused_attn(False)
        assert not any(b.attn.fused_attn for b in model.blocks)
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5)


def _hand_attention(attn: WidthAttention, t: torch.Tensor, scale: float):
    """softmax(scale * q k^T) and the attention output, computed from the raw weights."""
    H, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    qkv = t @ attn.qkv.weight.T + attn.qkv.bias
    probs, heads = [], []
    for h in range(H):
        q = qkv[..., h * dq:(h + 1) * dq]
        k = qkv[..., H * dq + h * dq:H * dq + (h + 1) * dq]
        v = qkv[..., 2 * H * dq + h * dv:2 * H * dq + (h + 1) * dv]
        p = torch.softmax(scale * (q @ k.transpose(-2, -1)), dim=-1)
        probs.append(p)
        heads.append(p @ v)
    out = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    return torch.stack(probs, dim=1), out


def test_custom_attn_scale_is_honoured():
    scales = [0.05, 0.5, None, 0.1, 0.2, 1.5]
    torch.manual_seed(0)
    model = timm.create_model(NANO, **NONUNIFORM, attn_scale=scales).double().eval()
    expected_scales = [s if s is not None else NONUNIFORM['qk_dim'][i] ** -0.5 for i, s in enumerate(scales)]
    assert model.block_widths['attn_scale'] == expected_scales
    assert model.model_args['attn_scale'] == expected_scales
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 50, model.embed_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for i in (0, 1, 2, 5):
            attn = model.blocks[i].attn
            assert attn.scale == expected_scales[i]
            probs, out = _hand_attention(attn, t, expected_scales[i])
            torch.testing.assert_close(attn.attention_probs(t), probs, rtol=0, atol=1e-12)
            for fused in (True, False):
                attn.fused_attn = fused
                torch.testing.assert_close(attn(t), out, rtol=0, atol=1e-10)
            # the default scale gives another map, so the comparison above is meaningful
            default_probs, _ = _hand_attention(attn, t, attn.qk_dim ** -0.5)
            if expected_scales[i] != attn.qk_dim ** -0.5:
                assert (default_probs - probs).abs().max() > 1e-3


@pytest.mark.parametrize('kw,message', [
    (dict(num_heads=[3, 3, 3]), 'num_heads has 3 entries but the model has depth 6'),
    (dict(qk_dim=[32, 32, 32]), 'qk_dim has 3 entries but the model has depth 6'),
    (dict(v_dim=[32] * 7), 'v_dim has 7 entries but the model has depth 6'),
    (dict(mlp_hidden=[10, 20, 30]), 'mlp_hidden has 3 entries but the model has depth 6'),
    (dict(attn_scale=[0.1, 0.2]), 'attn_scale has 2 entries but the model has depth 6'),
    (dict(num_heads=[3, 0, 3, 3, 3, 3]), 'at least one head'),
    (dict(num_heads=0), 'at least one head'),
    (dict(qk_dim=[32, 0, 32, 32, 32, 32]), r'qk_dim=0'),
    (dict(v_dim=[32, 32, 32, 32, 32, 0]), r'v_dim=0'),
    (dict(mlp_hidden=[10, 20, 0, 40, 50, 60]), 'at least one hidden unit, got 0'),
    (dict(mlp_hidden=0), 'at least one hidden unit, got 0'),
    (dict(block_fn=nn.Identity), 'block_fn is not accepted'),
], ids=['heads_len', 'qk_len', 'v_len', 'mlp_len', 'scale_len', 'zero_head_one_block', 'zero_heads',
        'zero_qk', 'zero_v', 'zero_mlp_one_block', 'zero_mlp', 'block_fn'])
def test_bad_widths_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(NANO, **kw)


def test_resolve_widths_defaults_and_broadcast():
    w = resolve_widths(96, 3, num_heads=[3, 2, 1])
    assert w == dict(num_heads=[3, 2, 1], qk_dim=[32, 48, 96], v_dim=[32, 48, 96], mlp_hidden=[384] * 3,
                     attn_scale=[32 ** -0.5, 48 ** -0.5, 96 ** -0.5])
    w = resolve_widths(64, 2, num_heads=4, qk_dim=[8, None], v_dim=5, mlp_ratio=2., attn_scale=[None, 0.25])
    assert w == dict(num_heads=[4, 4], qk_dim=[8, 16], v_dim=[5, 5], mlp_hidden=[128, 128],
                     attn_scale=[8 ** -0.5, 0.25])


# ---------------------------------------------------------------------------------------------
# 5. Zero width equals removed width (what a structured pruner relies on)
# ---------------------------------------------------------------------------------------------

def _kept_rows(H, dq, dv, heads, qk, vv):
    q_rows = [h * dq + j for h in heads for j in qk]
    k_rows = [H * dq + h * dq + j for h in heads for j in qk]
    v_rows = [2 * H * dq + h * dv + c for h in heads for c in vv]
    proj_cols = [h * dv + c for h in heads for c in vv]
    return q_rows + k_rows + v_rows, proj_cols


def _mask_and_slice(model, kind: str, block: int, index: int):
    """Return (masked copy of model, sliced state dict, new per-block widths)."""
    blk = model.blocks[block]
    H, dq, dv = blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim
    mlp = blk.mlp.fc1.out_features
    heads, qk, vv, units = list(range(H)), list(range(dq)), list(range(dv)), list(range(mlp))
    widths = copy.deepcopy(model.block_widths)
    kept, key = {'qk': (qk, 'qk_dim'), 'head': (heads, 'num_heads'), 'v': (vv, 'v_dim'),
                 'mlp': (units, 'mlp_hidden')}[kind]
    kept.remove(index)
    widths[key][block] -= 1
    rows, cols = _kept_rows(H, dq, dv, heads, qk, vv)
    all_rows, all_cols = _kept_rows(H, dq, dv, range(H), range(dq), range(dv))
    drop_rows = sorted(set(all_rows) - set(rows))
    drop_cols = sorted(set(all_cols) - set(cols))
    drop_units = sorted(set(range(mlp)) - set(units))

    masked = copy.deepcopy(model)
    mb = masked.blocks[block]
    with torch.no_grad():
        mb.attn.qkv.weight[drop_rows] = 0
        mb.attn.qkv.bias[drop_rows] = 0
        mb.attn.proj.weight[:, drop_cols] = 0
        mb.mlp.fc1.weight[drop_units] = 0
        mb.mlp.fc1.bias[drop_units] = 0
        mb.mlp.fc2.weight[:, drop_units] = 0

    p = f'blocks.{block}.'
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[p + 'attn.qkv.weight'] = sd[p + 'attn.qkv.weight'][rows]
    sd[p + 'attn.qkv.bias'] = sd[p + 'attn.qkv.bias'][rows]
    sd[p + 'attn.proj.weight'] = sd[p + 'attn.proj.weight'][:, cols]
    sd[p + 'mlp.fc1.weight'] = sd[p + 'mlp.fc1.weight'][units]
    sd[p + 'mlp.fc1.bias'] = sd[p + 'mlp.fc1.bias'][units]
    sd[p + 'mlp.fc2.weight'] = sd[p + 'mlp.fc2.weight'][:, units]
    return masked, sd, widths


ZERO_WIDTH_CASES = [
    ('qk', 0, 3), ('qk', 2, 31), ('qk', 1, 0),
    ('head', 1, 0), ('head', 0, 2), ('head', 4, 1),
    ('v', 1, 7), ('v', 2, 0), ('v', 3, 31),
    ('mlp', 0, 9), ('mlp', 5, 17),
]


@pytest.mark.parametrize('arch', [NANO, NANO_DIST])
@pytest.mark.parametrize('kind,block,index', ZERO_WIDTH_CASES)
def test_masked_equals_dense(arch, kind, block, index):
    torch.manual_seed(0)
    model = timm.create_model(arch, **NONUNIFORM).double().eval()
    # The dense model's softmax scales are kept by the smaller model (pruned-model convention).
    dense_scales = model.block_widths['attn_scale']
    masked, sd, widths = _mask_and_slice(model, kind, block, index)
    args = dict(model.model_args, **widths)
    assert args['attn_scale'] == dense_scales
    small = timm.create_model(arch, **args, num_classes=model.num_classes).double()
    small.load_state_dict(sd, strict=True)
    small.eval()
    for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'attn_scale'):
        assert small.block_widths[k] == widths[k]
    x = _input(model, batch=2, dtype=torch.float64)
    with torch.no_grad():
        y_full = model(x)
        y_masked = masked(x)
        for fused in (True, False):
            masked.set_fused_attn(fused)
            small.set_fused_attn(fused)
            torch.testing.assert_close(small(x), masked(x), rtol=0, atol=1e-10)
    # the removed unit was not already inert
    assert (y_full - y_masked).abs().max() > 1e-8


# ---------------------------------------------------------------------------------------------
# 6. model_args round trip
# ---------------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [(n, {}) for n in SMALL_IMAGE_MODELS] + [
    ('deitlab_deit_tiny_patch16_224', {}),
    ('deitlab_deit_tiny_distilled_patch16_224', {}),
    (NANO, NONUNIFORM),
    (NANO_DIST, NONUNIFORM),
    (NANO, dict(NONUNIFORM, attn_scale=[0.1] * 6, init_values=1e-2, qkv_bias=False, num_classes=3)),
    ('deitlab_deit_pico_patch4_32', dict(mlp_ratio=2., num_heads=4, drop_path_rate=0.1)),
]


@pytest.mark.parametrize('arch,kw', ROUND_TRIP_CASES,
                         ids=[f'{a}-{i}' for i, (a, _) in enumerate(ROUND_TRIP_CASES)])
def test_model_args_round_trip(arch, kw):
    torch.manual_seed(0)
    model = timm.create_model(arch, **kw).eval()
    args = json.loads(json.dumps(model.model_args))  # must survive config.json
    assert 'num_classes' not in args
    for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'attn_scale'):
        assert args[k] == model.block_widths[k]
        assert len(args[k]) == len(model.blocks)
    rebuilt = timm.create_model(arch, **args, num_classes=model.num_classes).eval()
    own, new = model.state_dict(), rebuilt.state_dict()
    assert list(new) == list(own)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in own.items()}
    assert rebuilt.model_args == args
    assert rebuilt.block_widths == model.block_widths
    rebuilt.load_state_dict(own, strict=True)
    x = _input(model, batch=1)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))

    other = timm.create_model(arch, **args, num_classes=model.num_classes + 4)
    other_sd = other.state_dict()
    assert list(other_sd) == list(own)
    for k, v in own.items():
        if k.startswith(('head.', 'head_dist.')):
            assert other_sd[k].shape[0] == model.num_classes + 4
            assert other_sd[k].shape[1:] == v.shape[1:]
        else:
            assert other_sd[k].shape == v.shape, k


# ---------------------------------------------------------------------------------------------
# Constructor options that timm's ViT accepts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw', [dict(dtype=torch.float64), dict(device='meta')], ids=['float64', 'meta'])
def test_dtype_and_device_apply_to_every_parameter(kw):
    model = timm.create_model('deitlab_deit_pico_patch4_32', **kw)
    if 'dtype' in kw:
        assert {p.dtype for p in model.parameters()} == {kw['dtype']}
        y = model(torch.zeros(1, 3, 32, 32, dtype=kw['dtype']))
        assert y.dtype == kw['dtype']
    else:
        assert {p.device.type for p in model.parameters()} == {kw['device']}
        assert 'device' not in model.model_args


@pytest.mark.parametrize('option', [dict(qk_norm=True), dict(proj_bias=False),
                                    dict(scale_attn_norm=True), dict(scale_mlp_norm=True)],
                         ids=lambda o: next(iter(o)))
def test_unsupported_block_options_are_not_silently_ignored(option):
    with pytest.raises(ValueError, match=f'deitlab DeiT blocks do not support {next(iter(option))}'):
        timm.create_model('deitlab_deit_pico_patch4_32', **option)
