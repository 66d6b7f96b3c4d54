"""deitlab.bench: counted GMACs equal the closed form, published DeiT figures, state restored,
timers and their settings. No measured time is asserted: the timers' arithmetic (medians,
images/s, ratios, the interleaving of ``compare``) is checked exactly on a fake clock that moves
only inside the forwards of the models being timed, by amounts the test chooses."""
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np

import pytest
import timm
import torch
import torch.nn as nn

import deitlab  # noqa: F401  (registers the architectures)
from deitlab.bench import (MODELS_COLUMNS, MODELS_DIGITS, analytic_gmacs, analytic_macs, benchmark_model, compare, count_gmacs, count_params,
                           format_benchmark, format_table, fused_attention, measure_latency, measure_memory,
                           measure_throughput, models_table, peak_memory_mb, plot_tradeoff, resolve_input_size)
from deitlab.bench import speed

SMALL = timm.list_models('deitlab_deit_*_patch4_32')
SETTINGS_KEYS = {'device', 'dtype', 'batch_size', 'threads', 'torch', 'fused_attn', 'warmup', 'repeats', 'input_size'}
ODD_WIDTHS = dict(num_heads=[3, 2, 3, 1, 3, 3], qk_dim=[8, 16, 32, 32, 32, 32], v_dim=[32, 8, 16, 32, 32, 32],
                  mlp_hidden=[10, 20, 30, 40, 50, 60], img_size=28, in_chans=1)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def _meta(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False, **kwargs)


def _hand_macs(patches, chans, patch, dim, heads, qk, v, mlp, classes, prefix):
    """The closed form written out independently of deitlab.bench (lists: one entry per block)."""
    n = patches + prefix
    total = patches * chans * patch * patch * dim
    for h, dq, dv, m in zip(heads, qk, v, mlp):
        total += n * dim * h * (2 * dq + dv) + h * n * n * dq + h * n * n * dv + n * h * dv * dim + 2 * n * dim * m
    return total + dim * classes * (2 if prefix == 2 else 1)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with two, a busy 2-core machine makes every forward ~50x slower
    (OpenMP threads wait for a core); results here do not depend on speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return timm.create_model('deitlab_deit_nano_patch4_32', img_size=28, in_chans=1)


# ------------------------------------------------------------------ GMACs and parameters

def test_small_family_registered():
    assert len(SMALL) == 8 and sum('distilled' in n for n in SMALL) == 4


@pytest.mark.parametrize('name', SMALL)
def test_analytic_equals_counter_small_models(name):
    model = timm.create_model(name)
    counted, closed = count_gmacs(model), analytic_gmacs(model)
    assert closed > 0 and _rel(counted, closed) < 1e-6
    assert analytic_macs(model)['tokens'] == 64 + (2 if 'distilled' in name else 1)


@pytest.mark.parametrize('distilled', [False, True])
def test_non_uniform_widths(distilled):
    name = 'deitlab_deit_nano_distilled_patch4_32' if distilled else 'deitlab_deit_nano_patch4_32'
    model = timm.create_model(name, **ODD_WIDTHS)
    assert resolve_input_size(model) == (1, 28, 28)
    counted, closed = count_gmacs(model), analytic_gmacs(model)
    assert _rel(counted, closed) < 1e-6
    hand = _hand_macs(49, 1, 4, 96, ODD_WIDTHS['num_heads'], ODD_WIDTHS['qk_dim'], ODD_WIDTHS['v_dim'],
                      ODD_WIDTHS['mlp_hidden'], 10, 2 if distilled else 1)
    assert analytic_macs(model)['total'] == hand


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_timm_deit_analytic_equals_counter(name):
    model = timm.create_model(name, pretrained=False)
    assert _rel(count_gmacs(model), analytic_gmacs(model)) < 1e-6


@pytest.mark.parametrize('size,published,dim,heads', [
    ('tiny', 1.258, 192, 3), ('small', 4.608, 384, 6), ('base', 17.58, 768, 12)])
def test_published_deit_figures(size, published, dim, heads):
    model = _meta(f'deitlab_deit_{size}_patch16_224')
    # the papers' figures are fvcore's totals, which add an estimate for each LayerNorm
    assert abs(analytic_gmacs(model, convention='fvcore') - published) < 0.01
    # matmuls only: exactly the closed form, and what FlopCounterMode counts
    hand = _hand_macs(196, 3, 16, dim, [heads] * 12, [64] * 12, [64] * 12, [4 * dim] * 12, 1000, 1)
    assert analytic_macs(model)['total'] == hand
    assert _rel(count_gmacs(model), hand / 1e9) < 1e-6
    assert 0 < published - analytic_gmacs(model) < 0.02


@pytest.mark.slow
def test_deit_base_counter_on_cpu():
    model = timm.create_model('deitlab_deit_base_patch16_224', pretrained=False)
    assert 86e6 < count_params(model) < 87e6
    assert _rel(count_gmacs(model), analytic_gmacs(model)) < 1e-6


def test_count_params(nano):
    assert count_params(nano) == sum(p.numel() for p in nano.parameters())
    nano.patch_embed.requires_grad_(False)
    frozen = sum(p.numel() for p in nano.patch_embed.parameters())
    assert count_params(nano, trainable=True) == count_params(nano) - frozen


def test_count_gmacs_batch_size_does_not_change_per_image(nano):
    assert _rel(count_gmacs(nano, batch_size=3), count_gmacs(nano)) < 1e-9


def test_count_gmacs_restores_fused_attn_and_mode(nano):
    attns = [b.attn for b in nano.blocks]
    for i, a in enumerate(attns):
        a.fused_attn = i % 2 == 0
    nano.train()
    nano.blocks[1].eval()
    count_gmacs(nano)
    assert [a.fused_attn for a in attns] == [i % 2 == 0 for i in range(len(attns))]
    assert nano.training and nano.blocks[0].training and not nano.blocks[1].training


def test_count_gmacs_restores_state_after_an_error(nano):
    nano.set_fused_attn(True)
    nano.train()
    with pytest.raises(RuntimeError):
        count_gmacs(nano, input_size=(3, 28, 28))  # the patch embedding takes one channel
    assert all(b.attn.fused_attn for b in nano.blocks) and nano.training


def test_fused_attention_context_restores_on_exception(nano):
    nano.set_fused_attn(True)
    with pytest.raises(KeyError):
        with fused_attention(nano, False):
            assert not any(b.attn.fused_attn for b in nano.blocks)
            raise KeyError('boom')
    assert all(b.attn.fused_attn for b in nano.blocks)


def test_fused_counter_misses_attention_without_the_switch(nano):
    """Why count_gmacs switches fused attention off: the counter drops SDPA on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    nano.set_fused_attn(True)
    nano.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        nano(torch.randn(1, 1, 28, 28))
    parts = analytic_macs(nano)
    assert fc.get_total_flops() / 2 == parts['total'] - parts['attn_qk'] - parts['attn_av']


def test_input_size_follows_patch_embed_not_stale_cfg(nano):
    assert nano.pretrained_cfg['input_size'] == (3, 32, 32)
    assert resolve_input_size(nano) == (1, 28, 28)
    assert resolve_input_size(nano, (1, 28, 28)) == (1, 28, 28)
    with pytest.raises(ValueError, match='three positive ints'):
        resolve_input_size(nano, (28, 28))


# ------------------------------------------------------------------ unsupported / inconsistent

def test_analytic_rejects_other_models():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(ValueError, match='supports deitlab DeiT .* not Sequential'):
        analytic_gmacs(cnn, (3, 32, 32))
    # the counter works on anything: 3x3 conv 3 -> 8 on 30x30 outputs, then the 8 -> 10 linear
    assert count_gmacs(cnn, (3, 32, 32)) == pytest.approx((30 * 30 * 8 * 3 * 9 + 8 * 10) / 1e9, rel=1e-12)


def test_analytic_rejects_stale_widths(nano):
    nano.blocks[2].attn.num_heads = 2  # as a pruner that forgot to update the module would leave it
    with pytest.raises(ValueError, match='stale widths'):
        analytic_gmacs(nano)


def test_analytic_rejects_attention_pooling_and_bad_convention(nano):
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, global_pool='map', img_size=32,
                            patch_size=16, depth=1)
    with pytest.raises(ValueError, match='attention pooling'):
        analytic_gmacs(vit)
    with pytest.raises(ValueError, match='convention'):
        analytic_gmacs(nano, convention='thop')


# ------------------------------------------------------------------ timers and memory

def _check_settings(settings, batch, keys=SETTINGS_KEYS):
    assert keys <= set(settings)
    assert settings['batch_size'] == batch and settings['device'] == 'cpu' and settings['dtype'] == 'float32'
    assert settings['threads'] == torch.get_num_threads() and settings['torch'] == torch.__version__


U = 2.0 ** -10   # the fake clock's unit: every sum and difference of the test's times is exact


class FakeClock:
    """``time.perf_counter`` of ``deitlab.bench.speed``, replaced: time passes only in the forwards
    of the modules the clock watches, by ``cost(k, batch)`` seconds for the k-th forward (from 0) of
    that module; ``log`` lists (name, batch size) of every watched forward in order."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        self.log = []
        monkeypatch.setattr(speed, 'time', SimpleNamespace(perf_counter=lambda: self.now))

    def watch(self, module, name, cost):
        k = itertools.count()

        def hook(mod, args, out):
            batch = args[0].shape[0]
            self.now += cost(next(k), batch)
            self.log.append((name, batch))

        module.register_forward_hook(hook)
        return module


def _tiny():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


TINY = (1, 4, 4)


def test_measure_latency(nano):
    """A real model: the settings say what ran, the model's state comes back, and ``quick`` takes
    exactly its 5 samples (min_time 0).

    Wrong code this catches: quick ignored (30 or more samples), settings that do not record the
    batch, input size, threads or fused attention used, a model left in eval mode."""
    nano.train()
    res = measure_latency(nano, quick=True)
    assert res['samples'] == 5 and res['settings']['warmup'] == 1 and res['settings']['repeats'] == 5
    assert res['p10_ms'] <= res['median_ms'] <= res['p90_ms'] and res['min_ms'] <= res['p10_ms']
    _check_settings(res['settings'], 1)
    assert res['settings']['input_size'] == [1, 28, 28] and res['settings']['fused_attn'] is True
    assert nano.training


def test_latency_is_the_median_of_the_timed_forwards(monkeypatch):
    """Fake clock: a warm-up forward of 64 units, then forwards of 1, 8, 2, 4 units. The latency is
    their median, 3 units, with numpy's 10th / 90th percentiles, mean 3.75, min 1, from 4 samples,
    all at batch 1.

    Wrong code this catches: the warm-up forward timed (median 4), the mean or the minimum reported
    as the median, one repeat too many or too few, percentiles swapped, a batch other than 1, a
    stopwatch that does not enclose the forward (0 ms)."""
    clock = FakeClock(monkeypatch)
    costs = [64, 1, 8, 2, 4]
    model = clock.watch(_tiny(), 'm', lambda k, b: costs[k] * U)
    res = measure_latency(model, TINY, warmup=1, repeats=4, min_time=0)
    timed = np.array(costs[1:]) * U * 1e3
    assert res['samples'] == 4 and clock.log == [('m', 1)] * 5
    assert res['median_ms'] == 3 * U * 1e3 and res['mean_ms'] == 3.75 * U * 1e3 and res['min_ms'] == U * 1e3
    assert res['p10_ms'] == pytest.approx(np.percentile(timed, 10), rel=1e-12)
    assert res['p90_ms'] == pytest.approx(np.percentile(timed, 90), rel=1e-12)


def test_measure_throughput(nano):
    """Wrong code this catches: quick ignored, a batch other than the one asked for, fused
    attention not forced off for the measurement or left off afterwards."""
    res = measure_throughput(nano, batch_size=8, quick=True, fused_attn=False)
    assert res['samples'] == 3 and res['settings']['repeats'] == 3
    _check_settings(res['settings'], 8)
    assert res['settings']['fused_attn'] is False
    assert all(b.attn.fused_attn for b in nano.blocks)  # forced only for the measurement


def test_throughput_is_the_median_of_batch_over_seconds(monkeypatch):
    """Fake clock, batch 8: a warm-up of 64 units, then batches of 1, 2, 4, 8 units. Images/s is the
    median of 8 / t, (4 + 2) / 2 = 3 per unit, not 8 / median(t) = 8 / 3; ``batch_ms`` is
    median(t) = 3 units; every forward is a batch of 8.

    Wrong code this catches: images/s as the batch over the median or mean time, the warm-up
    timed, the batch-1 input timed, p10 / p90 swapped (p10 is the slow end of images/s)."""
    clock = FakeClock(monkeypatch)
    costs = [64, 1, 2, 4, 8]
    model = clock.watch(_tiny(), 'm', lambda k, b: costs[k] * U)
    res = measure_throughput(model, TINY, batch_size=8, warmup=1, repeats=4, min_time=0)
    ips = 8 / (np.array(costs[1:]) * U)
    assert res['samples'] == 4 and clock.log == [('m', 8)] * 5
    assert res['images_per_s'] == 3 / U and res['batch_ms'] == 3 * U * 1e3
    assert res['images_per_s_p10'] == pytest.approx(np.percentile(ips, 10), rel=1e-12)
    assert res['images_per_s_p10'] < res['images_per_s']
    assert res['images_per_s_p90'] == pytest.approx(np.percentile(ips, 90), rel=1e-12)


def test_timers_sample_until_min_time_and_cap_at_ten_times_repeats(monkeypatch):
    """Fake clock, 0.25 s forwards, 2 repeats: with min_time 1 s sampling stops at 4 samples (1 s);
    with min_time 100 s at the cap of 10 x 2 = 20 samples. The warm-up does not count towards
    min_time.

    Wrong code this catches: min_time ignored (2 samples) or counted from before the warm-up (3),
    no cap (400 samples), the cap off by a factor."""
    clock = FakeClock(monkeypatch)
    model = clock.watch(_tiny(), 'm', lambda k, b: 0.25)
    assert measure_latency(model, TINY, warmup=1, repeats=2, min_time=1.0)['samples'] == 4
    assert measure_throughput(model, TINY, batch_size=2, warmup=0, repeats=2, min_time=100.0)['samples'] == 20
    assert clock.log == [('m', 1)] * 5 + [('m', 2)] * 20


def test_timers_refuse_meta_models():
    with pytest.raises(ValueError, match='meta device'):
        measure_latency(_meta('deitlab_deit_pico_patch4_32'), quick=True)


def test_timers_leave_the_callers_model_alone(nano):
    res = measure_latency(nano, dtype=torch.float64, warmup=0, repeats=2, min_time=0, channels_last=True)
    assert res['settings']['dtype'] == 'float64' and res['settings']['channels_last'] is True
    assert res['samples'] == 2
    assert all(p.dtype == torch.float32 for p in nano.parameters())
    assert nano.patch_embed.proj.weight.is_contiguous()


def test_memory(nano):
    """Wrong code this catches: weights counted in another dtype, twice, or with buffers they do
    not have; an input size taken from another batch or shape; a peak that is not the sum."""
    res = measure_memory(nano, batch_size=16)
    assert res['weights_mb'] == sum(p.numel() for p in nano.parameters()) * 4 / 2 ** 20   # fp32, no buffers
    assert res['input_mb'] == 16 * 1 * 28 * 28 * 4 / 2 ** 20
    assert res['forward_peak_mb'] > 0
    assert math.isclose(res['peak_mb'], res['weights_mb'] + res['input_mb'] + res['forward_peak_mb'])
    assert res['settings']['batch_size'] == 16 and res['method']
    assert peak_memory_mb(nano, batch_size=16) > 0


def test_compare_interleaved(nano):
    """Real models: the rows, settings and non-timed ratios. The baseline's ratios are exactly 1.

    Wrong code this catches: rows out of order or the baseline flag on the wrong row, a baseline
    ratio that is not 1, gmacs_ratio that is not the GMACs over the baseline's, GMACs or
    parameters of another model, settings that do not echo the rounds and steps asked for."""
    pico = timm.create_model('deitlab_deit_pico_patch4_32', img_size=28, in_chans=1)
    rows = compare({'nano': nano, 'pico': pico}, baseline='nano', batch_size=8, rounds=2, latency_steps=2,
                   throughput_steps=1, warmup=1)
    assert [r['name'] for r in rows] == ['nano', 'pico'] and [r['baseline'] for r in rows] == [True, False]
    assert rows[0]['latency_speedup'] == 1.0 and rows[0]['throughput_ratio'] == 1.0
    assert rows[0]['gmacs_ratio'] == 1.0 and rows[0]['params_ratio'] == 1.0
    assert rows[1]['gmacs_ratio'] == rows[1]['gmacs'] / rows[0]['gmacs'] < 1
    assert rows[1]['gmacs'] == count_gmacs(pico) and rows[1]['params_m'] == count_params(pico) / 1e6
    for r in rows:
        s = r['settings']
        assert (s['rounds'], s['latency_steps'], s['throughput_steps'], s['warmup']) == (2, 2, 1, 1)
        assert s['order'] == ['nano', 'pico'] and s['latency_batch_size'] == 1
        _check_settings(s, 8, SETTINGS_KEYS - {'repeats', 'fused_attn'} | {'latency_steps'})
        assert r['fused_attn'] is True
    with pytest.raises(ValueError, match='baseline'):
        compare({'nano': nano}, baseline='dense')


def _runs(log):
    """The names of the models in the order they ran, one entry per run of consecutive forwards."""
    return [name for name, _ in itertools.groupby(n for n, _ in log)]


def test_compare_measures_what_it_documents(monkeypatch):
    """Fake clock, models a (baseline) and b; a forward of a takes 1 + batch units, b twice that.
    Whatever the number of untimed forwards, every batch-1 forward of a takes 2 units and every
    batch-8 one 9, so: latency_ms exactly 2 and 4 units (p10 = p90 = median), images_per_s
    exactly 8 / 9 and 4 / 9 per unit, b's throughput_ratio and latency_speedup exactly 0.5, the
    baseline's exactly 1. The models take turns in the documented order -- warm-up a, b, then
    rounds a b, b a, a b -- and only at batch 1 and 8; the settings record what was asked.

    Wrong code this catches: inverted ratios (2 instead of 0.5), ratios of the wrong quantity, a
    baseline ratio that is not 1, latency timed at the batch size or throughput at batch 1,
    images/s that is not batch / seconds, no reversal of the order every other round, settings
    that do not say what ran."""
    clock = FakeClock(monkeypatch)
    a = clock.watch(_tiny(), 'a', lambda k, batch: (1 + batch) * U)
    b = clock.watch(_tiny(), 'b', lambda k, batch: 2 * (1 + batch) * U)
    rows = compare({'a': a, 'b': b}, baseline='a', input_size=TINY, batch_size=8, rounds=3, latency_steps=3,
                   throughput_steps=1, warmup=1, gmacs=False)
    assert _runs(clock.log) == ['a', 'b', 'a', 'b', 'a', 'b']   # a b | a b | b a | a b, runs merged
    assert {batch for _, batch in clock.log} == {1, 8}
    ra, rb = rows
    assert [r['name'] for r in rows] == ['a', 'b'] and ra['baseline'] and not rb['baseline']
    for row, scale in ((ra, 1), (rb, 2)):
        assert row['latency_ms'] == row['latency_p10_ms'] == row['latency_p90_ms'] == scale * 2 * U * 1e3
        assert row['images_per_s'] == pytest.approx(8 / (scale * 9 * U), rel=1e-12)
        assert row['params_m'] == sum(p.numel() for p in _tiny().parameters()) / 1e6
        s = row['settings']
        assert (s['rounds'], s['latency_steps'], s['throughput_steps'], s['warmup']) == (3, 3, 1, 1)
        assert s['batch_size'] == 8 and s['latency_batch_size'] == 1 and s['order'] == ['a', 'b']
        assert s['threads'] == torch.get_num_threads()
    assert ra['throughput_ratio'] == 1.0 and ra['latency_speedup'] == 1.0
    assert rb['throughput_ratio'] == pytest.approx(0.5, rel=1e-12)
    assert rb['latency_speedup'] == pytest.approx(0.5, rel=1e-12)
    assert rb['gmacs'] is None and rb['gmacs_ratio'] is None and rb['params_ratio'] == 1.0


class _Twice(nn.Module):
    """The same model run twice per forward: exactly twice the work."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + self.model(x)


def test_compare_sees_a_model_that_does_twice_the_work(nano):
    """Real clock, no time asserted: the same nano model, once and twice per forward, over 5
    interleaved rounds. Twice the work measures below 0.8 of the baseline's throughput and
    latency speed-up (about 0.5; a factor of 2 keeps the ordering clear of the noise of a busy
    machine).

    Wrong code this catches: a stopwatch that does not enclose the forward, every model timed on
    the baseline's runner, ratios taken against the wrong row or inverted (about 2)."""
    rows = compare({'once': nano, 'twice': _Twice(nano)}, baseline='once', input_size=(1, 28, 28), batch_size=16,
                   rounds=5, latency_steps=5, throughput_steps=3, warmup=1, gmacs=False)
    assert rows[1]['throughput_ratio'] < 0.8 and rows[1]['latency_speedup'] < 0.8


def test_compare_with_channels_last_leaves_trainable_weights(nano):
    pico = timm.create_model('deitlab_deit_pico_patch4_32', img_size=28, in_chans=1)
    compare({'nano': nano, 'pico': pico}, baseline='nano', batch_size=2, quick=True, channels_last=True, gmacs=False)
    for m in (nano, pico):
        w = m.patch_embed.proj.weight
        assert not w.is_inference() and w.is_contiguous()
        m.train()
        m(torch.randn(2, 1, 28, 28)).sum().backward()


def test_benchmark_model(nano, monkeypatch):
    """Fake clock: every forward of the nano model takes (1 + batch) units. Latency is exactly 2
    units at batch 1 and throughput 8 / 9 per unit at batch 8, from ``QUICK``'s sample counts; the
    flat fields are the detailed results' and the memory entry is measure_memory's.

    Wrong code this catches: latency timed at the throughput batch or throughput at batch 1, the
    flat fields taken from the wrong measurement, quick ignored, the summary's batch settings not
    the ones used."""
    clock = FakeClock(monkeypatch)
    clock.watch(nano, 'nano', lambda k, b: (1 + b) * U)
    res = benchmark_model(nano, batch_size=8, quick=True)
    assert res['input_size'] == [1, 28, 28] and res['params'] == count_params(nano)
    assert res['gmacs_match'] is True and _rel(res['gmacs'], res['gmacs_analytic']) < 1e-6
    assert res['latency_ms'] == res['latency']['median_ms'] == 2 * U * 1e3
    assert res['images_per_s'] == res['throughput']['images_per_s'] == 8 / (9 * U)
    assert res['throughput']['batch_ms'] == 9 * U * 1e3
    assert res['latency']['samples'] == speed.QUICK['latency']['repeats']
    assert res['throughput']['samples'] == speed.QUICK['throughput']['repeats']
    assert res['latency']['settings']['batch_size'] == 1 and res['throughput']['settings']['batch_size'] == 8
    assert res['peak_memory_mb'] == res['memory']['peak_mb'] > res['memory']['weights_mb']
    assert res['settings']['batch_size'] == 8 and res['settings']['latency_batch_size'] == 1
    text = format_benchmark(res)
    assert 'GMACs' in text and 'images/s' in text
    assert json.loads(json.dumps(res))['gmacs'] == res['gmacs']  # what `deitlab bench --json` prints


def test_benchmark_model_without_timers_on_a_cnn():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    res = benchmark_model(cnn, (3, 16, 16), latency=False, throughput=False, memory=False)
    assert res['gmacs'] == pytest.approx((14 * 14 * 8 * 3 * 9 + 8 * 10) / 1e9, rel=1e-12)
    assert res['gmacs_analytic'] is None and res['gmacs_match'] is None
    assert res['latency'] is None and res['settings']['threads'] == torch.get_num_threads() == 1


# ------------------------------------------------------------------ tables and plots

def test_models_table_and_format():
    rows = models_table()
    assert {r['name'] for r in rows} == set(timm.list_models('deitlab_*'))
    by = {r['name']: r for r in rows}
    assert by['deitlab_deit_base_patch16_224']['input_size'] == [3, 224, 224]
    assert 86 < by['deitlab_deit_base_patch16_224']['params_m'] < 87
    for r in rows:
        if r['gmacs_analytic'] is not None:
            assert _rel(r['gmacs'], r['gmacs_analytic']) < 1e-6
    json.dumps(rows)
    text = format_table(rows, MODELS_COLUMNS, digits=MODELS_DIGITS)
    lines = text.splitlines()
    assert lines[0].split() == ['name', 'input', 'params', '(M)', 'gmacs']
    assert len(lines) == len(rows) + 2 and len({len(line) for line in lines[2:]}) == 1
    assert '3x32x32' in text and '17.5638' in text


def test_format_table_cells():
    text = format_table([dict(a='x', b=1.23456, c=None, d=True), dict(a='long', b=10.0, c=3, d=False)], digits=2)
    lines = text.splitlines()
    assert lines[2].split() == ['x', '1.23', '-', 'yes'] and lines[3].split() == ['long', '10.00', '3', 'no']
    assert format_table([], ['a']).splitlines()[0] == 'a'


def test_plot_tradeoff(tmp_path):
    rows = [dict(name='a', gmacs=1.0, images_per_s=10.0, baseline=True), dict(name='b', gmacs=0.5, images_per_s=18.0)]
    path = tmp_path / 'tradeoff.png'
    plot_tradeoff(rows, path=str(path), title='t')
    assert path.stat().st_size > 1000
