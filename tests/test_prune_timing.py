"""Structural pruning: how the latency table is timed (interleaved rounds; the fastest round per
node, or the median of rounds paired against a reference block; its spread), with a fake clock
instead of wall time."""
import numpy as np
import pytest
import torch

from deitlab.prune import LatencyTable, PruneError
from _prune_helpers import _model

import deitlab.prune.timing as timing
from deitlab.prune import load_latency_table
from deitlab.prune.timing import round_stats, timed_rounds


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scripted_jobs(clock: FakeClock, durations: dict, calls: list) -> list:
    """Jobs whose calls advance the fake clock by the next scripted duration (seconds)."""
    def setup(key):
        def fn():
            calls.append(key)
            clock.now += next(durations[key])
        return fn
    return [(key, lambda key=key: setup(key)) for key in durations]


def _visit(untimed: float, timed: list) -> list:
    """One visit: two untimed warm-up calls, then the timed ones."""
    return [untimed, untimed] + list(timed)


def test_node_time_is_the_fastest_of_interleaved_rounds():
    clock, calls = FakeClock(), []
    # per job: the warm-up round (one timed call, discarded), then 3 rounds of 2 timed calls
    rounds = {'a': [(0.005, 0.007), (0.001, 0.009), (0.003, 0.002)],       # per round: 5, 1, 2 ms
              'b': [(0.020, 0.030), (0.010, 0.030), (0.040, 0.040)],       # 20, 10, 40
              'c': [(0.100, 0.100), (0.004, 0.009), (0.002, 0.003)]}       # 100, 4, 2
    # the untimed calls and the warm-up round are the fastest of all: counted, they would win
    durations = {k: iter(_visit(1e-6, [2e-6]) + [t for r in v for t in _visit(1e-6, r)]) for k, v in rounds.items()}
    per_round, _ = timed_rounds(_scripted_jobs(clock, durations, calls), torch.device('cpu'), rounds=3, steps=2,
                                progress=False, clock=clock)
    assert per_round['a'] == pytest.approx([5.0, 1.0, 2.0])
    assert per_round['b'] == pytest.approx([20.0, 10.0, 40.0])
    assert per_round['c'] == pytest.approx([100.0, 4.0, 2.0])
    # interleaved: every job's round r comes before any job's round r + 1
    visits = [calls[i] for i in range(0, 9, 3)] + [calls[i] for i in range(9, len(calls), 4)]
    assert visits[:3] == ['a', 'b', 'c']
    for r in range(3):
        assert sorted(visits[3 + 3 * r: 6 + 3 * r]) == ['a', 'b', 'c']
    # the node value is the fastest round, not the median or the mean; the spread is (max - min) / min
    for key, fastest, spread in (('a', 1.0, 4.0), ('b', 10.0, 3.0), ('c', 2.0, 49.0)):
        assert round_stats(per_round[key]) == pytest.approx((fastest, spread))
    with pytest.raises(PruneError, match='rounds >= 1 and steps >= 1'):
        timed_rounds([], torch.device('cpu'), rounds=0, steps=1)


def test_paired_timing_cancels_slow_spells_longer_than_a_visit():
    """Paired rounds time each call between two reference calls. The machine here runs at a
    different speed at every visit (a slow spell lasts longer than a visit): the fastest-round
    estimator keeps whatever speed the luckiest visit had, the paired ratio does not see the
    speed at all. Code that divided by one reference call timed at another visit, or by the
    reference's fastest call, would leave the spells in the rounds."""
    import itertools
    base = {'ref': 2e-3, 'a': 1e-3, 'b': 6e-3}
    spells = itertools.cycle([3.0, 2.0, 5.0, 4.0, 2.5])
    for paired in (True, False):
        clock, calls, speed = FakeClock(), [], {'f': 1.0}

        def setup(key):
            speed['f'] = next(spells)   # a new visit: the machine may be in another spell

            def fn():
                calls.append(key)
                clock.now += base[key] * speed['f']
            return fn
        jobs = [(key, lambda key=key: setup(key)) for key in ('a', 'ref', 'b')]
        per_round, _ = timed_rounds(jobs, torch.device('cpu'), rounds=4, steps=3, progress=False, clock=clock,
                                    reference='ref' if paired else None)
        if paired:
            # every round the exact ratio, in ms of the reference's fastest call (2 ms x 2.0)
            assert per_round['a'] == pytest.approx([2.0] * 4)
            assert per_round['b'] == pytest.approx([12.0] * 4)
            assert per_round['ref'] == pytest.approx([4.0] * 4)
            # a timed visit of 'a' after the warm-up round: 2 untimed calls, then R a R a R a R
            visit = ['a', 'a'] + ['ref', 'a'] * 3 + ['ref']
            starts = [i for i in range(len(calls)) if calls[i:i + len(visit)] == visit]
            assert len(starts) == 4   # one per timed round
        else:
            assert round_stats(per_round['a'])[1] > 0.2    # the spells stay in the rounds
    with pytest.raises(PruneError, match='timing reference'):
        timed_rounds(jobs, torch.device('cpu'), rounds=1, steps=1, reference='nope')


def test_round_stats_median_for_paired_rounds():
    assert round_stats([3.0, 1.0, 2.0, 10.0, 2.5], 'median') == pytest.approx((2.5, 9.0))
    assert round_stats([3.0, 1.0, 2.0, 10.0, 2.5]) == pytest.approx((1.0, 9.0))


def _fake_rounds(values):
    """A ``timed_rounds`` stand-in: every key gets the rounds ``values(key)``."""
    def fake(jobs, device, rounds, steps, threads=None, progress=None, **kw):
        for _, setup in jobs[:1]:
            setup()   # builds for real once: the jobs are well-formed
        fake.reference = kw.get('reference')
        return {key: values(key, rounds) for key, _ in jobs}, 1
    return fake


@pytest.mark.parametrize('paired', [False, True])
def test_build_latency_table_keeps_the_fastest_or_median_round_and_the_spread(tmp_path, monkeypatch, paired):
    """Unpaired rounds: the fastest round is the node's time. Paired rounds (ratios to a reference
    block, which other work moves both ways): the median round; the reference is the grid's
    middle node."""
    model = _model()
    grid = dict(emb=[16, 32], heads=[2, 4], qk=[4, 8], v=[3, 6], mlp=[32, 64])

    def values(key, rounds):
        base = 1.0 + (sum(key) if isinstance(key[0], int) else (key[1] / 16 if key[0] == 'other' else 50.0))
        return [3 * base, 2 * base, base][:rounds]      # fastest: base, spread 2
    fake = _fake_rounds(values)
    monkeypatch.setattr(timing, 'timed_rounds', fake)
    lut = timing.build_latency_table(model, batch_size=2, grid=grid, passes=3, steps=1, progress=False, paired=paired)
    k = 2.0 if paired else 1.0      # median of (3, 2, 1) x base, or the fastest
    for idx in np.ndindex(*lut.block_ms.shape):
        assert lut.block_ms[idx] == pytest.approx(k * (1.0 + sum(idx)))
    assert lut.other_ms == pytest.approx([k * (1 + 1), k * (1 + 2)])
    assert fake.reference == ((1, 1, 1, 1, 1) if paired else None)
    assert lut.meta['reference'] == (dict(emb=32, heads=4, qk=8, v=6, mlp=64) if paired else None)
    assert np.allclose(lut.block_spread, 2.0) and lut.other_spread == pytest.approx([2.0, 2.0])
    assert lut.meta['passes'] == 3 and lut.meta['spread']['median'] == pytest.approx(2.0)
    assert lut.meta['estimator'].startswith('median' if paired else 'fastest of interleaved rounds')
    assert 'malloc' in lut.meta
    whole = lut.meta['whole_model']
    assert whole['measured_ms'] == pytest.approx(51.0 * k)
    assert whole['parts_ms'] == pytest.approx(lut.model_ms(dict(model.block_widths, embed_dim=model.embed_dim)))
    assert whole['ratio'] == pytest.approx(51.0 * k / whole['parts_ms'], abs=1e-3)
    # misalignment probes: the largest node with one axis at 1 and 3 below a multiple of 8 (the
    # embedding below each such node, 16 and 32; mlp below 64; qk 8 and v 6 have none above 8),
    # priced against the interpolated table
    assert sorted(lut.misalign) == ['emb', 'mlp'] and [n for n, _ in lut.misalign['emb']] == [16, 32]
    for node, f in lut.misalign['emb']:
        assert f == pytest.approx(np.median([51.0 * k / lut.block(e, 4, 8, 6, 64) for e in (node - 1, node - 3)]),
                                  abs=1e-4)
    [[node, f]] = lut.misalign['mlp']
    assert node == 64 and f == pytest.approx(np.median([51.0 * k / lut.block(32, 4, 8, 6, m) for m in (63, 61)]),
                                             abs=1e-4)
    # the spread survives a round trip through JSON
    again = load_latency_table(lut.save(tmp_path / 'lut.json'))
    assert np.array_equal(again.block_spread, lut.block_spread) and again.other_spread == lut.other_spread
    assert again.meta['whole_model'] == whole
    assert again.model_ms(dict(model.block_widths, embed_dim=model.embed_dim)) == pytest.approx(whole['parts_ms'])
    with pytest.raises(PruneError, match='spread has shape'):
        LatencyTable(lut.axes, lut.block_ms, lut.other_emb, lut.other_ms, block_spread=np.zeros(3))


def test_build_latency_table_times_a_real_model_in_rounds():
    model = _model()
    grid = dict(emb=[16, 32], heads=[4], qk=[8], v=[6], mlp=[64])
    lut = timing.build_latency_table(model, batch_size=2, grid=grid, passes=2, steps=1, progress=False)
    assert (lut.block_ms > 0).all() and lut.block_spread.shape == lut.block_ms.shape
    assert (lut.block_spread >= 0).all() and lut.meta['whole_model']['measured_ms'] > 0
    assert lut.meta['passes'] == 2 and lut.meta['threads'] >= 1


def test_busy_warning_names_the_load_and_the_way_out():
    from deitlab.prune.timing import busy_warning
    assert busy_warning(dict(load_average=1.9, cpu_count=2, device_type='cpu')) is None
    assert busy_warning(dict(load_average=9.0, cpu_count=2, device_type='cuda')) is None
    assert busy_warning(dict(load_average=None, cpu_count=2)) is None
    line = busy_warning(dict(load_average=6.5, cpu_count=2, device_type='cpu'))
    assert 'load average of 6.5 on 2 cores' in line and '--lut PATH' in line and '\n' not in line
