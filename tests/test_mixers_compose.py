"""PoolFormer and SpectFormer with the rest of deitlab: closed-form GMACs in ``bench``, training
with distillation, and token fusion in SpectFormer's attention blocks."""
import pytest
import timm
import torch

from deitlab.bench import analytic_gmacs, count_gmacs
from deitlab.bench.summary import gmacs_pair
from deitlab.rundir import create
from deitlab.tokens import TokenFusionError, apply_mctf, apply_tome, remove_token_fusion, token_fusion_of
from deitlab.tokens.patch import grid_blocks
from deitlab.train import TrainConfig, train

from _tokens_helpers import _groups, _paired_images

FMNIST = dict(img_size=28, in_chans=1, num_classes=10)
SPECT = 'deitlab_spectformer_pico_patch4_32'   # depth 4, width 64
DATA = 'glyphs:train=128,val=64,size=32,seed=1'


def _spect(seed=0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(SPECT, **{**FMNIST, **kw})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # zero-initialised biases and head made non-zero
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


# --------------------------------------------------------------------------- bench: closed forms

@pytest.mark.parametrize('name,kw', [('deitlab_poolformer_pico_32', dict(in_chans=1, num_classes=10)),
                                     ('deitlab_poolformer_nano_32', dict(in_chans=3, num_classes=24)),
                                     (SPECT, FMNIST), (SPECT, dict(FMNIST, mixers='p,s,a,a')),
                                     ('deitlab_spectformer_nano_patch4_32', dict(img_size=32, num_classes=24))])
def test_bench_uses_the_family_closed_form(name, kw):
    m = timm.create_model(name, **kw)
    pair = gmacs_pair(m)
    assert pair['gmacs_analytic'] is not None and pair['gmacs_match'] is True
    assert pair['gmacs_fvcore'] is None   # the families count matrix products only
    with pytest.raises(ValueError, match="convention='matmul'"):
        analytic_gmacs(m, convention='fvcore')


# --------------------------------------------------------------------------- training and distillation

def _cfg(out, **kw):
    base = dict(data=DATA, out=str(out), epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0, drop_path=0.0,
                mixup=0.0, cutmix=0.0, aug='light', tensorboard=False, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize('student,kwargs,distill', [('deitlab_poolformer_pico_32', {}, 'hard'),
                                                    (SPECT, dict(alpha=2), 'soft')])
def test_token_mixer_students_train_with_a_deit_teacher(tmp_path, student, kwargs, distill):
    train(_cfg(tmp_path / 'teacher', model='deitlab_deit_pico_patch4_32'))
    res = train(_cfg(tmp_path / 'student', model=student, model_kwargs=kwargs, teacher=str(tmp_path / 'teacher'),
                     distill=distill))
    assert res['epochs'] == 1 and 0 <= res['val_top1'] <= 100
    m = create(str(tmp_path / 'student'))
    assert type(m).__name__ == {'deitlab_poolformer_pico_32': 'PoolFormer', SPECT: 'SpectFormer'}[student]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 24)


def test_spectformer_fine_tunes_with_mctf_consistency(tmp_path):
    res = train(_cfg(tmp_path / 'run', model=SPECT, model_kwargs=dict(alpha=2), token_fusion='mctf', r='4',
                     r_teacher_max=2))
    assert res['epochs'] == 1 and res['val_top1'] >= 0
    m = create(str(tmp_path / 'run'))   # the run directory holds the plain model
    assert token_fusion_of(m) is None and m.mixers == 'ssaa'


# --------------------------------------------------------------------------- token fusion in attention blocks

@pytest.mark.parametrize('fuse', [apply_tome, apply_mctf])
@pytest.mark.parametrize('mixers', ['s,s,a,a', 'p,i,a,a', 'a,a,a,a'])
def test_fusion_at_r0_is_the_plain_spectformer(fuse, mixers):
    m = _spect(mixers=mixers)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        fuse(m, r=0)
        assert torch.equal(m(x), ref)
        remove_token_fusion(m)
        assert torch.equal(m(x), ref)


@pytest.mark.parametrize('method,mode', [('tome', None), ('mctf', 'one_step_ahead'), ('mctf', 'precise'),
                                         ('mctf', 'previous')])
def test_fused_spectformer_counted_gmacs_equal_closed_form(method, mode):
    m = _spect(alpha=2)
    assert grid_blocks(m) == 2
    if method == 'tome':
        apply_tome(m, r=6)
    else:
        apply_mctf(m, r=6, mode=mode)
    tf = token_fusion_of(m)
    with torch.no_grad():
        m(torch.randn(1, 1, 28, 28))
    # 49 tokens through the 2 spectral blocks, then r = 6 in the attention blocks (MCTF skips the first)
    assert tf.last['tokens'] == ([49, 43, 37] if method == 'tome' else [49, 49, 43])
    assert count_gmacs(m) == pytest.approx(tf.gmacs(m), rel=1e-9)
    if mode not in ('precise', 'previous'):   # the ablation modes cost more than the plain model here
        assert tf.gmacs(m) < analytic_gmacs(create(SPECT, **FMNIST, alpha=2))


@pytest.mark.parametrize('method', ['tome', 'mctf'])
def test_mean_pooling_of_merged_duplicates_is_exact(method):
    """All-attention SpectFormer (mean pooling, no class token), position embedding zeroed: pairs of
    identical patches are duplicate tokens; merging exactly those pairs with proportional attention
    and the size-weighted mean leaves the logits unchanged."""
    m = _spect(alpha=0)
    with torch.no_grad():
        m.pos_embed.zero_()
    x = _paired_images(m, 6)
    with torch.no_grad():
        ref = m(x)
        if method == 'tome':
            apply_tome(m, r=6, layers=[1], trace_source=True)
        else:
            apply_mctf(m, r=6, layers=[1], trace_source=True, tau_info=0, tau_size=0)
        out = m(x)
    grid = m.patch_embed.grid_size[1]   # 7 columns: three pairs per row
    assert _groups(m.token_fusion.last['source']) == {(grid * (k // 3) + 2 * (k % 3), grid * (k // 3) + 2 * (k % 3) + 1)
                                                      for k in range(6)}
    assert torch.allclose(out, ref, atol=1e-5)


def test_fusion_refuses_grid_blocks_after_attention():
    with pytest.raises(TokenFusionError, match=r'block 1 \(SpectralBlock\) mixes tokens on the patch grid after'):
        apply_tome(_spect(mixers='a,s,s,a'), r=2)
    with pytest.raises(TokenFusionError, match='no attention block'):
        apply_mctf(_spect(alpha=4), r=2)
    m = _spect(alpha=2, class_token=True, global_pool='token')   # a class token passes through the filters
    apply_tome(m, r=4)
    with torch.no_grad():
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert token_fusion_of(m).last['tokens'] == [50, 46, 42]


def test_poolformer_is_not_fusable():
    with pytest.raises(TokenFusionError, match='not PoolFormer'):
        apply_tome(timm.create_model('deitlab_poolformer_pico_32', in_chans=1, num_classes=10), r=2)


def test_fuse_command_reports_a_spectformer(tmp_path):
    from deitlab.rundir import save_run_dir
    from deitlab.tokens.fuse import FuseConfig, fuse_model
    save_run_dir(_spect(alpha=2), tmp_path / 'run')
    res = fuse_model(FuseConfig(model=str(tmp_path / 'run'), method='tome', r='5', measure=False))
    assert res['grid_blocks'] == 2 and res['tokens'] == [49, 44, 39]   # tokens entering the 2 attention blocks, out
    counted = count_gmacs(apply_tome(create(str(tmp_path / 'run')), r=5))
    assert res['gmacs_ratio'] * analytic_gmacs(create(str(tmp_path / 'run'))) == pytest.approx(counted, rel=1e-9)
