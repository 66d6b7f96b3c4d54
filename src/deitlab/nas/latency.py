"""A latency predictor for the ViT-Res sub-networks of a search space, timed on this device.

A :class:`LatencyTable` holds the time of every part a sub-network is made of, at the shapes the
space allows:

* per stage ``s``, the time of one transformer block of every width choice ``C_s`` on that stage's
  token count, on a grid of (heads, MLP hidden width);
* every residual spatial reduction ``C_{s-1} -> C_s`` (all pairs of width choices);
* the stem (the space's patch stem, linear or conv; class / distillation tokens, position
  embedding) at every stage-1 width and the head (final LayerNorm and classifier) at every last-stage width.

The prediction for an architecture is the sum of its parts (skipped blocks cost nothing); a block
whose MLP width is not on the grid is interpolated linearly between the nearest timed widths (or
extrapolated from the two nearest). Parts timed alone run with their weights in cache and without
the whole network's Python and allocation overhead, so on a CPU the sum comes out some 20-35%
below the measured latency of the network (the ranking is kept: a Spearman correlation of about
0.99 on the ``mu`` space). ``calibrate=k`` times ``k`` whole sub-networks (the smallest, the
largest, random ones) with the parts and stores one ``scale``, the median of measured / sum; the
prediction is ``scale`` times the sum (1 without calibration).

Timing on a busy CPU is noisy, so every point is timed *paired* with a fixed reference module (a
block of the middle stage at its largest shape): in each of several rounds the points come in a
fresh random order, and each is timed between two calls of the reference; a point's time is the
median over the rounds of its ratio to the mean of the two reference calls, times the reference's
fastest time. A load that slows everything down moves both and cancels in the ratio. A change in
the machine's own state between timing the table and using it does not cancel so well (on a shared
virtual CPU the reference block and whole networks do not speed up or slow down by one factor): the
predicted milliseconds are those of the CPU when the table was timed, the ranking holds better.
Time the table again before a search whose budget is in absolute milliseconds measured another time
(``benchmarks/resnas_fmnist.py`` reports both effects).

:func:`check_predictions` reports how well the table predicts: the stand-alone latency of sliced
sub-networks (paired the same way) next to their prediction. Tables are JSON with their metadata
(device, threads, batch, torch version, load average). Uses torch and ``time.perf_counter`` only.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..bench.common import device_name, load_average, num_threads, synchronize
from ..layers import WidthBlock
from ..models.vitres import ResidualSpatialReduction, ViTRes
from ..models.vitres_stems import build_stem
from ..rundir import atomic_write_bytes
from .config import read_json_file
from .cost import stage_grids, stage_tokens
from .space import Arch, SearchSpace, SearchSpaceError

__all__ = ['LatencyTable', 'LatencyTableError', 'build_latency_table', 'check_predictions', 'paired_times',
           'time_models']

TABLE_FORMAT = 'deitlab-nas-latency/1'
# what a table's timings depend on: a space that differs here needs its own table
_SHAPE_KEYS = ('depths', 'head_dim', 'img_size', 'patch_size', 'in_chans', 'distilled', 'stem')
_OLD_DEFAULTS = dict(stem='linear')   # keys tables written before them lack


class LatencyTableError(SearchSpaceError):
    """A latency table that does not fit the search space, or a file that is not a table."""


# ----------------------------------------------------------------------------- the parts as modules

class _Stem(nn.Module):
    """The space's patch stem (linear or conv, as its networks are built), prefix tokens and position
    embedding: the start of ``ViTRes.forward_features``."""

    def __init__(self, space: SearchSpace, width: int):
        super().__init__()
        self.patch_embed = build_stem(space.stem, space.img_size, space.patch_size, space.in_chans, width)
        self.prefix = nn.Parameter(torch.zeros(1, 2 if space.distilled else 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, stage_tokens(space)[0], width))

    def forward(self, x):
        x = self.patch_embed(x)
        return torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


class _Head(nn.Module):
    """The final LayerNorm and the classifier(s) on the prefix token(s)."""

    def __init__(self, space: SearchSpace, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList([nn.Linear(width, space.num_classes) for _ in range(2 if space.distilled else 1)])

    def forward(self, x):
        x = self.norm(x)
        out = [h(x[:, i]) for i, h in enumerate(self.heads)]
        return out[0] if len(out) == 1 else (out[0] + out[1]) / 2


def _block(space: SearchSpace, width: int, heads: int, mlp: int) -> nn.Module:
    return WidthBlock(width, heads, space.head_dim, space.head_dim, mlp)


def _reference(space: SearchSpace) -> Tuple[nn.Module, Tuple[int, ...]]:
    """The reference module: a block of the middle stage at its largest width, heads and MLP."""
    s = len(space.depths) // 2
    blocks = [i for i, t in enumerate(space.stage_of) if t == s]
    heads = max(max(space.heads[i]) for i in blocks)
    mlp = max(max(space.mlp_hidden[i]) for i in blocks)
    width = space.widths[s][-1]
    return _block(space, width, heads, mlp), (stage_tokens(space)[s], width)


# ----------------------------------------------------------------------------- paired timing

def _calls_for(fn: Callable[[], object], target_s: float, device) -> int:
    """How many calls make one timing of about ``target_s`` seconds (1..64), after two warm-up calls."""
    fn()
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return int(min(64, max(1, math.ceil(target_s / max(time.perf_counter() - t0, 1e-6)))))


def _seconds(fn: Callable[[], object], calls: int, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls


def paired_times(items: Dict[object, Tuple[nn.Module, torch.Tensor]], reference: Tuple[nn.Module, torch.Tensor],
                 rounds: int = 5, seed: int = 0, target_ms: float = 2.0, device=None) -> Tuple[Dict[object, float], dict]:
    """Milliseconds per forward of every module in ``items`` (key -> (module, input)), each timed
    between two calls of ``reference`` in ``rounds`` rounds of random order: the median ratio to
    the reference times the reference's fastest time. Run under ``torch.inference_mode`` in eval
    mode. Returns the times and a summary (reference ms, rounds, the spread of the ratios)."""
    if rounds < 1:
        raise ValueError(f'rounds must be at least 1, got {rounds}')
    device = torch.device(device or 'cpu')
    rng = random.Random(seed)
    ref_mod, ref_x = reference
    with torch.inference_mode():
        def call(mod, x):
            return lambda: mod(x)
        ref = call(ref_mod.eval(), ref_x)
        ref_calls = _calls_for(ref, target_ms / 1e3, device)
        fns = {k: call(m.eval(), x) for k, (m, x) in items.items()}
        calls = {k: _calls_for(f, target_ms / 1e3, device) for k, f in fns.items()}
        ratios: Dict[object, List[float]] = {k: [] for k in items}
        ref_times: List[float] = []
        keys = list(items)
        for _ in range(rounds):
            rng.shuffle(keys)
            for k in keys:
                a = _seconds(ref, ref_calls, device)
                t = _seconds(fns[k], calls[k], device)
                b = _seconds(ref, ref_calls, device)
                ratios[k].append(t / ((a + b) / 2))
                ref_times += [a, b]
    ref_ms = min(ref_times) * 1e3 if ref_times else 0.0
    times = {k: float(np.median(r)) * ref_ms for k, r in ratios.items()}
    spread = [float((max(r) - min(r)) / np.median(r)) for r in ratios.values() if np.median(r) > 0]
    return times, dict(reference_ms=ref_ms, reference_ms_median=float(np.median(ref_times) * 1e3) if ref_times else 0.0,
                       rounds=rounds, median_ratio_spread=float(np.median(spread)) if spread else 0.0)


# ----------------------------------------------------------------------------- the table

def _interp(points: Dict[int, float], m: int) -> float:
    """Linear in the MLP width between the nearest timed widths (or from the two nearest outside)."""
    if m in points:
        return points[m]
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    lo = max([x for x in xs if x < m], default=None)
    hi = min([x for x in xs if x > m], default=None)
    if lo is None:
        lo, hi = xs[0], xs[1]
    elif hi is None:
        lo, hi = xs[-2], xs[-1]
    y = points[lo] + (points[hi] - points[lo]) * (m - lo) / (hi - lo)
    return max(y, 0.0)


@dataclass
class LatencyTable:
    """Milliseconds per part (see the module docstring). ``blocks``: (stage, width, heads, mlp) ->
    ms; ``reductions``: (stage, C_in, C_out) -> ms, the reduction into ``stage``; ``stems``: width
    -> ms; ``heads``: width -> ms. ``space``: the definition it was timed for; ``meta``: device,
    threads, batch, torch version, reference time, load average; ``scale``: the calibration factor
    applied to the sum of the parts."""

    space: dict
    blocks: Dict[Tuple[int, int, int, int], float]
    reductions: Dict[Tuple[int, int, int], float]
    stems: Dict[int, float]
    heads: Dict[int, float]
    meta: dict = field(default_factory=dict)
    scale: float = 1.0

    # ------------------------------------------------------------------ prediction

    def check_space(self, space: SearchSpace) -> None:
        """``LatencyTableError`` unless the table was timed for ``space``'s shapes (token counts,
        head width, depths) and covers its width and head choices."""
        mine = {**_OLD_DEFAULTS, **self.space}
        diff = [k for k in _SHAPE_KEYS if mine.get(k) != getattr(space, k)]
        if diff:
            detail = ', '.join(f'{k} {mine.get(k)!r} vs {getattr(space, k)!r}' for k in diff)
            raise LatencyTableError(f'the latency table was timed for another search space ({detail}); time one for '
                                    f'this space')
        for s, (choices, t) in enumerate(zip(space.widths, self._timed_widths())):
            missing = sorted(set(choices) - t)
            if missing:
                raise LatencyTableError(f'the latency table has no timings for stage {s} widths {missing}; time one '
                                        f'for this space')

    def _timed_widths(self) -> List[set]:
        S = len(self.space['depths'])
        return [{k[1] for k in self.blocks if k[0] == s} for s in range(S)]

    def block_ms(self, stage: int, width: int, heads: int, mlp: int) -> float:
        key = (stage, width, heads, mlp)
        if key in self.blocks:
            return self.blocks[key]
        points = {k[3]: v for k, v in self.blocks.items() if k[:3] == key[:3]}
        if not points:
            raise LatencyTableError(f'the latency table has no block of stage {stage} at width {width} with {heads} '
                                    f'heads; time one for this space')
        return _interp(points, mlp)

    def parts(self, space: SearchSpace, arch: Arch) -> Dict[str, float]:
        """Milliseconds of ``arch`` by part (``stem``, ``blocks``, ``reductions``, ``head``, as timed),
        ``sum`` and ``total`` (the prediction: ``scale * sum``)."""
        space.validate(arch)
        C = arch.widths
        try:
            stem, head = self.stems[C[0]], self.heads[C[-1]]
            reductions = sum(self.reductions[(s, C[s - 1], C[s])] for s in range(1, len(C)))
        except KeyError as e:
            raise LatencyTableError(f'the latency table has no timing for {e.args[0]!r}; time one for this '
                                    f'space') from None
        blocks = sum(self.block_ms(s, C[s], arch.heads[i], arch.mlp_hidden[i])
                     for i, s in enumerate(space.stage_of) if arch.keep[i])
        raw = stem + blocks + reductions + head
        return dict(stem=stem, blocks=blocks, reductions=reductions, head=head, sum=raw, total=self.scale * raw)

    def predict(self, space: SearchSpace, arch: Arch) -> float:
        """Predicted milliseconds of one forward of ``arch`` at the table's batch size."""
        return self.parts(space, arch)['total']

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return dict(format=TABLE_FORMAT, meta=self.meta, space=self.space, scale=self.scale,
                    blocks=[[*k, v] for k, v in sorted(self.blocks.items())],
                    reductions=[[*k, v] for k, v in sorted(self.reductions.items())],
                    stems=[[k, v] for k, v in sorted(self.stems.items())],
                    heads=[[k, v] for k, v in sorted(self.heads.items())])

    @classmethod
    def from_dict(cls, d: dict) -> 'LatencyTable':
        if not isinstance(d, dict) or d.get('format') != TABLE_FORMAT:
            got = d.get('format') if isinstance(d, dict) else type(d).__name__
            raise LatencyTableError(f'not a ViT-ResNAS latency table (format {got!r}, expected {TABLE_FORMAT!r})')
        try:
            return cls(space=dict(d['space']), meta=dict(d.get('meta') or {}),
                       blocks={tuple(int(v) for v in r[:4]): float(r[4]) for r in d['blocks']},
                       reductions={tuple(int(v) for v in r[:3]): float(r[3]) for r in d['reductions']},
                       stems={int(r[0]): float(r[1]) for r in d['stems']},
                       heads={int(r[0]): float(r[1]) for r in d['heads']}, scale=float(d.get('scale', 1.0)))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise LatencyTableError(f'the latency table is damaged ({type(e).__name__}: {e})') from None

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    @classmethod
    def load(cls, path) -> 'LatencyTable':
        return cls.from_dict(read_json_file(path, 'latency table', LatencyTableError))


def _spread_pick(values: Sequence[int], n: Optional[int]) -> List[int]:
    """``n`` of the sorted ``values``, evenly spread with both ends kept (all when ``n`` is None)."""
    values = sorted(set(values))
    if n is None or n >= len(values):
        return values
    if n < 2:
        raise ValueError(f'mlp_points must be at least 2 (the smallest and the largest width), got {n}')
    return sorted({values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)})


def _grid(space: SearchSpace, mlp_points: Optional[int]) -> List[Tuple[int, int, int, int]]:
    out = []
    for s, widths in enumerate(space.widths):
        blocks = [i for i, t in enumerate(space.stage_of) if t == s]
        heads = sorted({h for i in blocks for h in space.heads[i]})
        mlps = _spread_pick([m for i in blocks for m in space.mlp_hidden[i]], mlp_points)
        out += [(s, c, h, m) for c in widths for h in heads for m in mlps]
    return out


def _inputs(batch: int, device, gen: torch.Generator) -> Callable[[Tuple[int, ...]], torch.Tensor]:
    def make(shape):
        return torch.randn((batch, *shape), generator=gen).to(device)
    return make


def build_latency_table(space: SearchSpace, *, batch_size: int = 1, rounds: int = 5, threads: Optional[int] = None,
                        mlp_points: Optional[int] = None, calibrate: int = 5, device=None, seed: int = 0,
                        target_ms: float = 2.0) -> LatencyTable:
    """Time every part of ``space``'s sub-networks on ``device`` (default CPU) with ``threads``
    intra-op threads (default: the current setting) at ``batch_size``; ``mlp_points`` MLP widths
    per stage (evenly spread, ends kept; None: all choices), the others interpolated;
    ``calibrate`` whole sub-networks timed with them for the table's ``scale`` (0: none). See the
    module docstring for the paired timing."""
    device = torch.device(device or 'cpu')
    with torch.random.fork_rng():   # seeded weights, the caller's random state untouched
        torch.manual_seed(seed)
        items, calib = _parts(space, batch_size, device, mlp_points, calibrate, seed)
        ref, shape = _reference(space)
    x = _inputs(batch_size, device, torch.Generator().manual_seed(seed + 1))
    load_before = load_average()
    with num_threads(threads) as n_threads:
        times, summary = paired_times(items, (ref.to(device), x(shape)), rounds=rounds, seed=seed,
                                      target_ms=target_ms, device=device)
    meta = dict(device=str(device), device_name=device_name(device), threads=n_threads, batch_size=int(batch_size),
                torch=torch.__version__, dtype='float32', mlp_points=mlp_points, parts=len(items),
                load_avg=load_before, load_avg_after=load_average(),
                created=time.strftime('%Y-%m-%dT%H:%M:%S'), **summary)
    table = LatencyTable(
        space=space.to_dict(), meta=meta,
        blocks={k[1:]: v for k, v in times.items() if k[0] == 'block'},
        reductions={k[1:]: v for k, v in times.items() if k[0] == 'reduction'},
        stems={k[1]: v for k, v in times.items() if k[0] == 'stem'},
        heads={k[1]: v for k, v in times.items() if k[0] == 'head'})
    if calib:
        ratios = [times[('network', j)] / table.parts(space, a)['sum'] for j, a in enumerate(calib)]
        table.scale = float(np.median(ratios))
        meta.update(calibration=dict(networks=len(calib), ratios=ratios))
    return table


def _parts(space: SearchSpace, batch_size: int, device, mlp_points: Optional[int], calibrate: int,
           seed: int) -> tuple:
    """Every part to time (key -> (module on ``device``, input)) and the calibration networks."""
    x = _inputs(batch_size, device, torch.Generator().manual_seed(seed))
    tokens, grids = stage_tokens(space), stage_grids(space)
    prefix = 2 if space.distilled else 1
    items: Dict[tuple, Tuple[nn.Module, torch.Tensor]] = {}
    for s, c, h, m in _grid(space, mlp_points):
        items[('block', s, c, h, m)] = (_block(space, c, h, m), x((tokens[s], c)))
    for s in range(1, len(space.widths)):
        for ci in space.widths[s - 1]:
            for co in space.widths[s]:
                red = ResidualSpatialReduction(ci, co, (grids[s - 1],) * 2, prefix)
                items[('reduction', s, ci, co)] = (red, x((tokens[s - 1], ci)))
    for c in space.widths[0]:
        items[('stem', c)] = (_Stem(space, c), x((space.in_chans, space.img_size, space.img_size)))
    for c in space.widths[-1]:
        items[('head', c)] = (_Head(space, c), x((tokens[-1], c)))
    calib = _calibration_archs(space, calibrate, seed)
    for j, arch in enumerate(calib):
        items[('network', j)] = (ViTRes(**space.model_args(arch)), x((space.in_chans, space.img_size, space.img_size)))
    return {k: (m.to(device), v) for k, (m, v) in items.items()}, calib


def _calibration_archs(space: SearchSpace, n: int, seed: int) -> List[Arch]:
    """``n`` sub-networks: the smallest, the largest, then distinct random ones."""
    if n <= 0:
        return []
    out = [space.smallest(), space.largest()][:n]
    if n > 2:
        seen = {space.canonical(a) for a in out}
        out += [a for a in space.sample_distinct(n - 2 + len(seen), random.Random(seed))
                if space.canonical(a) not in seen][:n - 2]
    return out


def time_models(space: SearchSpace, models: Dict[object, nn.Module], *, batch_size: int = 1, rounds: int = 3,
                threads: Optional[int] = None, device=None, seed: int = 0, target_ms: float = 2.0) -> Tuple[dict, dict]:
    """Milliseconds per forward of every model in ``models`` (key -> module taking ``space``'s
    images, a ViT-Res sub-network or any other network of that input), with the paired timing of
    the latency tables (the same reference block), so the times compare with ``space``'s table
    predictions. Returns the times and the timing's settings (threads, batch, load average)."""
    device = torch.device(device or 'cpu')
    x = _inputs(batch_size, device, torch.Generator().manual_seed(seed))
    items = {k: (m.to(device), x((space.in_chans, space.img_size, space.img_size))) for k, m in models.items()}
    with torch.random.fork_rng():   # seeded weights, the caller's random state untouched
        torch.manual_seed(seed)
        ref, shape = _reference(space)
    with num_threads(threads) as n_threads:
        times, summary = paired_times(items, (ref.to(device), x(shape)), rounds=rounds, seed=seed,
                                      target_ms=target_ms, device=device)
    return times, dict(summary, threads=n_threads, batch_size=int(batch_size), device=str(device),
                       load_avg=load_average())


def check_predictions(space: SearchSpace, table: LatencyTable, archs: Sequence[Arch], *, supernet=None,
                      rounds: int = 3, threads: Optional[int] = None, device=None, seed: int = 0,
                      target_ms: float = 2.0) -> dict:
    """Predicted against measured milliseconds of the stand-alone sub-networks ``archs``
    (``supernet.subnet(arch)`` when a supernet is given, else freshly built ViT-Res), measured with
    the table's batch size and threads and the same paired timing (:func:`time_models`). Returns
    ``rows`` (arch, predicted_ms, measured_ms, ratio = predicted / measured), ``mean_abs_rel_error``,
    ``spearman`` (rank correlation, None for fewer than 3 archs) and ``settings``. Reports; asserts
    nothing."""
    table.check_space(space)
    with torch.random.fork_rng():   # seeded weights, the caller's random state untouched
        torch.manual_seed(seed)
        models = {j: supernet.subnet(arch) if supernet is not None else ViTRes(**space.model_args(arch))
                  for j, arch in enumerate(archs)}
    measured, settings = time_models(
        space, models, batch_size=int(table.meta.get('batch_size', 1)), rounds=rounds, device=device, seed=seed,
        threads=threads if threads is not None else table.meta.get('threads'), target_ms=target_ms)
    rows = []
    for j, arch in enumerate(archs):
        pred = table.predict(space, arch)
        rows.append(dict(arch=arch.to_dict(), predicted_ms=pred, measured_ms=measured[j],
                         ratio=pred / measured[j] if measured[j] > 0 else None))
    errors = [abs(r['predicted_ms'] - r['measured_ms']) / r['measured_ms'] for r in rows if r['measured_ms'] > 0]
    spearman = None
    if len(rows) >= 3:
        import warnings
        from scipy.stats import spearmanr
        with warnings.catch_warnings():   # constant input: no correlation (None)
            warnings.simplefilter('ignore')
            rho = float(spearmanr([r['predicted_ms'] for r in rows], [r['measured_ms'] for r in rows])[0])
        spearman = None if rho != rho else rho
    return dict(rows=rows, mean_abs_rel_error=float(np.mean(errors)) if errors else None, spearman=spearman,
                settings=dict(settings, table_threads=table.meta.get('threads')))
