"""``bench.compare``: ratios taken within each round, their median and spread, the warning when
the spread is wider than the effect, and the defaults recorded in the settings.

The clock is replaced by a fake ``Runner.step`` that returns chosen durations and records every
call, so that each expected value is computed here from the raw samples, independently of the
code under test. No measured time is asserted.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch.nn as nn

from deitlab.bench import compare
from deitlab.bench.report import format_compare, ratio_range
from deitlab.bench.speed import (COMPARE_DEFAULTS, COMPARE_QUICK, SETTLE_BELOW, Runner, fix_malloc_thresholds,
                                 contention_warning, malloc_state, noise_warnings, within_noise)

SIZE = (3, 2, 2)


def _tiny(width: int = 2) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, width))


class FakeClock:
    """Stands in for ``Runner.step``: ``seconds(name, batch, round, i)`` gives each call's duration.

    Calls are recorded per model and batch size in order; ``timed(model, kind)`` splits them into
    rounds the way ``compare`` documents its loop (warm-up forwards, then per round one untimed
    forward and the timed ones, at batch 1 and at the batch). ``name_of(model)`` names a model."""

    def __init__(self, name_of, seconds, protocol: dict):
        self.name_of, self.seconds, self.p = name_of, seconds, protocol
        self.calls = {}
        self.order = []

    def install(self, monkeypatch):
        clock, p = self, self.p
        per_round = {1: p['latency_steps'] + 1, 'B': p['throughput_steps'] + 1}

        def step(runner: Runner) -> float:
            name = clock.name_of(runner.model)
            kind = 1 if int(runner.x.shape[0]) == 1 else 'B'
            seq = clock.calls.setdefault((id(runner.model), kind), [])
            k = len(seq) - p['warmup']
            rnd, i = (k // per_round[kind], k % per_round[kind]) if k >= 0 else (-1, 0)
            t = float(clock.seconds(name, int(runner.x.shape[0]), rnd, i))
            seq.append(t)
            if kind == 1 and i == 0 and rnd >= 0:
                clock.order.append((rnd, name))
            return t

        monkeypatch.setattr(Runner, 'step', step)
        return self

    def timed(self, model, kind) -> list:
        """Per round, the timed samples of ``model`` (seconds) at batch 1 (``kind=1``) or at the batch."""
        steps = self.p['latency_steps'] if kind == 1 else self.p['throughput_steps']
        seq = self.calls[(id(model), kind)][self.p['warmup']:]
        return [seq[r * (steps + 1) + 1:(r + 1) * (steps + 1)] for r in range(self.p['rounds'])]


def _run(monkeypatch, seconds, protocol=None, batch=4, quick=False, names=('base', 'a', 'b')):
    models = {n: _tiny() for n in names}
    expected = dict(COMPARE_QUICK if quick else COMPARE_DEFAULTS)
    expected.update(protocol or {})
    ids = {id(m): n for n, m in models.items()}
    clock = FakeClock(lambda m: ids[id(m)], seconds, expected).install(monkeypatch)
    rows = compare(models, names[0], input_size=SIZE, batch_size=batch, quick=quick, gmacs=False, **(protocol or {}))
    clock.models = models
    return rows, clock, expected


def _irregular(name, batch, rnd, i):
    """Durations that differ between models, rounds and steps, with no common pattern."""
    rng = np.random.default_rng([('base', 'a', 'b').index(name), batch, rnd + 1, i])
    scale = {'base': 1.0, 'a': 0.6, 'b': 0.9}[name] * (batch / 4 if batch > 1 else 0.1)
    return scale * (1 + 0.5 * rng.random()) * 1e-3


def test_ratios_are_medians_of_per_round_ratios(monkeypatch):
    protocol = dict(rounds=5, latency_steps=3, throughput_steps=3, warmup=2)
    rows, clock, p = _run(monkeypatch, _irregular, protocol, batch=4)
    by = {r['name']: r for r in rows}
    base_thr = [np.median([4 / t for t in ts]) for ts in clock.timed(clock.models['base'], 'B')]
    base_lat = [np.median(ts) for ts in clock.timed(clock.models['base'], 1)]
    for name in ('base', 'a', 'b'):
        row = by[name]
        thr = [np.median([4 / t for t in ts]) for ts in clock.timed(clock.models[name], 'B')]
        lat = [np.median(ts) for ts in clock.timed(clock.models[name], 1)]
        thr_ratio = [v / b for v, b in zip(thr, base_thr)]
        lat_ratio = [b / v for v, b in zip(lat, base_lat)]
        assert row['images_per_s_rounds'] == pytest.approx(thr, rel=1e-12)
        assert row['latency_ms_rounds'] == pytest.approx([v * 1e3 for v in lat], rel=1e-12)
        assert row['throughput_ratio_rounds'] == pytest.approx(thr_ratio, rel=1e-12)
        assert row['latency_speedup_rounds'] == pytest.approx(lat_ratio, rel=1e-12)
        for key, ratios in (('throughput_ratio', thr_ratio), ('latency_speedup', lat_ratio)):
            assert row[key] == pytest.approx(np.median(ratios), rel=1e-12)
            assert row[f'{key}_lo'] == pytest.approx(min(ratios), rel=1e-12)
            assert row[f'{key}_hi'] == pytest.approx(max(ratios), rel=1e-12)
            assert row[f'{key}_spread'] == pytest.approx(max(ratios) - min(ratios), rel=1e-9, abs=1e-15)
        every = [t for ts in clock.timed(clock.models[name], 1) for t in ts]
        assert row['latency_ms'] == pytest.approx(np.median(every) * 1e3, rel=1e-12)
    # the baseline is exactly 1 in every round
    base = by['base']
    assert base['baseline'] and not by['a']['baseline']
    for key in ('throughput_ratio', 'latency_speedup'):
        assert base[f'{key}_rounds'] == [1.0] * 5
        assert base[key] == base[f'{key}_lo'] == base[f'{key}_hi'] == 1.0 and base[f'{key}_spread'] == 0.0
    # the order of the models is reversed every other round
    order = [[n for r, n in clock.order if r == k] for k in range(5)]
    assert order == [['base', 'a', 'b'], ['b', 'a', 'base']] * 2 + [['base', 'a', 'b']]


def test_slow_rounds_cancel_within_a_round(monkeypatch):
    """A slow spell that hits every model of a round (here up to 3x) leaves the per-round ratios
    alone; a ratio of pooled medians would not be exact."""
    slow = [1.0, 3.0, 1.2, 2.5, 1.0, 1.7, 2.9]
    speed = {'base': 1.0, 'a': 0.5, 'b': 0.8}

    def seconds(name, batch, rnd, i):
        return speed[name] * (batch if batch > 1 else 0.1) * slow[max(rnd, 0)] * (1 + 0.01 * i) * 1e-3

    rows, _, _ = _run(monkeypatch, seconds, dict(rounds=7, latency_steps=4, throughput_steps=2, warmup=1))
    by = {r['name']: r for r in rows}
    for name, want in (('a', 2.0), ('b', 1.25)):
        for key in ('throughput_ratio', 'latency_speedup'):
            assert by[name][key] == pytest.approx(want, rel=1e-9)
            assert by[name][f'{key}_spread'] == pytest.approx(0.0, abs=1e-9)
        assert not by[name]['throughput_noisy'] and not by[name]['latency_noisy']
    assert noise_warnings(rows, settings={}) == []   # {}: leave the machine's load out


def test_warning_when_spread_is_wider_than_effect(monkeypatch):
    """Model 'a' is 5% faster on the median but its rounds swing by +-30%: within the noise.
    Model 'b' is twice as fast with a small spread: a clear effect."""
    swing = [1.3, 0.75, 1.25, 0.7, 1.05]

    def seconds(name, batch, rnd, i):
        base = (batch if batch > 1 else 0.1) * 1e-3
        if name == 'a':
            return base / (swing[max(rnd, 0)])
        if name == 'b':
            return base / (2.0 + 0.05 * (rnd % 2))
        return base

    rows, _, _ = _run(monkeypatch, seconds, dict(rounds=5, latency_steps=2, throughput_steps=1, warmup=1))
    by = {r['name']: r for r in rows}
    a, b = by['a'], by['b']
    assert a['throughput_ratio'] == pytest.approx(1.05) and a['throughput_ratio_spread'] == pytest.approx(0.6)
    assert a['throughput_noisy'] and a['latency_noisy'] and within_noise(a)
    assert not b['throughput_noisy'] and not b['latency_noisy']
    assert not by['base']['throughput_noisy']
    lines = noise_warnings(rows, settings={})   # {}: leave the machine's load out
    assert len(lines) == 2 and all(line.startswith('warning: a: ') for line in lines)
    assert '0.70-1.30' in lines[0] and 'within the noise' in lines[0]
    # the rule itself: |ratio - 1| against half the range
    assert within_noise(dict(name='x', throughput_ratio=1.2, throughput_ratio_spread=0.41))
    assert not within_noise(dict(name='x', throughput_ratio=1.2, throughput_ratio_spread=0.39))
    assert within_noise(dict(name='x', throughput_ratio=0.8, throughput_ratio_spread=0.5))
    assert not within_noise(dict(name='x', baseline=True, throughput_ratio=1.0, throughput_ratio_spread=0.5))


def test_contention_warning_on_an_oversubscribed_cpu():
    busy = dict(device='cpu', threads=2, cpu_count=2, load_avg=1.0, load_avg_after=3.1)
    line = contention_warning(busy)
    assert line.startswith('warning: load average 3.1 on 2 cores') and 'biased' in line
    assert contention_warning(dict(busy, load_avg_after=2.4)) is None
    assert contention_warning(dict(busy, device='cuda:0')) is None
    assert contention_warning(dict(busy, load_avg_after=None, load_avg=None)) is None
    rows = [dict(name='base', baseline=True, throughput_ratio=1.0, throughput_ratio_spread=0.0, settings=busy)]
    assert noise_warnings(rows) == [line] and noise_warnings(rows, settings={}) == []


@pytest.mark.parametrize('quick', [False, True])
def test_default_rounds_are_recorded(monkeypatch, quick):
    rows, clock, p = _run(monkeypatch, _irregular, None, quick=quick, names=('base', 'a'))
    want = COMPARE_QUICK if quick else COMPARE_DEFAULTS
    assert want['rounds'] >= (3 if quick else 9)
    for row in rows:
        s = row['settings']
        for k in ('rounds', 'latency_steps', 'throughput_steps', 'warmup', 'run_time'):
            assert s[k] == want[k]
        assert len(row['throughput_ratio_rounds']) == len(row['latency_speedup_rounds']) == want['rounds']
        assert s['ratios'] == 'median of per-round ratios' and s['spread'] == 'min-max over rounds'
        assert 'malloc' in s and 'load_avg' in s and 'load_avg_after' in s and s['cpu_count'] >= 1
    a = id(clock.models['a'])
    assert len(clock.calls[(a, 1)]) == want['warmup'] + want['rounds'] * (want['latency_steps'] + 1)
    assert len(clock.calls[(a, 'B')]) == want['warmup'] + want['rounds'] * (want['throughput_steps'] + 1)


def test_long_forwards_cap_runs_and_skip_the_settling_forward(monkeypatch):
    """Runs stop once their timed forwards reach ``run_time``; the untimed forward before a run is
    kept for short forwards (batch 1 here, 0.06 s) and dropped for long ones (the batch, 0.3 s)."""
    calls = {1: 0, 'B': 0}

    def step(runner):
        kind = 1 if runner.x.shape[0] == 1 else 'B'
        calls[kind] += 1
        return 0.06 if kind == 1 else 0.3

    monkeypatch.setattr(Runner, 'step', step)
    rows = compare({'base': _tiny(), 'a': _tiny()}, 'base', input_size=SIZE, batch_size=4, gmacs=False, rounds=3,
                   latency_steps=10, throughput_steps=3, warmup=3, run_time=0.5)
    # warm-up: 3 batch-1 forwards (0.18 s), 2 batch forwards (0.6 s); per round: 1 untimed + 9
    # timed batch-1 forwards (0.54 s), 2 timed batch forwards (0.6 s), no untimed one
    assert calls == {1: 2 * (3 + 3 * (1 + 9)), 'B': 2 * (2 + 3 * 2)}
    for row in rows:
        assert row['settled'] == dict(latency=True, throughput=False)
        assert row['latency_samples'] == 27 and row['throughput_samples'] == 6
    s = rows[0]['settings']
    assert s['run_time'] == 0.5 and s['settle_below'] == SETTLE_BELOW


def test_explicit_arguments_override_defaults_and_bad_counts_raise(monkeypatch):
    rows, clock, p = _run(monkeypatch, _irregular, dict(rounds=4, throughput_steps=3), quick=True, names=('base', 'a'))
    s = rows[0]['settings']
    assert (s['rounds'], s['throughput_steps'], s['latency_steps']) == (4, 3, COMPARE_QUICK['latency_steps'])
    with pytest.raises(ValueError, match='rounds'):
        compare({'base': _tiny()}, 'base', input_size=SIZE, rounds=0, gmacs=False)


def test_table_shows_the_range_of_the_rounds():
    rows = [dict(name='dense', baseline=True, throughput_ratio=1.0, throughput_ratio_lo=1.0, throughput_ratio_hi=1.0,
                 latency_speedup=1.0),
            dict(name='fused', baseline=False, throughput_ratio=1.644, throughput_ratio_lo=1.581,
                 throughput_ratio_hi=1.712, latency_speedup=1.3)]
    assert ratio_range(rows[1], 'throughput_ratio') == '1.64 (1.58-1.71)'
    assert ratio_range(rows[0], 'throughput_ratio') == '1.00'
    assert ratio_range(rows[1], 'latency_speedup') == '1.30'
    assert ratio_range(rows[1], 'missing') is None
    table = format_compare(rows, ['name', 'throughput_ratio'])
    assert '1.64 (1.58-1.71)' in table.splitlines()[-1] and rows[1]['throughput_ratio'] == 1.644


def test_fixed_malloc_thresholds_are_recorded(monkeypatch):
    got = fix_malloc_thresholds()
    if got is None:
        pytest.skip('no glibc mallopt here')
    assert got['how'] in ('mallopt', 'environment') and malloc_state() == got
    rows, _, _ = _run(monkeypatch, _irregular, dict(rounds=3), quick=True, names=('base', 'a'))
    assert rows[0]['settings']['malloc'] == got


def test_fuse_command_prints_spread_and_warning(monkeypatch, capsys):
    """``deitlab fuse`` prints the per-round range of each ratio and a warning line for a ratio
    within the noise (here the token-reduced model's, made to swing by +-40% between rounds)."""
    from deitlab.cli import main

    def seconds(runner_name, batch, rnd, i):
        base = (batch if batch > 1 else 0.1) * 1e-3
        if runner_name.startswith('tome'):
            return base / (1.4 if rnd % 2 else 0.7)
        return base

    patched = set()
    from deitlab.tokens import fuse as fuse_mod
    real_apply = fuse_mod.apply_token_fusion

    def apply(model, *a, **k):   # the models are built inside fuse_model: name them by their patch
        out = real_apply(model, *a, **k)
        patched.add(id(out))
        return out

    monkeypatch.setattr(fuse_mod, 'apply_token_fusion', apply)
    FakeClock(lambda m: 'tome' if id(m) in patched else 'other', seconds, dict(COMPARE_QUICK)).install(monkeypatch)
    assert main(['fuse', 'tome', '--model', 'deitlab_deit_pico_patch4_32', '--r', '2', '--quick',
                 '--batch-size', '2']) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith('tome r=2')]
    assert table and '(0.70-1.40)' in table[0]
    assert any(line.startswith('warning: tome r=2: throughput ratio') for line in out.splitlines())
    assert 'rounds' in out
