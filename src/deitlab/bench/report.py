"""Turning measurements into text tables and plots."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

__all__ = ['format_table', 'format_benchmark', 'format_compare', 'ratio_range', 'plot_tradeoff']

Column = Union[str, Sequence[str]]


def _cell(value, digits: int) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        if math.isnan(value):
            return 'nan'
        return f'{value:.{digits}f}'
    if isinstance(value, (list, tuple)):
        return 'x'.join(str(v) for v in value)
    return str(value)


def format_table(rows: Sequence[dict], columns: Optional[Iterable[Column]] = None,
                 digits: Union[int, Dict[str, int]] = 3) -> str:
    """A fixed-width text table of ``rows`` (dicts).

    ``columns`` lists the keys to show, in order; an entry may be a ``(key, header)`` pair to
    rename the column. Default: the keys of the first row whose values are not dicts. Floats get
    ``digits`` decimals (an int, or a dict key -> decimals; 3 otherwise), lists and tuples are
    joined with 'x' (input sizes), None shows as '-'. Numbers are right-aligned, text left.
    """
    rows = list(rows)
    if columns is None:
        columns = [k for k, v in rows[0].items() if not isinstance(v, dict)] if rows else []
    keys, headers = [], []
    for c in columns:
        if isinstance(c, str):
            keys.append(c)
            headers.append(c)
        else:
            keys.append(c[0])
            headers.append(c[1])
    cells, numeric = [], [True] * len(keys)
    for row in rows:
        line = []
        for j, k in enumerate(keys):
            v = row.get(k)
            d = digits.get(k, 3) if isinstance(digits, dict) else digits
            line.append(_cell(v, d))
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                numeric[j] = False
        cells.append(line)
    widths = [max([len(h)] + [len(line[j]) for line in cells]) for j, h in enumerate(headers)]

    def fmt(parts: List[str]) -> str:
        return '  '.join(p.rjust(w) if numeric[j] else p.ljust(w) for j, (p, w) in enumerate(zip(parts, widths))).rstrip()

    out = [fmt(headers), '  '.join('-' * w for w in widths)]
    out.extend(fmt(line) for line in cells)
    return '\n'.join(out)


RATIO_KEYS = ('throughput_ratio', 'latency_speedup')


def ratio_range(row: dict, key: str, digits: int = 2) -> Optional[str]:
    """``'1.64 (1.58-1.71)'``: a ``compare`` ratio (median over rounds) and the range of its
    rounds; the bare ratio when the row has no range, None when it has no ratio."""
    v = row.get(key)
    if v is None:
        return None
    lo, hi = row.get(f'{key}_lo'), row.get(f'{key}_hi')
    if lo is None or hi is None or row.get('baseline'):
        return f'{v:.{digits}f}'
    return f'{v:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})'


def format_compare(rows: Sequence[dict], columns: Optional[Iterable[Column]] = None,
                   digits: Union[int, Dict[str, int]] = 3, ratio_digits: int = 2) -> str:
    """``format_table`` for ``compare`` rows, with each speed ratio (``throughput_ratio``,
    ``latency_speedup``) shown as its median over the rounds and, in brackets, the range of the
    per-round ratios (``ratio_range``)."""
    shown = []
    for row in rows:
        row = dict(row)
        for key in RATIO_KEYS:
            if key in row:
                row[key] = ratio_range(row, key, ratio_digits)
        shown.append(row)
    return format_table(shown, columns, digits)


def format_benchmark(result: dict) -> str:
    """Human-readable lines for one ``benchmark_model`` result."""
    s = result.get('settings', {})
    lines = [f"model        {result.get('model')}",
             f"input        {_cell(result.get('input_size'), 0)}",
             f"params       {result['params'] / 1e6:.3f} M"]
    ana = result.get('gmacs_analytic')
    lines.append(f"GMACs        {result['gmacs']:.4f} (counted, fused attention off)"
                 + (f", closed form {ana:.4f}" if ana is not None else ''))
    lat = result.get('latency')
    if lat:
        lines.append(f"latency      {lat['median_ms']:.3f} ms median (p10 {lat['p10_ms']:.3f}, "
                     f"p90 {lat['p90_ms']:.3f}) at batch 1")
    thr = result.get('throughput')
    if thr:
        lines.append(f"throughput   {thr['images_per_s']:.1f} images/s at batch {thr['settings']['batch_size']}")
    mem = result.get('memory')
    if mem:
        lines.append(f"peak memory  {mem['peak_mb']:.1f} MiB at batch {mem['settings']['batch_size']} "
                     f"(weights {mem['weights_mb']:.1f}, forward {mem['forward_peak_mb']:.1f}; {mem['method']})")
    if s:
        lines.append(f"settings     {s.get('device')} ({s.get('device_name')}), {s.get('dtype')}, amp {s.get('amp')}, "
                     f"{s.get('threads')} threads, fused attention {s.get('fused_attn')}, torch {s.get('torch')}, "
                     f"timm {s.get('timm')}, load average {s.get('load_avg')}")
    return '\n'.join(lines)


def plot_tradeoff(rows: Sequence[dict], x: str = 'gmacs', y: str = 'images_per_s', label: str = 'name',
                  path: Optional[str] = None, title: Optional[str] = None, ax=None, xlabel: Optional[str] = None,
                  ylabel: Optional[str] = None):
    """Scatter ``y`` against ``x`` for the rows (one labelled point each; a row with
    ``baseline`` true is drawn as a star). Saves a PNG to ``path`` when given and returns the
    matplotlib Axes. A new figure is a bare ``matplotlib.figure.Figure``, so pyplot's global
    state and backend are left alone."""
    if ax is None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6, 4.5), dpi=120)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    for row in rows:
        if row.get(x) is None or row.get(y) is None:
            continue
        ax.scatter(row[x], row[y], marker='*' if row.get('baseline') else 'o', s=120 if row.get('baseline') else 40)
        ax.annotate(str(row.get(label, '')), (row[x], row[y]), textcoords='offset points', xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path)
    return ax
