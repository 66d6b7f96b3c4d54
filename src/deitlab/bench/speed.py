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
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn

from .common import (device_name, eval_mode, fused_attention, fused_attn_state, load_average, model_device,
                     model_dtype, num_threads, random_input, resolve_input_size, synchronize)

__all__ = ['measure_latency', 'measure_throughput', 'compare', 'prepared', 'LATENCY_DEFAULTS',
           'THROUGHPUT_DEFAULTS', 'QUICK']

# warm-up forwards, minimum timed forwards, and minimum timed seconds (sampling continues until
# both minimums are met, up to 10x the minimum count).
LATENCY_DEFAULTS = dict(warmup=5, repeats=30, min_time=0.5)
THROUGHPUT_DEFAULTS = dict(warmup=2, repeats=8, min_time=0.5)
QUICK = dict(latency=dict(warmup=1, repeats=5, min_time=0.0), throughput=dict(warmup=1, repeats=3, min_time=0.0))


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
            load_avg=load_average(),
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


def compare(models: Dict[str, nn.Module], baseline: str, input_size: Optional[Sequence[int]] = None,
            batch_size: int = 64, device=None, dtype: Optional[torch.dtype] = None, *, rounds: Optional[int] = None,
            latency_steps: Optional[int] = None, throughput_steps: Optional[int] = None,
            warmup: Optional[int] = None, quick: bool = False, amp: bool = False, channels_last: bool = False,
            fused_attn: Optional[bool] = None, threads: Optional[int] = None, gmacs: bool = True) -> List[dict]:
    """Latency (batch 1) and throughput (``batch_size``) of several models, measured in one
    process, interleaved, and reported as ratios to ``baseline``.

    After ``warmup`` forwards of each model, every round runs ``latency_steps`` batch-1 forwards
    and ``throughput_steps`` batch forwards of each model in turn, each run preceded by one
    untimed forward; the order is reversed every other round (A, B, B, A, ...) so that no model
    always runs first. Each row has ``name``,
    ``baseline``, ``params_m``, ``gmacs`` (``count_gmacs``, when ``gmacs``), ``latency_ms``
    (median of all batch-1 samples) with ``latency_p10_ms`` / ``latency_p90_ms``,
    ``images_per_s`` (median), and the ratios ``latency_speedup`` (baseline latency / latency),
    ``throughput_ratio`` (images/s / baseline images/s), ``gmacs_ratio`` and ``params_ratio``,
    plus the shared ``settings``. Defaults: 5 rounds x (10 latency + 2 throughput steps), 3
    warm-up; ``quick=True``: 2 x (3 + 1), 1 warm-up.
    """
    from .flops import count_gmacs, count_params

    if baseline not in models:
        raise ValueError(f'baseline {baseline!r} is not one of the models {list(models)}')
    d = dict(rounds=2, latency_steps=3, throughput_steps=1, warmup=1) if quick else \
        dict(rounds=5, latency_steps=10, throughput_steps=2, warmup=3)
    for k, v in (('rounds', rounds), ('latency_steps', latency_steps), ('throughput_steps', throughput_steps),
                 ('warmup', warmup)):
        if v is not None:
            d[k] = int(v)
    names = list(models)
    lat = {n: [] for n in names}
    thr = {n: [] for n in names}
    opts = dict(device=device, dtype=dtype, amp=amp, channels_last=channels_last, fused_attn=fused_attn,
                threads=threads)
    with contextlib.ExitStack() as stack:
        runners, settings = {}, {}
        for n in names:
            r1, settings[n] = stack.enter_context(prepared(models[n], input_size, 1, **opts))
            runners[n] = (r1, r1.with_batch(batch_size))
            settings[n]['batch_size'] = batch_size
        for n in names:
            for _ in range(d['warmup']):
                runners[n][0].step()
                runners[n][1].step()
        for r in range(d['rounds']):
            for n in (names if r % 2 == 0 else names[::-1]):
                r1, rb = runners[n]
                # one untimed forward before each timed run: the first call after another model or
                # another batch shape pays for cold caches and allocations, more so for small models
                r1.step()
                lat[n].extend(r1.step() for _ in range(d['latency_steps']))
                rb.step()
                thr[n].extend(batch_size / rb.step() for _ in range(d['throughput_steps']))
    shared = dict(settings[baseline])
    shared.pop('fused_attn', None)
    shared.update(d, measure='compare', order=names, latency_batch_size=1)
    rows = []
    for n in names:
        row = dict(name=n, baseline=(n == baseline), params_m=count_params(models[n]) / 1e6,
                   gmacs=count_gmacs(models[n], input_size) if gmacs else None,
                   latency_ms=float(np.median(lat[n]) * 1e3), latency_p10_ms=float(np.percentile(lat[n], 10) * 1e3),
                   latency_p90_ms=float(np.percentile(lat[n], 90) * 1e3), images_per_s=float(np.median(thr[n])),
                   fused_attn=settings[n]['fused_attn'], device=settings[n]['device'])
        rows.append(row)
    base = rows[names.index(baseline)]
    for row in rows:
        row['latency_speedup'] = base['latency_ms'] / row['latency_ms']
        row['throughput_ratio'] = row['images_per_s'] / base['images_per_s']
        row['gmacs_ratio'] = row['gmacs'] / base['gmacs'] if gmacs and base['gmacs'] else None
        row['params_ratio'] = row['params_m'] / base['params_m'] if base['params_m'] else None
        row['settings'] = shared
    return rows
