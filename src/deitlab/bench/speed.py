"""Wall-clock latency and throughput of inference, alone or interleaved with other models.

The loop follows the usual recipe (timm's ``benchmark.py`` does the same): eval mode, a
synthetic random batch already on the device, warm-up forwards first, then timed forwards under
``torch.inference_mode()`` with ``time.perf_counter`` and, on CUDA, ``torch.cuda.synchronize``
before reading the clock. Every result carries the settings it was measured with. Speed claims
should be ratios from ``compare``, which measures all models in one process, round by round.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn

from .common import (device_name, eval_mode, fused_attention, fused_attn_state, load_average, model_device,
                     model_dtype, num_threads, random_input, resolve_input_size, synchronize)

__all__ = ['measure_latency', 'measure_throughput', 'compare', 'prepared', 'within_noise', 'noise_warnings',
           'contention_warning', 'fix_malloc_thresholds', 'malloc_state', 'LATENCY_DEFAULTS', 'THROUGHPUT_DEFAULTS',
           'QUICK', 'COMPARE_DEFAULTS', 'COMPARE_QUICK', 'SETTLE_BELOW']

# warm-up forwards, minimum timed forwards, and minimum timed seconds (sampling continues until
# both minimums are met, up to 10x the minimum count).
LATENCY_DEFAULTS = dict(warmup=5, repeats=30, min_time=0.5)
THROUGHPUT_DEFAULTS = dict(warmup=2, repeats=8, min_time=0.5)
QUICK = dict(latency=dict(warmup=1, repeats=5, min_time=0.0), throughput=dict(warmup=1, repeats=3, min_time=0.0))


# glibc's mallopt parameters and the values the benchmark scripts pass through the environment
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
_malloc_fixed: Optional[dict] = None


def fix_malloc_thresholds(mmap_threshold: int = 32 * 2 ** 20, trim_threshold: int = 2 ** 30) -> Optional[dict]:
    """Fix glibc's malloc thresholds for the rest of the process (``mallopt``): blocks below
    ``mmap_threshold`` come from the heap and freed memory is kept up to ``trim_threshold``.

    By default glibc raises its mmap threshold as large blocks are freed, so when the
    activations of a forward are served by fresh ``mmap`` calls (and page faults) depends on the
    history of the process: the same model's time moved by up to 30% from one process to the next
    on a small CPU model. Fixed thresholds make the allocation pattern the same in every round and
    every run. Process-wide and not undone, so only the command line and the benchmark scripts
    call it. Values already given in the environment (``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_``) are left as they are. Returns what is in force (also recorded in
    the settings of every later measurement), or None where there is no glibc ``mallopt``.
    """
    global _malloc_fixed
    if _malloc_fixed is None:
        env = {k: os.environ[k] for k in _MALLOC_ENV if k in os.environ}
        if env:
            _malloc_fixed = dict(env, how='environment')
        elif sys.platform.startswith('linux'):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return None
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            if mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and \
                    mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1:
                _malloc_fixed = dict(MALLOC_MMAP_THRESHOLD_=str(int(mmap_threshold)),
                                     MALLOC_TRIM_THRESHOLD_=str(int(trim_threshold)), how='mallopt')
    return _malloc_fixed


def malloc_state():
    """The fixed malloc thresholds in force (``fix_malloc_thresholds`` or the environment), or
    'default' (glibc's dynamic thresholds)."""
    if _malloc_fixed is not None:
        return _malloc_fixed
    env = {k: os.environ[k] for k in _MALLOC_ENV if k in os.environ}
    return dict(env, how='environment') if env else 'default'


def _resolve_device(device, model: nn.Module) -> torch.device:
    if device is None:
        return model_device(model)
    dev = torch.device(device)
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def _channels_last(model: nn.Module):
    """Move 4-D weights to channels_last; put them back to contiguous on exit unless they were
    channels_last already. Both moves happen outside inference mode (``compare`` nests several
    prepared models), so the weights never become inference tensors."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.dim() == 4]
    already = any(not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
    with torch.inference_mode(False):
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if not already:
            with torch.inference_mode(False):
                model.to(memory_format=torch.contiguous_format)


class Runner:
    """One prepared model and input; ``step()`` runs one forward and returns its seconds."""

    def __init__(self, model: nn.Module, x: torch.Tensor, device: torch.device, channels_last: bool = False):
        self.model, self.x, self.device, self.channels_last = model, x, device, channels_last

    def with_batch(self, batch_size: int) -> 'Runner':
        """The same prepared model on a new random batch of ``batch_size``."""
        x = random_input(tuple(self.x.shape[1:]), batch_size, self.device, self.x.dtype, self.channels_last)
        return Runner(self.model, x, self.device, self.channels_last)

    def forward(self):
        return self.model(self.x)

    def step(self) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        self.model(self.x)
        synchronize(self.device)
        return time.perf_counter() - t0


@contextlib.contextmanager
def prepared(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1,
             device=None, dtype: Optional[torch.dtype] = None, amp: bool = False,
             amp_dtype: torch.dtype = torch.bfloat16, channels_last: bool = False,
             fused_attn: Optional[bool] = None, threads: Optional[int] = None):
    """Context in which ``model`` is ready to be timed: yields ``(Runner, settings)``.

    The model runs where it is unless ``device`` / ``dtype`` ask for something else; then a copy
    is moved there and the caller's model is left untouched. Inside the context the model is in
    eval mode, under ``torch.inference_mode()`` (and bf16 autocast when ``amp``), with
    ``fused_attn`` forced to the given value (None: as built) and ``threads`` intra-op threads
    (None: current setting); all of it is restored on exit.
    """
    dev = _resolve_device(device, model)
    if dev.type == 'meta' or model_device(model).type == 'meta':
        raise ValueError('a model on the meta device has no weights to time; build it on a real device')
    dt = dtype or model_dtype(model)
    size = resolve_input_size(model, input_size)
    run = model
    if dev != model_device(model) or dt != model_dtype(model):
        with torch.inference_mode(False):
            run = copy.deepcopy(model).to(device=dev, dtype=dt)
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(run))
        stack.enter_context(fused_attention(run, fused_attn))
        stack.enter_context(num_threads(threads))
        if channels_last:
            stack.enter_context(_channels_last(run))
        x = random_input(size, batch_size, dev, dt, channels_last=channels_last)
        stack.enter_context(torch.inference_mode())
        if amp:
            stack.enter_context(torch.autocast(device_type=dev.type, dtype=amp_dtype))
        settings = dict(
            device=str(dev), device_name=device_name(dev), dtype=str(dt).replace('torch.', ''),
            amp=str(amp_dtype).replace('torch.', '') if amp else False, channels_last=bool(channels_last),
            batch_size=int(batch_size), input_size=list(size), threads=torch.get_num_threads(),
            fused_attn=fused_attn_state(run), torch=torch.__version__, timm=timm.__version__,
            load_avg=load_average(), malloc=malloc_state(),
        )
        yield Runner(run, x, dev, channels_last), settings


def _collect(step: Callable[[], float], warmup: int, repeats: int, min_time: float) -> List[float]:
    for _ in range(max(0, int(warmup))):
        step()
    times: List[float] = []
    start = time.perf_counter()
    cap = max(1, int(repeats)) * 10
    while len(times) < max(1, int(repeats)) or (time.perf_counter() - start < min_time and len(times) < cap):
        times.append(step())
    return times


def _loop_args(kind: str, quick: bool, warmup, repeats, min_time) -> dict:
    base = dict(QUICK[kind] if quick else (LATENCY_DEFAULTS if kind == 'latency' else THROUGHPUT_DEFAULTS))
    for k, v in (('warmup', warmup), ('repeats', repeats), ('min_time', min_time)):
        if v is not None:
            base[k] = v
    return base


def _ms_stats(times: Sequence[float]) -> dict:
    ms = np.asarray(times, dtype=np.float64) * 1e3
    return dict(median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)),
                p90_ms=float(np.percentile(ms, 90)), mean_ms=float(ms.mean()), min_ms=float(ms.min()))


def measure_latency(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1,
                    device=None, dtype: Optional[torch.dtype] = None, warmup: Optional[int] = None,
                    repeats: Optional[int] = None, min_time: Optional[float] = None, *, quick: bool = False,
                    amp: bool = False, channels_last: bool = False, fused_attn: Optional[bool] = None,
                    threads: Optional[int] = None) -> dict:
    """Milliseconds per forward of one batch (batch 1 by default: latency).

    Each timed forward is one sample; returns ``median_ms``, ``p10_ms``, ``p90_ms``,
    ``mean_ms``, ``min_ms``, ``samples`` and ``settings`` (device, dtype, amp, batch, input
    size, threads, fused attention, torch / timm versions, warm-up, repeats, min_time).
    Defaults: ``LATENCY_DEFAULTS``; ``quick=True`` uses ``QUICK['latency']`` (explicit
    ``warmup`` / ``repeats`` / ``min_time`` override either). The other options are those of
    ``prepared``.
    """
    loop = _loop_args('latency', quick, warmup, repeats, min_time)
    with prepared(model, input_size, batch_size, device, dtype, amp=amp, channels_last=channels_last,
                  fused_attn=fused_attn, threads=threads) as (runner, settings):
        times = _collect(runner.step, **loop)
    settings.update(loop, measure='latency')
    return dict(**_ms_stats(times), samples=len(times), settings=settings)


def measure_throughput(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 64,
                       device=None, dtype: Optional[torch.dtype] = None, warmup: Optional[int] = None,
                       repeats: Optional[int] = None, min_time: Optional[float] = None, *, quick: bool = False,
                       amp: bool = False, channels_last: bool = False, fused_attn: Optional[bool] = None,
                       threads: Optional[int] = None) -> dict:
    """Images per second at ``batch_size``: the median over timed forwards of batch / seconds.

    Returns ``images_per_s`` (median), ``images_per_s_p10`` / ``images_per_s_p90``,
    ``batch_ms`` (median milliseconds per batch), ``samples`` and ``settings``. Defaults:
    ``THROUGHPUT_DEFAULTS``; ``quick=True`` uses ``QUICK['throughput']``.
    """
    loop = _loop_args('throughput', quick, warmup, repeats, min_time)
    with prepared(model, input_size, batch_size, device, dtype, amp=amp, channels_last=channels_last,
                  fused_attn=fused_attn, threads=threads) as (runner, settings):
        times = _collect(runner.step, **loop)
    settings.update(loop, measure='throughput')
    ips = batch_size / np.asarray(times, dtype=np.float64)
    return dict(images_per_s=float(np.median(ips)), images_per_s_p10=float(np.percentile(ips, 10)),
                images_per_s_p90=float(np.percentile(ips, 90)), batch_ms=float(np.median(times) * 1e3),
                samples=len(times), settings=settings)


def _round_ratios(per_round: Dict[str, List[float]], baseline: str, invert: bool) -> Dict[str, List[float]]:
    """Per round, each model's value over the baseline's of the same round (``invert``: the
    baseline's over the model's, for times)."""
    base = per_round[baseline]
    return {n: [(b / v if invert else v / b) for v, b in zip(vals, base)] for n, vals in per_round.items()}


def _spread(key: str, ratios: Sequence[float]) -> dict:
    """``key`` (median of the per-round ratios), ``key_lo`` / ``key_hi`` (min / max over the
    rounds), ``key_spread`` (hi - lo) and ``key_rounds`` (every round's ratio)."""
    a = np.asarray(ratios, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    return {key: float(np.median(a)), f'{key}_lo': lo, f'{key}_hi': hi, f'{key}_spread': hi - lo,
            f'{key}_rounds': [float(v) for v in a]}


def within_noise(row: dict, key: str = 'throughput_ratio') -> bool:
    """True when the rounds disagree by more than the effect: ``|median - 1|`` is smaller than
    half the width of the per-round range (``key_lo`` .. ``key_hi``). A baseline row (ratio 1 in
    every round) and a row without a spread never are."""
    if row.get('baseline') or row.get(f'{key}_spread') is None or row.get(key) is None:
        return False
    return abs(row[key] - 1.0) < row[f'{key}_spread'] / 2


def contention_warning(settings: Optional[dict]) -> Optional[str]:
    """A line when the CPU was oversubscribed while ``compare`` measured: the 1-minute load
    average at the end (which counts the measuring threads themselves) above the number of cores
    (+0.5). Then every operator waits for its slowest thread, and the ratios are not only noisier
    but biased against the models with more operators (token reduction adds many small ones),
    which no number of rounds averages out. None on an uncontended machine or a GPU."""
    if not settings or not str(settings.get('device', 'cpu')).startswith('cpu'):
        return None
    load = settings.get('load_avg_after', settings.get('load_avg'))
    cores = settings.get('cpu_count')
    if load is None or not cores or load <= cores + 0.5:
        return None
    return (f"warning: load average {load} on {cores} cores while measuring with {settings.get('threads')} threads: "
            f"other processes competed for the cores, which makes every ratio noisier and biased against models "
            f"with more operators; measure on a quieter machine, or with fewer threads (one thread is disturbed "
            f"far less)")


def noise_warnings(rows: Sequence[dict], keys: Sequence[str] = ('throughput_ratio', 'latency_speedup'),
                   settings: Optional[dict] = None) -> List[str]:
    """One line for every ratio of ``compare`` rows that is within the noise (``within_noise``):
    the speed-up or slow-down it reports is smaller than the disagreement between rounds; first,
    the ``contention_warning`` of ``settings`` (default: the rows' own) when there is one."""
    labels = dict(throughput_ratio='throughput ratio', latency_speedup='latency speed-up')
    busy = contention_warning(settings if settings is not None else next(
        (r['settings'] for r in rows if isinstance(r.get('settings'), dict)), None))
    out = [busy] if busy else []
    for row in rows:
        for key in keys:
            if within_noise(row, key):
                n = len(row.get(f'{key}_rounds') or [])
                lo, hi = row[f'{key}_lo'], row[f'{key}_hi']
                out.append(f"warning: {row['name']}: {labels.get(key, key)} {row[key]:.2f}x, but its {n} rounds range "
                           f"{lo:.2f}-{hi:.2f}x: the difference from 1x is within the noise of this machine (more "
                           f"rounds or a quieter machine will tell)")
    return out


# Per model and round: at most `latency_steps` batch-1 forwards and `throughput_steps` batch
# forwards, each run cut short once its timed forwards add up to `run_time` seconds (one at least);
# `warmup` forwards of each model first, under the same cap.
COMPARE_DEFAULTS = dict(rounds=9, latency_steps=10, throughput_steps=2, warmup=3, run_time=0.4)
COMPARE_QUICK = dict(rounds=3, latency_steps=3, throughput_steps=1, warmup=1, run_time=0.2)
# a run is preceded by one untimed forward when the model's forward at that batch took less than
# this in the warm-up: a cold cache is felt by short forwards, not by long ones
SETTLE_BELOW = 0.1


def _timed_run(step: Callable[[], float], steps: int, run_time: float) -> List[float]:
    out: List[float] = []
    while len(out) < steps:
        out.append(step())
        if sum(out) >= run_time:
            break
    return out


def compare(models: Dict[str, nn.Module], baseline: str, input_size: Optional[Sequence[int]] = None,
            batch_size: int = 64, device=None, dtype: Optional[torch.dtype] = None, *, rounds: Optional[int] = None,
            latency_steps: Optional[int] = None, throughput_steps: Optional[int] = None,
            warmup: Optional[int] = None, quick: bool = False, amp: bool = False, channels_last: bool = False,
            fused_attn: Optional[bool] = None, threads: Optional[int] = None, gmacs: bool = True,
            run_time: Optional[float] = None, progress: Optional[bool] = None) -> List[dict]:
    """Latency (batch 1) and throughput (``batch_size``) of several models, measured in one
    process, interleaved, and reported as ratios to ``baseline``.

    After ``warmup`` forwards of each model, every round runs ``latency_steps`` batch-1 forwards
    and ``throughput_steps`` batch forwards of each model in turn; the order is reversed every
    other round (A, B, B, A, ...) so that no model always runs first. Every run (warm-up ones
    too) stops early once its timed forwards add up to ``run_time`` seconds, after one forward at
    least, so that a large model costs a few forwards per round rather than minutes. A run is
    preceded by one untimed forward when that model's fastest forward at that batch took less than
    ``SETTLE_BELOW`` seconds in the warm-up (always when there is no warm-up): the first call
    after another model or another batch shape pays for cold caches and allocations, which only
    a short forward feels.

    The ratios are taken within each round -- a model's median images/s of the round over the
    baseline's of the same round, the baseline's median batch-1 time of the round over the
    model's -- so that a slow spell of the machine, which hits both sides of a round, cancels.
    Each row has ``name``, ``baseline``, ``params_m``, ``gmacs`` (``count_gmacs``, when
    ``gmacs``), ``latency_ms`` (median of all batch-1 samples) with ``latency_p10_ms`` /
    ``latency_p90_ms``, ``images_per_s`` (median of all batch samples), the per-round values
    ``latency_ms_rounds`` and ``images_per_s_rounds``, and the ratios ``throughput_ratio`` and
    ``latency_speedup``: the median of the per-round ratios, with ``_lo`` / ``_hi`` (min / max
    over the rounds), ``_spread`` (hi - lo) and ``_rounds`` (each round's ratio; exactly 1 for the
    baseline). ``throughput_noisy`` / ``latency_noisy`` are true when the ratio is within the noise
    (``within_noise``; ``noise_warnings`` words it). Also ``gmacs_ratio``, ``params_ratio`` and
    ``latency_samples`` / ``throughput_samples`` (timed forwards in all) and ``settled`` (which
    runs had the untimed forward), and the shared ``settings`` (which record the rounds, steps and
    caps used). Defaults (``COMPARE_DEFAULTS``): 9 rounds x (10 latency + 2 throughput steps),
    3 warm-up, runs capped at 0.4 s; ``quick=True`` (``COMPARE_QUICK``): 3 x (3 + 1), 1 warm-up,
    0.2 s -- still enough rounds for a spread. ``progress``: a bar over the warm-up and the
    rounds (None: on a terminal; it updates between timed runs, never inside one).
    """
    from ..console import progress as progress_bar
    from .flops import count_gmacs, count_params

    if baseline not in models:
        raise ValueError(f'baseline {baseline!r} is not one of the models {list(models)}')
    d = dict(COMPARE_QUICK if quick else COMPARE_DEFAULTS)
    for k, v in (('rounds', rounds), ('latency_steps', latency_steps), ('throughput_steps', throughput_steps),
                 ('warmup', warmup), ('run_time', run_time)):
        if v is not None:
            d[k] = float(v) if k == 'run_time' else int(v)
    for k in ('rounds', 'latency_steps', 'throughput_steps'):
        if d[k] < 1:
            raise ValueError(f'{k} must be at least 1, got {d[k]}')
    names = list(models)
    lat = {n: [[] for _ in range(d['rounds'])] for n in names}
    thr = {n: [[] for _ in range(d['rounds'])] for n in names}
    opts = dict(device=device, dtype=dtype, amp=amp, channels_last=channels_last, fused_attn=fused_attn,
                threads=threads)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress_bar(progress, total=(d['rounds'] + 1) * len(names), leave=False,
                                               desc='speed rounds'))
        runners, settings = {}, {}
        for n in names:
            r1, settings[n] = stack.enter_context(prepared(models[n], input_size, 1, **opts))
            runners[n] = (r1, r1.with_batch(batch_size))
            settings[n]['batch_size'] = batch_size
        settle = {}
        for n in names:
            warm = [_timed_run(runner.step, d['warmup'], d['run_time']) for runner in runners[n]]
            settle[n] = [not w or min(w) < SETTLE_BELOW for w in warm]
            bar.update(1)
        for r in range(d['rounds']):
            for n in (names if r % 2 == 0 else names[::-1]):
                (r1, rb), (s1, sb) = runners[n], settle[n]
                if s1:
                    r1.step()
                lat[n][r].extend(_timed_run(r1.step, d['latency_steps'], d['run_time']))
                if sb:
                    rb.step()
                thr[n][r].extend(batch_size / t for t in _timed_run(rb.step, d['throughput_steps'], d['run_time']))
                bar.update(1)
    shared = dict(settings[baseline])
    shared.pop('fused_attn', None)
    shared.update(d, measure='compare', order=names, latency_batch_size=1, settle_below=SETTLE_BELOW,
                  ratios='median of per-round ratios', spread='min-max over rounds', load_avg_after=load_average(),
                  cpu_count=os.cpu_count())
    lat_rounds = {n: [float(np.median(v)) for v in lat[n]] for n in names}
    thr_rounds = {n: [float(np.median(v)) for v in thr[n]] for n in names}
    thr_ratio = _round_ratios(thr_rounds, baseline, invert=False)
    lat_ratio = _round_ratios(lat_rounds, baseline, invert=True)
    rows = []
    for n in names:
        every_lat = [t for v in lat[n] for t in v]
        every_thr = [t for v in thr[n] for t in v]
        row = dict(name=n, baseline=(n == baseline), params_m=count_params(models[n]) / 1e6,
                   gmacs=count_gmacs(models[n], input_size) if gmacs else None,
                   latency_ms=float(np.median(every_lat) * 1e3),
                   latency_p10_ms=float(np.percentile(every_lat, 10) * 1e3),
                   latency_p90_ms=float(np.percentile(every_lat, 90) * 1e3),
                   images_per_s=float(np.median(every_thr)),
                   latency_ms_rounds=[t * 1e3 for t in lat_rounds[n]], images_per_s_rounds=thr_rounds[n],
                   latency_samples=len(every_lat), throughput_samples=len(every_thr),
                   settled=dict(latency=settle[n][0], throughput=settle[n][1]),
                   fused_attn=settings[n]['fused_attn'], device=settings[n]['device'])
        row.update(_spread('latency_speedup', lat_ratio[n]))
        row.update(_spread('throughput_ratio', thr_ratio[n]))
        rows.append(row)
    base = rows[names.index(baseline)]
    for row in rows:
        row['throughput_noisy'] = within_noise(row, 'throughput_ratio')
        row['latency_noisy'] = within_noise(row, 'latency_speedup')
        row['gmacs_ratio'] = row['gmacs'] / base['gmacs'] if gmacs and base['gmacs'] else None
        row['params_ratio'] = row['params_m'] / base['params_m'] if base['params_m'] else None
        row['settings'] = shared
    return rows
