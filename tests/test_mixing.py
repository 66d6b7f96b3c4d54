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


def test_mixpro_batch_and_loss_match_the_formulas():
    model = _model()
    mixer = BatchMixer('mixpro', model, K, (32, 32), maskmix_prob=1.0)
    loss_fn = MixLoss()
    torch.manual_seed(3)
    x, y = _batch()
    xm, target = mixer(x.clone(), y)
    assert isinstance(target, MixTarget) and target.kind == 'pal'
    assert torch.allclose(target.y_soft.sum(1), torch.ones(8))
    # every token of xm comes from x_i where the token mask is 1 and from x_perm(i) elsewhere
    m = target.token_mask.bool()[..., None]
    assert torch.equal(_tokens(xm), torch.where(m, _tokens(x), _tokens(x[target.perm])))
    with mixer.capture(target):
        logits = model(xm)
        loss = loss_fn(logits, target)
    a = target.captured.attn
    assert a.shape == (8, 64)
    lam = pal_lambda(attention_lambda(target.token_mask, a), target.lam_area, logits, target.y_soft)
    assert torch.allclose(loss, mixed_ce(logits, y, target.perm, lam))
    stats = loss_fn.pop_stats()
    assert set(stats) == {'pal_alpha', 'pal_lambda_shift'} and 0 < stats['pal_alpha'] <= 1
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


@pytest.mark.parametrize('mode', ['mixup', 'cutmix', 'mixup-cutmix'])
def test_plain_modes_are_timm(mode):
    from timm.data import Mixup
    model = _model()
    mixer = BatchMixer(mode, model, K, (32, 32))
    ref = Mixup(mixup_alpha=0.8 if mode != 'cutmix' else 0.0, cutmix_alpha=1.0 if mode != 'mixup' else 0.0,
                label_smoothing=0.1, num_classes=K)
    x, y = _batch()
    np.random.seed(5)
    a = mixer(x.clone(), y)
    np.random.seed(5)
    b = ref(x.clone(), y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


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
