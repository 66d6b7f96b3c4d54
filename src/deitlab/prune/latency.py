"""Latency lookup table for latency-aware pruning (NViT, Yang et al. CVPR 2023, Sec. 3.3).

NViT estimates a model's latency from a table of *one transformer block* timed on the target
device over a grid of widths (embedding width E, heads H, per-head query/key width dq, per-head
value width dv, MLP hidden width M), interpolated multilinearly between grid nodes:

    Lat(model) = Lat_other(E) + sum_b LUT(E, H_b, dq_b, dv_b, M_b)

where ``Lat_other`` is the patch embedding, final norm and classifier head(s), timed over E. The
latency saved by removing one unit of a type in a block is the finite difference
``dLat = LUT(dims) - LUT(dims with one unit fewer)`` (summed over all blocks for E), which the
pruner subtracts from that unit's saliency: ``I' = I - lambda * dLat``.

``build_latency_table`` times the blocks on the current device (random weights, eval mode,
``batch_size`` images of the model's token count) in several passes over the grid, so that load
changes on a shared machine spread over all nodes; each node keeps its fastest time. Tables are JSON
files (``LatencyTable.save`` / ``load``) and can be reused for any model with the same token
count whose widths lie inside the grid.

**MLP-only families** (PoolFormer, SpectFormer; families.py) change nothing but the MLP hidden
widths, so their table (``MLPLatencyTable``) is one curve per *block kind* over M instead of a 5-D
grid: blocks of one kind share their structure and input shape and differ only in M (SpectFormer:
the token mixer, spectral / attention / pooling / identity, all at the fixed embedding width and
token count; PoolFormer: the stage, whose width and map size differ from the other stages'):

    Lat(model) = Lat_other + sum_b LUT_kind(b)(M_b)

with linear interpolation in M between nodes, ``Lat_other`` the model with every block replaced by
an identity (stem, downsampling, norm, head), and the saving of one unit ``LUT(M) - LUT(M - 1)``.
A kind is timed on a copy of its first block with a fresh MLP of each grid width, on the block's
real input shape; the timing scheme is the same (warm-up pass, passes in random order, minimum).
Timing each kind separately (instead of one block and a FLOP model) keeps what MACs miss: the
FFTs of the spectral blocks, the attention's softmax, the pooling and GroupNorm on large maps,
which do not shrink with M and so dilute the saving of an MLP unit differently per kind.
``load_latency_table`` reads either kind of file.
"""
from __future__ import annotations

import abc
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..bench.common import device_name, num_threads, synchronize
from ..models.deit import WidthBlock
from .families import MLPLayout, layout_of
from .groups import PruneError, tokens_of

__all__ = ['AXES', 'FORMAT', 'MLP_FORMAT', 'LatencyTable', 'MLPLatencyTable', 'default_grid', 'grid_for',
           'build_latency_table', 'load_latency_table']

AXES = ('emb', 'heads', 'qk', 'v', 'mlp')
FORMAT = 'deitlab-latency-table/1'
MLP_FORMAT = 'deitlab-mlp-latency-table/1'


def _grid_axis(full: int, fractions: Sequence[float], minimum: int = 1) -> List[int]:
    vals = {max(minimum, int(round(full * f))) for f in fractions}
    vals.add(full)
    return sorted(v for v in vals if v <= full)


def default_grid(model: nn.Module, fine: bool = False) -> Dict[str, List[int]]:
    """Grid nodes covering every width the model could be pruned to (from 1 unit to dense): per
    axis for a DeiT, per block kind (MLP widths) for the MLP-only families."""
    layout = layout_of(model)
    if isinstance(layout, MLPLayout):
        fractions = (0.0, 0.25, 0.5, 0.75, 1.0) if not fine else tuple(i / 8 for i in range(9))
        grid: Dict[str, List[int]] = {}
        for b, m in enumerate(layout.widths()['mlp_hidden']):
            kind = layout.block_kind(b)
            grid[kind] = sorted(set(grid.get(kind, [])) | set(_grid_axis(m, fractions)))
        return grid
    w = model.block_widths
    E, H = model.embed_dim, max(w['num_heads'])
    dq, dv, M = max(w['qk_dim']), max(w['v_dim']), max(w['mlp_hidden'])
    quarters = (0.0, 0.25, 0.5, 1.0) if not fine else (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
    heads = list(range(1, H + 1)) if H <= 4 else _grid_axis(H, (0.0, 0.25, 0.5, 0.75, 1.0))
    return dict(emb=_grid_axis(E, (0.25, 0.5, 0.75, 1.0), minimum=8 if E >= 32 else 1),
                heads=heads, qk=_grid_axis(dq, quarters), v=_grid_axis(dv, quarters),
                mlp=_grid_axis(M, (0.0, 0.25, 0.5, 0.75, 1.0)))


def grid_for(model: nn.Module, overrides: Optional[Dict[str, list]] = None) -> Dict[str, List[int]]:
    """``default_grid`` with some axes given (``NViTConfig.lut_grid``). For the MLP-only families
    only ``mlp`` may be given: those widths are the nodes of every block kind, capped at the kind's
    widest MLP, which always stays a node."""
    grid = default_grid(model)
    if not overrides:
        return grid
    layout = layout_of(model)
    if not isinstance(layout, MLPLayout):
        return dict(grid, **overrides)
    bad = sorted(set(overrides) - {'mlp'})
    if bad:
        raise PruneError(f'{layout.family} models prune MLP hidden widths only; the latency grid takes an mlp '
                         f'axis, not {bad}')
    values = [int(v) for v in overrides['mlp']]
    return {k: sorted({v for v in values if 1 <= v <= max(axis)} | {max(axis)}) for k, axis in grid.items()}


class _JsonTable(abc.ABC):
    """JSON files of a latency table class (``FORMAT``, ``to_dict`` / ``from_dict``)."""

    FORMAT = ''

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """The table as JSON-able data."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: dict):
        """The table from ``to_dict``'s data."""

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path):
        return _load(path, (cls,))


def _load(path, classes):
    path = Path(path)
    if not path.is_file():
        raise PruneError(f'latency table file does not exist: {path}')
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PruneError(f'{path} is not valid JSON: {e}') from None
    fmt = d.get('format') if isinstance(d, dict) else type(d).__name__
    cls = next((c for c in classes if isinstance(d, dict) and fmt == c.FORMAT), None)
    if cls is None:
        expected = ' or '.join(repr(c.FORMAT) for c in classes)
        raise PruneError(f'{path} is not a deitlab latency table (format {fmt!r}, expected {expected})')
    try:
        return cls.from_dict(d)
    except PruneError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PruneError(f'{path} is a damaged latency table ({type(e).__name__}: {e})') from None


def load_latency_table(path):
    """A ``LatencyTable`` (DeiT) or an ``MLPLatencyTable`` (PoolFormer, SpectFormer), by the file's
    format."""
    return _load(path, (LatencyTable, MLPLatencyTable))


class LatencyTable(_JsonTable):
    """Block latency (ms) on a 5-D grid plus the non-block latency over E, with interpolation."""

    FORMAT = FORMAT

    def __init__(self, axes: Dict[str, List[int]], block_ms: np.ndarray, other_emb: List[int],
                 other_ms: List[float], meta: Optional[dict] = None):
        self.axes = {k: [int(v) for v in axes[k]] for k in AXES}
        self.block_ms = np.asarray(block_ms, dtype=np.float64)
        shape = tuple(len(self.axes[k]) for k in AXES)
        if self.block_ms.shape != shape:
            raise PruneError(f'latency table has shape {self.block_ms.shape}, its axes need {shape}')
        for k in AXES:
            if sorted(set(self.axes[k])) != self.axes[k]:
                raise PruneError(f'latency table axis {k} must be strictly increasing, got {self.axes[k]}')
        self.other_emb = [int(v) for v in other_emb]
        self.other_ms = [float(v) for v in other_ms]
        self.meta = dict(meta or {})
        self._interp = None

    # ------------------------------------------------------------------ lookup
    def _interpolator(self):
        if self._interp is None:
            from scipy.interpolate import RegularGridInterpolator
            live = [i for i, k in enumerate(AXES) if len(self.axes[k]) > 1]
            values = self.block_ms.reshape([len(self.axes[AXES[i]]) for i in live]) if live else self.block_ms
            grid = tuple(np.asarray(self.axes[AXES[i]], dtype=np.float64) for i in live)
            fn = RegularGridInterpolator(grid, values, method='linear', bounds_error=False, fill_value=None) \
                if live else None
            self._interp = (live, fn)
        return self._interp

    def block(self, emb: float, heads: float, qk: float, v: float, mlp: float) -> float:
        """Interpolated latency (ms) of one block with these widths (exact at grid nodes)."""
        point = dict(emb=emb, heads=heads, qk=qk, v=v, mlp=mlp)
        live, fn = self._interpolator()
        for i, k in enumerate(AXES):
            if i not in live and point[k] != self.axes[k][0]:
                raise PruneError(f'the latency table has one {k} value ({self.axes[k][0]}); cannot look up {point[k]}')
        if fn is None:
            return float(self.block_ms.reshape(-1)[0])
        return float(fn(np.asarray([[point[AXES[i]] for i in live]], dtype=np.float64))[0])

    def other(self, emb: float) -> float:
        """Latency (ms) of the non-block part, linear between nodes and extrapolated like ``block``."""
        xs, ys = self.other_emb, self.other_ms
        if len(xs) == 1:
            return float(ys[0])
        i = int(np.clip(np.searchsorted(xs, emb) - 1, 0, len(xs) - 2))
        return float(ys[i] + (ys[i + 1] - ys[i]) * (emb - xs[i]) / (xs[i + 1] - xs[i]))

    def model_ms(self, widths: dict) -> float:
        """Estimated latency (ms) of a model with these widths (``model.block_widths`` plus
        ``embed_dim``, or ``Masks.kept()``)."""
        E = widths['embed_dim']
        return self.other(E) + sum(self.block(E, h, q, v, m) for h, q, v, m in zip(
            widths['num_heads'], widths['qk_dim'], widths['v_dim'], widths['mlp_hidden']))

    def unit_savings(self, widths: dict) -> dict:
        """Latency (ms) saved by removing one more unit of each layer at these widths, in the layout
        of ``reduce_units`` (one float per layer); 0 where a layer is down to one unit."""
        E = widths['embed_dim']
        rows = list(zip(widths['num_heads'], widths['qk_dim'], widths['v_dim'], widths['mlp_hidden']))
        out = {'emb': 0.0, 'head': [], 'qk': [], 'v': [], 'mlp': []}
        if E > 1 and len(self.axes['emb']) > 1:
            out['emb'] = self.other(E) - self.other(E - 1) + sum(
                self.block(E, *r) - self.block(E - 1, *r) for r in rows)
        # an axis with one grid value is a width the table does not vary: it saves nothing
        varies = {k: len(self.axes[k]) > 1 for k in AXES}
        for h, q, v, m in rows:
            base = self.block(E, h, q, v, m)
            out['head'].append(base - self.block(E, h - 1, q, v, m) if h > 1 and varies['heads'] else 0.0)
            out['qk'].append(base - self.block(E, h, q - 1, v, m) if q > 1 and varies['qk'] else 0.0)
            out['v'].append(base - self.block(E, h, q, v - 1, m) if v > 1 and varies['v'] else 0.0)
            out['mlp'].append(base - self.block(E, h, q, v, m - 1) if m > 1 and varies['mlp'] else 0.0)
        return out

    def check_covers(self, model: nn.Module) -> None:
        """Raise unless the model is a DeiT whose widths lie inside the grid and whose token count matches."""
        layout = layout_of(model)
        if isinstance(layout, MLPLayout):
            raise PruneError(f'this latency table times DeiT blocks, the model is a {layout.family}; build a table '
                             f'for this model')
        w = model.block_widths
        need = dict(emb=[model.embed_dim], heads=w['num_heads'], qk=w['qk_dim'], v=w['v_dim'], mlp=w['mlp_hidden'])
        for k, vals in need.items():
            if max(vals) > max(self.axes[k]):
                raise PruneError(f'the latency table covers {k} up to {max(self.axes[k])} but the model has '
                                 f'{max(vals)}; build a table for this model')
        tokens = self.meta.get('tokens')
        if tokens is not None and tokens != tokens_of(model):
            raise PruneError(f'the latency table was measured with {tokens} tokens, the model has '
                             f'{tokens_of(model)}; build a table for this model')

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return dict(format=FORMAT, meta=self.meta, axes=self.axes, block_ms=self.block_ms.tolist(),
                    other=dict(emb=self.other_emb, ms=self.other_ms))

    @classmethod
    def from_dict(cls, d: dict) -> 'LatencyTable':
        return cls(d['axes'], np.asarray(d['block_ms']), d['other']['emb'], d['other']['ms'], d.get('meta'))


class MLPLatencyTable(_JsonTable):
    """Latency (ms) of the blocks of an MLP-only family over their MLP hidden width, one curve per
    block kind, plus the latency of the rest of the model (see the module docstring).

    Args:
        family: the layout's family ('PoolFormer', 'SpectFormer').
        blocks: the kind of every block of the model, in order.
        kinds: per kind ``{'mlp': [M nodes, increasing], 'ms': [latency per node], 'input': [block
            input shape without the batch]}``.
        other_ms: the model with its blocks replaced by identities.
    """

    FORMAT = MLP_FORMAT

    def __init__(self, family: str, blocks: Sequence[str], kinds: Dict[str, dict], other_ms: float,
                 meta: Optional[dict] = None):
        self.family = str(family)
        self.blocks = [str(k) for k in blocks]
        self.kinds = {}
        for k, d in kinds.items():
            mlp, ms = [int(v) for v in d['mlp']], [float(v) for v in d['ms']]
            if not mlp or sorted(set(mlp)) != mlp or mlp[0] < 1:
                raise PruneError(f'latency table kind {k}: the mlp axis must be increasing widths >= 1, got {mlp}')
            if len(ms) != len(mlp):
                raise PruneError(f'latency table kind {k} has {len(ms)} times for {len(mlp)} mlp widths')
            self.kinds[str(k)] = dict(mlp=mlp, ms=ms, input=[int(v) for v in d['input']])
        missing = sorted(set(self.blocks) - set(self.kinds))
        if missing:
            raise PruneError(f'latency table has blocks of kinds {missing} but no times for them')
        self.other_ms = float(other_ms)
        self.meta = dict(meta or {})

    def block(self, kind: str, mlp: float) -> float:
        """Latency (ms) of one block of ``kind`` with ``mlp`` hidden units: linear between nodes,
        extrapolated from the two nearest nodes outside them (constant with one node)."""
        xs, ys = self.kinds[kind]['mlp'], self.kinds[kind]['ms']
        if len(xs) == 1:
            return ys[0]
        i = int(np.clip(np.searchsorted(xs, mlp) - 1, 0, len(xs) - 2))
        return float(ys[i] + (ys[i + 1] - ys[i]) * (mlp - xs[i]) / (xs[i + 1] - xs[i]))

    def model_ms(self, widths: dict) -> float:
        """Estimated latency (ms) of the model with these MLP widths (``Masks.kept()``)."""
        return self.other_ms + sum(self.block(k, m) for k, m in zip(self.blocks, widths['mlp_hidden']))

    def unit_savings(self, widths: dict) -> dict:
        """Latency (ms) saved by removing one more hidden unit of each block's MLP, in the layout of
        ``reduce_units``; 0 at one unit and for a kind timed at one width only."""
        return {'mlp': [self.block(k, m) - self.block(k, m - 1) if m > 1 and len(self.kinds[k]['mlp']) > 1 else 0.0
                        for k, m in zip(self.blocks, widths['mlp_hidden'])]}

    def check_covers(self, model: nn.Module) -> None:
        """Raise unless the model has this table's family, block kinds and block input shapes, and
        MLP widths inside the grid."""
        layout = layout_of(model)
        if not isinstance(layout, MLPLayout):
            raise PruneError(f'this latency table times the MLP widths of {self.family} blocks, the model is a '
                             f'{layout.family}; build a table for this model')
        kinds = [layout.block_kind(b) for b in range(layout.depth)]
        if layout.family != self.family or kinds != self.blocks:
            raise PruneError(f'the latency table was measured for {self.family} blocks {self.blocks}, the model has '
                             f'{layout.family} blocks {kinds}; build a table for this model')
        for b, (kind, shape, m) in enumerate(zip(kinds, layout.block_inputs, layout.widths()['mlp_hidden'])):
            entry = self.kinds[kind]
            if list(shape) != entry['input']:
                raise PruneError(f'the latency table timed {kind} blocks on inputs {entry["input"]}, block {b} of the '
                                 f'model takes {list(shape)}; build a table for this model')
            if m > max(entry['mlp']):
                raise PruneError(f'the latency table covers {kind} MLP widths up to {max(entry["mlp"])} but block '
                                 f'{b} has {m}; build a table for this model')

    def to_dict(self) -> dict:
        return dict(format=MLP_FORMAT, meta=self.meta, family=self.family, blocks=self.blocks, kinds=self.kinds,
                    other_ms=self.other_ms)

    @classmethod
    def from_dict(cls, d: dict) -> 'MLPLatencyTable':
        return cls(d['family'], d['blocks'], d['kinds'], d['other_ms'], d.get('meta'))


def _time(fn, device: torch.device, n: int) -> List[float]:
    out = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _timed_passes(jobs: list, device: torch.device, passes: int, steps: int, threads: Optional[int],
                  progress: Optional[bool]):
    """Time every job ``passes`` x ``steps`` times; ``jobs`` are ``(key, setup)`` where ``setup()``
    builds what is timed and returns the call to time. Returns ``({key: [ms, ...]}, threads)``.

    Pass 0 warms the allocator and kernel caches up and is discarded; later passes visit the jobs
    in a new random order, so slow drifts of the machine spread over all of them. Every visit
    builds afresh and runs two untimed forwards first."""
    from tqdm.auto import tqdm
    samples = {key: [] for key, _ in jobs}
    rng = np.random.default_rng(0)
    with num_threads(threads) as n_threads:
        bar = tqdm(total=passes * len(jobs), desc='latency table', disable=progress is False, leave=False)
        for p in range(passes + 1):
            order = jobs if p == 0 else [jobs[i] for i in rng.permutation(len(jobs))]
            for key, setup in order:
                fn = setup()
                fn()
                fn()
                times = _time(fn, device, steps if p else 1)
                if p:
                    samples[key].extend(times)
                    bar.update(1)
        bar.close()
    return samples, n_threads


def _meta(model: nn.Module, dev: torch.device, batch_size: int, n_threads: int, passes: int, steps: int,
          t0: float, **extra) -> dict:
    return dict(device=device_name(dev), batch_size=batch_size, **extra, threads=n_threads,
                dtype=str(next(model.parameters()).dtype).replace('torch.', ''), passes=passes, steps=steps,
                torch=torch.__version__, seconds=round(time.perf_counter() - t0, 1), units='ms per batch')


def _stem_model(model: nn.Module, emb: int) -> nn.Module:
    """The DeiT without blocks at embedding width ``emb`` (patch embedding, norm, head)."""
    import timm
    from ..rundir import architecture_of
    args = dict(model.model_args)
    for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'attn_scale'):
        args.pop(k, None)
    args.update(embed_dim=emb, depth=0, num_heads=1)
    return timm.create_model(architecture_of(model), pretrained=False, num_classes=model.num_classes, **args)


@torch.inference_mode()
def build_latency_table(model: nn.Module, batch_size: int = 64, grid: Optional[Dict[str, List[int]]] = None,
                        device=None, threads: Optional[int] = None, passes: int = 3, steps: int = 2,
                        progress: Optional[bool] = None):
    """Time one block of ``model``'s kind over a width grid on ``device`` (default: the model's).

    After one warm-up pass over all nodes, every node is timed ``passes`` x ``steps`` times (after
    two warm-up forwards each, in a new random order every pass) with random weights on
    ``batch_size`` x tokens x E inputs. The table keeps the fastest sample: on a shared CPU the
    slow outliers come from other work and first-touch page faults of fresh buffers, not from the
    block, and the minimum is the steady-state cost (as ``timeit`` recommends). The
    non-block part (patch embedding, final norm, head) is timed over the E axis the same way.

    For PoolFormer / SpectFormer this returns an ``MLPLatencyTable`` (``grid``: MLP widths per block
    kind, see ``default_grid``), timed the same way on ``batch_size`` copies of each kind's input.
    """
    from ..bench.common import model_device

    dev = torch.device(device) if device is not None else model_device(model)
    layout = layout_of(model)
    if isinstance(layout, MLPLayout):
        return _build_mlp_table(model, layout, batch_size, grid, dev, threads, passes, steps, progress)
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
    inputs = {e: torch.randn(batch_size, N, e, device=dev) for e in grid['emb']}
    image = torch.randn(batch_size, chans, *size, device=dev)

    def block_job(idx):
        e, h, q, v, m = (grid[k][j] for k, j in zip(AXES, idx))
        blk = WidthBlock(e, h, q, v, m, qkv_bias=qkv_bias, init_values=init_values,
                         norm_layer=lambda d: nn.LayerNorm(d, eps=ln_eps)).to(dev).eval()
        return lambda: blk(inputs[e])

    def stem_job(e):
        stem = _stem_model(model, e).to(dev).eval()
        return lambda: stem(image)

    jobs = [(idx, lambda idx=idx: block_job(idx)) for idx in np.ndindex(*shape)]
    jobs += [(('other', e), lambda e=e: stem_job(e)) for e in grid['emb']]
    t0 = time.perf_counter()
    samples, n_threads = _timed_passes(jobs, dev, passes, steps, threads, progress)
    table = np.zeros(shape)
    for idx in np.ndindex(*shape):
        table[idx] = float(np.min(samples[idx]))
    other = [float(np.min(samples[('other', e)])) for e in grid['emb']]
    return LatencyTable(grid, table, grid['emb'], other,
                        _meta(model, dev, batch_size, n_threads, passes, steps, t0, tokens=N))


def _build_mlp_table(model: nn.Module, layout: MLPLayout, batch_size: int, grid: Optional[Dict[str, List[int]]],
                     dev: torch.device, threads: Optional[int], passes: int, steps: int,
                     progress: Optional[bool]) -> MLPLatencyTable:
    """``build_latency_table`` for an MLP-only family: every (kind, M) node and the model without
    blocks are the jobs of the same timing passes."""
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

    jobs = [((k, m), lambda k=k, m=m: block_job(k, m)) for k in first for m in grid[k]]
    jobs.append((('other',), lambda: (lambda: stem(image))))
    t0 = time.perf_counter()
    samples, n_threads = _timed_passes(jobs, dev, passes, steps, threads, progress)
    table = {k: dict(mlp=grid[k], ms=[float(np.min(samples[(k, m)])) for m in grid[k]],
                     input=list(layout.block_inputs[b])) for k, b in first.items()}
    return MLPLatencyTable(layout.family, kinds, table, float(np.min(samples[('other',)])),
                           _meta(model, dev, batch_size, n_threads, passes, steps, t0))
