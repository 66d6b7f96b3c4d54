"""OFB's search on the training loop (prune/ofb_search.py): the optimiser groups, the schedule of
lambda and eliminations, and ``prune_ofb`` end to end on a tiny DeiT."""
import json

import torch

import pytest
import timm

from deitlab.prune.config import OFBConfig
from deitlab.prune.ofb import OFBSearch, lambda_at
from deitlab.prune.ofb_search import MIN_EVENTS, OFBHooks, prune_ofb, search_optimizer
from deitlab.rundir import save_run_dir
from _prune_helpers import _model

DATA = 'glyphs:train=96,val=32,size=28,seed=1'   # 24 classes


def test_optimizer_has_the_papers_three_groups():
    model = _model()
    s = OFBSearch(model)
    opt = search_optimizer(model, s, OFBConfig('m', 'd', 'o', lr=3e-4, arch_lr=7e-4, weight_decay=0.05))
    decay, no_decay, arch = opt.param_groups
    assert decay['weight_decay'] == 0.05 and decay['lr'] == 3e-4
    assert all(p.ndim >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0
    assert {id(p) for p in s.score_parameters()} <= {id(p) for p in no_decay['params']}
    assert arch['betas'] == (0.5, 0.999) and arch['weight_decay'] == 1e-3 and arch['lr'] == 7e-4
    assert [id(p) for p in arch['params']] == [id(p) for p in s.arch_parameters()]
    n_model = sum(1 for p in model.parameters())
    assert len(decay['params']) + len(no_decay['params']) == n_model + len(s.score_parameters())


def test_hooks_follow_the_warm_up_and_eliminate_on_schedule(monkeypatch):
    model = _model()
    s = OFBSearch(model)
    cfg = OFBConfig('m', 'd', 'o', warmup=0.25, eliminations_per_epoch=3)
    hooks = OFBHooks(s, model, cfg, steps=400, steps_per_epoch=300)
    assert hooks.warmup_steps == 100
    assert hooks.elim_every == min(300 // 3, 400 // MIN_EVENTS) == 10
    calls = []
    monkeypatch.setattr(s, 'eliminate', lambda *a: calls.append(hooks.steps) or {})
    monkeypatch.setattr(hooks, 'record', lambda dropped=None: None)
    for step in range(1, 51):
        hooks.after_step(step, 0.0)
        assert s.lam == pytest.approx(lambda_at(step / 100))
    assert calls == [10, 20, 30, 40, 50] and s.lam == pytest.approx(0.99 - 0.89 * 0.5)
    assert not hooks.should_stop()
    hooks.steps = 400
    assert hooks.should_stop()


def test_prune_ofb_end_to_end(tmp_path):
    """Search, fold, cut and fine-tune on a tiny DeiT: a run directory timm reloads at the searched
    widths, the cut model equal to the masked one at the end of the search, the trace and plots."""
    model = _model(num_classes=24, img_size=28)
    dense_dir = save_run_dir(model, tmp_path / 'dense')
    out = tmp_path / 'ofb'
    report = prune_ofb(OFBConfig(model=str(dense_dir), data=DATA, out=str(out), target_gmacs=0.6, search_steps=24,
                                 arch_lr=0.3, batch_size=16, finetune_epochs=1, finetune_steps=2, measure=False,
                                 progress=False))
    # a fast arch learning rate: candidates go, modules shrink mid-search and the cut stays exact
    assert report['shrinks'] >= 1
    assert report['masked_vs_cut_max_abs'] < 1e-5
    final = timm.create_model(f'local-dir:{out}')
    widths = report['searched_widths']
    assert final.embed_dim == widths['embed_dim'] and final.block_widths['mlp_hidden'] == widths['mlp_hidden']
    assert json.loads((out / 'config.json').read_text())['model_args']['mlp_hidden'] == widths['mlp_hidden']
    trace = json.loads((out / 'search_trace.json').read_text())
    assert trace[0]['step'] == 0 and trace[-1]['step'] == report['search_steps'] <= 24
    assert all(abs(sum(p) - 1) < 1e-3 for p in trace[0]['modules'].values())
    for f in ('search_trace.png', 'widths.png', 'report.json', 'searched/config.json'):
        assert (out / f).is_file(), f
    assert report['forced_modules'] >= 0 and 0 < report['gmacs_fraction'] <= 1
    saved = json.loads((out / 'report.json').read_text())
    assert saved['target'] == dict(kind='gmacs', value=0.6) and saved['search_forward_passes'] > 0


class Stop(Exception):
    pass


@pytest.mark.usefixtures('one_thread')
def test_a_resumed_search_ends_where_an_unbroken_one_does(tmp_path, monkeypatch):
    """Killed after an elimination event and resumed from its checkpoint, the search removes the same
    candidates, shrinks the same modules and ends with the same weights as a search never stopped."""
    from safetensors.torch import load_file
    from deitlab.prune import PruneError
    model = _model(num_classes=24, img_size=28)
    dense = save_run_dir(model, tmp_path / 'dense')

    def cfg(out, **kw):
        return OFBConfig(model=str(dense), data=DATA, out=str(tmp_path / out), target_gmacs=0.6, search_steps=16,
                         arch_lr=0.3, batch_size=8, finetune_epochs=0, measure=False, progress=False, device='cpu',
                         **kw)
    whole = prune_ofb(cfg('whole'))
    original = OFBHooks.after_step

    def stop_at_6(self, step, loss):
        original(self, step, loss)
        if self.steps == 6:
            raise Stop
    monkeypatch.setattr(OFBHooks, 'after_step', stop_at_6)
    with pytest.raises(Stop):
        prune_ofb(cfg('broken'))
    monkeypatch.setattr(OFBHooks, 'after_step', original)
    with pytest.raises(PruneError, match='already holds a run; choose another --out, or --resume it'):
        prune_ofb(cfg('broken'))
    steps_after = []

    def count(self, step, loss):
        original(self, step, loss)
        steps_after.append(self.steps)
    monkeypatch.setattr(OFBHooks, 'after_step', count)
    resumed = prune_ofb(cfg('broken', resume=True))
    assert steps_after[0] == 7 and steps_after[-1] == whole['search_steps'] == resumed['search_steps'], \
        'the resumed search goes on from step 6, not from the start'
    assert whole['shrinks'] >= 1 and resumed['shrinks'] == whole['shrinks']
    assert resumed['searched_widths'] == whole['searched_widths']
    traces = [json.loads((tmp_path / d / 'search_trace.json').read_text()) for d in ('whole', 'broken')]
    assert [r['step'] for r in traces[0]] == [r['step'] for r in traces[1]]
    assert [r['dropped'] for r in traces[0]] == [r['dropped'] for r in traces[1]]
    a, b = (load_file(tmp_path / d / 'searched' / 'model.safetensors') for d in ('whole', 'broken'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PruneError, match='has no ofb_checkpoint.pt to resume from'):
        prune_ofb(cfg('never', resume=True))
