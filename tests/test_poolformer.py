"""Tests for the deitlab PoolFormer models (timm's MetaFormer with PoolFormer v1 settings)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.metaformer import Pooling

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
from deitlab.bench.flops import count_gmacs
from deitlab.models.poolformer import SMALL_IMAGE_CONFIGS, PoolFormer, analytic_macs
from deitlab.rundir import save_run_dir

SMALL = [f'deitlab_poolformer_{s}_32' for s in SMALL_IMAGE_CONFIGS]


def test_names_registered():
    expected = {f'deitlab_poolformer_{s}' for s in ('s12', 's24', 's36', 'm36', 'm48')} | set(SMALL)
    assert set(timm.list_models('deitlab_poolformer_*')) == expected


@pytest.mark.parametrize('shape', [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 2, 3)])
def test_pooling_mixer_is_zero_on_constant_input(shape):
    # one constant per (sample, channel), dyadic so that sums of up to 9 copies are exact
    levels = torch.tensor([1.5, -0.75, 2.0, 0.25])
    x = levels[torch.arange(shape[0] * shape[1]) % 4].reshape(shape[0], shape[1], 1, 1).expand(shape).contiguous()
    out = Pooling(pool_size=3)(x)
    assert torch.equal(out, torch.zeros_like(out))  # borders too: count_include_pad=False


@pytest.mark.parametrize('name', SMALL)
def test_small_forward_backward_all_grads(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=28, in_chans=1, num_classes=10)
    assert isinstance(model, PoolFormer)
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
    # the last stage still has a spatial map larger than 1x1 (the pooling mixer is not trivially 0)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert feats[-1].shape[-2:] == (2, 2)


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('chans,size', [(1, 28), (3, 32)])
def test_count_gmacs_equals_closed_form(name, chans, size):
    model = timm.create_model(name, img_size=size, in_chans=chans, num_classes=10)
    assert tuple(model.pretrained_cfg['input_size']) == (chans, size, size)
    assert count_gmacs(model) == pytest.approx(analytic_macs(model, size) / 1e9, rel=1e-9)


def test_run_dir_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('deitlab_poolformer_nano_32', img_size=28, in_chans=1, num_classes=10).eval()
    with torch.no_grad():  # move LayerScale off its init so the weights matter
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_run_dir(model, tmp_path / 'run')
    loaded = timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True).eval()
    assert type(loaded) is PoolFormer
    assert loaded.model_args == model.model_args
    assert tuple(loaded.pretrained_cfg['input_size']) == (1, 28, 28)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_timm_poolformer_s12_state_dict_transfers():
    torch.manual_seed(0)
    ref = timm.create_model('poolformer_s12', pretrained=False, num_classes=7).eval()
    ours = timm.create_model('deitlab_poolformer_s12', pretrained=False, num_classes=7).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert ours.pretrained_cfg['hf_hub_id'] == 'timm/poolformer_s12.sail_in1k'
