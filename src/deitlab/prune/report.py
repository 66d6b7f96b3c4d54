"""What a pruning run bought: accuracy, params, GMACs, measured and predicted speed-up, and the
per-block widths against the dense model (NViT's "parameter redistribution" picture). Widths and
closed-form GMACs come from the model's layout (families.py), so a pruned PoolFormer / SpectFormer
reports its MLP widths only.

Every measured result compares the latency table's predicted speed-up with the measured one
(``prediction_error = predicted / measured - 1``, per row and in ``report['prediction']``) and,
beyond ``PREDICTION_TOLERANCE``, says in one line what usually causes the gap."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.nn as nn

from .families import PruneError, layout_of
from .latency import ALIGN

PREDICTION_TOLERANCE = 0.10
WIDTH_PANELS = (('num_heads', 'heads'), ('qk_dim', 'QK dim / head'), ('v_dim', 'V dim / head'),
                ('mlp_hidden', 'MLP hidden'))


def widths_of(model: nn.Module) -> dict:
    """The model's widths in the vocabulary of ``Masks.kept()`` (``layout_of(model).widths()``)."""
    return layout_of(model).widths()


def plot_widths(dense: dict, pruned: dict, path, title: str = '') -> Path:
    """Bars of heads, QK dim, V dim and MLP width per block, dense (grey) against pruned (only the
    widths the model has: MLP width for PoolFormer / SpectFormer)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(key, label) for key, label in WIDTH_PANELS if key in dense]
    depth = len(dense[panels[0][0]])
    x = np.arange(depth)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels) + (3 if len(panels) == 1 else 0), 3.3),
                             squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(x, dense[key], color='0.82', label='dense')
        ax.bar(x, pruned[key], color='tab:blue', width=0.55, label='pruned')
        ax.set_title(label)
        ax.set_xlabel('block')
        ax.set_xticks(x)
        ax.grid(axis='y', alpha=.3)
    axes[0].legend(fontsize=8)
    if 'embed_dim' in dense:
        title = f'{title}  embedding {dense["embed_dim"]} -> {pruned["embed_dim"]}'
    fig.suptitle(title.strip())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed_rows(models: dict, baseline: str, batch_size: int, lut=None, quick: bool = False,
               rounds: Optional[int] = None, threads: Optional[int] = None) -> list:
    """``bench.compare`` rows (interleaved, one process) plus the LUT's predicted speed-up and
    ``prediction_error = predicted_speedup / throughput_ratio - 1`` (the table times batches of its
    ``batch_size``: compare it with the measured throughput at the same batch)."""
    from ..bench import compare
    rows = compare(models, baseline, batch_size=batch_size, quick=quick, rounds=rounds, threads=threads)
    if lut is not None:
        family = layout_of(models[baseline]).family
        base_ms = lut.model_ms(widths_of(models[baseline]))
        for r in rows:   # the table describes the baseline's family only
            m = models[r['name']]
            same = _family(m) == family
            r['predicted_speedup'] = base_ms / lut.model_ms(widths_of(m)) if same else None
            if r['predicted_speedup'] is not None and r.get('throughput_ratio'):
                r['prediction_error'] = r['predicted_speedup'] / r['throughput_ratio'] - 1.0
    return rows


def off_grid_widths(lut, widths: dict) -> dict:
    """Widths of a model that lie between the table's nodes and are not multiples of ``ALIGN``, per
    axis (``{'emb': [95], 'qk': [20], 'v': [28, 20]}``): interpolation between aligned nodes
    underestimates them (a DeiT-nano block at 2 threads: qk 20 took 4.9 ms, qk 16 and 32 4.6-4.7 ms)
    unless the table prices them (``LatencyTable.misalign``)."""
    if hasattr(lut, 'axes'):
        axes = dict(emb='embed_dim', qk='qk_dim', v='v_dim', mlp='mlp_hidden')
        nodes = {k: set(lut.axes[k]) for k in axes}
    elif hasattr(lut, 'kinds'):
        axes = dict(mlp='mlp_hidden')
        nodes = {'mlp': {m for d in lut.kinds.values() for m in d['mlp']}}
    else:
        return {}
    out = {}
    for k, key in axes.items():
        values = widths.get(key, [])
        bad = [int(w) for w in (values if isinstance(values, (list, tuple)) else [values])
               if int(w) not in nodes[k] and int(w) % ALIGN]
        if bad:
            out[k] = bad
    return out


def prediction_check(row: dict, lut, settings: Optional[dict] = None, off_grid: Optional[dict] = None) -> Optional[dict]:
    """The table's predicted speed-up of one ``speed_rows`` row against the measured throughput
    ratio: ``predicted_speedup``, ``measured_speedup`` (with its range over the rounds),
    ``prediction_error`` and, when they differ by more than ``PREDICTION_TOLERANCE``, a one-line
    ``warning`` naming the likely causes: settings that differ between the table and the
    measurement (batch, threads, malloc; ``settings`` defaults to the row's), an oversubscribed CPU,
    the model's ``off_grid`` widths (``off_grid_widths``), a table timed on a busy CPU, then the usual
    suspects.
    None without both numbers."""
    pred, meas = row.get('predicted_speedup'), row.get('throughput_ratio')
    if pred is None or not meas:
        return None
    err = pred / meas - 1.0
    meta = getattr(lut, 'meta', {}) or {}
    settings = settings if settings is not None else (row.get('settings') or {})
    measured_batch, measured_threads = settings.get('batch_size'), settings.get('threads')
    measured_malloc = settings.get('malloc')
    out = dict(predicted_speedup=round(pred, 4), measured_speedup=round(meas, 4), prediction_error=round(err, 4),
               table_batch_size=meta.get('batch_size'), table_threads=meta.get('threads'),
               measured_batch_size=measured_batch, measured_threads=measured_threads)
    for key in ('lo', 'hi'):   # the range of the measured ratio over compare's rounds
        if row.get(f'throughput_ratio_{key}') is not None:
            out[f'measured_speedup_{key}'] = round(row[f'throughput_ratio_{key}'], 4)
    if abs(err) <= PREDICTION_TOLERANCE:
        return out
    from ..bench.speed import contention_warning
    causes = []
    if contention_warning(settings):
        causes.append(f'the CPU was oversubscribed while measuring (load average '
                      f'{settings.get("load_avg_after", settings.get("load_avg"))} on {settings.get("cpu_count")} cores)')
    if measured_batch is not None and meta.get('batch_size') not in (None, measured_batch):
        causes.append(f'the table was timed at batch {meta["batch_size"]}, the speed at {measured_batch}')
    if measured_threads is not None and meta.get('threads') not in (None, measured_threads):
        causes.append(f'the table was timed on {meta["threads"]} threads, the speed on {measured_threads}')
    if measured_malloc is not None and meta.get('malloc') is not None and \
            _malloc_key(meta['malloc']) != _malloc_key(measured_malloc):
        causes.append('the table and the speed were timed under different malloc settings')
    whole = (meta.get('whole_model') or {}).get('ratio')
    if whole is not None and abs(whole - 1.0) > PREDICTION_TOLERANCE:
        causes.append(f'the dense model measured {whole:.2f}x the sum of its timed parts')
    if off_grid and err > 0 and not getattr(lut, 'misalign', None):
        listed = ', '.join(f'{k} {"/".join(map(str, sorted(set(v), reverse=True)))}' for k, v in off_grid.items())
        causes.append(f'widths between the table\'s nodes that are not multiples of {ALIGN} ({listed}) run slower than '
                      f'the interpolation gives (--round-to {ALIGN} keeps them aligned)')
    load, cores = meta.get('load_average'), meta.get('cpu_count')
    if load is not None and cores and load > cores + 0.5:
        causes.append(f'the table was timed on an oversubscribed CPU (load average {load} on {cores} cores; '
                      f'--lut PATH reuses one timed on a quiet machine)')
    causes.append('machine load during either timing, the allocator (glibc malloc returning buffers to the OS), '
                  'small-shape per-operator overheads')
    out['warning'] = (f'the latency table predicted a {pred:.2f}x speed-up, measured {meas:.2f}x '
                      f'({err:+.0%}); likely: ' + '; '.join(causes))
    return out


def _family(model: nn.Module) -> Optional[str]:
    try:
        return layout_of(model).family
    except PruneError:
        return None


def _malloc_key(state):
    """Malloc settings without how they were set (mallopt or the environment)."""
    return {k: v for k, v in state.items() if k != 'how'} if isinstance(state, dict) else state


def finish_report(cfg, out: Path, dense: nn.Module, final: nn.Module, pruner, val_loader, device, is_main: bool,
                  extra: Optional[dict] = None) -> dict:
    from ..bench import count_params, format_table
    from ..evaluate import evaluate

    acc = {name: evaluate(m, val_loader, device, progress=False)['top1'] for name, m in (('dense', dense),
                                                                                      ('nvit', final))}
    if not is_main:   # under torchrun the others only join the (summed) evaluation
        return dict(rows=[dict(name='dense', top1=acc['dense']), dict(name='nvit', top1=acc['nvit'])],
                    run_dir=str(out), pruned_widths=widths_of(final))
    rows = []
    meta = getattr(pruner.lut, 'meta', None) or {}
    batch = meta.get('batch_size') or cfg.lut_batch     # measure at the table's batch and thread count
    threads = meta.get('threads') if device.type == 'cpu' else None
    prediction = None
    if pruner.lut is not None:
        prediction = dict(predicted_speedup=round(pruner.budget.dense['latency_ms'] /
                                                  pruner.lut.model_ms(widths_of(final)), 4),
                          measured_speedup=None, prediction_error=None)
    if cfg.measure:
        rows = speed_rows({'dense': dense, 'nvit': final}, 'dense', batch, pruner.lut, threads=threads)
        if pruner.lut is not None:
            prediction = prediction_check(next(r for r in rows if r['name'] == 'nvit'), pruner.lut,
                                          off_grid=off_grid_widths(pruner.lut, widths_of(final))) or prediction
            if prediction.get('warning'):
                from ..console import log
                log(f'warning: {prediction["warning"]}')
    else:
        for name, m in (('dense', dense), ('nvit', final)):
            rows.append(dict(name=name, params_m=count_params(m) / 1e6, gmacs=layout_of(m).gmacs()))
    for r in rows:
        r['top1'] = acc[r['name']]
    dw, pw = widths_of(dense), widths_of(final)
    plot = plot_widths(dw, pw, out / 'widths.png', title=f'NViT {pruner.budget.kind} target {pruner.budget.target}')
    report = dict(rows=rows, dense_widths=dw, pruned_widths=pw, target=dict(kind=pruner.budget.kind,
                  value=pruner.budget.target), estimate=pruner.estimate(), plot=str(plot), run_dir=str(out),
                  prediction=prediction, plan=pruner.plan, **(extra or {}))
    (out / 'report.json').write_text(json.dumps(report, indent=2, default=str))
    cols = ['name', 'top1', 'params_m', 'gmacs', 'latency_ms', 'images_per_s', 'latency_speedup',
            'throughput_ratio', 'predicted_speedup', 'prediction_error']
    report['table'] = format_table(rows, [c for c in cols if any(c in r for r in rows)])
    return report
