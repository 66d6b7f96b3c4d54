"""Peak memory of one inference forward.

What is measured, per device:

* CUDA: ``torch.cuda.reset_peak_memory_stats`` before the forward and
  ``torch.cuda.max_memory_allocated`` after it; the forward's own peak is that minus what was
  allocated just before (weights, the input and anything else the process holds).
* CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made
  by torch's CPU allocator during the forward; the running sum of those, in time order, peaks at
  the forward's own peak (activations and temporaries above what was live before). Memory that
  libraries take outside torch's allocator (oneDNN / BLAS scratch, allocator caching, Python
  objects) is not included. If the profiler's event list is unavailable the fallback is the
  growth of the process's resident high-water mark (``ru_maxrss``), a lower bound that is 0 when
  an earlier peak was higher; ``method`` says which was used.

``peak_mb`` = weights + input + the forward's own peak, in MiB (2**20 bytes), the same
definition on both devices.
"""
from __future__ import annotations

import gc
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .speed import prepared

__all__ = ['measure_memory', 'peak_memory_mb', 'tensor_mb']

MB = float(2 ** 20)


def tensor_mb(model: nn.Module) -> float:
    """MiB held by the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / MB


def _cpu_forward_peak(runner) -> tuple:
    from torch.profiler import ProfilerActivity, profile

    from ..console import native_stderr_quiet

    try:
        with native_stderr_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.forward()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            if e.device_type() != torch.autograd.DeviceType.CPU:
                continue
            live += e.nbytes()
            peak = max(peak, live)
        return peak, 'torch.profiler CPU allocations (running sum of allocs and frees)'
    except (AttributeError, RuntimeError):
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runner.forward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, after - before) * 1024, 'ru_maxrss growth (lower bound)'


def measure_memory(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1,
                   device=None, dtype: Optional[torch.dtype] = None, *, amp: bool = False,
                   channels_last: bool = False, fused_attn: Optional[bool] = None) -> dict:
    """Peak memory of one inference forward at ``batch_size`` (see the module docstring).

    Returns ``peak_mb`` (weights + input + forward peak), ``forward_peak_mb``, ``weights_mb``,
    ``input_mb``, ``method``, on CUDA also ``device_peak_mb`` (``max_memory_allocated``,
    everything the process holds), and ``settings``. One forward runs first as a warm-up so that
    one-off lazy initialisation is not counted.
    """
    with prepared(model, input_size, batch_size, device, dtype, amp=amp, channels_last=channels_last,
                  fused_attn=fused_attn) as (runner, settings):
        dev = runner.device
        runner.forward()
        gc.collect()
        weights = tensor_mb(runner.model)
        inp = runner.x.numel() * runner.x.element_size() / MB
        extra = {}
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            runner.forward()
            torch.cuda.synchronize(dev)
            top = torch.cuda.max_memory_allocated(dev)
            forward_peak, method = top - before, 'torch.cuda.max_memory_allocated'
            extra['device_peak_mb'] = top / MB
        elif dev.type == 'cpu':
            forward_peak, method = _cpu_forward_peak(runner)
        else:
            raise ValueError(f'peak memory is measured on CPU and CUDA only, not {dev.type}')
    settings.update(measure='memory')
    return dict(peak_mb=weights + inp + forward_peak / MB, forward_peak_mb=forward_peak / MB, weights_mb=weights,
                input_mb=inp, method=method, **extra, settings=settings)


def peak_memory_mb(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1,
                   device=None, dtype: Optional[torch.dtype] = None, **kwargs) -> float:
    """MiB needed by an inference forward at ``batch_size``: weights + input + the forward's
    own peak of live tensors (``measure_memory(...)['peak_mb']``; see the module docstring for
    exactly what is counted on CPU and on CUDA)."""
    return measure_memory(model, input_size, batch_size, device, dtype, **kwargs)['peak_mb']
