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
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..bench.common import device_name, num_threads, synchronize
from ..models.deit import WidthBlock
from .groups import PruneError, tokens_of

AXES = ('emb', 'heads', 'qk', 'v', 'mlp')
FORMAT = 'deitlab-latency-table/1'


def _grid_axis(full: int, fractions: Sequence[float], minimum: int = 1) -> List[int]:
    vals = {max(minimum, int(round(full * f))) for f in fractions}
    vals.add(full)
    return sorted(v for v in vals if v <= full)


def default_grid(model: nn.Module, fine: bool = False) -> Dict[str, List[int]]:
    """Grid nodes covering every width the model could be pruned to (from 1 unit to dense)."""
    w = model.block_widths
    E, H = model.embed_dim, max(w['num_heads'])
    dq, dv, M = max(w['qk_dim']), max(w['v_dim']), max(w['mlp_hidden'])
    quarters = (0.0, 0.25, 0.5, 1.0) if not fine else (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
    heads = list(range(1, H + 1)) if H <= 4 else _grid_axis(H, (0.0, 0.25, 0.5, 0.75, 1.0))
    return dict(emb=_grid_axis(E, (0.25, 0.5, 0.75, 1.0), minimum=8 if E >= 32 else 1),
                heads=heads, qk=_grid_axis(dq, quarters), v=_grid_axis(dv, quarters),
                mlp=_grid_axis(M, (0.0, 0.25, 0.5, 0.75, 1.0)))


class LatencyTable:
    """Block latency (ms) on a 5-D grid plus the non-block latency over E, with interpolation."""

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
        """Raise unless the model's widths lie inside the grid and its token count matches."""
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

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> 'LatencyTable':
        path = Path(path)
        if not path.is_file():
            raise PruneError(f'latency table file does not exist: {path}')
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PruneError(f'{path} is not valid JSON: {e}') from None
        if not isinstance(d, dict) or d.get('format') != FORMAT:
            fmt = d.get('format') if isinstance(d, dict) else type(d).__name__
            raise PruneError(f'{path} is not a deitlab latency table (format {fmt!r}, expected {FORMAT!r})')
        try:
            return cls(d['axes'], np.asarray(d['block_ms']), d['other']['emb'], d['other']['ms'], d.get('meta'))
        except (KeyError, TypeError, ValueError) as e:
            raise PruneError(f'{path} is a damaged latency table ({type(e).__name__}: {e})') from None


def _time(fn, device: torch.device, n: int) -> List[float]:
    out = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stem_model(model: nn.Module, emb: int) -> nn.Module:
    """The model without blocks at embedding width ``emb`` (patch embedding, norm, head)."""
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
                        progress: Optional[bool] = None) -> LatencyTable:
    """Time one block of ``model``'s kind over a width grid on ``device`` (default: the model's).

    After one warm-up pass over all nodes, every node is timed ``passes`` x ``steps`` times (after
    two warm-up forwards each, in a new random order every pass) with random weights on
    ``batch_size`` x tokens x E inputs. The table keeps the fastest sample: on a shared CPU the
    slow outliers come from other work and first-touch page faults of fresh buffers, not from the
    block, and the minimum is the steady-state cost (as ``timeit`` recommends). The
    non-block part (patch embedding, final norm, head) is timed over the E axis the same way.
    """
    from tqdm.auto import tqdm
    from ..bench.common import model_device

    dev = torch.device(device) if device is not None else model_device(model)
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
    nodes = list(np.ndindex(*shape))
    samples = {i: [] for i in nodes}
    chans, size = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    other = {e: [] for e in grid['emb']}
    inputs = {e: torch.randn(batch_size, N, e, device=dev) for e in grid['emb']}
    image = torch.randn(batch_size, chans, *size, device=dev)
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    with num_threads(threads) as n_threads:
        bar = tqdm(total=passes * (len(nodes) + len(other)), desc='latency table', disable=progress is False,
                   leave=False)
        for p in range(passes + 1):
            # pass 0 warms the allocator and kernel caches up and is discarded; later passes visit
            # the nodes in a new random order, so slow drifts of the machine spread over all nodes
            order = nodes if p == 0 else [nodes[i] for i in rng.permutation(len(nodes))]
            for idx in order:
                e, h, q, v, m = (grid[k][j] for k, j in zip(AXES, idx))
                blk = WidthBlock(e, h, q, v, m, qkv_bias=qkv_bias, init_values=init_values,
                                 norm_layer=lambda d: nn.LayerNorm(d, eps=ln_eps)).to(dev).eval()
                x = inputs[e]
                blk(x)
                blk(x)
                times = _time(lambda: blk(x), dev, steps if p else 1)
                if p:
                    samples[idx].extend(times)
                    bar.update(1)
            for e in grid['emb']:
                stem = _stem_model(model, e).to(dev).eval()
                stem(image)
                stem(image)
                times = _time(lambda: stem(image), dev, steps)
                if p:
                    other[e].extend(times)
                    bar.update(1)
        bar.close()
    table = np.zeros(shape)
    for idx, s in samples.items():
        table[idx] = float(np.min(s))
    meta = dict(device=device_name(dev), batch_size=batch_size, tokens=N, threads=n_threads,
                dtype=str(next(model.parameters()).dtype).replace('torch.', ''), passes=passes, steps=steps,
                torch=torch.__version__, seconds=round(time.perf_counter() - t0, 1), units='ms per batch')
    return LatencyTable(grid, table, grid['emb'], [float(np.min(other[e])) for e in grid['emb']], meta)
