"""DCAL on the one training loop (``deitlab train --dcal``: train/dcal_train.py, dcal_config.py) and
retrieval evaluation (``deitlab eval --retrieval``: retrieval.py): the run directory reloads as
``deitlab_dcal``, branch losses and loss weights in the metrics, resume equals an unbroken run,
the re-ID loss with P x K batches, the retrieval metric on hand-made distances, bad input."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from deitlab.cli import main
from deitlab.data.pk_sampler import PKBatchSampler
from deitlab.evaluate import evaluate
from deitlab.retrieval import average_precision, retrieval_metrics
from deitlab.rundir import create
from deitlab.train import ConfigError, TrainConfig, train
from deitlab.train import engine
from deitlab.train.dcal import DCAL
from deitlab.train.triplet import batch_hard_triplet

FINE = 'glyphs-fine:train=64,val=32,letters=2'
REID = 'glyphs-reid:ids=8,test_ids=4,per_id=6,views=2,val_per_id=2'
PICO = 'deitlab_deit_pico_patch4_32'
BRANCHES = ('sa', 'glca', 'pwca')


def tiny_cfg(out, **kw):
    base = dict(model=PICO, data=FINE, out=str(out), epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0,
                drop_path=0.0, mix='none', aug='none', tensorboard=False, progress=False, max_steps_per_epoch=2,
                dcal=True)
    base.update(kw)
    return TrainConfig(**base)


def _rows(out):
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def _x(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _val_loader(model, spec=FINE):
    from deitlab.data.for_model import eval_loader, model_datasets
    val, = model_datasets(model, spec, ('val',))
    return eval_loader(val, 32)


def test_dcal_run_reloads_as_the_wrapper_with_identical_outputs(one_thread, tmp_path):
    out = tmp_path / 'run'
    res = train(tiny_cfg(out))
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'deitlab_dcal' and config['model_args']['backbone'] == PICO
    assert config['model_args']['ratio'] == 0.1 and config['model_args']['inference'] == 'sa+glca'
    sd = load_file(str(out / 'model.safetensors'))
    assert {'loss_weights.sa', 'loss_weights.glca', 'loss_weights.pwca', 'glca_head.weight'} <= set(sd)
    a = create(str(out)).eval()
    b = create(f'local-dir:{out}').eval()
    c = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert isinstance(a, DCAL) and all(torch.equal(sd[k], v) for k, v in a.state_dict().items())
    x = _x()
    with torch.no_grad():
        ya = a(x)
        assert torch.equal(ya, b(x)) and torch.equal(ya, c(x))
        assert torch.allclose(ya.sum(1), torch.full((3,), 2.0))   # softmax(SA) + softmax(GLCA)
    # the evaluation of the run is the reloaded model's
    ev = evaluate(a, _val_loader(a), torch.device('cpu'))
    assert ev['top1'] == res['val_top1'] and ev['loss'] == pytest.approx(_rows(out)[-1]['val_loss'], rel=1e-6)
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert all(torch.equal(ckpt['model'][k], v) for k, v in sd.items())
    # the summary prices both inference modes; the training FLOPs include PWCA
    assert 0 < res['gmacs_sa'] < res['gmacs_sa_glca'] and set(res['dcal_w']) == set(BRANCHES)
    assert res['train_gflops'] == pytest.approx(2 * 2 * 16 * 3 * 2 * a.training_gmacs(), rel=1e-3)
    assert a.training_gmacs() > res['gmacs_sa_glca'] + 0.9 * res['gmacs_sa']


def test_metrics_hold_the_branch_losses_and_loss_weights(one_thread, tmp_path):
    out = tmp_path / 'm'
    train(tiny_cfg(out, epochs=1))
    row = _rows(out)[-1]
    for b in BRANCHES:
        assert row[f'dcal_loss_{b}'] > 0 and row[f'dcal_w_{b}'] != 0.0   # the w_k are learnt
    assert 'dcal_triplet_sa' not in row and 0 <= row['val_top1'] <= 100


def test_loss_weights_and_tokens_are_kept_out_of_weight_decay():
    from deitlab.train.loop import build_optimizer
    torch.manual_seed(0)
    model = DCAL(create(PICO, num_classes=4))
    opt = build_optimizer(model, dict(opt='adamw', lr=1e-3, weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert {'loss_weights.sa', 'loss_weights.glca', 'loss_weights.pwca', 'backbone.pos_embed',
            'backbone.cls_token'} <= no_decay
    assert 'backbone.blocks.0.attn.qkv.weight' not in no_decay and 'glca_head.weight' not in no_decay


@pytest.mark.parametrize('model, kwargs', [
    ('deitlab_deit_pico_distilled_patch4_32', {}),
    ('vit_tiny_patch16_224', dict(img_size=32, model_kwargs=dict(patch_size=4, depth=2, embed_dim=32, num_heads=2))),
])
def test_distilled_deit_and_timm_vit_train_and_reload(one_thread, tmp_path, model, kwargs):
    out = tmp_path / 'r'
    res = train(tiny_cfg(out, model=model, epochs=1, max_steps_per_epoch=1, dcal_no_pwca=True, **kwargs))
    loaded = create(str(out)).eval()
    assert isinstance(loaded, DCAL) and loaded.branches == ('sa', 'glca')
    assert evaluate(loaded, _val_loader(loaded), torch.device('cpu'))['top1'] == res['val_top1']
    assert json.loads((out / 'config.json').read_text())['model_args']['backbone'] == model


def test_resume_equals_an_unbroken_run(one_thread, tmp_path, monkeypatch):
    full, part = tmp_path / 'full', tmp_path / 'part'
    train(tiny_cfg(full, epochs=3))
    original = engine._RunDirEpochs.after_epoch

    def stop(self, epoch, row):
        original(self, epoch, row)
        if epoch == 0:
            raise KeyboardInterrupt
    monkeypatch.setattr(engine._RunDirEpochs, 'after_epoch', stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(part, epochs=3))
    monkeypatch.setattr(engine._RunDirEpochs, 'after_epoch', original)
    with pytest.raises(ConfigError, match=r'cannot resume .*dcal_ratio: saved 0.1 vs now 0.2'):
        train(tiny_cfg(part, epochs=3, dcal_ratio=0.2, resume=True))
    train(tiny_cfg(part, epochs=3, resume=True))
    a, b = load_file(str(full / 'model.safetensors')), load_file(str(part / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in r.items() if 'time' not in k and 'per_s' not in k and 'cpu_s' not in k}
                       for r in _rows(p)]
    assert strip(full) == strip(part)


def test_triplet_loss_with_pk_batches(one_thread, tmp_path, monkeypatch):
    seen = []
    original = engine._DeiTBatches.on_batch

    def spy(self, x, y):
        seen.append(y.clone())
        return original(self, x, y)
    monkeypatch.setattr(engine._DeiTBatches, 'on_batch', spy)
    out = tmp_path / 't'
    train(tiny_cfg(out, data=REID, batch_size=8, pk='4,2', triplet=True, dcal_ratio=0.3, epochs=1))
    assert len(seen) == 2
    for y in seen:
        labels, counts = y.unique(return_counts=True)
        assert len(labels) == 4 and counts.tolist() == [2] * 4
        assert y.view(4, 2).eq(y.view(4, 2)[:, :1]).all()   # identity-major
    row = _rows(out)[-1]
    assert all(row[f'dcal_triplet_{b}'] >= 0 and row[f'dcal_loss_{b}'] >= row[f'dcal_triplet_{b}'] for b in BRANCHES)


def test_pk_batches_are_drawn_per_seed_and_epoch():
    labels = torch.arange(30) % 7   # 7 labels, 4 or 5 images each
    s = PKBatchSampler(labels, 3, 4, seed=1)
    assert len(s) == 30 // 12 == len(list(s))
    first = list(s)
    assert first == list(PKBatchSampler(labels, 3, 4, seed=1))
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    for batch in first:
        ys = labels[batch].view(3, 4)
        assert ys.eq(ys[:, :1]).all() and len(ys[:, 0].unique()) == 3
    halves = [list(PKBatchSampler(labels, 3, 4, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == first


def test_batch_hard_triplet_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0], [9.0, 9.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    # anchor 0: d_ap 3, d_an 1 -> 3 - 1 + 0.5; anchor 1: d_ap 3, d_an sqrt(10) -> relu(3 - 3.162 + 0.5);
    # anchor 2: d_ap 4, d_an 1 -> 3.5; anchor 3: d_ap 4, d_an 5 -> 0; anchor 4: no positive, left out
    expect = (2.5 + (3.5 - 10 ** 0.5) + 3.5 + 0.0) / 4
    assert batch_hard_triplet(f, y, 0.5).item() == pytest.approx(expect, rel=1e-6)
    assert batch_hard_triplet(f, torch.arange(5), 0.3).item() == 0.0


# --- the retrieval metric on hand-made distances ---

def test_average_precision_by_hand():
    assert average_precision(torch.tensor([True, False, True, False])) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision(torch.tensor([False, True])) == pytest.approx(0.5)
    assert average_precision(torch.tensor([False, False])) == 0.0


def test_retrieval_metrics_market_protocol():
    # gallery: identities and views; the distance rows rank it 0, 1, 2, ...
    g_ids = torch.tensor([1, 2, 1, 3, 1])
    g_views = torch.tensor([1, 1, 0, 1, 0])
    dist = torch.tensor([
        [0.1, 0.2, 0.3, 0.4, 0.5],   # query 1 view 0: 2 and 4 are junk (id 1, view 0): matches at rank 1 of [0, 1, 3]
        [0.5, 0.1, 0.2, 0.3, 0.4],   # query 1 view 2: order 1, 2, 3, 4, 0: matches at ranks 2, 4, 5
        [0.1, 0.2, 0.3, 0.4, 0.5],   # query 4 view 0: no match anywhere: left out
        [0.3, 0.1, 0.2, 0.4, 0.5],   # query 2 view 1: its only match (1, same view) is junk: left out
    ])
    q_ids, q_views = torch.tensor([1, 1, 4, 2]), torch.tensor([0, 2, 0, 1])
    res = retrieval_metrics(dist, q_ids, q_views, g_ids, g_views, ranks=(1, 2, 5))
    ap1, ap2 = 1.0, (1 / 2 + 2 / 4 + 3 / 5) / 3
    assert res['queries'] == 4 and res['valid_queries'] == 2
    assert res['mAP'] == pytest.approx(100 * (ap1 + ap2) / 2)
    assert (res['rank1'], res['rank2'], res['rank5']) == (50.0, 100.0, 100.0)
    with pytest.raises(ValueError, match='no query has a match'):
        retrieval_metrics(dist[2:], q_ids[2:], q_views[2:], g_ids, g_views)


def test_eval_retrieval_cli(one_thread, tmp_path, capsys):
    out = tmp_path / 'reid'
    train(tiny_cfg(out, data=REID, batch_size=8, pk='4,2', triplet=True, epochs=1, max_steps_per_epoch=1))
    for model in (str(out), PICO):   # DCAL's features, and a plain model's pre-logits
        assert main(['eval', '--model', model, '--data', REID, '--retrieval', '--json']) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 0 <= res['mAP'] <= 100 and 0 <= res['rank1'] <= res['rank5'] <= 100
        assert res['queries'] == 4 * 2 and res['gallery'] == 4 * 4 and res['valid_queries'] == 8
        assert res['feature_dim'] == (128 if model == str(out) else 64)
    assert main(['eval', '--model', PICO, '--data', FINE, '--retrieval']) == 2
    assert 'no query and gallery; use a re-ID spec' in capsys.readouterr().err


@pytest.mark.parametrize('kw, match', [
    (dict(dcal_ratio=0.0), r'dcal_ratio \(--dcal-ratio\) is a fraction of the patch tokens in \(0, 1\], got 0.0'),
    (dict(mix='mixup-cutmix', mixup=0.8), r'--dcal with batch mixing \(--mix mixup-cutmix\) is not supported.*--mix none'),
    (dict(mix='transmix', mixup=0.0, cutmix=0.0), r'--mix transmix\) is not supported'),
    (dict(distill='soft', teacher=PICO), r'--dcal does not compose with --distill soft yet'),
    (dict(dcal=False, dcal_no_pwca=True), r'--dcal-no-pwca is an option of DCAL training: add --dcal'),
    (dict(dcal=False, triplet=True, distill='soft', teacher=PICO), r'--triplet does not compose with --distill soft'),
    (dict(dcal_no_glca=True), r'--dcal-no-glca: the inference sa\+glca needs the GLCA branch'),
    (dict(dcal_no_glca=True, dcal_no_pwca=True, dcal_inference='sa'), r'leave only the backbone'),
    (dict(pk='4,2'), r'--pk 4,2 makes batches of 4 x 2 = 8 images but --batch-size is 16'),
    (dict(pk='4'), r'--pk takes P,K'),
    (dict(pk='16,1', triplet=True), r'triplet loss needs at least 2 identities \(P\) of at least 2 images'),
    (dict(dcal_inference='glca'), r"dcal_inference must be one of sa\+glca, sa; got 'glca'"),
    (dict(token_fusion='tome'), r'--dcal does not compose with --token-fusion'),
])
def test_bad_settings_are_refused_with_the_reason(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path / 'x', **kw).validate()


def test_a_dcal_run_trains_on_only_with_dcal(one_thread, tmp_path):
    out = tmp_path / 'first'
    train(tiny_cfg(out, epochs=1, max_steps_per_epoch=1))
    with pytest.raises(ConfigError, match='is a DCAL model .*: go on training it with --dcal'):
        train(tiny_cfg(tmp_path / 'plain', model=str(out), dcal=False, epochs=1))
    with pytest.raises(ConfigError, match=r'is a DCAL model with other options \(ratio: saved 0.1 vs now 0.5\)'):
        train(tiny_cfg(tmp_path / 'other', model=str(out), dcal_ratio=0.5, epochs=1))
    res = train(tiny_cfg(tmp_path / 'more', model=str(out), epochs=1, max_steps_per_epoch=1))
    assert res['epochs'] == 1 and isinstance(create(str(tmp_path / 'more')), DCAL)
