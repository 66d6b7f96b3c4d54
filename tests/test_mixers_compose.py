"""PoolFormer and SpectFormer with the rest of deitlab: closed-form GMACs in ``bench``, training
with distillation, and token fusion in SpectFormer's attention blocks."""
import json

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


def _val_by_hand(model, data=DATA, batch_size=64):
    """Top-1 (%) and mean cross-entropy of ``model`` on the val split of ``data``, computed here
    (argmax of the logits against the labels; the images shaped as training shapes them), and
    the number of images."""
    from deitlab.data import build_dataset
    from deitlab.train.engine import model_input, norm_stats
    chans, size = model_input(model)
    mean, std = norm_stats(model, chans)
    ds = build_dataset(data, 'val', img_size=size, in_chans=chans, aug='none', mean=mean, std=std)
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            xs, ys = zip(*(ds[j] for j in range(i, min(i + batch_size, len(ds)))))
            logits, ys = model(torch.stack(xs)), torch.tensor(ys)
            correct += int((logits.argmax(1) == ys).sum())
            loss += torch.nn.functional.cross_entropy(logits, ys, reduction='sum').item()
    return 100 * correct / len(ds), loss / len(ds), len(ds)


def _last_metrics(run_dir):
    return json.loads((run_dir / 'metrics.jsonl').read_text().splitlines()[-1])


@pytest.mark.parametrize('student,kwargs,distill', [('deitlab_poolformer_pico_32', {}, 'hard'),
                                                    (SPECT, dict(alpha=2), 'soft')])
def test_token_mixer_students_train_with_a_deit_teacher(tmp_path, student, kwargs, distill):
    """The reported accuracy is the saved student's: the run directory, rebuilt and run here on the
    64 validation images, gets exactly ``val_top1`` (counted by hand, in %) and the logged
    ``val_loss`` (to float rounding).

    Wrong code this catches: a summary that reports another model (the teacher, the student before
    its last step, the EMA), the training split, or a fraction instead of a percentage; a run
    directory that does not rebuild the trained student (weights saved before the last step,
    another pooling or mixer layout, a distillation head lost)."""
    train(_cfg(tmp_path / 'teacher', model='deitlab_deit_pico_patch4_32'))
    res = train(_cfg(tmp_path / 'student', model=student, model_kwargs=kwargs, teacher=str(tmp_path / 'teacher'),
                     distill=distill))
    m = create(str(tmp_path / 'student'))
    top1, loss, n = _val_by_hand(m)
    assert n == 64 and res['epochs'] == 1
    assert res['val_top1'] == pytest.approx(top1, abs=1e-9) and res['best_top1'] == res['val_top1']
    assert _last_metrics(tmp_path / 'student')['val_loss'] == pytest.approx(loss, rel=1e-5)
    assert type(m).__name__ == {'deitlab_poolformer_pico_32': 'PoolFormer', SPECT: 'SpectFormer'}[student]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 24)


def test_spectformer_fine_tunes_with_mctf_consistency(tmp_path):
    """Training with --token-fusion mctf evaluates the fused model, and the run directory holds
    the plain one: MCTF (r = 4) put back on the saved model gets exactly the reported ``val_top1``
    on the 64 validation images (counted by hand, in %) and the logged ``val_loss``.

    Wrong code this catches: a summary that reports another model or split or a fraction instead
    of a percentage; a run directory that keeps the fusion patch, or holds weights other than the
    ones evaluated (saved before the last step, the consistency teacher's pass)."""
    res = train(_cfg(tmp_path / 'run', model=SPECT, model_kwargs=dict(alpha=2), token_fusion='mctf', r='4',
                     r_teacher_max=2))
    m = create(str(tmp_path / 'run'))   # the run directory holds the plain model
    assert token_fusion_of(m) is None and m.mixers == 'ssaa'
    top1, loss, n = _val_by_hand(apply_mctf(m, r=4))
    assert n == 64 and res['epochs'] == 1
    assert res['val_top1'] == pytest.approx(top1, abs=1e-9) and res['best_top1'] == res['val_top1']
    assert _last_metrics(tmp_path / 'run')['val_loss'] == pytest.approx(loss, rel=1e-5)


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
