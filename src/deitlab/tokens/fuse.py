"""``deitlab fuse tome|mctf``: patch a model with token reduction, evaluate and benchmark it.

Every run reports, side by side and measured interleaved in one process: the unpatched model
with fused attention (SDPA, timm's default) -- the honest baseline -- and with explicit softmax
attention, and the token-reduced model: accuracy (with ``--data``), parameters, GMACs (closed
form, checked against a counted forward), batch-1 latency, throughput at ``--batch-size`` and
the ratios to the fused baseline, plus the per-block token counts. Each ratio is taken within
each of ``--rounds`` interleaved rounds (``bench.compare``; 9, or 3 with ``--quick``) and shown
as the median with the range over the rounds; ``warnings`` (printed) flags a ratio whose range
is wider than its distance from 1x, and a CPU busier than its cores.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import Optional

import torch.nn as nn

from ..registry import TOKEN_FUSION
from .config import FuseConfig, TokenFusionError
from .schedule import fusion_macs

__all__ = ['FuseConfig', 'fuse_model', 'apply_token_fusion', 'evaluate_models', 'parse_r_arg', 'default_batch',
           'FUSION_METHODS']

FUSION_METHODS = TOKEN_FUSION.names()


def parse_r_arg(r, inflect: Optional[float] = None):
    """``16`` -> 16, ``0.35`` -> 0.35, ``'16,16,8'`` -> [16, 16, 8]; with ``inflect``, ``(r, inflect)``."""
    if isinstance(r, str):
        parts = [p for p in r.replace(' ', '').split(',') if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise TokenFusionError(f'r must be a number or a comma-separated list of numbers, got {r!r}') from None
        if not vals:
            raise TokenFusionError('r is empty')
        vals = [int(v) if v.is_integer() and v >= 1 else v for v in vals]
        r = vals if len(vals) > 1 else vals[0]
    elif isinstance(r, float) and r.is_integer() and r >= 1:
        r = int(r)
    for v in (r if isinstance(r, list) else [r]):
        if v < 0:
            raise TokenFusionError(f'r must be >= 0, got {v:g}')
        if isinstance(v, float) and not v < 1:
            raise TokenFusionError(f'r is a number of tokens (an integer) or a fraction of the tokens in [0, 1), '
                                   f'got {v:g}')
    if inflect is not None:
        if isinstance(r, list) or not float(r).is_integer():
            raise TokenFusionError('--inflect needs an integer r')
        r = (int(r), float(inflect))
    return r


def apply_token_fusion(model: nn.Module, method: str, r=None, layers=None, **options) -> nn.Module:
    """Patch ``model`` with a method of ``deitlab.registry.TOKEN_FUSION`` (``apply_tome``,
    ``apply_mctf``, ``apply_mctf(fast=True)``); ``r=None`` is the method's ``default_r`` (ToMe 8,
    MCTF 16, MCTF-Fast 0.35)."""
    entry = TOKEN_FUSION.get(method, TokenFusionError, 'token fusion method')
    fused = entry.load()(model, entry['default_r'] if r is None else r, layers=layers, **entry['options'], **options)
    _check_r_possible(fused, r)
    return fused


def _check_r_possible(model: nn.Module, r) -> None:
    """An integer ``r`` larger than one bipartite step can merge is an error, not a silent clamp: a
    block merges at most half of its unprotected tokens."""
    asked = max(r) if isinstance(r, list) else r[0] if isinstance(r, tuple) else r
    if not isinstance(asked, int) or asked < 1:
        return
    tf = model.token_fusion
    tokens = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    most = (tokens - tf.protected) // 2
    if asked > most:
        raise TokenFusionError(f'r = {asked} is more than a block can merge: at most {most} of the model\'s {tokens} '
                               f'tokens ({tf.protected} protected) in one bipartite step')


def default_batch(gmacs: float, work: float = 64.0) -> int:
    """The throughput batch ``deitlab fuse`` uses by default: the power of two between 8 and 256
    closest to ``work`` GMACs of the unpatched model (DeiT-S, 4.6 GMACs: 16; DeiT-T: 64; a
    Fashion-MNIST nano: 256), so that a batch forward takes about as long for every model and the
    interleaved rounds fit in about a minute on two CPU cores while a small model still gets a
    batch large enough to be timed."""
    if not gmacs or gmacs <= 0:
        return 64
    return int(min(256, max(8, 2 ** round(math.log2(work / gmacs)))))


def fuse_model(cfg: FuseConfig) -> dict:
    """Patch ``cfg.model`` with ``cfg.method`` and report what it buys (see the module docstring)."""
    from ..bench import compare
    from ..bench.report import format_compare
    from ..bench.speed import noise_warnings
    from ..rundir import create

    TOKEN_FUSION.check(cfg.method, TokenFusionError, 'method')
    r = None if cfg.r is None else parse_r_arg(cfg.r, cfg.inflect)
    base = create(cfg.model, pretrained=cfg.pretrained).eval()
    if cfg.device:
        from ..distributed import resolve_device
        base.to(resolve_device(cfg.device))
    explicit = copy.deepcopy(base)
    for m in explicit.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    fused = apply_token_fusion(copy.deepcopy(base), cfg.method, r, cfg.layer_list(), **cfg.fusion_options())
    tf = fused.token_fusion
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    depth = len(base.blocks) - tf.start   # the blocks fusion runs in (after SpectFormer's grid blocks)
    schedule = tf.schedule(tokens, depth)
    kind = TOKEN_FUSION[cfg.method]['cost']
    label = f'{cfg.method} r={tf.r}'
    models = {'fused attention': base, 'explicit attention': explicit, label: fused}
    macs = {n: fusion_macs(m, schedule if m is fused else tf.schedule(tokens, depth, 0), kind,
                           **tf.cost_options())['total'] / 1e9 for n, m in models.items()}
    if cfg.measure:
        batch = cfg.batch_size or default_batch(macs['fused attention'])
        rows = compare(models, 'fused attention', batch_size=batch, quick=cfg.quick, rounds=cfg.rounds,
                       threads=cfg.threads, gmacs=True)
    else:
        from ..bench import count_params
        rows = [dict(name=n, params_m=count_params(m) / 1e6) for n, m in models.items()]
    settings = None
    for row in rows:
        row['gmacs_closed_form'] = macs[row['name']]
        settings = row.pop('settings', settings)
    if cfg.data:
        acc = evaluate_models({k: v for k, v in models.items() if k != 'explicit attention'}, cfg.data, cfg.split,
                              cfg.eval_batch_size, cfg.device, cfg.workers)
        acc['explicit attention'] = acc['fused attention']   # the same function, computed another way
        for row in rows:
            row.update(acc[row['name']])
    cols = ['name', 'top1', 'params_m', 'gmacs_closed_form', 'latency_ms', 'images_per_s', 'latency_speedup',
            'throughput_ratio']
    return dict(model=cfg.model, method=cfg.method, fusion=tf.describe(), rows=rows,
                tokens=[s['tokens_in'] for s in schedule] + [schedule[-1]['tokens_out']], grid_blocks=tf.start,
                gmacs_ratio=macs[label] / macs['fused attention'], settings=settings, config=asdict(cfg),
                warnings=noise_warnings(rows, settings=settings) if cfg.measure else [],
                table=format_compare(rows, [c for c in cols if any(c in r for r in rows)]))


def evaluate_models(models: dict, data: str, split: str = 'val', batch_size: int = 256,
                    device: Optional[str] = None, workers: int = 0) -> dict:
    """Top-1 / top-5 of each model on one loader of ``data`` (shaped for the first model)."""
    from ..data.for_model import eval_loader, model_datasets
    from ..distributed import resolve_device
    from ..evaluate import evaluate

    ds, = model_datasets(next(iter(models.values())), data, (split,))
    loader = eval_loader(ds, batch_size, workers=workers)
    dev = resolve_device(device)
    out = {}
    for name, m in models.items():
        res = evaluate(m.to(dev), loader, dev, amp=dev.type == 'cuda', progress=None)   # a bar on a terminal
        out[name] = dict(top1=res['top1'], top5=res['top5'])
    return out
