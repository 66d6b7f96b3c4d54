"""Tests for the hierarchical SpectFormer (SpectFormer-H: spectral stages, attention stages,
class attention, token-labelling aux head)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.pvt_v2 import Attention as GridAttention

from deitlab.bench.flops import count_gmacs
from deitlab.models.spectformer import SpectralGating
from deitlab.models.spectformer_h import SpectFormerH, SpectFormerHBlock, spectformer_h_macs, stage_grids
from deitlab.rundir import create, save_run_dir

PICO, NANO = 'deitlab_spectformer_h_pico_32', 'deitlab_spectformer_h_nano_32'
SMALL = [PICO, NANO]
FMNIST = dict(img_size=28, in_chans=1, num_classes=10)


def _kinds(model):
    return [[blk.spectral for blk in stage.blocks] for stage in model.stages]


def test_names_registered():
    expected = {f'deitlab_spectformer_h_{s}_224' for s in 'sbl'} | set(SMALL)
    assert set(timm.list_models('deitlab_spectformer_h_*')) == expected


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('chans,size', [(1, 28), (3, 32)])
def test_forward_shape_and_grids(name, chans, size):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size, in_chans=chans, num_classes=7).eval()
    assert isinstance(model, SpectFormerH)
    assert tuple(model.pretrained_cfg['input_size']) == (chans, size, size)
    assert len(model.pretrained_cfg['mean']) == chans
    half = size // 2
    assert model.grid_sizes == [(half, half), (half // 2, half // 2), (4, 4), (2, 2)]   # last stage >= 2x2
    with torch.no_grad():
        assert model(torch.randn(2, chans, size, size)).shape == (2, 7)


def test_small_param_counts():
    counts = {n: sum(p.numel() for p in timm.create_model(n, **FMNIST).parameters()) for n in SMALL}
    assert 0.2e6 < counts[PICO] < 0.3e6
    assert 0.6e6 < counts[NANO] < 0.8e6


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('spectral', [0, 2, 4])
def test_backward_every_parameter_gets_a_gradient(name, spectral):
    torch.manual_seed(0)
    model = timm.create_model(name, num_spectral_stages=spectral, drop_path_rate=0.1, **FMNIST).train()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert model.aux_head.weight.grad.abs().sum() > 0   # the aux head trains through the max over tokens


def test_token_label_outputs():
    torch.manual_seed(0)
    model = timm.create_model(PICO, **FMNIST).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 2 * 2, 64)   # class token + the last stage's 2x2 grid
        cls, aux = model.forward_dense(x)
        assert cls.shape == (2, 10) and aux.shape == (2, 4, 10)
        # the released inference combination
        assert torch.allclose(model(x), cls + 0.5 * aux.max(dim=1).values, atol=1e-6)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    plain = timm.create_model(PICO, token_label=False, **FMNIST).eval()
    assert plain.aux_head is None and not any(n.startswith('aux_head') for n, _ in plain.named_parameters())
    with torch.no_grad():
        cls, aux = plain.forward_dense(x)
        assert aux is None and torch.equal(plain(x), cls)
    model.reset_classifier(5)
    assert model.head.out_features == model.aux_head.out_features == 5 and model(x).shape == (2, 5)


def test_class_token_is_the_mean_and_class_attention_keeps_patch_tokens():
    torch.manual_seed(0)
    model = timm.create_model(PICO, cls_attn_blocks=0, token_label=False, **FMNIST).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        t = model.forward_features(x)
        assert torch.allclose(t[:, 0], model.norm(_pre_norm_mean(model, x)), atol=1e-5)
        blk = timm.create_model(PICO, **FMNIST).cls_blocks[0]
        y = torch.randn(2, 5, 64)
        out = blk(y)
        assert torch.equal(out[:, 1:], y[:, 1:]) and not torch.allclose(out[:, 0], y[:, 0])


def _pre_norm_mean(model, x):
    h, grid = model.stem(x)
    for stage in model.stages:
        h, grid = stage(h, grid)
    return h.mean(1)


@pytest.mark.parametrize('stage', [0, 1])
def test_identity_filter_leaves_the_stage_mixer_input_unchanged(stage):
    torch.manual_seed(0)
    model = timm.create_model(NANO, **FMNIST)
    grid = model.grid_sizes[stage]
    dim = model.model_args['embed_dims'][stage]
    x = torch.randn(2, grid[0] * grid[1], dim)
    for blk in model.stages[stage].blocks:
        assert isinstance(blk.mixer, SpectralGating) and blk.mixer.grid_size == grid
        assert blk.mixer.weight.shape == (grid[0], grid[1] // 2 + 1, dim, 2)
        assert not torch.allclose(blk.mix(x, grid), x, atol=1e-3)
        blk.mixer.set_identity()
        assert (blk.mix(x, grid) - x).abs().max() < 1e-5


@pytest.mark.parametrize('spectral', [0, 1, 2, 3, 4])
def test_num_spectral_stages_selects_block_types(spectral):
    model = timm.create_model(NANO, num_spectral_stages=spectral, **FMNIST)
    depths = model.model_args['depths']
    assert _kinds(model) == [[i < spectral] * d for i, d in enumerate(depths)]
    for i, stage in enumerate(model.stages):
        for blk in stage.blocks:
            assert isinstance(blk, SpectFormerHBlock)
            assert isinstance(blk.mixer, SpectralGating if i < spectral else GridAttention)
    assert model.num_spectral_stages == model.model_args['num_spectral_stages'] == spectral


def test_default_is_two_spectral_stages():
    model = timm.create_model(PICO, **FMNIST)
    assert model.num_spectral_stages == 2 and _kinds(model) == [[True], [True], [False, False], [False]]


def test_non_square_input():
    model = timm.create_model(PICO, img_size=(28, 20), in_chans=1, num_classes=3).eval()
    assert model.grid_sizes == [(14, 10), (7, 5), (4, 3), (2, 2)]
    assert model.stages[0].blocks[0].mixer.weight.shape == (14, 6, 16, 2)
    assert model.stages[1].blocks[0].mixer.weight.shape == (7, 3, 32, 2)
    assert tuple(model.pretrained_cfg['input_size']) == (1, 28, 20)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 20)).shape == (2, 3)
    assert count_gmacs(model) * 1e9 == pytest.approx(spectformer_h_macs(model)['total'], rel=1e-9)


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('chans,size', [(1, 28), (3, 32)])
@pytest.mark.parametrize('extra', [{}, dict(num_spectral_stages=0, cls_attn_blocks=2),
                                   dict(num_spectral_stages=4, token_label=False)])
def test_count_gmacs_equals_closed_form(name, chans, size, extra):
    model = timm.create_model(name, img_size=size, in_chans=chans, num_classes=10, **extra)
    macs = spectformer_h_macs(model)
    assert count_gmacs(model) * 1e9 == pytest.approx(macs['total'], rel=1e-9)
    assert macs['total_with_spectral'] == macs['total'] + macs['spectral_fft'] + macs['spectral_filter']
    (h0, w0), (h1, w1) = model.grid_sizes[:2]
    dims, depths = model.model_args['embed_dims'], model.model_args['depths']
    filt = sum(4 * h * (w // 2 + 1) * dims[i] * depths[i] for i, (h, w) in enumerate(model.grid_sizes)
               if i < model.num_spectral_stages)
    assert macs['spectral_filter'] == filt


def test_run_dir_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(NANO, num_spectral_stages=3, cls_attn_blocks=2, **FMNIST)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        model.train()(x)   # move the BatchNorm running statistics off their init
    model.eval()
    assert 'num_classes' not in model.model_args
    json.dumps(model.model_args)
    run = save_run_dir(model, tmp_path / 'run')
    loaded = create(str(run)).eval()
    assert type(loaded) is SpectFormerH
    assert loaded.model_args == model.model_args and _kinds(loaded) == _kinds(model)
    assert tuple(loaded.pretrained_cfg['input_size']) == (1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_paper_shapes_params_and_macs():
    # release README: H-S 22.2M / 3.9G, H-B 33.1M / 6.3G, H-L 54.7M / 12.7G. Those GFLOPs leave out
    # the attention matrix products (q.k and a.v; module-hook counters do not see them):
    # total - attn_qk - attn_av reproduces them, total itself is 4.07 / 6.61 / 13.20.
    expected = dict(s=(22.2, 3.9, 4.07), b=(33.1, 6.3, 6.61), l=(54.7, 12.7, 13.20))
    for size, (params, paper_g, total_g) in expected.items():
        with torch.device('meta'):
            model = timm.create_model(f'deitlab_spectformer_h_{size}_224')
        assert model.grid_sizes == [(56, 56), (28, 28), (14, 14), (7, 7)]
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.05)
        macs = spectformer_h_macs(model)
        assert macs['total'] / 1e9 == pytest.approx(total_g, abs=0.005)
        assert (macs['total'] - macs['attn_qk'] - macs['attn_av']) / 1e9 == pytest.approx(paper_g, abs=0.05)
        if size == 's':
            assert count_gmacs(model) * 1e9 == pytest.approx(macs['total'], rel=1e-9)


def test_released_filter_sizes_at_224():
    # the release hard-codes 56 x 29 (stage 1) and 28 x 15 (stage 2) filters
    with torch.device('meta'):
        model = timm.create_model('deitlab_spectformer_h_l_224')
    assert model.stages[0].blocks[0].mixer.weight.shape == (56, 29, 96, 2)
    assert model.stages[1].blocks[0].mixer.weight.shape == (28, 15, 192, 2)
    assert stage_grids(224) == ((112, 112), [(56, 56), (28, 28), (14, 14), (7, 7)])


def test_wrong_input_size_is_a_clear_error():
    model = timm.create_model(PICO, **FMNIST).eval()
    with pytest.raises(ValueError, match=r'built for \(1, 28, 28\) inputs .* got \(2, 1, 32, 32\)'):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match='built for'):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match='does not fit the model'):
        spectformer_h_macs(model, (1, 32, 32))
    attention_only = timm.create_model(PICO, num_spectral_stages=0, **FMNIST).eval()
    with torch.no_grad():   # no filters: any input size the convolutions take
        assert attention_only(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize('bad', [-1, 5, 1.5, True, '2'])
def test_bad_num_spectral_stages(bad):
    with pytest.raises(ValueError, match='num_spectral_stages must be an int between 0 and 4'):
        timm.create_model(PICO, num_spectral_stages=bad, **FMNIST)


@pytest.mark.parametrize('kwargs,message', [
    (dict(dynamic_img_size=True), 'does not support dynamic_img_size'),
    (dict(cls_attn_blocks=-1), 'cls_attn_blocks must be an int >= 0'),
    (dict(global_pool='avg'), "global_pool must be 'token'"),
    (dict(num_heads=(1, 2, 3, 5)), 'embed dim 64 is not divisible by 5 heads'),
    (dict(depths=(1, 1, 1)), 'must have one entry per stage'),
    (dict(img_size=0), 'too small'),
])
def test_bad_arguments(kwargs, message):
    args = dict(FMNIST, **kwargs)
    with pytest.raises(ValueError, match=message):
        timm.create_model(PICO, **args)


def test_analytic_gmacs_uses_the_closed_form():
    from deitlab.bench import flops
    model = timm.create_model(NANO, **FMNIST)
    assert flops.analytic_gmacs(model) * 1e9 == pytest.approx(spectformer_h_macs(model)['total'], rel=1e-12)
    assert flops.analytic_gmacs(model) == pytest.approx(count_gmacs(model), rel=1e-9)
