"""--mix in training: deitlab.train.mixing (BatchMixer, MixLoss) and the engine wiring."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

import deitlab.models  # noqa: F401  (registers deitlab_* names)
from deitlab.train import ConfigError, TrainConfig, train
from deitlab.train.mixing import BatchMixer, MixLoss, MixTarget, default_mask_size
from deitlab.train.mixpro import attention_lambda, mixed_ce, pal_lambda, smooth_one_hot

K = 6
MODEL = 'deitlab_deit_pico_patch4_32'
DATA = 'glyphs:train=256,val=64,size=32,seed=1'


def _model(name=MODEL, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=K, **kw).eval()


def _batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, K, (B,), generator=g)


def _tokens(t, p=4):
    return F.unfold(t, p, stride=p).transpose(1, 2)


def test_default_mask_size_gives_four_cells_a_side():
    assert default_mask_size(32, 4) == 8
    assert default_mask_size(28, 4) == 8
    assert default_mask_size(224, 16) == 64
    assert default_mask_size(224, 14) == 56  # the released DeiT configs: mask 56 with patch 14
    assert default_mask_size(16, 16) == 16


def _smoothed(y, eps=0.1):
    """timm's label smoothing written out: eps / K off the label, 1 - eps + eps / K on it."""
    return torch.full((len(y), K), eps / K).scatter_(1, y[:, None], 1 - eps + eps / K)


def test_mixpro_batch_and_loss_match_the_formulas():
    """A MixPro batch and its PAL loss against values computed here from the mixed image, the
    model's own attention map and MixPro's formulas, none of them taken from deitlab.train.mixpro:
    the token mask and the partner of each sample are read off the mixed image; the class token's
    last-block attention is the softmax map the block computes (caught on its dropout, explicit
    attention), averaged over heads, at the patch columns; then lambda_attn = sum m a / sum a,
    alpha = cos(y~, softmax z), lambda = alpha lambda_attn + (1 - alpha) lambda_area and the loss
    mean[lambda CE(z, y) + (1 - lambda) CE(z, y_perm)].

    Wrong code this catches: a token mask or pairing that is not the one in the image; y~ without
    label smoothing or with the weights of the two labels swapped; attention from another row or
    block, with the class-token column kept, renormalised over the patches, or the heads' max;
    lambda_attn without the division; alpha as a dot product instead of the cosine; alpha weighting
    lambda_area instead of lambda_attn; the two cross-entropies' labels swapped; logged pal_alpha /
    pal_lambda_shift that are not the batch means of alpha and |lambda - lambda_area|."""
    model = _model()
    last = model.blocks[-1].attn
    with torch.no_grad():   # a peaked attention map and confident logits: labels far from the area weights
        last.qkv.weight.mul_(25)
        model.head.weight.mul_(20)
    last.fused_attn = False   # the explicit softmax path, so that its attention map can be caught
    maps = []
    last.attn_drop.register_forward_hook(lambda mod, args, out: maps.append(out.detach()))
    mixer = BatchMixer('mixpro', model, K, (32, 32), maskmix_prob=1.0)
    loss_fn = MixLoss()
    torch.manual_seed(7)   # a pairing without fixed points
    x, y = _batch()
    xm, target = mixer(x.clone(), y)
    assert isinstance(target, MixTarget) and target.kind == 'pal'
    # what the image says: which tokens are x_i's, and whose image the others come from
    tx, tm = _tokens(x), _tokens(xm)
    own = (tm == tx).all(-1)                                        # (B, N)
    assert 0 < own.sum() < own.numel()
    perm = torch.tensor([next(j for j in range(8) if j != i and torch.equal(tm[i][~own[i]], tx[j][~own[i]]))
                         for i in range(8)])
    assert not torch.equal(perm, torch.arange(8))
    m = own.float()
    lam_area = m.mean(1)   # 32 px images, 8 px cells: every token has the same number of pixels
    y_soft = lam_area[:, None] * _smoothed(y) + (1 - lam_area[:, None]) * _smoothed(y[perm])
    assert torch.equal(target.perm, perm) and torch.equal(target.token_mask, m)
    assert torch.allclose(target.lam_area, lam_area) and torch.allclose(target.y_soft, y_soft)
    with mixer.capture(target):
        logits = model(xm)
        loss = loss_fn(logits, target)
    assert len(maps) == 1 and maps[0].shape == (8, 2, 65, 65)
    a = maps[0][:, :, 0, 1:].mean(1)                                 # class-token row, patch columns
    assert torch.allclose(target.captured.attn, a, rtol=1e-5, atol=1e-7)
    lam_attn = (m * a).sum(1) / a.sum(1)
    p = logits.detach().softmax(-1)
    alpha = (y_soft * p).sum(1) / (y_soft.norm(dim=1) * p.norm(dim=1))
    lam = alpha * lam_attn + (1 - alpha) * lam_area
    nll = -p.log()
    expected = (lam * nll[torch.arange(8), y] + (1 - lam) * nll[torch.arange(8), y[perm]]).mean()
    # the attention moved the labels far from their area weights, and alpha spreads over (0, 1)
    assert (lam_attn - lam_area).abs().min() > 0.05 and (lam - lam_area).abs().max() > 0.2
    assert alpha.min() < 0.1 and alpha.max() > 0.5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    stats = loss_fn.pop_stats()
    assert set(stats) == {'pal_alpha', 'pal_lambda_shift'}
    assert stats['pal_alpha'] == pytest.approx(alpha.mean().item(), rel=1e-5)
    assert stats['pal_lambda_shift'] == pytest.approx((lam - lam_area).abs().mean().item(), rel=1e-5)
    assert loss_fn.pop_stats() == {}


def test_mixpro_loss_needs_the_captured_attention():
    model = _model()
    mixer = BatchMixer('mixpro', model, K, (32, 32), maskmix_prob=1.0)
    x, y = _batch()
    xm, target = mixer(x, y)
    with pytest.raises(RuntimeError, match='needs the class-token attention'):
        MixLoss()(model(xm), target)


def test_maskmix_gives_area_soft_labels_and_other_batches_mixup():
    model = _model()
    mixer = BatchMixer('maskmix', model, K, (32, 32), maskmix_prob=0.5)
    torch.manual_seed(0)
    np.random.seed(0)
    pure = 0
    for i in range(40):
        x, y = _batch(seed=i)
        xm, target = mixer(x.clone(), y)
        assert torch.is_tensor(target) and target.shape == (8, K)
        assert torch.allclose(target.sum(1), torch.ones(8))
        pure += _is_pure_mix(x, xm)  # MaskMix: whole tokens; Mixup blends pixels, CutMix boxes cut tokens
    assert 10 < pure < 30


def _is_pure_mix(x, xm):
    """Every token of xm equals the same token of some image of the batch."""
    t, tx = _tokens(xm), _tokens(x)
    eq = (t[:, None] == tx[None]).all(-1)  # (B, B, N)
    return bool(eq.any(1).all())


def test_transmix_cutmix_batches_get_attention_labels():
    model = _model()
    mixer = BatchMixer('transmix', model, K, (32, 32), switch_prob=1.0)  # CutMix on every batch
    np.random.seed(1)
    x, y = _batch()
    xm, target = mixer(x.clone(), y)
    assert isinstance(target, MixTarget) and target.kind == 'transmix'
    assert torch.equal(target.perm, torch.arange(7, -1, -1))
    # the token mask is the share of each token from x_i, and the area weight its mean
    assert torch.allclose(target.token_mask.mean(1), target.lam_area)
    whole = target.token_mask[0] == 1
    assert torch.equal(_tokens(xm)[:, whole], _tokens(x)[:, whole])
    with mixer.capture(target):
        logits = model(xm)
    # w = 1: the area label, i.e. timm's CutMix target; w = 0: the attention label alone
    area = MixLoss(transmix_area_weight=1.0)(logits, target)
    assert torch.allclose(area, SoftTargetCrossEntropy()(logits, target.y_soft))
    lam = attention_lambda(target.token_mask, target.captured.attn)
    y1 = smooth_one_hot(y, K, 0.1)
    attn_only = MixLoss(transmix_area_weight=0.0)(logits, target)
    assert torch.allclose(attn_only, SoftTargetCrossEntropy()(logits, lam[:, None] * y1 + (1 - lam[:, None]) * y1.flip(0)))
    assert not torch.allclose(area, attn_only)


def test_transmix_mixup_batches_keep_the_area_label():
    model = _model()
    mixer = BatchMixer('transmix', model, K, (32, 32), switch_prob=0.0)
    np.random.seed(0)
    _, target = mixer(*_batch())
    assert torch.is_tensor(target)


# (mode, numpy seed): for mixup-cutmix the seed's switch draw u (the second np.random.rand()) is
# 0.026 (CutMix), 0.715 (Mixup with switch probability 0.5, CutMix with 0.8) and 0.871 (Mixup)
@pytest.mark.parametrize('mode,seed', [('mixup', 5), ('cutmix', 5), ('cutmix', 6), ('mixup-cutmix', 2),
                                       ('mixup-cutmix', 0), ('mixup-cutmix', 5)])
def test_plain_modes_follow_timms_recipe(mode, seed):
    """The batch and label of mixup / cutmix / mixup-cutmix against the DeiT recipe computed here
    from the same numpy draws (timm's Mixup, batch mode, as its code documents it): u0 = rand()
    (< prob 1), for mixup-cutmix u = rand() and CutMix iff u < 0.5; lambda ~ Beta(0.8, 0.8) for
    Mixup, Beta(1, 1) for CutMix; a CutMix box of side int(32 sqrt(1 - lambda)) centred at
    (randint(32), randint(32)), clipped, pasted from x.flip(0), lambda corrected to 1 - box area;
    labels lambda y~ + (1 - lambda) y~.flip(0) with y~ smoothed by 0.1.

    Wrong code this catches: CutMix drawing with the Mixup alpha or the reverse; mixup-cutmix
    with TransMix's switch probability 0.8 (seed 0) or none; an uncorrected lambda (the Beta draw
    instead of the box's area); no label smoothing; a partner other than x.flip(0); CutMix boxes
    that keep the wrong side."""
    mixer = BatchMixer(mode, _model(), K, (32, 32))
    x, y = _batch()
    np.random.seed(seed)
    xm, target = mixer(x.clone(), y)
    rng = np.random.RandomState(seed)   # the same stream as np.random after np.random.seed(seed)
    assert rng.rand() < 1.0
    if mode == 'mixup-cutmix':
        cut = rng.rand() < 0.5
    else:
        cut = mode == 'cutmix'
    lam = rng.beta(1.0, 1.0) if cut else rng.beta(0.8, 0.8)
    if cut:
        side = int(32 * np.sqrt(1 - lam))
        cy, cx = rng.randint(0, 32), rng.randint(0, 32)
        yl, yh = max(cy - side // 2, 0), min(cy + (side + 1) // 2, 32)
        xl, xh = max(cx - side // 2, 0), min(cx + (side + 1) // 2, 32)
        box = torch.zeros(32, 32, dtype=torch.bool)
        box[yl:yh, xl:xh] = True
        assert 0 < box.sum() < 32 * 32
        expected = torch.where(box, x.flip(0), x)
        lam = 1 - box.sum().item() / (32 * 32)
        assert torch.equal(xm, expected)
    else:
        assert torch.allclose(xm, x * lam + x.flip(0) * (1 - lam), atol=1e-6)
    assert 0.05 < lam < 0.95
    soft = lam * _smoothed(y) + (1 - lam) * _smoothed(y.flip(0))
    assert torch.allclose(target, soft, atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(8))


def test_none_passes_through():
    x, y = _batch()
    mixer = BatchMixer('none', _model(), K, (32, 32))
    assert not mixer.active
    xo, yo = mixer(x, y)
    assert xo is x and yo is y


def test_bad_inputs_say_why():
    pool = timm.create_model('deitlab_poolformer_pico_32', num_classes=K)
    with pytest.raises(ValueError, match='no class-token attention'):
        BatchMixer('mixpro', pool, K, (32, 32))
    with pytest.raises(ValueError, match='no class-token attention'):
        BatchMixer('transmix', timm.create_model('deitlab_spectformer_pico_patch4_32', num_classes=K), K, (32, 32))
    with pytest.raises(ValueError, match='give --mask-size'):
        BatchMixer('maskmix', pool, K, (32, 32))
    BatchMixer('maskmix', pool, K, (32, 32), mask_size=8)  # a conv stem takes any cell size
    with pytest.raises(ValueError, match='must be a multiple of the patch size'):
        BatchMixer('maskmix', _model(), K, (32, 32), mask_size=6)
    with pytest.raises(ValueError, match='needs --mixup > 0'):
        BatchMixer('mixup', _model(), K, (32, 32), mixup_alpha=0)
    with pytest.raises(ValueError, match='needs --cutmix > 0'):
        BatchMixer('transmix', _model(), K, (32, 32), cutmix_alpha=0)
    with pytest.raises(ValueError, match='mix must be one of'):
        BatchMixer('mixmax', _model(), K, (32, 32))


def _cfg(out, **kw):
    base = dict(model=MODEL, data=DATA, out=str(out), epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0,
                drop_path=0.0, aug='none', tensorboard=False, progress=False, max_steps_per_epoch=4)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def test_train_mixpro_is_deterministic_and_logs_alpha(tmp_path):
    a = train(_cfg(tmp_path / 'a', mix='mixpro', maskmix_prob=1.0))
    b = train(_cfg(tmp_path / 'b', mix='mixpro', maskmix_prob=1.0))
    ma, mb = _metrics(tmp_path / 'a'), _metrics(tmp_path / 'b')
    assert ma[-1]['train_loss'] == mb[-1]['train_loss'] and a['val_top1'] == b['val_top1']
    assert 0 < ma[-1]['pal_alpha'] <= 1
    c = train(_cfg(tmp_path / 'c', mix='mixpro', maskmix_prob=1.0, seed=1))
    assert _metrics(tmp_path / 'c')[-1]['train_loss'] != ma[-1]['train_loss']
    assert c['epochs'] == 1


def test_train_refuses_what_does_not_compose(tmp_path):
    with pytest.raises(ConfigError, match='no class-token attention'):
        train(_cfg(tmp_path / 'p', model='deitlab_poolformer_pico_32', mix='transmix'))
    with pytest.raises(ConfigError, match='does not compose with --token-fusion'):
        train(_cfg(tmp_path / 't', mix='mixpro', token_fusion='tome'))
    with pytest.raises(ConfigError, match='mix must be one of'):
        train(_cfg(tmp_path / 'm', mix='cutout'))


def test_train_mixpro_with_distillation(tmp_path):
    train(_cfg(tmp_path / 'teacher', mix='none'))
    res = train(_cfg(tmp_path / 'student', model='deitlab_deit_pico_distilled_patch4_32', mix='mixpro',
                     maskmix_prob=1.0, teacher=str(tmp_path / 'teacher'), distill='hard'))
    assert res['epochs'] == 1 and 'pal_alpha' in _metrics(tmp_path / 'student')[-1]
    train(_cfg(tmp_path / 'student2', model='deitlab_deit_pico_distilled_patch4_32', mix='transmix',
               mixup_switch_prob=1.0, teacher=str(tmp_path / 'teacher'), distill='soft'))
    assert 'transmix_lam_attn' in _metrics(tmp_path / 'student2')[-1]


def test_train_mixpro_under_ddp(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29519', '-m', 'deitlab',
           'train', '--out', str(out), '--model', MODEL, '--data', DATA, '--epochs', '1', '--batch-size', '32',
           '--max-steps-per-epoch', '3', '--warmup-epochs', '0', '--aug', 'none', '--mix', 'mixpro',
           '--maskmix-prob', '1', '--no-tensorboard', '--no-progress']
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / 'train_config.json').read_text())['world_size'] == 2
    assert 0 < _metrics(out)[-1]['pal_alpha'] <= 1
