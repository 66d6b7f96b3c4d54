"""Structural pruning: the pruning schedules (linear by default over a budget derived from the data,
NViT's fixed groups per event), the plan logged and recorded before a run, and the latency
prediction checked against the measured speed-up."""
import json

import numpy as np
import pytest
import timm
import torch

from deitlab.prune import LatencyTable, NViTConfig, NViTPruner, PruneError
from _prune_helpers import _loader, _model

from deitlab.prune import lut_path, prune_nvit
from deitlab.prune import schedule as sched
from deitlab.prune.nvit import latency_table
from deitlab.prune.report import PREDICTION_TOLERANCE, off_grid_widths, prediction_check
from deitlab.prune.schedule import auto_prune_steps, make_plan, resolve_schedule
from deitlab.rundir import save_run_dir

DATA = 'glyphs:train=48,val=16,size=28,seed=1'   # 24 classes


def _cfg(**kw) -> NViTConfig:
    args = dict(model='x', data='x', out='x', target_gmacs=0.8, lam=0, progress=False, val_batches=0)
    args.update(kw)
    return NViTConfig(**args)


def _record_events(pruner) -> list:
    events = []
    original = pruner.event

    def event():
        goal = pruner.event_goal()
        removed = original()
        events.append((goal, removed))
        return removed
    pruner.event = event
    return events


# ---------------------------------------------------------------------------------------------
# which schedule, how long
# ---------------------------------------------------------------------------------------------

def test_default_schedule_is_linear_over_two_epochs_clamped_in_about_40_events():
    cfg = _cfg().validate()
    assert resolve_schedule(cfg) == 'linear'
    # 1,437 images at batch 32: 44 batches; two epochs (88 steps) are raised to the 200-step floor
    plan = make_plan(cfg, 44)
    assert (plan['schedule'], plan['source'], plan['prune_steps'], plan['interval'], plan['events']) == \
        ('linear', 'auto', 200, 5, 40)
    assert plan['finetune_steps'] == 44 and plan['goal_steps'] == 200     # finetune_epochs=1
    # Fashion-MNIST at batch 32 (1875 batches): two epochs are capped at 2000 steps
    plan = make_plan(cfg, 1875)
    assert (plan['prune_steps'], plan['interval'], plan['events']) == (2000, 50, 40)
    # in between: two epochs, rounded down to whole intervals
    plan = make_plan(cfg, 750)
    assert plan['interval'] == 1500 // 40 and plan['prune_steps'] == 40 * (1500 // 40) and plan['events'] == 40
    # total_steps leaves at least half of the budget to the fine-tune
    plan = make_plan(_cfg(total_steps=120).validate(), 750)
    assert plan['prune_steps'] <= 60 and plan['prune_steps'] + plan['finetune_steps'] >= 120
    # a given interval is kept
    plan = make_plan(_cfg(interval=7).validate(), 44)
    assert plan['interval'] == 7 and plan['prune_steps'] == 7 * (200 // 7)
    assert auto_prune_steps(None) == sched.AUTO_MIN_STEPS


def test_explicit_flags_keep_their_old_meaning():
    # --prune-steps (and --interval): linear over exactly those steps, as the demo and benchmark run
    plan = make_plan(_cfg(prune_steps=800, interval=20, total_steps=1875).validate(), 1875)
    assert (plan['schedule'], plan['source'], plan['prune_steps'], plan['events'], plan['finetune_steps']) == \
        ('linear', 'given', 800, 40, 1075)
    # --prune-steps alone: the old interval of 100 steps
    plan = make_plan(_cfg(prune_steps=300).validate(), 44)
    assert (plan['interval'], plan['events']) == (100, 3)
    with pytest.raises(PruneError, match=r'prune_steps \(50\) must be at least one interval \(100\)'):
        _cfg(prune_steps=50).validate()
    # a goal that does not end on an interval keeps falling over the given steps
    plan = make_plan(_cfg(prune_steps=250).validate(), 44)
    assert plan['goal_steps'] == 250 and plan['prune_steps'] == 300
    # --groups-per-event alone: NViT's schedule, as before
    cfg = _cfg(groups_per_event=4).validate()
    assert resolve_schedule(cfg) == 'nvit'
    assert make_plan(cfg, 44, nvit_events=7)['prune_steps'] == 700


def test_default_schedule_reaches_the_target_within_its_planned_steps(monkeypatch, capsys):
    monkeypatch.setattr(sched, 'AUTO_MIN_STEPS', 24)    # a short budget for a test
    monkeypatch.setattr(sched, 'AUTO_EVENTS', 6)
    pruner = NViTPruner(_model(), _cfg(target_gmacs=0.7, group_sizes=dict(mlp=2)), lut=None,
                        device=torch.device('cpu'))
    events = _record_events(pruner)
    pruner.run(_loader())                 # 2 batches per epoch: 4 steps, raised to 24
    plan = pruner.plan
    assert (plan['schedule'], plan['source'], plan['prune_steps'], plan['interval'], plan['events']) == \
        ('linear', 'auto', 24, 4, 6)
    assert pruner.done() and pruner.steps <= plan['prune_steps'] and pruner.steps == pruner.events * 4
    goals = [g for g, _ in events]
    assert goals == pytest.approx([1 - 0.3 * k / 6 for k in range(1, len(goals) + 1)])
    for goal, row in zip(goals, pruner.log):
        assert row['gmacs'] <= goal + 1e-12
    assert pruner.log[0]['gmacs'] > 0.8   # the first event does not jump to the target
    # the plan was announced on stderr before the first step, with a step time and expected duration
    err = capsys.readouterr().err
    assert 'linear schedule to gmacs 0.7 over 24 steps' in err and '6 events every 4 steps' in err
    assert 'pruning ~' in err and isinstance(plan['step_s'], float) and plan['expected_s'] is not None


def test_nvit_schedule_removes_its_groups_per_event_every_interval():
    pruner = NViTPruner(_model(), _cfg(schedule='nvit', interval=2, group_sizes=dict(mlp=4)), lut=None,
                        device=torch.device('cpu'))
    events = _record_events(pruner)
    pruner.run(_loader())
    assert pruner.plan['schedule'] == 'nvit' and pruner.plan['groups_per_event'] == 2
    assert pruner.plan['estimated'] and pruner.plan['prune_steps'] % 2 == 0
    assert all(goal is None for goal, _ in events)
    sizes = [len(removed) for _, removed in events]
    assert sizes[:-1] == [2] * (len(sizes) - 1) and 1 <= sizes[-1] <= 2    # the last stops at the target
    assert pruner.steps == 2 * pruner.events and pruner.done()
    # the plan's estimate (random saliencies) is of the right size, and is redone after the first event
    assert pruner.plan['events'] / 2 <= pruner.events <= 2 * pruner.plan['events']
    assert pruner.plan['prune_steps_after_first_event'] % 2 == 0


def test_schedule_bad_input_messages():
    with pytest.raises(PruneError, match=r"unknown schedule 'fast'; choose linear .* or nvit"):
        _cfg(schedule='fast').validate()
    with pytest.raises(PruneError, match='--prune-steps sets the linear schedule'):
        _cfg(schedule='nvit', prune_steps=100).validate()
    with pytest.raises(PruneError, match='--groups-per-event sets the nvit schedule'):
        _cfg(schedule='linear', groups_per_event=2).validate()
    with pytest.raises(PruneError, match='interval must be >= 1, got 0'):
        _cfg(interval=0).validate()
    assert _cfg(schedule=' NViT ').validate().schedule == 'nvit'
    pruner = NViTPruner(_model(), _cfg(prune_steps=300, max_prune_steps=200), lut=None, device=torch.device('cpu'))
    with pytest.raises(PruneError, match=r'the linear schedule needs 300 steps, more than --max-prune-steps \(200\)'):
        pruner.run(_loader())
    assert pruner.steps == 0


# ---------------------------------------------------------------------------------------------
# the latency table: measure, a file or a committed table
# ---------------------------------------------------------------------------------------------

def _small_table(meta=None) -> LatencyTable:
    return LatencyTable(dict(emb=[8, 32], heads=[1, 4], qk=[1, 8], v=[1, 6], mlp=[1, 64]),
                        np.fromfunction(lambda e, h, q, v, m: 1 + e + h + q + v + 4 * m, (2,) * 5), [8, 32],
                        [1.0, 2.0], meta)


def test_lut_measure_times_a_table_and_a_path_loads_one(tmp_path, monkeypatch):
    import deitlab.prune.nvit as nvit_mod
    built = []

    def fake_build(model, **kw):
        built.append(kw)
        return _small_table()
    monkeypatch.setattr(nvit_mod, 'build_latency_table', fake_build)
    model = _model()
    for spec in (None, 'measure', 'MEASURE'):
        lut = latency_table(_cfg(target_gmacs=None, target_latency=0.5, lut=spec, lut_passes=7), model)
        assert lut.meta['source'] == 'measure'
    assert len(built) == 3 and built[0]['passes'] == 7 and built[0]['batch_size'] == 64
    path = _small_table(dict(note='saved')).save(tmp_path / 'lut.json')
    lut = latency_table(_cfg(target_gmacs=None, target_latency=0.5, lut=str(path)), model)
    assert len(built) == 3 and lut.meta['note'] == 'saved' and lut.meta['source'] == str(path)
    assert latency_table(_cfg(lut=None), model) is None           # a GMACs target without lam needs none
    assert lut_path('measure') is None and lut_path(None) is None and lut_path(str(path)) == path


def test_lut_missing_file_fails_before_anything_is_loaded(tmp_path, capsys):
    from deitlab.cli import main
    missing = tmp_path / 'nope.json'
    with pytest.raises(PruneError, match=r'latency table file does not exist: .*nope.json; --lut takes a '
                                         r'latency_table.json, "measure"'):
        _cfg(lut=str(missing)).validate()
    with pytest.raises(PruneError, match='latency table file does not exist'):
        lut_path('no_such_committed_table')
    args = ['prune', 'nvit', '--model', 'no-such-model', '--data', DATA, '--out', str(tmp_path / 'o'),
            '--target-latency', '0.5', '--lut', str(missing)]
    assert main(args) == 2
    assert 'latency table file does not exist' in capsys.readouterr().err
    args[-2:] = ['--schedule', 'fast']
    assert main(args) == 2
    assert "unknown schedule 'fast'" in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_committed_tables_load_by_name():
    from deitlab.prune import committed_tables, load_latency_table
    for name in committed_tables():
        lut = load_latency_table(name)
        assert lut_path(name).name == f'{name}.json'
        assert lut.meta['batch_size'] >= 1 and lut.meta['threads'] >= 1 and lut.meta['whole_model']['ratio'] > 0
        assert lut.block_spread is not None and lut.meta['passes'] >= 3
    # the demo's model and grid: the table the demo prunes against covers them
    from deitlab.demo import _DEMO_GRID, DEMO_LUT, DEMO_MODEL
    lut = load_latency_table(DEMO_LUT)
    lut.check_covers(timm.create_model(DEMO_MODEL, num_classes=24))
    assert lut.axes == {k: sorted(v) for k, v in _DEMO_GRID.items()}
    assert (lut.meta['batch_size'], lut.meta['threads'], lut.meta['tokens']) == (64, 2, 65)


# ---------------------------------------------------------------------------------------------
# predicted against measured speed-up
# ---------------------------------------------------------------------------------------------

def test_prediction_check_error_and_warning():
    lut = _small_table(dict(batch_size=64, threads=2))
    ok = prediction_check(dict(predicted_speedup=1.9, throughput_ratio=1.8, settings=dict(batch_size=64, threads=2)), lut)
    assert ok['prediction_error'] == pytest.approx(1.9 / 1.8 - 1, abs=1e-4) and 'warning' not in ok
    assert abs(ok['prediction_error']) <= PREDICTION_TOLERANCE
    off = prediction_check(dict(predicted_speedup=2.2, throughput_ratio=1.8), lut, dict(batch_size=32, threads=4))
    assert off['prediction_error'] == pytest.approx(2.2 / 1.8 - 1, abs=1e-4)
    assert 'predicted a 2.20x speed-up, measured 1.80x (+22%)' in off['warning']
    assert 'timed at batch 64, the speed at 32' in off['warning'] and 'on 2 threads, the speed on 4' in off['warning']
    assert 'allocator' in off['warning'] and '\n' not in off['warning']
    lut.meta.update(malloc='default', whole_model=dict(ratio=1.2), load_average=3.1, cpu_count=2)
    under = prediction_check(dict(predicted_speedup=1.5, throughput_ratio=1.8, throughput_ratio_lo=1.7,
                                  throughput_ratio_hi=1.9), lut,
                             dict(batch_size=64, threads=2, malloc=dict(MALLOC_MMAP_THRESHOLD_='1', how='mallopt'),
                                  device='cpu', load_avg_after=6.0, cpu_count=2))
    assert under['prediction_error'] < -PREDICTION_TOLERANCE and 'batch' not in under['warning']
    assert 'different malloc settings' in under['warning'] and '1.20x the sum of its timed parts' in under['warning']
    assert 'oversubscribed while measuring (load average 6.0 on 2 cores)' in under['warning']
    assert (under['measured_speedup_lo'], under['measured_speedup_hi']) == (1.7, 1.9)
    assert 'timed on an oversubscribed CPU (load average 3.1 on 2 cores' in under['warning']
    # widths between nodes and off the vector width: named when the table predicts too much
    widths = dict(embed_dim=32, num_heads=[4, 4], qk_dim=[5, 8], v_dim=[6, 3], mlp_hidden=[20, 64])
    off = off_grid_widths(lut, widths)
    assert off == dict(qk=[5], v=[3], mlp=[20])
    high = prediction_check(dict(predicted_speedup=2.2, throughput_ratio=1.8), lut, dict(batch_size=64, threads=2), off)
    assert 'not multiples of 8 (qk 5, v 3, mlp 20) run slower than the interpolation' in high['warning']
    assert 'multiples of 8' not in prediction_check(dict(predicted_speedup=1.5, throughput_ratio=1.8), lut,
                                                    dict(batch_size=64, threads=2), off)['warning']
    # an embedding off the multiple is named too; a table that prices misaligned widths does not blame them
    assert off_grid_widths(lut, dict(widths, embed_dim=30)) == dict(emb=[30], qk=[5], v=[3], mlp=[20])
    lut.misalign = dict(emb=[[32, 1.1]], qk=[[8, 1.05]])
    assert 'multiples of 8' not in prediction_check(dict(predicted_speedup=2.2, throughput_ratio=1.8), lut,
                                                    dict(batch_size=64, threads=2), off)['warning']
    assert prediction_check(dict(predicted_speedup=None, throughput_ratio=1.8), lut) is None


def test_prune_nvit_records_plan_and_prediction(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sched, 'AUTO_MIN_STEPS', 8)
    monkeypatch.setattr(sched, 'AUTO_EVENTS', 4)
    model = _model(num_classes=24, img_size=28)
    dense_dir = save_run_dir(model, tmp_path / 'dense')
    path = _small_table(dict(batch_size=8, threads=1)).save(tmp_path / 'lut.json')
    out = tmp_path / 'nvit'
    report = prune_nvit(NViTConfig(model=str(dense_dir), data=DATA, out=str(out), target_latency=0.9, lam=0.02,
                                   lut=str(path), batch_size=16, finetune_epochs=0, val_batches=1,
                                   progress=False, group_sizes=dict(mlp=8)))
    saved = json.loads((out / 'report.json').read_text())
    plan = saved['plan']
    assert (plan['schedule'], plan['source'], plan['prune_steps'], plan['interval']) == ('linear', 'auto', 8, 2)
    assert saved['prune_steps'] <= plan['prune_steps'] and plan['finetune_steps'] == 0
    assert plan['step_s'] > 0 and plan['expected_prune_s'] > 0 and plan['prune_s_measured'] >= 0
    pred = saved['prediction']
    assert pred['table_batch_size'] == pred['measured_batch_size'] == 8 and pred['measured_threads'] == 1
    assert pred['prediction_error'] == pytest.approx(pred['predicted_speedup'] / pred['measured_speedup'] - 1,
                                                     abs=1e-3)
    row = next(r for r in saved['rows'] if r['name'] == 'nvit')
    assert row['prediction_error'] == pytest.approx(row['predicted_speedup'] / row['throughput_ratio'] - 1)
    err = capsys.readouterr().err
    assert 'linear schedule to latency 0.9 over 8 steps' in err
    assert ('warning: the latency table predicted' in err) == (abs(pred['prediction_error']) > PREDICTION_TOLERANCE)
    assert report['plan'] == plan
