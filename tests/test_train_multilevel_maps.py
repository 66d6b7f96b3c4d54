"""Multi-level training's coalescing maps (train/multilevel_maps.py): C(D(theta)) is the identity
bit for bit, the width de-coalescing keeps the function, the depth one does not, interpolation has
exact ends, and the results are ordinary deitlab models."""
import pytest
import timm
import torch

import deitlab
from deitlab.rundir import create, save_run_dir
from deitlab.train.config import ConfigError
from deitlab.train.multilevel_maps import PAIRINGS, check_coalescible, coalesce, decoalesce, interpolate

deitlab.register_models()

PICO = 'deitlab_deit_pico_patch4_32'
PICO_DIST = 'deitlab_deit_pico_distilled_patch4_32'
# 16 px, one channel, E=32, 4 blocks of 4 heads, qk 8 != v 6 per head (the Q/K/V sections differ), MLP 64.
SMALL = dict(num_classes=5, img_size=16, in_chans=1, embed_dim=32, depth=4, num_heads=4, qk_dim=8, v_dim=6,
             mlp_hidden=64)
ATOL = 1e-5


@torch.no_grad()
def _model(distilled=False, seed=0, **kw):
    """A tiny perturbed deitlab DeiT in eval mode (zero biases and unit LN weights made random)."""
    torch.manual_seed(seed)
    model = timm.create_model(PICO_DIST if distilled else PICO, **{**SMALL, **kw})
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _x(seed=0):
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, x):
    return model.eval()(x)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


KINDS = dict(deit={}, distilled=dict(distilled=True), layerscale=dict(init_values=1e-5))


@pytest.mark.parametrize('kind', list(KINDS))
def test_width_coalescing_undoes_decoalescing_exactly(kind, one_thread):
    small = _model(**KINDS[kind])
    large = decoalesce(small, depth=False)
    assert large.embed_dim == 64 and large.block_widths['num_heads'] == [8] * 4
    _assert_same_state(coalesce(large, depth=False), small)


@pytest.mark.parametrize('pairing', PAIRINGS)
def test_depth_coalescing_undoes_decoalescing_exactly(pairing, one_thread):
    small = _model(init_values=1e-5)
    large = decoalesce(small, width=False, pairing=pairing)
    assert len(large.blocks) == 8 and large.embed_dim == 32
    _assert_same_state(coalesce(large, width=False, pairing=pairing), small)


@pytest.mark.parametrize('pairing', PAIRINGS)
def test_width_and_depth_together_round_trip_exactly(pairing, one_thread):
    small = _model(distilled=True, init_values=1e-5)
    large = decoalesce(small, pairing=pairing)
    assert len(large.blocks) == 8 and large.embed_dim == 64
    _assert_same_state(coalesce(large, pairing=pairing), small)


def test_depth_decoalescing_copies_layers_in_the_pairing_order():
    small = _model()
    sd = small.state_dict()
    for pairing, order in (('adjacent', [0, 0, 1, 1, 2, 2, 3, 3]), ('half', [0, 1, 2, 3, 0, 1, 2, 3])):
        big = decoalesce(small, width=False, pairing=pairing).state_dict()
        for i, src in enumerate(order):
            assert torch.equal(big[f'blocks.{i}.mlp.fc1.weight'], sd[f'blocks.{src}.mlp.fc1.weight'])


def test_depth_coalescing_averages_the_paired_layers():
    large = _model()
    sd = large.state_dict()
    for pairing, pairs in (('adjacent', [(0, 1), (2, 3)]), ('half', [(0, 2), (1, 3)])):
        small = coalesce(large, width=False, pairing=pairing).state_dict()
        for i, (a, b) in enumerate(pairs):
            for name in ('attn.qkv.weight', 'norm1.bias', 'mlp.fc2.weight'):
                key = f'blocks.{{}}.{name}'
                assert torch.equal(small[key.format(i)], (sd[key.format(a)] + sd[key.format(b)]) / 2)


@pytest.mark.parametrize('kind', list(KINDS))
def test_width_decoalescing_keeps_the_logits(kind, one_thread):
    small = _model(**KINDS[kind])
    x = _x()
    large = decoalesce(small, depth=False)
    assert torch.allclose(_logits(large, x), _logits(small, x), atol=ATOL)
    if kind == 'distilled':   # both heads, not only their average
        for m in (small, large):
            m.set_distilled_training(True)
            m.train()
        with torch.no_grad():
            for a, b in zip(large(x), small(x)):
                assert torch.allclose(a, b, atol=ATOL)


@pytest.mark.parametrize('pairing', PAIRINGS)
def test_depth_decoalescing_changes_the_function(pairing):
    small = _model()
    x = _x()
    large = decoalesce(small, width=False, pairing=pairing)
    assert (_logits(large, x) - _logits(small, x)).abs().max() > 1e-3


def test_width_coalescing_follows_the_matrix_equations():
    """W' = A_out W S_in^T and b' = A_out b, checked with dense A and S on fc1, qkv's V section,
    the tokens and the classifier."""
    large = _model(distilled=True)
    small = coalesce(large, depth=False)
    L, S = large.state_dict(), small.state_dict()

    def avg(n):
        return torch.cat([torch.eye(n // 2), torch.eye(n // 2)], dim=1) / 2

    def summ(n):
        return torch.cat([torch.eye(n // 2), torch.eye(n // 2)], dim=1)

    W, b = L['blocks.0.mlp.fc1.weight'], L['blocks.0.mlp.fc1.bias']
    assert torch.allclose(S['blocks.0.mlp.fc1.weight'], avg(64) @ W @ summ(32).T, atol=1e-6)
    assert torch.allclose(S['blocks.0.mlp.fc1.bias'], avg(64) @ b, atol=1e-6)
    # V rows: heads are whole; head i of the small model merges heads i and i + 2 of the large one
    H, dq, dv = 4, 8, 6
    V = L['blocks.1.attn.qkv.weight'][2 * H * dq:].reshape(H, dv, 32)
    Vs = S['blocks.1.attn.qkv.weight'][H * dq:].reshape(H // 2, dv, 16)
    for i in range(H // 2):
        merged = (V[i] + V[i + H // 2]) / 2
        assert torch.allclose(Vs[i], merged[:, :16] + merged[:, 16:], atol=1e-6)
    for key in ('cls_token', 'dist_token', 'pos_embed', 'norm.weight', 'blocks.2.norm2.bias'):
        t = L[key]
        assert torch.equal(S[key], (t[..., :16] + t[..., 16:]) / 2), key
    for key in ('head.weight', 'head_dist.weight'):
        assert torch.equal(S[key], L[key][:, :16] + L[key][:, 16:])
        assert torch.equal(S[key.replace('weight', 'bias')], L[key.replace('weight', 'bias')])
    assert torch.equal(S['patch_embed.proj.weight'], (L['patch_embed.proj.weight'][:16]
                                                      + L['patch_embed.proj.weight'][16:]) / 2)


def test_shapes_of_the_micro_model():
    torch.manual_seed(0)
    model = timm.create_model('deitlab_deit_micro_distilled_patch4_32', num_classes=10, img_size=16,
                              in_chans=1).eval()
    small = coalesce(model)
    assert small.embed_dim == 64 and len(small.blocks) == 4
    assert small.cls_token.shape == (1, 1, 64) and small.dist_token.shape == (1, 1, 64)
    assert small.pos_embed.shape == (1, 18, 64)
    assert small.patch_embed.proj.weight.shape == (64, 1, 4, 4)
    assert small.head.weight.shape == (10, 64) and small.head_dist.weight.shape == (10, 64)
    w = small.block_widths
    assert w['num_heads'] == [2] * 4 and w['qk_dim'] == [32] * 4 and w['v_dim'] == [32] * 4
    assert w['mlp_hidden'] == [256] * 4 and w['attn_scale'] == model.block_widths['attn_scale'][:4]
    assert small.blocks[0].attn.qkv.weight.shape == (192, 64) and small.blocks[0].attn.proj.weight.shape == (64, 64)
    assert small.pretrained_cfg['architecture'] == model.pretrained_cfg['architecture']
    assert type(small) is type(model) and not small.training
    big = decoalesce(model, depth=False)
    assert big.pos_embed.shape == (1, 18, 256) and big.blocks[7].mlp.fc1.weight.shape == (1024, 256)
    assert small(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_mode_and_distilled_flag_are_kept():
    model = _model(distilled=True).train()
    model.set_distilled_training(True)
    for new in (coalesce(model), decoalesce(model)):
        assert new.training and new.distilled_training
        assert next(new.parameters()).dtype == torch.float32


def test_coalesced_model_reloads_from_a_run_dir(tmp_path):
    small = coalesce(_model(distilled=True, init_values=1e-5), pairing='half')
    save_run_dir(small, tmp_path)
    back = create(str(tmp_path))
    x = _x()
    assert back.block_widths == small.block_widths
    assert torch.equal(_logits(back, x), _logits(small, x))


def test_interpolation_has_exact_ends():
    large = _model(init_values=1e-5, seed=1)
    small = coalesce(_model(init_values=1e-5, seed=2))
    mapped = decoalesce(small)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    assert interpolate(large, mapped, 0.0) is large
    for k, v in large.state_dict().items():
        assert torch.equal(v, before[k])
    interpolate(large, mapped, 0.25)
    for k, v in large.state_dict().items():
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * mapped.state_dict()[k], atol=1e-6)
    interpolate(large, mapped, 1.0)
    _assert_same_state(large, mapped)


def test_bad_alpha_and_shapes_are_refused():
    large, mapped = _model(), decoalesce(_model(), depth=False)
    for alpha in (1.5, -0.1, float('nan')):
        with pytest.raises(ConfigError, match=r'alpha must be in \[0, 1\]'):
            interpolate(large, large, alpha)
    with pytest.raises(ConfigError, match='same shape: cls_token'):
        interpolate(large, mapped)
    with pytest.raises(ConfigError, match='same tensors; blocks.4'):
        interpolate(decoalesce(large, width=False), large)


@pytest.mark.parametrize('kw, message', [
    (dict(embed_dim=34 + 1), 'halves the embedding width: embed_dim 35 is odd'),
    (dict(num_heads=[4, 3, 4, 4]), 'block 1 has 3 heads, which cannot be halved'),
    (dict(num_heads=1), 'block 0 has 1 head, which cannot be halved'),
    (dict(mlp_hidden=63), 'block 0 has MLP hidden width 63'),
    (dict(depth=1), 'depth 1 cannot be halved'),
    (dict(depth=3), 'depth 3 cannot be halved .it is odd'),
])
def test_what_cannot_be_halved_is_named(kw, message):
    model = _model(**kw)
    with pytest.raises(ConfigError, match=message):
        check_coalescible(model)
    with pytest.raises(ConfigError, match=message):
        coalesce(model)


def test_only_one_axis_is_checked_when_only_one_is_halved():
    coalesce(_model(depth=3), depth=False)            # odd depth, width only: fine
    coalesce(_model(num_heads=3, qk_dim=8), width=False)   # odd heads, depth only: fine


def test_half_pairing_needs_equal_widths_in_paired_blocks():
    model = _model(num_heads=[4, 4, 2, 2])
    coalesce(model, width=False, pairing='adjacent')
    with pytest.raises(ConfigError, match='blocks 0 and 2 have different widths'):
        coalesce(model, width=False, pairing='half')


def test_bad_pairing_and_foreign_models_are_refused(tiny_vit):
    with pytest.raises(ConfigError, match="pairing must be one of adjacent, half, got 'odd'"):
        coalesce(_model(), pairing='odd')
    with pytest.raises(ConfigError, match="one of adjacent, half"):
        decoalesce(_model(), pairing='')
    with pytest.raises(ConfigError, match='VisionTransformer.*only deitlab DeiT / distilled DeiT.*from_timm'):
        check_coalescible(tiny_vit)
