"""Latency lookup table for latency-aware pruning (NViT, Yang et al. CVPR 2023, Sec. 3.3).

NViT estimates a model's latency from a table of *one transformer block* timed on the target
device over a grid of widths (embedding width E, heads H, per-head query/key width dq, per-head
value width dv, MLP hidden width M), interpolated multilinearly between grid nodes:

    Lat(model) = Lat_other(E) + sum_b LUT(E, H_b, dq_b, dv_b, M_b)

where ``Lat_other`` is the patch embedding, final norm and classifier head(s), timed over E. The
latency saved by removing one unit of a type in a block is the finite difference
``dLat = LUT(dims) - LUT(dims with one unit fewer)`` (summed over all blocks for E), which the
pruner subtracts from that unit's saliency: ``I' = I - lambda * dLat``.

``build_latency_table`` (timing.py) times the blocks on the current device (random weights, eval
mode, ``batch_size`` images of the model's token count) in several interleaved rounds over the grid;
each node keeps its fastest round and the spread of its rounds. Tables are JSON files (``LatencyTable.save`` /
``load``) and can be reused for any model with the same token count whose widths lie inside the
grid; ``lut_path`` resolves ``NViTConfig.lut`` (``measure``, a file, or a table committed in
``deitlab/prune/tables/``).

**MLP-only families** (PoolFormer, SpectFormer; families.py) change nothing but the MLP hidden
widths, so their table (``MLPLatencyTable``) is one curve per *block kind* over M instead of a 5-D
grid: blocks of one kind share their structure and input shape and differ only in M (SpectFormer:
the token mixer, spectral / attention / pooling / identity, all at the fixed embedding width and
token count; PoolFormer: the stage, whose width and map size differ from the other stages'):

    Lat(model) = Lat_other + sum_b LUT_kind(b)(M_b)

with linear interpolation in M between nodes, ``Lat_other`` the model with every block replaced by
an identity (stem, downsampling, norm, head), and the saving of one unit ``LUT(M) - LUT(M - 1)``.
A kind is timed on a copy of its first block with a fresh MLP of each grid width, on the block's
real input shape; the timing scheme is the same (warm-up round, interleaved rounds, fastest).
Timing each kind separately (instead of one block and a FLOP model) keeps what MACs miss: the
FFTs of the spectral blocks, the attention's softmax, the pooling and GroupNorm on large maps,
which do not shrink with M and so dilute the saving of an MLP unit differently per kind.
``load_latency_table`` reads either kind of file.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch.nn as nn

from .families import DeiTLayout, MLPLayout, layout_of
from .base import TABLES_DIR, PruneError, committed_tables, lut_path
from .groups import tokens_of

__all__ = ['AXES', 'FORMAT', 'MLP_FORMAT', 'LatencyTable', 'MLPLatencyTable', 'default_grid', 'grid_for',
           'load_latency_table', 'lut_path', 'committed_tables', 'TABLES_DIR']

AXES = ('emb', 'heads', 'qk', 'v', 'mlp')
ALIGN = 8   # widths off a multiple of this pay ``LatencyTable.misalign``
FORMAT = DeiTLayout.table_format
MLP_FORMAT = MLPLayout.table_format


def default_grid(model: nn.Module, fine: bool = False) -> Dict[str, List[int]]:
    """Grid nodes covering every width the model could be pruned to (from 1 unit to dense): per
    axis for a DeiT, per block kind (MLP widths) for the MLP-only families (``Layout.latency_grid``)."""
    return layout_of(model).latency_grid(fine)


def grid_for(model: nn.Module, overrides: Optional[Dict[str, list]] = None) -> Dict[str, List[int]]:
    """``default_grid`` with some axes given (``NViTConfig.lut_grid``; ``Layout.grid_with``)."""
    return layout_of(model).grid_with(overrides)


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
    format; ``path`` may name a committed table (``lut_path``)."""
    return _load(lut_path(path) or path, (LatencyTable, MLPLatencyTable))


class LatencyTable(_JsonTable):
    """Block latency (ms) on a 5-D grid plus the non-block latency over E, with interpolation."""

    FORMAT = FORMAT

    def __init__(self, axes: Dict[str, List[int]], block_ms: np.ndarray, other_emb: List[int],
                 other_ms: List[float], meta: Optional[dict] = None,
                 block_spread: Optional[np.ndarray] = None, other_spread: Optional[List[float]] = None,
                 misalign: Optional[Dict[str, list]] = None):
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
        # per node: (max - min) / min of the timing rounds (None for hand-made tables)
        self.block_spread = None if block_spread is None else np.asarray(block_spread, dtype=np.float64)
        if self.block_spread is not None and self.block_spread.shape != shape:
            raise PruneError(f'latency table spread has shape {self.block_spread.shape}, its axes need {shape}')
        self.other_spread = None if other_spread is None else [float(v) for v in other_spread]
        self.misalign = misalign
        self._interp = None

    @property
    def misalign(self) -> Dict[str, list]:
        """Per axis (emb, qk, v, mlp) the measured cost of a width off a multiple of ``ALIGN``:
        ``[width, factor]`` pairs sorted by width (``timing.misalign_probes``); empty: not priced."""
        return self._misalign

    @misalign.setter
    def misalign(self, value: Optional[Dict[str, list]]) -> None:
        pairs = {str(k): sorted([int(w), float(f)] for w, f in v) for k, v in (value or {}).items()}
        unknown = sorted(set(pairs) - {'emb', 'qk', 'v', 'mlp'})
        if unknown:
            raise PruneError(f'latency table misalign factors for unknown axes {unknown}')
        self._misalign = pairs

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

    def _misalign_at(self, axis: str, width: float) -> float:
        """The axis's factor at ``width``: linear between the measured ``[width, factor]`` pairs,
        constant outside them (1 without any)."""
        pairs = self.misalign.get(axis)
        if not pairs:
            return 1.0
        return float(np.interp(width, [w for w, _ in pairs], [f for _, f in pairs]))

    def misalign_factor(self, emb: int, qk: int, v: int, mlp: int) -> float:
        """What a block pays for widths off multiples of ``ALIGN`` (1 for a table without
        ``misalign``): the embedding's factor, when E is off, times the largest factor among the
        inner widths that are off (QK, V, MLP). The inner ones do not compound: on a 2-core x86 CPU a
        DeiT block with QK 23 took 1.09x the time of QK 24, with V 23 1.08x, with both and MLP 291
        1.07x; an embedding of 71 instead of 72 added its own 1.09x on top of either."""
        f = self._misalign_at('emb', emb) if int(emb) % ALIGN else 1.0
        inner = [self._misalign_at(a, w) for a, w in (('qk', qk), ('v', v), ('mlp', mlp)) if int(w) % ALIGN]
        return f * max(inner + [1.0])

    def model_ms(self, widths: dict) -> float:
        """Estimated latency (ms) of a model with these widths (``model.block_widths`` plus
        ``embed_dim``, or ``Masks.kept()``): every block interpolated, times its ``misalign_factor``."""
        E = widths['embed_dim']
        return self.other(E) + sum(self.block(E, h, q, v, m) * self.misalign_factor(E, q, v, m) for h, q, v, m in zip(
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
        if layout.table_format != FORMAT:
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
        d = dict(format=FORMAT, meta=self.meta, axes=self.axes, block_ms=self.block_ms.tolist(),
                 other=dict(emb=self.other_emb, ms=self.other_ms))
        if self.block_spread is not None:
            d['block_spread'] = self.block_spread.tolist()
        if self.other_spread is not None:
            d['other']['spread'] = self.other_spread
        if self.misalign:
            d['misalign'] = self.misalign
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'LatencyTable':
        spread = d.get('block_spread')
        return cls(d['axes'], np.asarray(d['block_ms']), d['other']['emb'], d['other']['ms'], d.get('meta'),
                   block_spread=None if spread is None else np.asarray(spread),
                   other_spread=d['other'].get('spread'), misalign=d.get('misalign'))


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
            if d.get('spread') is not None:   # per node: (max - min) / min of the timing rounds
                self.kinds[str(k)]['spread'] = [float(v) for v in d['spread']]
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
        if layout.table_format != MLP_FORMAT:
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
