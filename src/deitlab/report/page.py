"""The report as one self-contained HTML page, drawn with plotly (offline: plotly.js is written into
the page once, nothing is fetched when it is viewed).

The page holds, top to bottom:

* two charts, top-1 against GMACs (``#chart-gmacs``) and against measured batch-1 latency
  (``#chart-latency``): one marker per model that has both numbers, one trace per source, a marker
  shape per dataset; the Pareto front of each dataset (highest top-1 for the cost) drawn as a
  staircase over its models in a trace of its own. Hovering a marker shows the model's numbers,
  clicking it opens its details;
* a table of every model (``#models``): source, dataset, top-1, GMACs, parameters, latency and
  whether it is on a front; clicking a column's header sorts the rows by it (again: the other way);
* per-model details, one collapsible section each (``#model-N``): the numbers and how they were
  obtained, the per-block widths (bars against the dense model's when known), the training curve
  (validation top-1 and training loss per epoch) and the configuration as JSON; their charts are
  drawn when the section is first opened;
* the machine and settings the numbers come from, per source, and where the page was built.

The only hand-written JavaScript is the table's sort, the lazy drawing of the detail charts and the
click from a marker to its details.
"""
from __future__ import annotations

import datetime
import html
import json
import os
import platform
import sys
from typing import Dict, List, Optional, Sequence

from .records import WIDTH_KEYS, ModelRecord, ReportError, front_of

__all__ = ['render_page', 'require_plotly', 'AXES']

#: chart axis -> (record attribute, axis title, id of the chart's element)
AXES = {'gmacs': ('gmacs', 'GMACs per image', 'chart-gmacs'),
        'latency': ('latency_ms', 'latency at batch 1 (ms, measured)', 'chart-latency')}
_SYMBOLS = ('circle', 'square', 'diamond', 'triangle-up', 'cross', 'x', 'star', 'hexagon', 'pentagon')
_DENSE_COLOUR, _MODEL_COLOUR = '#c8c8c8', '#1f77b4'
#: every chart's plotly config: no logo, and no button that would send the chart to a server
PLOT_CONFIG = {'displaylogo': False, 'responsive': True, 'showSendToCloud': False}
EXTRA_HINT = "pip install 'deitlab[report]'"


def require_plotly():
    """The plotly modules the page is drawn with, or a ReportError saying how to install plotly."""
    try:
        import plotly
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.subplots import make_subplots
    except ImportError:
        raise ReportError(f'deitlab report draws its charts with plotly, which is not installed: {EXTRA_HINT} '
                          f'(or pip install plotly)') from None
    return plotly, go, pio, make_subplots


def _fmt(value, digits: int) -> str:
    return '' if value is None else f'{value:.{digits}f}'


def _machine_line(machine: Optional[dict]) -> str:
    """A few words on where a source's speed was measured (device, threads), for the hover text."""
    if not machine:
        return ''
    device = machine.get('device_name') or (machine.get('lut_meta') or {}).get('device') or machine.get('device')
    threads = machine.get('threads')
    return ', '.join(str(p) for p in (device, f'{threads} threads' if threads else None) if p)


def _hover(r: ModelRecord) -> str:
    lines = [f'<b>{html.escape(r.name)}</b>', f'top-1 {r.top1:.2f}%' if r.top1 is not None else 'top-1: none',
             f'{r.gmacs:.4f} GMACs' if r.gmacs is not None else 'GMACs: none']
    if r.params is not None:
        lines.append(f'{r.params / 1e6:.3f} M params')
    if r.latency_ms is not None:
        where = _machine_line(r.machine)
        lines.append(f'{r.latency_ms:.3f} ms at batch 1' + (f' ({html.escape(where)})' if where else ''))
    lines.append(f'{html.escape(r.source)} · {html.escape(str(r.data))}')
    return '<br>'.join(lines)


def _scatter(go, records: Sequence[ModelRecord], axis: str, fronts: Dict, title: str):
    """One axis's chart: a marker trace per source (``meta='models'``), a front trace per dataset
    (``meta='pareto'``)."""
    attr, label, _ = AXES[axis]
    fig = go.Figure()
    datasets = list(dict.fromkeys(r.data for r in records))
    symbol = {d: _SYMBOLS[i % len(_SYMBOLS)] for i, d in enumerate(datasets)}
    sources = list(dict.fromkeys(r.source for r in records if r.has(attr)))
    for source in sources:
        idx = [i for i, r in enumerate(records) if r.source == source and r.has(attr)]
        fig.add_trace(go.Scatter(
            x=[getattr(records[i], attr) for i in idx], y=[records[i].top1 for i in idx], mode='markers',
            name=source, meta='models', customdata=idx, hovertext=[_hover(records[i]) for i in idx],
            hoverinfo='text', marker=dict(size=9, symbol=[symbol[records[i].data] for i in idx], opacity=.85,
                                          line=dict(width=.5, color='#333'))))
    for data, idx in fronts.items():
        fig.add_trace(go.Scatter(
            x=[getattr(records[i], attr) for i in idx], y=[records[i].top1 for i in idx], mode='lines+markers',
            line=dict(shape='hv', dash='dot', color='#222', width=1.5), name=f'Pareto front: {data}',
            meta='pareto', customdata=idx, hoverinfo='skip',
            marker=dict(size=16, symbol=f'{symbol[data]}-open', color='#d62728', line=dict(width=2))))
    values = [getattr(r, attr) for r in records if r.has(attr)]
    log_x = min(values) > 0 and max(values) / min(values) >= 20
    fig.update_layout(title=title, xaxis_title=label + (' (log scale)' if log_x else ''), yaxis_title='top-1 (%)',
                      template='plotly_white', hovermode='closest', legend=dict(font=dict(size=11)),
                      margin=dict(l=60, r=20, t=50, b=50))
    if log_x:
        fig.update_xaxes(type='log')
    return fig


def _widths_figure(go, make_subplots, r: ModelRecord):
    panels = [(k, label) for k, label in WIDTH_KEYS if k in r.widths]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[label for _, label in panels])
    dense = r.dense_widths or {}
    for col, (key, _) in enumerate(panels, start=1):
        blocks = list(range(len(r.widths[key])))
        if key in dense:
            fig.add_trace(go.Bar(x=blocks, y=dense[key], name='dense', marker_color=_DENSE_COLOUR,
                                 showlegend=col == 1, legendgroup='dense'), row=1, col=col)
        fig.add_trace(go.Bar(x=blocks, y=r.widths[key], name='this model', marker_color=_MODEL_COLOUR,
                             width=.55 if key in dense else None, showlegend=col == 1, legendgroup='model'),
                      row=1, col=col)
        fig.update_xaxes(title_text='block', dtick=1, row=1, col=col)
    title = 'per-block widths'
    if 'embed_dim' in r.widths:
        title += f' (embedding {dense["embed_dim"]} -> {r.widths["embed_dim"]})' if 'embed_dim' in dense \
            else f' (embedding {r.widths["embed_dim"]})'
    fig.update_layout(title=title, barmode='overlay', height=300, margin=dict(l=40, r=10, t=60, b=40),
                      plot_bgcolor='white')
    return fig


def _curve_figure(go, make_subplots, r: ModelRecord):
    fig = make_subplots(specs=[[{'secondary_y': True}]])
    rows = r.curve
    for key, name, second, colour in (('val_top1', 'validation top-1 (%)', False, '#1f77b4'),
                                      ('train_loss', 'training loss', True, '#ff7f0e')):
        pts = [(row['epoch'], row[key]) for row in rows if key in row]
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=name, mode='lines+markers',
                                     line=dict(color=colour)), secondary_y=second)
    fig.update_xaxes(title_text='epoch')
    fig.update_yaxes(title_text='top-1 (%)', secondary_y=False)
    fig.update_yaxes(title_text='loss', secondary_y=True, zeroline=False, showgrid=False)
    fig.update_layout(title='training curve', height=300, margin=dict(l=50, r=50, t=50, b=40), plot_bgcolor='white')
    return fig


def _lazy_figure(fig, key: str) -> str:
    """A figure drawn when its details section opens: its JSON in a script element (without the
    layout template, which every figure would otherwise repeat) and an empty element to draw in."""
    spec = json.loads(fig.to_json())
    spec.get('layout', {}).pop('template', None)
    text = json.dumps(spec, separators=(',', ':')).replace('</', '<\\/')
    return (f'<script type="application/json" id="{key}">{text}</script>'
            f'<div class="figure" data-figure="{key}"></div>')


_COLUMNS = (('model', None), ('source', None), ('dataset', None), ('top-1 (%)', 2), ('GMACs', 4),
            ('params (M)', 3), ('latency (ms)', 3), ('Pareto front', None))


def _table(records: Sequence[ModelRecord], on_front: Dict[int, List[str]]) -> str:
    head = ''.join(f'<th scope="col" title="click to sort">{html.escape(c)}</th>' for c, _ in _COLUMNS)
    body = []
    for i, r in enumerate(records):
        values = (r.name, r.source, r.data, r.top1, r.gmacs, None if r.params is None else r.params / 1e6,
                  r.latency_ms, ', '.join(on_front.get(i, [])))
        cells = []
        for (col, digits), v in zip(_COLUMNS, values):
            if digits is not None:
                sort, text = ('' if v is None else repr(float(v))), _fmt(v, digits)
            else:
                sort = text = '' if v is None else str(v)
            shown = f'<a href="#model-{i}">{html.escape(text)}</a>' if col == 'model' else html.escape(text)
            cells.append(f'<td data-value="{html.escape(sort)}">{shown}</td>')
        body.append(f'<tr>{"".join(cells)}</tr>')
    return (f'<table id="models" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        rows.append(f'<tr><th scope="row">{html.escape(str(k))}</th><td>{html.escape(text)}</td></tr>')
    return f'<table class="kv">{"".join(rows)}</table>'


def _details(go, make_subplots, i: int, r: ModelRecord, fronts: List[str]) -> str:
    numbers = {'source': r.source, 'dataset': r.data, 'top-1 (%)': _fmt(r.top1, 2) or 'not recorded',
               'GMACs': _fmt(r.gmacs, 4) or 'not recorded',
               'params (M)': _fmt(None if r.params is None else r.params / 1e6, 3) or 'not recorded',
               'latency (ms, batch 1)': _fmt(r.latency_ms, 3) or 'not measured',
               'Pareto front': ', '.join(fronts) or 'no'}
    if r.notes:
        numbers['how'] = r.notes
    numbers.update({k: f'{v:.4g}' if isinstance(v, float) else v for k, v in r.extra.items()})
    parts = [_kv_table(numbers)]
    if r.widths and any(k in r.widths for k, _ in WIDTH_KEYS):
        parts.append(_lazy_figure(_widths_figure(go, make_subplots, r), f'fig-{i}-widths'))
    if r.curve and len(r.curve) > 1:
        parts.append(_lazy_figure(_curve_figure(go, make_subplots, r), f'fig-{i}-curve'))
    if r.config:
        text = json.dumps(r.config, indent=2, default=str)
        parts.append(f'<details class="config"><summary>configuration</summary><pre>{html.escape(text)}</pre>'
                     f'</details>')
    summary = f'{html.escape(r.name)} <span class="muted">({html.escape(r.source)})</span>'
    return f'<details class="model" id="model-{i}"><summary>{summary}</summary>{"".join(parts)}</details>'


def _machines(records: Sequence[ModelRecord]) -> str:
    """One block per distinct machine-and-settings record, naming the sources that share it."""
    groups: Dict[str, List[str]] = {}
    keep: Dict[str, dict] = {}
    for r in records:
        key = json.dumps(r.machine, sort_keys=True, default=str)
        keep[key] = r.machine
        if r.source not in groups.setdefault(key, []):
            groups[key].append(r.source)
    parts = []
    for key, sources in groups.items():
        shown = ', '.join(sources[:6]) + (f' and {len(sources) - 6} more' if len(sources) > 6 else '')
        body = _kv_table(keep[key]) if keep[key] else '<p class="muted">the source records no settings</p>'
        parts.append(f'<h3>{html.escape(shown)}</h3>{body}')
    return ''.join(parts)


def built_here(plotly_version: str) -> dict:
    """Where and when the page was built."""
    from .. import __version__
    return {'built (UTC)': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
            'deitlab': __version__, 'plotly': plotly_version, 'python': sys.version.split()[0],
            'platform': platform.platform(), 'processor': platform.processor() or platform.machine(),
            'cpu count': os.cpu_count()}


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1em;margin-bottom:.3em}
.chart{margin-bottom:1em}.muted{color:#777}.note{background:#f7f7f2;padding:.5em 1em}
table{border-collapse:collapse;font-size:.88em}td,th{padding:.25em .6em;border-bottom:1px solid #eee;text-align:left}
#models th{cursor:pointer;background:#f3f3f3;position:sticky;top:0}
#models th[aria-sort=ascending]::after{content:" \\25B2"}
#models th[aria-sort=descending]::after{content:" \\25BC"}#models td[data-value]{white-space:nowrap}
table.kv th{font-weight:normal;color:#555}table.kv td{word-break:break-word}
details.model{margin:.3em 0;border:1px solid #e4e4e4;padding:.3em .7em}details.model>summary{cursor:pointer}
.figure{height:300px}pre{background:#fafafa;padding:.6em;overflow:auto;max-height:30em;font-size:.85em}
"""

# the table's sort, the detail charts drawn when opened, a marker's click opening its details
_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.getAttribute('aria-sort') !== 'ascending';
  const key = row => { const v = row.cells[col].dataset.value; return v === '' || isNaN(v) ? v : Number(v); };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === '' || y === '') return (x === '') - (y === '');
    const order = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return up ? order : -order;
  });
  th.parentNode.querySelectorAll('th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
  rows.forEach(row => body.appendChild(row));
}));
document.querySelectorAll('details.model').forEach(d => d.addEventListener('toggle', () => {
  if (!d.open) return;
  d.querySelectorAll('div[data-figure]:not([data-drawn])').forEach(div => {
    const fig = JSON.parse(document.getElementById(div.dataset.figure).textContent);
    Plotly.newPlot(div, fig.data, fig.layout, PLOT_CONFIG);
    div.dataset.drawn = '1';
  });
}));
document.querySelectorAll('div.js-plotly-plot').forEach(gd => gd.on('plotly_click', e => {
  const d = document.getElementById('model-' + e.points[0].customdata);
  if (d) { d.open = true; d.scrollIntoView(); }
}));
"""


def render_page(records: Sequence[ModelRecord], title: str, sources: Sequence[str]) -> str:
    """The whole page (see the module docstring) for ``records``, which come from ``sources``."""
    plotly, go, pio, make_subplots = require_plotly()
    from plotly.offline import get_plotlyjs

    on_front: Dict[int, List[str]] = {}
    charts, counts = [], {}
    for axis, (attr, label, element) in AXES.items():
        fronts = front_of(records, attr)
        for idx in fronts.values():
            for i in idx:
                on_front.setdefault(i, []).append(axis)
        counts[axis] = sum(r.has(attr) for r in records)
        heading = f'top-1 against {label}'
        if counts[axis]:
            fig = _scatter(go, records, axis, fronts, heading)
            charts.append(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=element,
                                      default_height='540px', config=PLOT_CONFIG))
        else:
            what = 'a measured latency (run directories are timed with --measure)' if axis == 'latency' else 'GMACs'
            charts.append(f'<p class="note" id="{element}">No model has both top-1 and {what}.</p>')
    datasets = sorted({str(r.data) for r in records})
    intro = (f'{len(records)} models from {len(set(r.source for r in records))} source(s), '
             f'{len(datasets)} dataset(s): {html.escape(", ".join(datasets))}. The charts show every model with a '
             f'top-1 and the cost on their axis ({counts["gmacs"]} against GMACs, {counts["latency"]} against '
             f'latency); the table lists all of them.')
    caution = ('Pareto fronts are drawn per dataset. Latencies measured on different machines or with different '
               'settings (see <a href="#machine">Machine and settings</a>) are only comparable within one source.')
    details = ''.join(_details(go, make_subplots, i, r, on_front.get(i, [])) for i, r in enumerate(records))
    built = built_here(plotly.__version__)
    built['sources'] = list(sources)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>{html.escape(title)}</h1>
<p>{intro}</p>
<p class="note">{caution}</p>
<h2 id="charts">Accuracy against cost</h2>
<div class="chart">{charts[0]}</div><div class="chart">{charts[1]}</div>
<h2 id="table">Models</h2><p class="muted">Click a column's header to sort by it; a model's name opens its
details.</p>
{_table(records, on_front)}
<h2 id="details">Per-model details</h2>{details}
<h2 id="machine">Machine and settings</h2>
<p>What each source records about the machine and the settings its numbers come from:</p>{_machines(records)}
<h3>This page</h3>{_kv_table(built)}
<script>const PLOT_CONFIG = {json.dumps(PLOT_CONFIG)};{_SCRIPT}</script>
</body></html>
"""
