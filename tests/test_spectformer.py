"""Tests for the vanilla SpectFormer (spectral gating blocks, then attention blocks)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from deitlab.bench.flops import count_gmacs
from deitlab.models.spectformer import SpectFormer, SpectralBlock, SpectralGating, spectformer_macs
from deitlab.rundir import save_run_dir

SMALL = ['deitlab_spectformer_pico_patch4_32', 'deitlab_spectformer_nano_patch4_32',
         'deitlab_spectformer_micro_patch4_32']
FMNIST = dict(img_size=28, in_chans=1, num_classes=10)


def test_names_registered():
    names = set(timm.list_models('deitlab_spectformer_*'))
    assert set(SMALL) <= names
    assert {f'deitlab_spectformer_{s}_patch16_224' for s in ('t', 'xs', 's', 'b')} <= names


@pytest.mark.parametrize('grid', [(8, 8), (7, 7), (4, 6), (5, 3)])
@pytest.mark.parametrize('prefix', [0, 1])
def test_identity_filter_returns_input(grid, prefix):
    torch.manual_seed(0)
    sg = SpectralGating(16, grid, num_prefix_tokens=prefix)
    assert sg.weight.shape == (grid[0], grid[1] // 2 + 1, 16, 2)
    assert sg.weight.numel() == grid[0] * (grid[1] // 2 + 1) * 16 * 2
    x = torch.randn(3, prefix + grid[0] * grid[1], 16)
    assert not torch.allclose(sg(x), x, atol=1e-3)  # the random init filters
    sg.set_identity()
    y = sg(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 1e-5


def test_prefix_tokens_pass_through_and_grid_is_circular():
    torch.manual_seed(0)
    sg = SpectralGating(8, (4, 6), num_prefix_tokens=1)
    x = torch.randn(2, 1 + 24, 8)
    y = sg(x)
    assert torch.equal(y[:, :1], x[:, :1])
    # circular shift of the grid commutes with the filter (a global circular convolution)
    grid = x[:, 1:].reshape(2, 4, 6, 8)
    shifted = torch.cat([x[:, :1], grid.roll((1, 2), dims=(1, 2)).reshape(2, 24, 8)], dim=1)
    y_shift = sg(shifted)[:, 1:].reshape(2, 4, 6, 8)
    assert torch.allclose(y_shift, y[:, 1:].reshape(2, 4, 6, 8).roll((1, 2), dims=(1, 2)), atol=1e-5)
    with pytest.raises(ValueError, match='expects 1 prefix'):
        sg(torch.randn(2, 24, 8))


def test_non_square_grid_model():
    model = timm.create_model(SMALL[0], img_size=(28, 16), in_chans=1, num_classes=5)
    assert tuple(model.patch_embed.grid_size) == (7, 4)
    assert model.blocks[0].filter.weight.shape == (7, 3, 64, 2)
    assert model(torch.randn(2, 1, 28, 16)).shape == (2, 5)


def test_class_token_variant():
    model = timm.create_model(SMALL[0], class_token=True, global_pool='token', **FMNIST)
    assert model.blocks[0].filter.num_prefix_tokens == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_alpha_selects_block_types():
    depth = 6
    plain = timm.create_model(SMALL[1], alpha=0, **FMNIST)
    assert all(type(b) is Block for b in plain.blocks)
    spectral = timm.create_model(SMALL[1], alpha=depth, **FMNIST)
    assert all(type(b) is SpectralBlock for b in spectral.blocks)
    mixed = timm.create_model(SMALL[1], **FMNIST)
    assert mixed.alpha == 2   # the released alpha / depth = 1/3
    assert [type(b) for b in mixed.blocks] == [SpectralBlock] * 2 + [Block] * 4
    # alpha=0 is a plain ViT: same parameter names and shapes as timm's VisionTransformer
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
        class_token=False, global_pool='avg', fc_norm=False)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in vit.state_dict().items()}
    vit.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(plain.eval()(x), vit.eval()(x), atol=1e-6)


@pytest.mark.parametrize('alpha', [-1, 7, 2.5])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match='alpha .number of spectral blocks. must be'):
        timm.create_model(SMALL[1], alpha=alpha, **FMNIST)


def test_dynamic_img_size_rejected():
    with pytest.raises(ValueError, match='does not support dynamic_img_size'):
        timm.create_model(SMALL[0], dynamic_img_size=True, **FMNIST)


@pytest.mark.parametrize('name', SMALL)
def test_forward_backward_all_grads(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **FMNIST)
    assert model.patch_embed.grid_size == (7, 7)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.blocks[0].filter.weight.grad.abs().sum() > 0


def test_run_dir_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(SMALL[1], alpha=2, **FMNIST).eval()
    assert model.model_args['alpha'] == 2 and 'num_classes' not in model.model_args
    run = save_run_dir(model, tmp_path / 'run')
    loaded = timm.create_model(f'local-dir:{run}', pretrained=True).eval()
    assert isinstance(loaded, SpectFormer) and loaded.alpha == 2
    assert [type(b) for b in loaded.blocks] == [type(b) for b in model.blocks]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.model_args == model.model_args


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('alpha', [0, 1, None])
def test_count_gmacs_equals_closed_form(name, alpha):
    kw = dict(FMNIST) if alpha is None else dict(FMNIST, alpha=alpha)
    model = timm.create_model(name, **kw)
    macs = spectformer_macs(model)
    assert count_gmacs(model) * 1e9 == pytest.approx(macs['total'], rel=1e-9)
    assert macs['total_with_spectral'] == macs['total'] + macs['spectral_fft'] + macs['spectral_filter']
    if model.alpha:
        assert macs['spectral_filter'] == model.alpha * 4 * 7 * 4 * model.embed_dim


def test_paper_shapes_params_and_macs():
    # released vanilla logs: T 9.2M / 1.8G, XS 20.0M / 4.0G, S 32.4M / 6.6G, B 57.2M / 11.5G
    expected = dict(t=(9.2, 1.8), xs=(20.0, 4.0), s=(32.4, 6.6), b=(57.2, 11.5))
    for size, (params, gmacs) in expected.items():
        with torch.device('meta'):
            model = timm.create_model(f'deitlab_spectformer_{size}_patch16_224')
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.1)
        assert spectformer_macs(model)['total'] / 1e9 == pytest.approx(gmacs, abs=0.1)


# ------------------------------------------------------------------ MetaFormer mixer patterns

def test_mixer_pattern_builds_the_intended_layers_and_round_trips(tmp_path):
    from deitlab.models.spectformer import GridPooling, MixerBlock
    model = timm.create_model(SMALL[0], mixers='p,s,a,i', **FMNIST).eval()   # pico: depth 4
    kinds = [type(b) for b in model.blocks]
    assert kinds == [MixerBlock, SpectralBlock, Block, MixerBlock]
    assert isinstance(model.blocks[0].mixer, GridPooling) and isinstance(model.blocks[3].mixer, torch.nn.Identity)
    assert model.mixers == 'psai' and model.alpha is None and model.model_args['mixers'] == 'psai'
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count_gmacs(model) == pytest.approx(spectformer_macs(model)['total'] / 1e9, rel=0, abs=0)
    save_run_dir(model, tmp_path / 'run')
    again = timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True).eval()
    model.eval()
    assert again.mixers == 'psai' and torch.equal(again(x), model(x))


def test_a_spectformer_pattern_is_alpha():
    a = timm.create_model(SMALL[1], mixers='sssaaa', **FMNIST)
    b = timm.create_model(SMALL[1], alpha=3, **FMNIST)
    assert a.alpha == 3 and a.mixers == b.mixers == 'sssaaa'
    assert a.state_dict().keys() == b.state_dict().keys()


def test_grid_pooling_of_a_constant_is_zero():
    from deitlab.models.spectformer import GridPooling
    pool = GridPooling((7, 5), num_prefix_tokens=1)
    out = pool(torch.full((2, 1 + 35, 8), 1.5))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize('pattern,message', [('s,s,x,a', r"unknown token mixer\(s\) \['x'\]"),
                                             ('ssa', 'the pattern has 3 blocks but depth is 4')])
def test_bad_mixer_pattern_message(pattern, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(SMALL[0], mixers=pattern, **FMNIST)


def test_spectral_block_is_one_residual_around_filter_and_mlp():
    torch.manual_seed(0)
    blk = SpectralBlock(16, (4, 4))
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        expected = x + blk.mlp(blk.norm2(blk.filter(blk.norm1(x))))
        blk.filter.set_identity()
        identity = x + blk.mlp(blk.norm2(blk.norm1(x)))   # the paper's LN -> SGN -> LN -> MLP, SGN = id
        assert torch.allclose(blk(x), identity, atol=1e-5)
    assert not torch.allclose(expected, identity)
