"""Tests for ViT-ResNAS supernet training (nas/warmup.py, nas/train.py, nas/config.py; ViT-ResNAS part 3)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from deitlab.nas import SPACES, SearchSpace, SearchSpaceError, Supernet
from deitlab.nas.config import SupernetConfig
from deitlab.nas.train import CHECKPOINT_NAME, SupernetSampling, holdout_indices, train_supernet
from deitlab.nas.warmup import allowed_count, allowed_counts, allowed_space, head_importance, mlp_importance, rewire
from deitlab.train.config import ConfigError
from deitlab.train.loop import Hooks
from _nn_helpers import perturb

DATA = 'glyphs:train=96,val=32,size=32,seed=1'   # 24 classes, 4 training images each


def _tiny(**kw) -> SearchSpace:
    """Two stages of two blocks (the second of each skippable), heads of width 8, 32 px, patch 8."""
    args = dict(widths=[[16, 24], [32, 48]], depths=[2, 2], heads=[[1, 2], [2, 3]], mlp_hidden=[[16, 32], [32, 64]],
                skippable=[1, 3], head_dim=8, img_size=32, patch_size=8, num_classes=24,
                model_name='deitlab_vitres_mu_patch4_32')
    return SearchSpace(**{**args, **kw})


@pytest.fixture
def tiny(monkeypatch, one_thread):
    monkeypatch.setitem(SPACES, 'tiny', _tiny())
    return SPACES['tiny']


def _cfg(tmp_path, name='run', **kw) -> SupernetConfig:
    args = dict(data=DATA, out=str(tmp_path / name), space='tiny', epochs=2, batch_size=8, ex_per_arch=2, holdout=1,
                max_steps_per_epoch=3, width_warmup_epochs=0, warmup_epochs=0.5, progress=False, seed=3)
    return SupernetConfig(**{**args, **kw})


class _Record(Hooks):
    """Every step's architectures, the allowed choice counts, the training subset's indices."""

    def __init__(self):
        self.steps, self.counts, self.train_indices = [], [], None

    def sampling(self) -> SupernetSampling:
        return next(h for h in self.trainer.hooks if isinstance(h, SupernetSampling))

    def after_step(self, step, loss):
        s = self.sampling()
        self.steps.append(list(s.step_archs))
        self.counts.append(allowed_counts(s.space, s.progress(step - 1)))
        self.train_indices = list(s.sampler.dataset.indices)


# ----------------------------------------------------------------------------- width warm-up

def test_allowed_choices_grow_from_the_largest_to_all():
    space = _tiny()
    assert [allowed_count(3, t) for t in (0, 0.3, 0.34, 0.66, 0.67, 0.99, 1, 2)] == [1, 1, 2, 2, 3, 3, 3, 3]
    start = allowed_space(space, 0.0)
    assert start.num_archs() == 1 and start.largest() == space.largest() and start.skippable == []
    assert allowed_space(space, 1.0) is space
    half = allowed_space(space, 0.5)
    assert half.skippable == [1, 3] and half.widths == space.widths   # 2 choices: both from halfway
    prev = 0
    for t in [i / 20 for i in range(21)]:
        n = allowed_space(space, t).num_archs()
        assert n >= prev
        prev = n
    assert prev == space.num_archs()
    mu = SPACES['mu']
    c = allowed_counts(mu, 0.4)   # three choices: two allowed; keep: still kept only
    assert c['widths'] == [2, 2, 2] and c['keep'] == [1] * 9 and c['heads'][:3] == [1, 1, 1]
    assert all(a.widths[0] in (56, 64) and all(a.keep)
               for a in allowed_space(mu, 0.4).sample_distinct(8, random.Random(0)))


# ----------------------------------------------------------------------------- rewiring

def test_rewiring_keeps_the_largest_network_and_sorts_units_by_l1(tiny):
    torch.manual_seed(0)
    sn = perturb(Supernet(tiny)).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = tiny.smallest()
    opt = torch.optim.AdamW(sn.parameters(), lr=1e-3)
    sn(x, [tiny.largest()] * 3).sum().backward()
    opt.step()
    blk = sn.model.blocks[3]
    before_scores = mlp_importance(blk.mlp)
    moment_of_top = opt.state[blk.mlp.fc1.weight]['exp_avg'][before_scores.argmax()].clone()
    with torch.no_grad():
        ref, ref_small = sn(x, tiny.largest()), sn(x, small)
    state = rewire(sn, opt)
    with torch.no_grad():
        assert torch.allclose(sn(x, tiny.largest()), ref, atol=1e-5)
        assert not torch.allclose(sn(x, small), ref_small, atol=1e-3)   # the small network now holds other units
    for i, b in enumerate(sn.model.blocks):
        h, m = head_importance(b.attn), mlp_importance(b.mlp)
        assert torch.all(h[:-1] >= h[1:]) and torch.all(m[:-1] >= m[1:]), i
        assert sorted(state['heads'][i]) == list(range(b.attn.num_heads))
    assert torch.equal(mlp_importance(blk.mlp), before_scores[state['mlp'][3]])
    assert torch.equal(opt.state[blk.mlp.fc1.weight]['exp_avg'][0], moment_of_top)   # AdamW moments moved too
    assert state['rewirings'] == 1
    with torch.no_grad():   # the sliced sub-network still equals the masked one
        assert torch.allclose(sn.subnet(small)(x), sn(x, small), atol=1e-5)


# ----------------------------------------------------------------------------- held-out images

def test_holdout_is_per_class_deterministic_and_checked():
    targets = torch.tensor([0, 1, 2] * 5)
    held = holdout_indices(targets, 2, seed=4)
    assert held == holdout_indices(targets, 2, seed=4) == sorted(held)
    assert torch.bincount(targets[held]).tolist() == [2, 2, 2]
    assert holdout_indices(targets, 0, seed=4) == []
    with pytest.raises(ConfigError, match=r"holdout 5: class 'c' has only 5 training images"):
        holdout_indices(torch.cat([targets, torch.tensor([0, 1])]), 5, seed=4, classes=['a', 'b', 'c'])


# ----------------------------------------------------------------------------- training runs

def test_training_writes_its_files_and_distinct_archs_per_step(tiny, tmp_path):
    rec = _Record()
    summary = train_supernet(_cfg(tmp_path), hooks=[rec])
    out = tmp_path / 'run'
    assert {p.name for p in out.iterdir()} >= {'supernet.safetensors', CHECKPOINT_NAME, 'space.json', 'holdout.json',
                                                'metrics.jsonl', 'summary.json'}
    assert summary['archs_trained'] == 2 * 3 * 4 and 1 <= summary['distinct_archs'] <= 24
    assert 0 <= summary['largest_top1'] <= 100 and 0 <= summary['smallest_top1'] <= 100
    assert json.loads((out / 'summary.json').read_text())['archs_trained'] == 24
    rows = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2] and {'val_top1_largest', 'val_top1_smallest'} <= set(rows[0])
    # every step: 4 sub-batches, 4 different networks
    assert len(rec.steps) == 6
    for archs in rec.steps:
        assert len(archs) == 4 and len({tiny.canonical(a) for a in archs}) == 4
    # the space and the weights rebuild the supernet
    saved = json.loads((out / 'space.json').read_text())
    space = SearchSpace.from_dict(saved['space'])
    assert saved['name'] == 'tiny' and space.num_classes == 24 and space.widths == tiny.widths
    sn = Supernet(space)
    sn.model.load_state_dict(load_file(str(out / 'supernet.safetensors')))
    # the held-out images: one per class, none of them trained on
    held = json.loads((out / 'holdout.json').read_text())
    assert len(held['indices']) == 24 and held['num_images'] == 96 and held['per_class'] == 1
    assert not set(held['indices']) & set(rec.train_indices) and len(rec.train_indices) == 72


def test_width_warmup_grows_choices_and_rewires(tiny, tmp_path):
    rec = _Record()
    summary = train_supernet(_cfg(tmp_path, epochs=3, width_warmup_epochs=2), hooks=[rec])
    assert summary['rewirings'] == 2
    assert all(a == tiny.largest() for a in rec.steps[0])   # the largest only at the start
    assert all(v == 1 for k in ('widths', 'heads', 'mlp_hidden', 'keep') for v in rec.counts[0][k])
    assert rec.counts[-1] == allowed_counts(tiny, 1.0)   # all choices at the end
    assert rec.counts[-1]['keep'] == [1, 2, 1, 2]
    sizes = [sum(sum(v) for v in c.values()) for c in rec.counts]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert any(a != tiny.largest() for a in rec.steps[-1])


def test_resume_equals_an_unbroken_run(tiny, tmp_path, monkeypatch):
    import deitlab.nas.train as nas_train
    cfg = dict(epochs=3, width_warmup_epochs=2)   # a rewiring before and after the break
    train_supernet(_cfg(tmp_path, 'unbroken', **cfg))

    class Interrupted(Exception):
        pass

    save = nas_train.atomic_torch_save

    def save_then_stop(obj, path):
        save(obj, path)
        if obj['epoch'] == 0:
            raise Interrupted

    monkeypatch.setattr(nas_train, 'atomic_torch_save', save_then_stop)
    with pytest.raises(Interrupted):
        train_supernet(_cfg(tmp_path, 'broken', **cfg))
    monkeypatch.setattr(nas_train, 'atomic_torch_save', save)
    with pytest.raises(ConfigError, match='already holds a supernet checkpoint; pass --resume'):
        train_supernet(_cfg(tmp_path, 'broken', **cfg))
    summary = train_supernet(_cfg(tmp_path, 'broken', resume=True, **cfg))
    a, b = (torch.load(tmp_path / d / CHECKPOINT_NAME, weights_only=True) for d in ('unbroken', 'broken'))
    assert a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert a['rewiring'] == b['rewiring'] and a['rewiring']['rewirings'] == 2
    assert torch.equal(a['sampling']['distinct'], b['sampling']['distinct'])
    assert summary['archs_trained'] == 36
    rows = [json.loads(ln) for ln in (tmp_path / 'broken' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2, 3]


# ----------------------------------------------------------------------------- bad input

def test_config_errors_name_the_field_and_the_limit(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"unknown search space 'huge'; known spaces: mu, mu_distilled"):
        _cfg(tmp_path, space='huge').validate()
    with pytest.raises(ConfigError, match=r'batch_size 8 is not divisible by ex_per_arch 3'):
        _cfg(tmp_path, space='mu', ex_per_arch=3).validate()
    for field, value, msg in (('epochs', 0, 'epochs must be >= 1, got 0'), ('lr', 0, 'lr must be > 0'),
                              ('drop_path', 1.0, r'drop_path must be in \[0, 1\)'),
                              ('holdout', -1, 'holdout must be >= 0'),
                              ('width_warmup_epochs', 5, r'width_warmup_epochs must be <= epochs \(2\)'),
                              ('warmup_epochs', 2, r'warmup_epochs must be < epochs \(2\)')):
        with pytest.raises(ConfigError, match=msg):
            _cfg(tmp_path, space='mu', **{field: value}).validate()
    assert _cfg(tmp_path, space='mu', width_warmup_epochs=None, epochs=8).validate().width_warmup == 2


def test_resume_refuses_another_space_or_definition(tiny, tmp_path, monkeypatch):
    train_supernet(_cfg(tmp_path, epochs=1, max_steps_per_epoch=1))
    monkeypatch.setitem(SPACES, 'tiny2', tiny)
    with pytest.raises(SearchSpaceError,
                       match=r"search space 'tiny', but --space is 'tiny2'; resume with --space tiny"):
        train_supernet(_cfg(tmp_path, space='tiny2', epochs=1, max_steps_per_epoch=1, resume=True))
    monkeypatch.setitem(SPACES, 'tiny', _tiny(head_dim=4))
    with pytest.raises(SearchSpaceError, match=r"search space 'tiny' is defined differently .*head_dim: saved 8 vs "
                                               r"now 4"):
        train_supernet(_cfg(tmp_path, epochs=1, max_steps_per_epoch=1, resume=True))
    with pytest.raises(ConfigError, match=r'other settings \(lr: saved 0.001 vs now 0.5\)'):
        train_supernet(_cfg(tmp_path, epochs=1, max_steps_per_epoch=1, resume=True, lr=0.5))


def test_distilled_space_trains_both_heads_on_the_labels(monkeypatch, one_thread, tmp_path):
    space = _tiny(distilled=True, model_name='deitlab_vitres_mu_distilled_patch4_32')
    monkeypatch.setitem(SPACES, 'tiny_distilled', space)
    criterion = torch.nn.CrossEntropyLoss()
    sampling = SupernetSampling(space, 2, 0, 0, None, criterion)
    a, b, y = torch.randn(4, 24), torch.randn(4, 24), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(sampling.loss(None, (a, b), y), (criterion(a, y) + criterion(b, y)) / 2)
    summary = train_supernet(_cfg(tmp_path, space='tiny_distilled', epochs=1, max_steps_per_epoch=2))
    assert summary['archs_trained'] == 8 and summary['space'] == 'tiny_distilled'


def test_cli_trains_and_prints_json_last(tiny, tmp_path, capsys):
    from deitlab.cli import main
    argv = ['nas', 'train-supernet', '--space', 'tiny', '--data', DATA, '--out', str(tmp_path / 'cli'), '--epochs', '1',
            '--batch-size', '8', '--ex-per-arch', '4', '--holdout', '1', '--max-steps-per-epoch', '1', '--no-progress',
            '--json']
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['archs_trained'] == 2 and result['epochs'] == 1 and (tmp_path / 'cli' / 'summary.json').is_file()
