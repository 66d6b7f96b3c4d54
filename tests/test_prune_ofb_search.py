"""OFB's search on the training loop (prune/ofb_search.py): the optimiser groups, the schedule of
lambda and eliminations, and ``prune_ofb`` end to end on a tiny DeiT."""
import json
import math

import torch

import pytest
import timm

from deitlab.prune.config import OFBConfig
from deitlab.prune.ofb import BUDGET_BAND, OFBSearch, lambda_at
from deitlab.prune.ofb_search import MIN_EVENTS, OFBHooks, _force_choice, prune_ofb, search_optimizer
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
    cfg = OFBConfig('m', 'd', 'o', target_gmacs=0.5, warmup=0.25, eliminations_per_epoch=3)
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
    assert report['budget_reached'] == pytest.approx(report['gmacs_fraction'], abs=1e-4)
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


def _table_for_small_model():
    """A latency table covering the tiny DeiT, its block time multilinear in the widths."""
    import itertools
    import numpy as np
    from deitlab.prune.latency import AXES, LatencyTable
    axes = dict(emb=[8, 32], heads=[1, 4], qk=[1, 8], v=[1, 6], mlp=[1, 64])

    def f(e, h, q, v, m):
        return 0.2 + 0.01 * e + 0.002 * e * h * (q + v) + 0.003 * e * m / 8
    ms = np.zeros([2] * 5)
    for idx in itertools.product(range(2), repeat=5):
        ms[idx] = f(*(axes[k][i] for k, i in zip(AXES, idx)))
    return LatencyTable(axes, ms, [8, 32], [0.1, 0.4]), f


def test_the_latency_budget_term_has_the_tables_value_and_slopes():
    from deitlab.prune.ofb import table_latency
    lut, _ = _table_for_small_model()
    widths = dict(embed_dim=torch.tensor(20.5, requires_grad=True),
                  num_heads=[torch.tensor(3.2, requires_grad=True), torch.tensor(2.0, requires_grad=True)],
                  qk_dim=[torch.tensor(5.5, requires_grad=True), torch.tensor(7.0, requires_grad=True)],
                  v_dim=[torch.tensor(4.0, requires_grad=True), torch.tensor(3.3, requires_grad=True)],
                  mlp_hidden=[torch.tensor(40.0, requires_grad=True), torch.tensor(17.5, requires_grad=True)])
    plain = {k: (float(v.detach()) if k == 'embed_dim' else [float(t.detach()) for t in v]) for k, v in widths.items()}
    ms = table_latency(lut, widths)
    assert float(ms.detach()) == pytest.approx(lut.model_ms(plain))
    ms.backward()
    sv = lut.unit_savings(plain)
    assert float(widths['embed_dim'].grad) == pytest.approx(sv['emb'])
    for kind, key in (('head', 'num_heads'), ('qk', 'qk_dim'), ('v', 'v_dim'), ('mlp', 'mlp_hidden')):
        assert [float(t.grad) for t in widths[key]] == pytest.approx(sv[kind])


def test_prune_ofb_to_a_latency_target(tmp_path):
    lut, _ = _table_for_small_model()
    path = lut.save(tmp_path / 'lut.json')
    model = _model(num_classes=24, img_size=28)
    dense_dir = save_run_dir(model, tmp_path / 'dense')
    out = tmp_path / 'ofb'
    report = prune_ofb(OFBConfig(model=str(dense_dir), data=DATA, out=str(out), target_latency=0.6, lut=str(path),
                                 search_steps=12, arch_lr=0.3, batch_size=16, finetune_epochs=0, measure=False,
                                 progress=False))
    assert report['target'] == dict(kind='latency', value=0.6)
    assert (out / 'latency_table.json').is_file()
    trace = json.loads((out / 'search_trace.json').read_text())
    assert all(0 < r['budget_fraction'] <= 1 for r in trace) and trace[0]['budget_fraction'] != trace[0]['macs_fraction']
    with pytest.raises(Exception, match='exactly one OFB target'):
        OFBConfig(model='m', data='d', out='o', target_latency=0.5, target_gmacs=0.5).validate()


def test_a_search_over_its_budget_says_so():
    from deitlab.prune.ofb_search import budget_warning
    assert budget_warning('GMACs', 0.5, 0.52) is None
    line = budget_warning('GMACs', 0.35, 0.515)
    assert line.startswith('warning: the search ended at 0.515 of the dense GMACs, above the target 0.35')
    assert '--search-epochs' in line and '\n' not in line


def _open_two(s):
    """Leave two modules open: the embedding between its narrowest and widest candidate (0.6 / 0.4)
    and block 0's MLP between two widths (0.7 / 0.3); every other module settled on its widest."""
    with torch.no_grad():
        for m in s.modules_list():
            m.active[:-1] = False
        emb, mlp = s.module('emb'), s.module('mlp', 0)
        for m, (pa, pb) in ((emb, (0.6, 0.4)), (mlp, (0.3, 0.7))):
            m.active[0] = m.active[-1] = True
            m.alpha.fill_(-30.0)
            m.alpha[0], m.alpha[-1] = math.log(pa), math.log(pb)
    return emb, mlp


def test_a_search_cut_short_settles_the_open_modules_jointly_on_the_budget():
    s = OFBSearch(_model())
    emb, mlp = _open_two(s)
    narrow, wide = int(emb.widths[0]), int(emb.widths[-1])
    cost = {e: float(s.fraction(s.widths_by(lambda m: e if m is emb else int(m.widths[-1]))))
            for e in (narrow, wide)}
    # the most probable combination when it meets the budget
    assert _force_choice(s, cost[narrow]) == 2
    assert emb.chosen() == narrow and mlp.chosen() == int(mlp.widths[-1])
    # a less probable one when only it does: the wide embedding
    s = OFBSearch(_model())
    emb, mlp = _open_two(s)
    narrow_costs = [float(s.fraction(s.widths_by(lambda m: narrow if m is emb else
                                                 (w if m is mlp else int(m.widths[-1])))))
                    for w in (int(mlp.widths[0]), int(mlp.widths[-1]))]
    assert all(abs(c - cost[wide]) > BUDGET_BAND * cost[wide] for c in narrow_costs)
    assert _force_choice(s, cost[wide]) == 2
    assert emb.chosen() == wide and not emb.searching() and not mlp.searching()
    assert _force_choice(s, cost[wide]) == 0
