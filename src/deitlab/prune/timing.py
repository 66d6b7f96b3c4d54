"""Timing the latency table on this device (``build_latency_table``), robust to a busy machine.

Every grid node (a block of given widths, or the model without its blocks) is a *job*. After one
warm-up round over all jobs (discarded), ``rounds`` rounds each visit every job once, in a new
random order per round: load from other work hits one visit of many nodes, not every visit of a
contiguous part of the grid. A visit builds the module afresh and runs two untimed forwards
(first-touch page faults of fresh buffers are one-off costs, not the block's), then its timed ones.

**Paired** (the default): every timed call sits between two calls of a reference block (the grid's
middle node), ``R J R J ... R``, and the visit's value is the median over ``steps`` of the call
divided by the mean of its two neighbours; a node's time is the median of its rounds times the
reference's fastest call. The machines this was built on run at two speeds, switching every few
seconds (a 512x512 matmul took 1.1 or 1.8 ms, whatever else ran), so an absolute time depends on
the spell a visit fell in: five tables of DeiT-nano timed with the fastest-round estimator on
such a machine put the sum of their parts at 0.89 to 1.47 times the whole model timed in the same
rounds. A spell lasts longer than a visit, so it slows both sides of a ratio and cancels: four
paired tables came to 1.01 to 1.06 (``benchmarks/latency_check.py`` compares both against measured
speed-ups of pruned models).

**Fastest** (``paired=False``, the estimator before): ``steps`` timed calls per visit, the fastest
kept, a node's time the fastest of its rounds. Other work only ever adds time, so on a machine
that is merely shared this finds the block's own cost (on a 2-core machine under a load average of
5, two tables of 40 nodes agreed per node to a mean |log ratio| of 0.11 with the fastest of 9
rounds, against 0.27 with the median and 0.86 with the mean), but not on one whose speed drifts.
Either way a node's spread ``(max - min) / min`` over rounds is stored next to it in the table
(``meta['spread']`` summarises it).

The table describes a model as ``other(E) + sum_b block_b``. A real forward also pays what the
sum of separately timed parts misses: one block's output feeding the next, and above all the
allocator. Timed alone, a block gets its same-size buffers back from malloc's free lists; in a
pruned model every block has other widths, and glibc's dynamic mmap threshold serves some of the
activations with fresh mappings and page faults, more so for non-uniform models: the pruned model
then measures further above the sum of its parts than the dense one, and the predicted speed-up
comes out high. With fixed malloc thresholds both stay about equally far above (a common factor,
which cancels in the ratio). ``deitlab prune nvit`` therefore fixes the thresholds
(``bench.speed.fix_malloc_thresholds``) before timing the table and the speeds; the table records
the allocator state, and with ``whole_model`` the dense model is one more job of the same rounds, so
``meta['whole_model']`` shows how far its measured time is from the sum of its parts.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from ..bench.common import device_name, num_threads, synchronize
from ..console import progress as progress_bar
from ..layers import WidthBlock
from .families import MLPLayout, layout_of
from .groups import PruneError, tokens_of
from .latency import ALIGN, AXES, LatencyTable, MLPLatencyTable, default_grid

__all__ = ['build_latency_table', 'timed_rounds', 'round_stats', 'busy_warning']


def _time(fn, device: torch.device, n: int, clock: Callable[[], float]) -> List[float]:
    out = []
    for _ in range(n):
        synchronize(device)
        t0 = clock()
        fn()
        synchronize(device)
        out.append((clock() - t0) * 1e3)
    return out


def timed_rounds(jobs: list, device: torch.device, rounds: int, steps: int, threads: Optional[int] = None,
                 progress: Optional[bool] = None, clock: Callable[[], float] = time.perf_counter, seed: int = 0,
                 reference=None):
    """Time every job once per round; ``jobs`` are ``(key, setup)`` where ``setup()`` builds what is
    timed and returns the call to time. Returns ``({key: [ms per round]}, threads)``.

    Round 0 warms the allocator and kernel caches up and is discarded; rounds 1..``rounds`` visit
    every job once each, in a new random order per round (interleaved: round r+1 starts after every
    job's round r). A visit makes two untimed calls, then:

    * without ``reference``: ``steps`` timed calls; the round's value is the fastest.
    * with ``reference`` (the key of one of the jobs, built once): the timed calls alternate with
      calls of the reference, ``R J R J ... R``; each job call is divided by the mean of the two
      reference calls around it and the round's value is the median of these ratios, times the
      fastest reference call of the whole run (so the values stay in ms). A slow spell of the
      machine that lasts longer than a visit slows both sides of a ratio and cancels.
    """
    if rounds < 1 or steps < 1:
        raise PruneError(f'latency table timing needs rounds >= 1 and steps >= 1, got {rounds} and {steps}')
    setups = dict(jobs)
    if reference is not None and reference not in setups:
        raise PruneError(f'the timing reference {reference!r} is not one of the jobs')
    per_round: Dict[object, List[float]] = {key: [] for key, _ in jobs}
    rng = np.random.default_rng(seed)
    ref_calls: List[float] = []
    with num_threads(threads) as n_threads:
        ref = setups[reference]() if reference is not None else None
        bar = progress_bar(progress, total=rounds * len(jobs), desc='latency table', leave=False)
        for r in range(rounds + 1):
            order = jobs if r == 0 else [jobs[i] for i in rng.permutation(len(jobs))]
            for key, setup in order:
                fn = setup()
                fn()
                fn()
                if not r:
                    _time(fn, device, 1, clock)
                    continue
                if ref is None:
                    per_round[key].append(min(_time(fn, device, steps, clock)))
                else:
                    per_round[key].append(_paired(fn, ref, device, steps, clock, ref_calls))
                bar.update(1)
        bar.close()
    if ref is not None:
        scale = min(ref_calls)
        per_round = {key: [v * scale for v in vals] for key, vals in per_round.items()}
    return per_round, n_threads


def _paired(fn, ref, device: torch.device, steps: int, clock: Callable[[], float], ref_calls: List[float]) -> float:
    """One paired visit (``timed_rounds``): the median over ``steps`` of ``job / mean(reference
    before, reference after)``; the reference calls are appended to ``ref_calls``."""
    before = _time(ref, device, 1, clock)[0]
    ref_calls.append(before)
    ratios = []
    for _ in range(steps):
        job = _time(fn, device, 1, clock)[0]
        after = _time(ref, device, 1, clock)[0]
        ref_calls.append(after)
        ratios.append(job / (0.5 * (before + after)))
        before = after
    return float(np.median(ratios))


def round_stats(values: List[float], estimator: str = 'fastest') -> tuple:
    """``(time, spread)`` of a node from its per-round times: the fastest round (``'fastest'``, for
    plain timings: other work only adds time) or the median round (``'median'``, for paired
    timings, whose ratios other work moves both ways), and ``(max - min) / min`` over the rounds."""
    v = np.asarray(values, dtype=np.float64)
    lo = float(v.min())
    value = lo if estimator == 'fastest' else float(np.median(v))
    return value, float((v.max() - lo) / lo) if lo > 0 else 0.0


def _summary(spreads) -> dict:
    s = np.asarray(list(spreads), dtype=np.float64)
    return dict(median=round(float(np.median(s)), 4), p90=round(float(np.percentile(s, 90)), 4),
                max=round(float(s.max()), 4)) if s.size else {}


ESTIMATORS = {False: 'fastest of interleaved rounds (each the fastest of steps calls)',
              True: 'median of interleaved rounds, each the median over steps calls of the call divided by the '
                    'reference calls around it; times the fastest reference call'}


def _meta(model: nn.Module, dev: torch.device, batch_size: int, n_threads: int, rounds: int, steps: int,
          t0: float, spreads, reference=None, **extra) -> dict:
    from ..bench.common import load_average
    from ..bench.speed import malloc_state
    return dict(device=device_name(dev), device_type=dev.type, batch_size=batch_size, **extra, threads=n_threads, malloc=malloc_state(),
                dtype=str(next(model.parameters()).dtype).replace('torch.', ''), passes=rounds, steps=steps,
                estimator=ESTIMATORS[reference is not None], reference=reference, spread=_summary(spreads), load_average=load_average(), cpu_count=os.cpu_count(),
                torch=torch.__version__, seconds=round(time.perf_counter() - t0, 1), units='ms per batch')


def busy_warning(meta: dict) -> Optional[str]:
    """A line when a table was timed on an oversubscribed CPU (1-minute load average above the
    cores + 0.5): its times, and so which widths get pruned, then depend on the other work."""
    load, cores = meta.get('load_average'), meta.get('cpu_count')
    if load is None or not cores or load <= cores + 0.5 or meta.get('device_type', 'cpu') != 'cpu':
        return None
    return (f'warning: the latency table was timed with a load average of {load} on {cores} cores: other work '
            f'slowed some of its nodes, and so changes which widths get pruned; reuse a table timed on a quieter '
            f'machine with --lut PATH (or a committed one with --lut NAME)')


def _stem_model(model: nn.Module, emb: int) -> nn.Module:
    """The DeiT without blocks at embedding width ``emb`` (patch embedding, norm, head)."""
    import timm
    from ..rundir import architecture_of
    args = dict(model.model_args)
    for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'attn_scale'):
        args.pop(k, None)
    args.update(embed_dim=emb, depth=0, num_heads=1)
    return timm.create_model(architecture_of(model), pretrained=False, num_classes=model.num_classes, **args)


def _fresh_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    """A copy of the model in eval mode on ``dev`` (outside inference mode: normal tensors), timed
    as a whole; the caller's model keeps its mode and device."""
    import copy
    with torch.inference_mode(False):
        return copy.deepcopy(model).to(dev).eval()


@torch.inference_mode()
def build_latency_table(model: nn.Module, batch_size: int = 64, grid: Optional[Dict[str, List[int]]] = None,
                        device=None, threads: Optional[int] = None, passes: int = 5, steps: int = 2,
                        progress: Optional[bool] = None, whole_model: bool = True, paired: bool = True):
    """Time one block of ``model``'s kind over a width grid on ``device`` (default: the model's).

    ``passes`` interleaved rounds over every node after a warm-up round (``timed_rounds``), with
    random weights on ``batch_size`` x tokens x E inputs, and ``block_spread`` holds each node's spread.
    With ``paired`` (the default) every call is timed against a reference block called just before
    and after it (the grid's middle node: each axis at its middle value) and a node's time is its
    median ratio over the rounds times the reference's time; without, the fastest round (each the
    fastest of ``steps`` calls). The non-block part (patch
    embedding, final norm, head) is timed over the E axis the same way. With ``whole_model`` the dense
    model itself is one more job, recorded against the sum of its parts in ``meta['whole_model']``
    (a diagnostic; module docstring).

    For PoolFormer / SpectFormer this returns an ``MLPLatencyTable`` (``grid``: MLP widths per block
    kind, see ``default_grid``), timed the same way on ``batch_size`` copies of each kind's input.
    """
    from ..bench.common import model_device

    dev = torch.device(device) if device is not None else model_device(model)
    layout = layout_of(model)
    if layout.table_format == MLPLatencyTable.FORMAT:
        return _build_mlp_table(model, layout, batch_size, grid, dev, threads, passes, steps, progress, whole_model,
                                paired)
    grid = dict(grid or default_grid(model))
    for k in AXES:
        if k not in grid or not grid[k]:
            raise PruneError(f'latency grid needs a non-empty {k!r} axis')
        grid[k] = sorted({int(v) for v in grid[k]})
        if grid[k][0] < 1:
            raise PruneError(f'latency grid axis {k} must hold widths >= 1, got {grid[k]}')
    N = tokens_of(model)
    blk0 = model.blocks[0]
    ln_eps = getattr(blk0.norm1, 'eps', 1e-6)
    qkv_bias = blk0.attn.qkv.bias is not None
    init_values = 1e-5 if hasattr(blk0.ls1, 'gamma') else None
    shape = tuple(len(grid[k]) for k in AXES)
    chans, size = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    probes = misalign_probes(grid)
    inputs = {e: torch.randn(batch_size, N, e, device=dev) for e in sorted(set(grid['emb']) | {
        d[0] for by_node in probes.values() for dims in by_node.values() for d in dims})}
    image = torch.randn(batch_size, chans, *size, device=dev)

    def block_job(dims):
        blk = WidthBlock(*dims, qkv_bias=qkv_bias, init_values=init_values,
                         norm_layer=lambda d: nn.LayerNorm(d, eps=ln_eps)).to(dev).eval()
        return lambda: blk(inputs[dims[0]])

    def node(idx):
        return tuple(grid[k][j] for k, j in zip(AXES, idx))

    def stem_job(e):
        stem = _stem_model(model, e).to(dev).eval()
        return lambda: stem(image)

    whole = _fresh_copy(model, dev) if whole_model else None
    jobs = [(idx, lambda idx=idx: block_job(node(idx))) for idx in np.ndindex(*shape)]
    jobs += [(('other', e), lambda e=e: stem_job(e)) for e in grid['emb']]
    jobs += [(('probe', d), lambda d=d: block_job(d)) for by_node in probes.values() for dims in by_node.values()
             for d in dims]
    if whole_model:
        jobs.append((('model',), lambda: (lambda: whole(image))))
    reference = tuple(len(grid[k]) // 2 for k in AXES) if paired else None
    t0 = time.perf_counter()
    samples, n_threads = timed_rounds(jobs, dev, passes, steps, threads, progress, reference=reference)
    est = 'median' if paired else 'fastest'
    table, spread = np.zeros(shape), np.zeros(shape)
    for idx in np.ndindex(*shape):
        table[idx], spread[idx] = round_stats(samples[idx], est)
    other, other_spread = zip(*(round_stats(samples[('other', e)], est) for e in grid['emb']))
    meta = _meta(model, dev, batch_size, n_threads, passes, steps, t0, list(spread.ravel()) + list(other_spread),
                 reference=reference and {k: grid[k][i] for k, i in zip(AXES, reference)}, tokens=N)
    lut = LatencyTable(grid, table, grid['emb'], list(other), meta, block_spread=spread,
                       other_spread=list(other_spread))
    lut.misalign = {axis: [[node, round(float(np.median([round_stats(samples[('probe', d)], est)[0] / lut.block(*d)
                                                       for d in dims])), 4)] for node, dims in by_node.items()]
                    for axis, by_node in probes.items()}
    if whole_model:
        _record_whole(lut, model, samples[('model',)], est)
    return lut


def misalign_probes(grid: Dict[str, List[int]]) -> Dict[str, Dict[int, list]]:
    """Blocks that time what a width off a multiple of ``ALIGN`` costs (``LatencyTable.misalign``),
    per axis the table varies (heads aside): ``{axis: {node: [dims, dims]}}``, the largest node of
    every axis with this one at 1 and 3 below ``node`` (two probes against noise). The embedding is
    probed below each of its nodes that is a multiple of ``ALIGN`` above it (its cost grows with E:
    1.01x at 31 against 32, 1.11x at 71, 1.16x at 95 on a 2-core x86 CPU), QK, V and MLP below
    their largest node."""
    top = {k: grid[k][-1] for k in AXES}
    out = {}
    for axis in ('emb', 'qk', 'v', 'mlp'):
        nodes = grid[axis] if axis == 'emb' else grid[axis][-1:]
        nodes = [n for n in nodes if n % ALIGN == 0 and n > ALIGN]
        if len(grid[axis]) > 1 and nodes:
            out[axis] = {n: [tuple(w if k == axis else top[k] for k in AXES) for w in (n - 1, n - 3)] for n in nodes}
    return out


def _record_whole(lut, model: nn.Module, whole_rounds: List[float], estimator: str) -> None:
    """``meta['whole_model']``: the dense model's measured time against the sum of its parts."""
    whole, whole_spread = round_stats(whole_rounds, estimator)
    parts = lut.model_ms(layout_of(model).widths())
    lut.meta['whole_model'] = dict(measured_ms=round(whole, 4), parts_ms=round(parts, 4),
                                   ratio=round(whole / parts, 4) if parts > 0 else None, spread=round(whole_spread, 4))


def _build_mlp_table(model: nn.Module, layout: MLPLayout, batch_size: int, grid: Optional[Dict[str, List[int]]],
                     dev: torch.device, threads: Optional[int], rounds: int, steps: int,
                     progress: Optional[bool], whole_model: bool, paired: bool) -> MLPLatencyTable:
    """``build_latency_table`` for an MLP-only family: every (kind, M) node, the model without
    blocks (and the dense model, with ``whole_model``) are the jobs of the same rounds; the paired
    reference is the first kind's middle width."""
    from ..bench.common import resolve_input_size
    kinds = [layout.block_kind(b) for b in range(layout.depth)]
    first = {}
    for b, k in enumerate(kinds):
        first.setdefault(k, b)
    grid = dict(grid or default_grid(model))
    for k in first:
        if not grid.get(k):
            raise PruneError(f'the latency grid needs MLP widths for the {k} blocks (grid kinds: {sorted(grid)})')
        grid[k] = sorted({int(v) for v in grid[k]})
        if grid[k][0] < 1:
            raise PruneError(f'latency grid for {k} must hold widths >= 1, got {grid[k]}')
    p = next(model.parameters())
    inputs = {k: torch.randn(batch_size, *layout.block_inputs[b], device=dev, dtype=p.dtype) for k, b in first.items()}
    image = torch.randn(batch_size, *resolve_input_size(model), device=dev, dtype=p.dtype)
    stem = layout.without_blocks().to(dev).eval()

    def block_job(kind, m):
        blk = layout.block_with_mlp(first[kind], m).to(dev).eval()
        return lambda: blk(inputs[kind])

    whole = _fresh_copy(model, dev) if whole_model else None
    jobs = [((k, m), lambda k=k, m=m: block_job(k, m)) for k in first for m in grid[k]]
    jobs.append((('other',), lambda: (lambda: stem(image))))
    if whole_model:
        jobs.append((('model',), lambda: (lambda: whole(image))))
    k0 = next(iter(first))
    reference = (k0, grid[k0][len(grid[k0]) // 2]) if paired else None
    t0 = time.perf_counter()
    samples, n_threads = timed_rounds(jobs, dev, rounds, steps, threads, progress, reference=reference)
    est = 'median' if paired else 'fastest'
    table, spreads = {}, []
    for k, b in first.items():
        stats = [round_stats(samples[(k, m)], est) for m in grid[k]]
        spreads += [s for _, s in stats]
        table[k] = dict(mlp=grid[k], ms=[v for v, _ in stats], spread=[s for _, s in stats],
                        input=list(layout.block_inputs[b]))
    other, other_spread = round_stats(samples[('other',)], est)
    lut = MLPLatencyTable(layout.family, kinds, table, other,
                          _meta(model, dev, batch_size, n_threads, rounds, steps, t0, spreads + [other_spread],
                                reference=reference and dict(kind=reference[0], mlp=reference[1])))
    if whole_model:
        _record_whole(lut, model, samples[('model',)], est)
    return lut
