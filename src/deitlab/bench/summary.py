"""One call per question: everything about one model, and the table of registered models."""
from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn

from ..console import progress as progress_bar
from .common import model_name, resolve_input_size
from .flops import analytic_gmacs, count_gmacs, count_params
from .memory import measure_memory
from .speed import measure_latency, measure_throughput

__all__ = ['benchmark_model', 'models_table', 'gmacs_pair', 'MODELS_COLUMNS', 'MODELS_DIGITS']

# what ``deitlab models`` shows: format_table(models_table(), MODELS_COLUMNS, digits=MODELS_DIGITS)
MODELS_COLUMNS = ['name', ('input_size', 'input'), ('params_m', 'params (M)'), 'gmacs']
MODELS_DIGITS = {'params_m': 2, 'gmacs': 4}


def gmacs_pair(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> dict:
    """``gmacs`` (counted), ``gmacs_analytic`` and ``gmacs_fvcore`` (closed form, None when the
    model is not one the closed form knows) and ``gmacs_match`` (counter equals closed form to
    1e-6 relative; None without a closed form). A mismatch also warns."""
    counted = count_gmacs(model, input_size)
    try:
        analytic = analytic_gmacs(model, input_size)
    except ValueError:
        analytic = None
    try:
        fvcore = analytic_gmacs(model, input_size, convention='fvcore') if analytic is not None else None
    except ValueError:   # a family whose closed form counts matrix products only
        fvcore = None
    match = None
    if analytic is not None:
        match = abs(counted - analytic) <= 1e-6 * max(abs(analytic), 1e-12)
        if not match:
            warnings.warn(f'{model_name(model)}: counted {counted:.6f} GMACs but the closed form gives '
                          f'{analytic:.6f}; the model computes something its widths do not describe')
    return dict(gmacs=counted, gmacs_analytic=analytic, gmacs_fvcore=fvcore, gmacs_match=match)


def benchmark_model(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 64,
                    device=None, quick: bool = False, *, dtype: Optional[torch.dtype] = None, amp: bool = False,
                    channels_last: bool = False, fused_attn: Optional[bool] = None, threads: Optional[int] = None,
                    latency: bool = True, throughput: bool = True, memory: bool = True,
                    progress: Optional[bool] = None) -> dict:
    """Parameters, GMACs, batch-1 latency, throughput and peak memory of one model.

    ``input_size`` defaults to what the model takes (its patch embedding's ``img_size`` and input
    channels, else ``pretrained_cfg['input_size']``). GMACs are counted with fused attention off
    and, for DeiT / ViT, checked against the closed form. Latency is measured at batch 1,
    throughput and peak memory at ``batch_size``, on ``device`` (default: where the model is).
    ``quick=True`` uses short timing loops. ``latency`` / ``throughput`` / ``memory`` = False
    skip those measurements (their entries are then None). ``progress``: a bar over the
    measurements (None: on a terminal).

    Returns a flat summary (``model``, ``input_size``, ``params``, ``params_m``,
    ``trainable_params``, ``gmacs``, ``gmacs_analytic``, ``gmacs_fvcore``, ``gmacs_match``,
    ``latency_ms``, ``images_per_s``, ``peak_memory_mb``) plus the full results under
    ``latency``, ``throughput`` and ``memory`` and the shared ``settings``.
    """
    size = resolve_input_size(model, input_size)
    opts = dict(device=device, dtype=dtype, amp=amp, channels_last=channels_last, fused_attn=fused_attn)
    params = count_params(model)
    out = dict(model=model_name(model), input_size=list(size), params=params, params_m=params / 1e6,
               trainable_params=count_params(model, trainable=True))
    steps = [('GMACs', lambda: gmacs_pair(model, size))]
    if latency:
        steps.append(('latency', lambda: measure_latency(model, size, 1, quick=quick, threads=threads, **opts)))
    if throughput:
        steps.append(('throughput', lambda: measure_throughput(model, size, batch_size, quick=quick, threads=threads,
                                                               **opts)))
    if memory:
        steps.append(('memory', lambda: measure_memory(model, size, batch_size, **opts)))
    done = {}
    with progress_bar(progress, total=len(steps), desc='bench', leave=False) as bar:
        for name, step in steps:
            bar.set_postfix_str(name)
            done[name] = step()
            bar.update(1)
    out.update(done['GMACs'])
    lat, thr, mem = done.get('latency'), done.get('throughput'), done.get('memory')
    out.update(latency_ms=lat['median_ms'] if lat else None, images_per_s=thr['images_per_s'] if thr else None,
               peak_memory_mb=mem['peak_mb'] if mem else None, latency=lat, throughput=thr, memory=mem)
    first = thr or lat or mem
    if first is not None:
        settings = {k: v for k, v in first['settings'].items()
                    if k not in ('batch_size', 'warmup', 'repeats', 'min_time', 'measure')}
        settings.update(batch_size=batch_size, latency_batch_size=1, quick=quick)
    else:
        settings = dict(torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads())
    out['settings'] = settings
    return out


def _build(name: str, device: str) -> nn.Module:
    if device == 'meta':
        try:
            with torch.device('meta'):
                return timm.create_model(name, pretrained=False)
        except Exception:  # some constructors need real tensors; a CPU build always works
            pass  # fall through to a real CPU build
    model = timm.create_model(name, pretrained=False)
    return model if device == 'meta' else model.to(device)


def models_table(names: Union[None, str, Iterable[str]] = None, device: str = 'meta') -> List[dict]:
    """One row per registered deitlab architecture: ``name``, ``input_size``, ``params_m``,
    ``gmacs`` (counted) and ``gmacs_analytic`` (closed form or None), ``gmacs_fvcore``.

    ``names``: architecture names, a timm wildcard pattern, or None for ``deitlab_*``. Models
    are built with ``pretrained=False`` (nothing downloads) on the meta device, where building
    and counting take no memory and almost no time; a model that cannot run on meta is rebuilt
    on the CPU.
    """
    if names is None:
        names = timm.list_models('deitlab_*')
    elif isinstance(names, str):
        names = timm.list_models(names) or [names]
    rows = []
    for name in names:
        model = _build(name, device)
        try:
            pair = gmacs_pair(model)
        except (NotImplementedError, RuntimeError):
            if device != 'meta':
                raise
            model = _build(name, 'cpu')
            pair = gmacs_pair(model)
        rows.append(dict(name=name, input_size=list(resolve_input_size(model)),
                         params_m=count_params(model) / 1e6, gmacs=pair['gmacs'],
                         gmacs_analytic=pair['gmacs_analytic'], gmacs_fvcore=pair['gmacs_fvcore']))
    return rows
