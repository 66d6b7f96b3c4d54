"""Tests for STViT (semantic-token DeiT) and the STViT-R recover module: tiny models, CPU, exact
properties."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
from deitlab.bench import count_gmacs
from deitlab.models.deit import WidthBlock
from deitlab.rundir import create, save_run_dir
from deitlab.models.stvit import STViT, STViTDistilled, stvit_filter_fn, stvit_from_deit, stvit_macs

FMNIST = dict(img_size=28, in_chans=1, num_classes=10)   # 7x7 tokens
NANO, NANO_DIST = 'deitlab_stvit_nano_patch4_32', 'deitlab_stvit_nano_distilled_patch4_32'
DEIT, DEIT_DIST = 'deitlab_deit_nano_patch4_32', 'deitlab_deit_nano_distilled_patch4_32'
NONUNIFORM = dict(num_heads=[3, 2, 3, 1, 3, 3], qk_dim=[8, 16, 32, 32, 32, 32], v_dim=[32, 8, 16, 32, 32, 32],
                  mlp_hidden=[10, 20, 30, 40, 50, 60])


def _build(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**FMNIST, **kw}).eval()


def _x(batch: int = 2, chans: int = 1, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _prefix(model) -> int:
    return 2 if isinstance(model, STViTDistilled) else 1


def test_registered_names_and_defaults():
    names = set(timm.list_models('deitlab_stvit_*'))
    expected = {f'deitlab_stvit_{s}{d}_patch16_224' for s in ('tiny', 'small', 'base') for d in ('', '_distilled')}
    expected |= {f'deitlab_stvit_{s}{d}_patch4_32' for s in ('pico', 'nano', 'micro', 'mini')
                 for d in ('', '_distilled')}
    assert names == expected
    with torch.device('meta'):
        small = timm.create_model('deitlab_stvit_small_patch16_224')
    assert (small.stvit_layer, small.stvit_grid, small.num_semantic_tokens) == (4, (4, 4), 16)
    for size, layer in (('pico', 1), ('nano', 2), ('micro', 3), ('mini', 4)):
        with torch.device('meta'):
            m = timm.create_model(f'deitlab_stvit_{size}_patch4_32')
        assert (m.stvit_layer, m.stvit_grid) == (layer, (3, 3))


@pytest.mark.parametrize('name', ['deitlab_stvit_pico_patch4_32', NANO, NANO_DIST,
                                  'deitlab_stvit_micro_distilled_patch4_32'])
def test_shapes_and_token_count_after_insertion(name):
    model = _build(name)
    assert isinstance(model, STViTDistilled if '_distilled' in name else STViT)
    assert model.patch_embed.grid_size == (7, 7) and model.patch_embed.proj.in_channels == 1
    k, n = model.stvit_layer, _prefix(model)
    seen = {}
    model.blocks[k].register_forward_pre_hook(lambda m, args: seen.__setitem__('after', args[0].shape))
    if k > 0:
        model.blocks[k - 1].register_forward_pre_hook(lambda m, args: seen.__setitem__('before', args[0].shape))
    x = _x(3)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
        assert model.forward_features(x).shape == (3, n + 9, model.embed_dim)
    assert seen['after'] == (3, n + 9, model.embed_dim)   # [CLS(, DIST)] + 3x3 semantic tokens
    if k > 0:
        assert seen['before'] == (3, n + 49, model.embed_dim)


def test_32px_three_channels_default():
    model = _build(NANO, img_size=32, in_chans=3)
    assert model.patch_embed.grid_size == (8, 8)
    with torch.no_grad():
        assert model(_x(2, 3, 32)).shape == (2, 10)


def test_forward_dense_shape_and_gradients():
    model = _build(NANO, stvit_recover=True).train()
    x = _x(2)
    dense = model.forward_dense(x)
    assert dense.shape == (2, model.embed_dim, 7, 7)
    dense.square().mean().backward()
    for mod in (model.recover, model.refine, model.blocks[-1], model.patch_embed):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


@pytest.mark.parametrize('name', [NANO, NANO_DIST])
def test_gradients_reach_every_parameter(name):
    model = _build(name, stvit_recover=True).train()
    x = _x(2)
    loss = model(x).square().sum() + model.forward_dense(x).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize('name', [NANO, NANO_DIST])
def test_batch_independence(name):
    model = _build(name, stvit_recover=True)
    x = _x(4)
    with torch.no_grad():
        joint, dense = model(x), model.forward_dense(x)
        for i in range(4):
            torch.testing.assert_close(model(x[i:i + 1]), joint[i:i + 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.forward_dense(x[i:i + 1]), dense[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('deit_name', [DEIT, DEIT_DIST])
@pytest.mark.parametrize('pool', ['avg', 'max'])
def test_full_grid_pooling_reproduces_the_deit(deit_name, pool):
    """Pooling to the full 7x7 grid gives P = X exactly; with G = 0 and the refinement block's
    residual branches zeroed, the STViT is the DeiT it came from."""
    deit = _build(deit_name)
    model = stvit_from_deit(deit, stvit_grid=7, stvit_pool=pool)
    x = _x(3)
    with torch.no_grad():
        assert not torch.allclose(model(x), deit(x))   # the refinement block does change the tokens
        for lin in (model.refine.attn.proj, model.refine.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        assert torch.equal(model(x), deit(x))


def test_refinement_on_pooled_full_grid_is_self_attention():
    """With S = X the keys/values [X; X] hold every key twice; duplicates cancel in the softmax, so
    the refinement block equals the same block's self-attention over X."""
    model = _build(NANO)
    x = torch.randn(2, 49, model.embed_dim)
    with torch.no_grad():
        for fused in (True, False):
            model.refine.attn.fused_attn = fused
            torch.testing.assert_close(model.refine(x, torch.cat([x, x], dim=1)), WidthBlock.forward(model.refine, x),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name, kw', [
    (NANO, {}),
    (NANO_DIST, dict(stvit_recover=True, stvit_grid=[2, 3], stvit_pool='max', stvit_layer=0)),
    (NANO, dict(stvit_recover=True, **NONUNIFORM)),
])
def test_run_dir_round_trip(tmp_path, name, kw):
    model = _build(name, **kw)
    x = _x(2)
    with torch.no_grad():
        ref = model(x)
    save_run_dir(model, tmp_path / 'run')
    for loaded in (timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True), create(tmp_path / 'run')):
        loaded.eval()
        assert type(loaded) is type(model)
        assert loaded.model_args == model.model_args
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
            if model.recover is not None:
                assert torch.equal(loaded.forward_dense(x), model.forward_dense(x))


@pytest.mark.parametrize('deit_name', [DEIT, DEIT_DIST])
def test_stvit_from_deit_copies_every_tensor(deit_name):
    deit = _build(deit_name, **NONUNIFORM).to(torch.float64).train()
    model = stvit_from_deit(deit)
    assert isinstance(model, STViTDistilled if '_distilled' in deit_name else STViT)
    assert model.training and next(model.parameters()).dtype == torch.float64
    assert model.pretrained_cfg['architecture'] == deit_name.replace('_deit_', '_stvit_')
    src, own = deit.state_dict(), model.state_dict()
    k = model.stvit_layer
    refine = {n for n in own if n.startswith('refine.')}
    assert set(own) == set(src) | refine | {'global_centers'}
    for name, t in src.items():
        assert torch.equal(own[name], t), name
    for name in refine:
        assert torch.equal(own[name], src[f'blocks.{k}.' + name[len('refine.'):]]), name
    assert torch.count_nonzero(own['global_centers']) == 0
    assert model.block_widths == deit.block_widths


def test_stvit_from_timm_vit():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                            num_heads=2).eval()
    model = stvit_from_deit(vit, stvit_layer=1, stvit_grid=3)
    assert (model.stvit_layer, model.num_semantic_tokens) == (1, 9)
    for name, t in vit.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    with torch.no_grad():
        assert model(_x(2)).shape == (2, 10)


@pytest.mark.parametrize('deit_name, name', [(DEIT, NANO), (DEIT_DIST, NANO_DIST)])
def test_pretrained_file_maps_a_deit_run_dir(tmp_path, deit_name, name):
    deit = _build(deit_name, **NONUNIFORM)
    save_run_dir(deit, tmp_path / 'deit')
    file = str(tmp_path / 'deit' / 'model.safetensors')
    want = stvit_from_deit(deit)
    got = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **FMNIST,
                            **NONUNIFORM).eval()
    assert got.state_dict().keys() == want.state_dict().keys()
    for key, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], t), key
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(got(x), want(x))
    # the recover block is not in a DeiT: it keeps its own initialisation and the load stays strict
    with_recover = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **FMNIST,
                                     stvit_recover=True, **NONUNIFORM)
    assert torch.equal(with_recover.refine.attn.qkv.weight, deit.blocks[with_recover.stvit_layer].attn.qkv.weight)


def test_train_engine_builds_stvit_from_a_deit_file(tmp_path):
    from deitlab.train.config import TrainConfig
    from deitlab.train.engine import build_student

    deit = _build(DEIT)
    save_run_dir(deit, tmp_path / 'deit')
    cfg = TrainConfig(model=NANO, pretrained_file=str(tmp_path / 'deit' / 'model.safetensors'))
    model = build_student(cfg, num_classes=10, data_chans=1, data_size=28).eval()
    assert isinstance(model, STViT) and model.patch_embed.grid_size == (7, 7)
    with torch.no_grad():
        assert torch.equal(model(_x(2)), stvit_from_deit(deit)(_x(2)))


def test_filter_passes_an_stvit_state_dict_through():
    model = _build(NANO)
    sd = model.state_dict()
    assert stvit_filter_fn(sd, model) is sd


@pytest.mark.parametrize('name, kw', [
    (NANO, {}),
    (NANO_DIST, dict(stvit_grid=2, stvit_layer=0, stvit_pool='max')),
    (NANO, dict(img_size=32, in_chans=3, stvit_layer=5, **NONUNIFORM)),
    (NANO, dict(global_pool='avg', class_token=False)),
])
def test_gmacs_closed_form_equals_counter(name, kw):
    model = _build(name, **kw)
    assert stvit_macs(model)['total'] / 1e9 == count_gmacs(model)


def test_gmacs_below_the_deit():
    stvit, deit = _build(NANO), _build(DEIT)
    assert count_gmacs(stvit) < 0.6 * count_gmacs(deit)
    with torch.device('meta'):
        small = timm.create_model('deitlab_stvit_small_patch16_224')
        deit_small = timm.create_model('deitlab_deit_small_patch16_224')
    # the paper's "nearly 60% fewer FLOPs" for 16 semantic tokens on DeiT-S
    assert 0.55 < 1 - count_gmacs(small) / count_gmacs(deit_small) < 0.62


@pytest.mark.parametrize('kw, match', [
    (dict(stvit_grid=8), 'more semantic tokens than image tokens'),
    (dict(stvit_grid=[3, 8]), 'more semantic tokens than image tokens'),
    (dict(stvit_layer=6), 'out of range'),
    (dict(stvit_layer=-1), 'out of range'),
    (dict(stvit_pool='mean'), 'stvit_pool must be one of'),
    (dict(stvit_grid=0), 'positive int'),
    (dict(patch_drop_rate=0.5), 'patch_drop_rate must be 0'),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        _build(NANO, **kw)


def test_clear_errors_on_misuse():
    model = _build(NANO)
    with pytest.raises(RuntimeError, match='stvit_recover=True'):
        model.forward_dense(_x(1))
    with pytest.raises(ValueError, match='already an STViT'):
        stvit_from_deit(model)
    with pytest.raises(ValueError, match='counts STViT models'):
        stvit_macs(_build(DEIT))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(_x(1), output_fmt='NHWC')
    assert 'global_centers' in model.no_weight_decay()


def test_intermediates_are_the_blocks_outputs_and_end_in_forward_features():
    """forward_intermediates: image-token maps before the semantic layer, g x g semantic-token maps
    after it, and its final features equal forward_features. Catches intermediates taken before the
    semantic tokens are swapped in, or a final output that skips the norm."""
    model = _build(NANO).eval()
    x = _x(2)
    k, (g, _), n = model.stvit_layer, model.stvit_grid, model.num_prefix_tokens
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        h, w = model.patch_embed.grid_size
        assert [tuple(m.shape[2:]) for m in maps] == [(h, w)] * k + [(g, g)] * (len(model.blocks) - k)
        last, = model.forward_intermediates(x, indices=1, norm=True, output_fmt='NLC', intermediates_only=True)
        assert torch.equal(last, final[:, n:])
        (first, prefix), = model.forward_intermediates(x, indices=[0], output_fmt='NLC', return_prefix_tokens=True,
                                                      intermediates_only=True, stop_early=True)
        ref = model.blocks[0](model._embed(x)[0])
        assert torch.equal(first, ref[:, n:]) and torch.equal(prefix, ref[:, :n])
