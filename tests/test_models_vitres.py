"""Tests for the ViT-Res models (multi-stage ViT with residual spatial reduction, ViT-ResNAS part 1)."""
from __future__ import annotations

import pytest
import timm
import torch

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
from deitlab.bench import analytic_gmacs, analytic_macs, count_gmacs, count_params
from deitlab.models.inputs import resolve_input_size
from deitlab.models.vitres import ResidualSpatialReduction, ViTRes
from deitlab.models.vitres_stems import ConvStem, stem_macs
from deitlab.rundir import create, save_run_dir

NAMES = {
    'deitlab_vitres_mu_patch4_32', 'deitlab_vitres_nano_patch4_32',
    'deitlab_vitres_mu_distilled_patch4_32', 'deitlab_vitres_nano_distilled_patch4_32',
    'deitlab_vitres_tiny_patch14_224', 'deitlab_vitres_small_patch14_224',
}
# a model with irregular per-block widths: 3 stages of 1, 2, 1 blocks on a 16 px, 4x4-patch input
IRREGULAR = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3, widths=[8, 16, 24], depths=[1, 2, 1],
                 num_heads=[2, 1, 3, 2], head_dim=[4, 8, 5, 6], mlp_hidden=[10, 20, 7, 33])


def _perturb(model):
    """Move every parameter off its init (zeros / ones), so that all weights matter; BatchNorm running
    statistics (the conv stem's) too."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_names_registered():
    assert set(timm.list_models('deitlab_vitres_*')) == NAMES


def _expected_params(widths, depths, heads, hdim, mlp, patch, chans, grid, classes, prefix):
    """Parameter count by hand: patch conv, tokens, position embeddings, blocks, reductions, norm, heads."""
    n = chans * patch * patch * widths[0] + widths[0] + prefix * widths[0] + (prefix + grid * grid) * widths[0]
    i = 0
    for s, (C, d) in enumerate(zip(widths, depths)):
        if s > 0:
            Ci, g = widths[s - 1], grid // 2 ** s
            n += 2 * Ci + 9 * Ci * C + C + Ci * C + C + (prefix + g * g) * C
        for _ in range(d):
            H, hd, M = heads[i], hdim[i], mlp[i]
            n += 4 * C + C * 3 * H * hd + 3 * H * hd + H * hd * C + C + C * M + M + M * C + C
            i += 1
    return n + 2 * widths[-1] + (widths[-1] * classes + classes) * (2 if prefix == 2 else 1)


@pytest.mark.parametrize('name', sorted(NAMES))
def test_every_name_builds_with_the_expected_parameters(name):
    with torch.device('meta'):   # no memory, no init work: the 224 px shapes are cheap here
        model = timm.create_model(name, pretrained=False)
    assert isinstance(model, ViTRes)
    assert model.pretrained_cfg['architecture'] == name
    args = model.model_args
    small = name.endswith('_32')
    assert args['patch_size'] == ([4, 4] if small else [14, 14])
    assert model.num_classes == (10 if small else 1000)
    stages = {'mu': ([64, 128, 256], [2, 2, 2], 32), 'nano': ([96, 192, 384], [2, 2, 2], 32),
              'tiny': ([192, 384, 768], [4, 4, 4], 64), 'small': ([256, 512, 1024], [4, 4, 4], 64)}
    widths, depths, hd = stages[name.split('_')[2]]
    assert (args['widths'], args['depths']) == (widths, depths)
    stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
    heads = [widths[s] // hd for s in stage_of]
    mlp = [4 * widths[s] for s in stage_of]
    assert (args['num_heads'], args['head_dim'], args['mlp_hidden']) == (heads, [hd] * len(heads), mlp)
    prefix = 2 if 'distilled' in name else 1
    assert model.num_prefix_tokens == prefix
    expected = _expected_params(widths, depths, heads, [hd] * len(heads), mlp, 4 if small else 14, 3,
                                8 if small else 16, model.num_classes, prefix)
    assert count_params(model) == expected


@pytest.mark.parametrize('name,prefix', [('deitlab_vitres_mu_patch4_32', 1), ('deitlab_vitres_mu_distilled_patch4_32', 2)])
def test_shapes_through_every_stage(name, prefix):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, tuple(o.shape))))
             for m in [model.patch_embed, *model.reductions, *model.blocks]]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
    for h in hooks:
        h.remove()
    P = prefix
    # execution order: patch embed, stage 1 blocks, reduction, stage 2 blocks, reduction, stage 3 blocks
    assert seen == [('PatchEmbed', (2, 64, 64)),
                    ('WidthBlock', (2, 64 + P, 64)), ('WidthBlock', (2, 64 + P, 64)),
                    ('ResidualSpatialReduction', (2, 16 + P, 128)),
                    ('WidthBlock', (2, 16 + P, 128)), ('WidthBlock', (2, 16 + P, 128)),
                    ('ResidualSpatialReduction', (2, 4 + P, 256)),
                    ('WidthBlock', (2, 4 + P, 256)), ('WidthBlock', (2, 4 + P, 256))]
    assert feats.shape == (2, 4 + P, 256)
    assert out.shape == (2, 10)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert model.grid_sizes == [(8, 8), (4, 4), (2, 2)]
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = ViTRes(**IRREGULAR, drop_path_rate=0.3)
    assert [getattr(b.drop_path1, 'drop_prob', 0.) for b in model.blocks] == pytest.approx([0., 0.1, 0.2, 0.3])
    model(torch.randn(2, 1, 16, 16)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_residual_spatial_reduction_zeroed_is_pooled_padded_identity():
    torch.manual_seed(0)
    rsr = ResidualSpatialReduction(8, 12, (4, 6), num_prefix_tokens=2)
    with torch.no_grad():
        for t in (rsr.conv.weight, rsr.conv.bias, rsr.token_proj.weight, rsr.token_proj.bias, rsr.pos_embed):
            t.zero_()
    # multiples of 1/4 in [-2, 2): sums of four and their quarter are exact in float32
    x = torch.randint(-8, 8, (3, 2 + 4 * 6, 8)).float() / 4
    out = rsr(x)
    assert out.shape == (3, 2 + 2 * 3, 12)
    grid = x[:, 2:].reshape(3, 4, 6, 8)          # token (i, j) of the 4x6 grid, row-major
    pooled = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4
    expected = torch.zeros(3, 8, 12)
    expected[:, :2, :8] = x[:, :2]
    expected[:, 2:, :8] = pooled.reshape(3, 6, 8)
    assert torch.equal(out, expected)
    # the main path is live once its weights are not zero
    with torch.no_grad():
        rsr.pos_embed.fill_(1.0)
    assert torch.equal(rsr(x), expected + 1.0)


def test_distilled_heads():
    torch.manual_seed(0)
    model = _perturb(timm.create_model('deitlab_vitres_mu_distilled_patch4_32', num_classes=4))
    assert model.get_classifier()[1] is model.head_dist
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
        assert not torch.allclose(cls, dist)
        assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)
    model.train()   # no drop path / dropout here, so training mode computes the same numbers
    with torch.no_grad():
        assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)   # not in distilled training: averaged
        model.set_distilled_training(True)
        a, b = model(x)
        assert torch.allclose(a, cls, atol=1e-6) and torch.allclose(b, dist, atol=1e-6)
        model.eval()
        assert model(x).shape == (2, 4)   # eval always averages


def test_reset_classifier():
    model = timm.create_model('deitlab_vitres_mu_distilled_patch4_32')
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.head.out_features == 7 and model.head_dist.out_features == 7
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 256)


@pytest.mark.parametrize('name,kwargs', [
    ('deitlab_vitres_mu_patch4_32', dict(num_heads=[2, 1, 4, 3, 8, 5], mlp_hidden=[256, 100, 512, 64, 1024, 7])),
    ('deitlab_vitres_mu_distilled_patch4_32', dict(in_chans=1, num_classes=5)),
    ('deitlab_vitres_mu_patch4_32', dict(stem='conv', in_chans=1)),
    ('deitlab_vitres_mu_distilled_patch4_32', dict(stem='conv', stem_width=12, num_classes=5)),
])
def test_run_dir_round_trip(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = _perturb(timm.create_model(name, **kwargs)).eval()
    save_run_dir(model, tmp_path)
    for spec in (str(tmp_path), f'local-dir:{tmp_path}'):
        loaded = create(spec).eval()
        assert type(loaded) is ViTRes
        assert loaded.model_args == model.model_args
        assert loaded.pretrained_cfg['architecture'] == name
        x = torch.randn(2, model.in_chans, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize('kwargs,match', [
    (dict(img_size=24), r'6x6 patch grid.*multiples of 4'),          # 24 / 4 = 6: halves once, not twice
    (dict(img_size=32, patch_size=8, widths=[8, 16], depths=[1, 1]), None),   # 4x4 grid, one reduction: fine
    (dict(widths=[64, 32, 128]), r'narrower.*C_out >= C_in'),
    (dict(num_heads=[2, 2, 4]), r'num_heads has 3 entries but the model has 6 blocks'),
    (dict(mlp_hidden=[8] * 7), r'mlp_hidden has 7 entries but the model has 6 blocks'),
    (dict(head_dim=[32, 32]), r'head_dim has 2 entries'),
    (dict(stem='patchify'), r"unknown ViT-Res stem 'patchify'; supported: linear \(.*; "
                            r"conv \(ViT-ResNAS's release: 3x3 conv"),
    (dict(stem='conv', img_size=24, patch_size=3), r'conv stem needs an even patch size.*got patch_size 3x3'),
    (dict(stem='conv', img_size=(32, 24), patch_size=(4, 3)), r'conv stem needs an even patch size.*4x3'),
    (dict(stem='conv', stem_width=0), r'stem_width must be positive'),
    (dict(widths=[64, 128], depths=[2, 2, 2]), r'one entry per stage'),
])
def test_bad_arguments(kwargs, match):
    if match is None:
        ViTRes(**kwargs)
        return
    with pytest.raises(ValueError, match=match):
        ViTRes(**kwargs)
    with pytest.raises(ValueError, match=match):   # the same message through timm
        timm.create_model('deitlab_vitres_mu_patch4_32', **kwargs)


def test_reduction_rejects_narrowing_and_odd_grids():
    with pytest.raises(ValueError, match=r'C_out=8 < C_in=16'):
        ResidualSpatialReduction(16, 8, (4, 4), 1)
    with pytest.raises(ValueError, match=r'3x4 is not even'):
        ResidualSpatialReduction(8, 8, (3, 4), 1)


@pytest.mark.parametrize('name,kwargs', [
    ('deitlab_vitres_mu_patch4_32', {}),
    ('deitlab_vitres_mu_distilled_patch4_32', {}),
    ('deitlab_vitres_nano_patch4_32', dict(num_heads=[1, 5, 2, 7, 3, 12], head_dim=[16, 8, 40, 32, 24, 32],
                                           mlp_hidden=[10, 384, 99, 768, 1536, 3])),
    ('deitlab_vitres_mu_patch4_32', dict(stem='conv')),
    ('deitlab_vitres_nano_distilled_patch4_32', dict(stem='conv', stem_width=20, in_chans=1,
                                                     mlp_hidden=[10, 384, 99, 768, 1536, 3])),
    ('deitlab_vitres_tiny_patch14_224', dict(stem='conv')),
])
def test_closed_form_equals_counter(name, kwargs):
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    parts = analytic_macs(model)
    assert parts['total'] == sum(parts[k] for k in ('patch_embed', 'qkv', 'attn_qk', 'attn_av', 'proj', 'mlp',
                                                    'reduction_conv', 'reduction_tokens', 'head'))
    assert analytic_gmacs(model) == pytest.approx(count_gmacs(model), rel=1e-12)
    assert sum(parts['blocks']) == sum(parts[k] for k in ('qkv', 'attn_qk', 'attn_av', 'proj', 'mlp'))
    with pytest.raises(ValueError, match='position embeddings'):
        analytic_macs(model, (3, 64, 64))


def test_hand_count_equals_counter():
    """MACs of IRREGULAR (distilled, 2 prefix tokens) counted by hand, term by term."""
    model = ViTRes(**IRREGULAR, distilled=True).eval()
    P = 2
    patch = 4 * 4 * (1 * 4 * 4) * 8                        # 16 patches, each 1x4x4 -> 8 channels
    N1, N2, N3 = 16 + P, 4 + P, 1 + P                       # tokens per stage: 4x4, 2x2, 1x1 grids

    def block(N, C, H, d, M):                               # qkv, QK^T, AV, proj, MLP
        return N * C * 3 * H * d + H * N * N * d + H * N * N * d + N * H * d * C + 2 * N * C * M

    blocks = (block(N1, 8, 2, 4, 10)
              + block(N2, 16, 1, 8, 20) + block(N2, 16, 3, 5, 7)
              + block(N3, 24, 2, 6, 33))
    reductions = (9 * 8 * 16 * (2 * 2) + P * 8 * 16          # 3x3 conv onto the 2x2 grid, prefix-token Linear
                  + 9 * 16 * 24 * (1 * 1) + P * 16 * 24)
    heads = 2 * 24 * 3                                      # head and head_dist
    total = patch + blocks + reductions + heads
    assert round(count_gmacs(model) * 1e9) == total
    assert analytic_macs(model)['total'] == total


# ----------------------------------------------------------------------------- the conv stem

def test_conv_stem_shapes_and_grid():
    torch.manual_seed(0)
    model = timm.create_model('deitlab_vitres_mu_patch4_32', stem='conv', in_chans=1).eval()
    stem = model.patch_embed
    assert isinstance(stem, ConvStem)
    assert (stem.img_size, stem.patch_size, stem.grid_size, stem.num_patches) == ((32, 32), (4, 4), (8, 8), 64)
    assert stem.conv1[0].stride == (2, 2) and stem.proj.kernel_size == stem.proj.stride == (2, 2)
    assert stem.proj.in_channels == 32 and stem.in_chans == 1   # the hidden width is not the input's channels
    assert resolve_input_size(model) == (1, 32, 32)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert stem(x).shape == (2, 64, 64)
        assert model(x).shape == (2, 10)
    # 224 px, patch 14: the release's shapes, a 7x7 stride-7 projection onto the 16x16 grid
    with torch.device('meta'):
        big = timm.create_model('deitlab_vitres_tiny_patch14_224', stem='conv')
    assert big.patch_embed.proj.kernel_size == (7, 7) and big.patch_embed.grid_size == (16, 16)
    with pytest.raises(ValueError, match=r'takes \(1, 32, 32\) images, got \(3, 32, 32\)'):
        stem(torch.randn(1, 3, 32, 32))


def test_conv_stem_is_the_documented_network():
    """The stem's output by hand: conv-BN-ReLU stride 2, residual pair, strided projection."""
    torch.manual_seed(0)
    stem = _perturb(ConvStem(16, 4, 2, 6, width=5)).eval()
    x = torch.randn(3, 2, 16, 16)

    def cbr(seq, t, stride):
        conv, bn = seq[0], seq[1]
        t = torch.nn.functional.conv2d(t, conv.weight, None, stride, 1)
        t = (t - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        return torch.relu(t * bn.weight[:, None, None] + bn.bias[:, None, None])

    with torch.no_grad():
        y = cbr(stem.conv1, x, 2)
        y = y + cbr(stem.conv3, cbr(stem.conv2, y, 1), 1)
        ref = torch.nn.functional.conv2d(y, stem.proj.weight, stem.proj.bias, 2).flatten(2).transpose(1, 2)
        assert torch.allclose(stem(x), ref, atol=1e-5)


def test_conv_stem_hand_count_equals_counter():
    """The conv stem's MACs term by term, 16 px, patch 4, 1 channel, hidden width 5, stage-1 width 8."""
    model = ViTRes(**IRREGULAR, stem='conv', stem_width=5).eval()
    stem = (8 * 8 * 9 * 1 * 5             # 3x3 stride-2 conv onto 8x8
            + 2 * 8 * 8 * 9 * 5 * 5       # the residual pair of 3x3 convs
            + 4 * 4 * 5 * 2 * 2 * 8)      # 2x2 stride-2 projection onto the 4x4 grid
    assert stem_macs('conv', 16, 4, 1, 8, 5) == stem
    linear = ViTRes(**IRREGULAR).eval()
    assert round(count_gmacs(model) * 1e9) - round(count_gmacs(linear) * 1e9) == stem - 4 * 4 * (1 * 4 * 4) * 8
    assert analytic_macs(model)['patch_embed'] == stem
    assert analytic_macs(model)['total'] == round(count_gmacs(model) * 1e9)


# ----------------------------------------------------------------------------- the patch head

@pytest.mark.parametrize('name', ['deitlab_vitres_mu_patch4_32', 'deitlab_vitres_mu_distilled_patch4_32'])
def test_patch_head_leaves_the_class_logits_and_classifies_every_last_stage_token(name):
    torch.manual_seed(0)
    model = _perturb(timm.create_model(name, num_classes=5, patch_head=True)).eval()
    plain = timm.create_model(name, num_classes=5).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('patch_head.')})
    x = torch.randn(3, 3, 32, 32)
    P = model.num_prefix_tokens
    with torch.no_grad():
        out, patches = model.forward_dense(x)
        assert torch.equal(model(x), plain(x)) and torch.equal(out, plain(x))
        assert model.patch_grid == (2, 2) and patches.shape == (3, 4, 5)
        tokens = model.forward_features(x)[:, P:]
        assert torch.allclose(patches, tokens @ model.patch_head.weight.T + model.patch_head.bias, atol=1e-6)
        with model.capture_patch_logits() as got:
            assert got.logits is None
            assert torch.equal(model(x), out)
        assert torch.equal(got.logits, patches)
        assert model._patch_sink is None   # the capture ends with the block
    with pytest.raises(ValueError, match='no patch head to capture; build it with patch_head=True'):
        with plain.capture_patch_logits():
            pass
    model.reset_classifier(7)
    assert model.patch_head.out_features == 7 and model.forward_dense(x)[1].shape == (3, 4, 7)


def test_patch_head_round_trip_and_macs(tmp_path):
    torch.manual_seed(0)
    model = _perturb(timm.create_model('deitlab_vitres_mu_patch4_32', stem='conv', patch_head=True, in_chans=1)).eval()
    assert model.model_args['patch_head'] is True and 'patch_head' not in timm.create_model(
        'deitlab_vitres_mu_patch4_32').model_args
    save_run_dir(model, tmp_path)
    loaded = create(f'local-dir:{tmp_path}').eval()
    assert loaded.model_args == model.model_args and loaded.patch_head is not None
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(loaded.forward_dense(x), model.forward_dense(x)):
            assert torch.equal(a, b)
    parts = analytic_macs(model)
    assert parts['patch_head'] == 2 * 2 * 256 * 10                     # 4 last-stage tokens x C_S x K
    assert parts['total'] == round(count_gmacs(model) * 1e9)           # inference: the class head only
    assert round(model.training_gmacs() * 1e9) == parts['total'] + parts['patch_head']   # training: both
    assert parts['total'] == analytic_macs(timm.create_model('deitlab_vitres_mu_patch4_32', stem='conv',
                                                             in_chans=1))['total']
