"""``deitlab train --triplet`` without DCAL (train/triplet.py): the forward gives the logits of the
plain model and its pre-logits features, the loss adds the batch-hard triplet term, which goes into
the metrics; the run reloads as the plain architecture."""
import json

import pytest
import timm
import torch

import deitlab  # noqa: F401
from deitlab.train import TrainConfig, train
from deitlab.train.triplet import TripletCriterion, batch_hard_triplet, features_and_logits

REID = 'glyphs-reid:ids=8,test_ids=4,per_id=6,views=2,val_per_id=2'
PICO = 'deitlab_deit_pico_patch4_32'


@pytest.mark.parametrize('name', [PICO, 'vit_tiny_patch16_224'])
def test_features_and_logits_match_the_model(name):
    kw = dict(img_size=32, patch_size=4) if name.startswith('vit_') else {}
    model = timm.create_model(name, num_classes=5, **kw).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = features_and_logits(model, x)
        assert torch.equal(out['logits'], model(x))
        assert torch.equal(out['features'], model.forward_head(model.forward_features(x), pre_logits=True))
    assert out['features'].shape == (3, model.num_features)


def test_criterion_is_the_label_loss_plus_the_triplet_term():
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    logits, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 0, 1, 1])
    ce = lambda x, out, t: torch.nn.functional.cross_entropy(out, t)   # noqa: E731
    crit = TripletCriterion(ce, margin=0.5)
    loss = crit(None, dict(logits=logits, features=feats), y)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item()
                                        + batch_hard_triplet(feats, y, 0.5).item(), rel=1e-6)
    assert crit.last.item() == pytest.approx(batch_hard_triplet(feats, y, 0.5).item())


def test_plain_run_with_triplet_and_pk(one_thread, tmp_path):
    out = tmp_path / 'reid'
    cfg = TrainConfig(model=PICO, data=REID, out=str(out), epochs=1, batch_size=8, pk='4,2', triplet=True, lr=1e-3,
                      warmup_epochs=0, drop_path=0.0, mix='none', aug='none', tensorboard=False, progress=False,
                      max_steps_per_epoch=2)
    res = train(cfg)
    row = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert row['triplet_loss'] > 0 and row['train_loss'] > row['triplet_loss']
    assert json.loads((out / 'config.json').read_text())['architecture'] == PICO
    assert 0 <= res['val_top1'] <= 100
