"""Model records from run directories (``config.json`` + ``model.safetensors``, and what training,
pruning or the search wrote beside them).

:func:`read_run_dir` reads the files (torch-free): top-1 from ``summary.json`` (else the last epoch of
``metrics.jsonl`` that has one, else the pruned model's row of a pruning run's ``report.json``), the dataset from ``summary.json`` / ``train_config.json``, the training
curve from ``metrics.jsonl``, per-block widths from ``config.json``'s ``model_args`` (a pruned model
records them there) and the dense model's from a pruning run's ``report.json``, and the configuration
(``config.json``'s architecture and arguments, ``train_config.json``). :func:`measure_runs` then
builds each model (``rundir.create``, as ``timm.create_model('local-dir:RUN_DIR')``) and counts its
parameters and GMACs (``bench.count_gmacs`` at its own input size) -- a run directory records
neither for every kind of run, and counting them from the weights on disk is exact -- and, when asked,
times them all at batch 1 in one process, interleaved (``bench.compare``), on the device given or the
default one.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import List, Optional, Sequence

from .records import WIDTH_KEYS, ModelRecord, ReportError

__all__ = ['find_run_dirs', 'read_run_dir', 'measure_runs', 'read_curve']

CONFIG, SUMMARY, METRICS, TRAIN_CONFIG, PRUNE_REPORT = ('config.json', 'summary.json', 'metrics.jsonl',
                                                        'train_config.json', 'report.json')
CURVE_KEYS = ('epoch', 'val_top1', 'val_top5', 'train_loss', 'val_loss')


def find_run_dirs(path) -> List[Path]:
    """``path`` if it is a run directory (it holds ``config.json``), else the run directories directly
    inside it, in name order; a ReportError when there are none."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
    if not runs:
        raise ReportError(f'{path} holds no run directory (no {CONFIG} in it or in the directories inside it): '
                          f'give run directories, a directory of them, or benchmark JSON files')
    return runs


def _json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f'{path} is not valid JSON ({e}); the run directory is damaged') from None
    return value if isinstance(value, dict) else None


def read_curve(path: Path) -> List[dict]:
    """The rows of ``metrics.jsonl`` that have an epoch, with the keys of :data:`CURVE_KEYS` (a line
    that is not JSON, e.g. cut short by an interrupted run, is skipped)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding='utf-8', errors='replace').splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get('epoch'), (int, float)):
            rows.append({k: row[k] for k in CURVE_KEYS if isinstance(row.get(k), (int, float))})
    return rows


def _widths(model_args: dict) -> Optional[dict]:
    widths = {k: list(model_args[k]) for k, _ in WIDTH_KEYS if isinstance(model_args.get(k), (list, tuple))}
    if not widths:
        return None
    if isinstance(model_args.get('embed_dim'), int):
        widths['embed_dim'] = model_args['embed_dim']
    return widths


def read_run_dir(path) -> ModelRecord:
    """One run directory's record, from its files alone (GMACs, parameters and latency are filled in by
    :func:`measure_runs`)."""
    path = Path(path)
    config = _json(path / CONFIG)
    if config is None:
        raise ReportError(f'{path} is not a run directory (no {CONFIG})')
    summary = _json(path / SUMMARY) or {}
    train_config = _json(path / TRAIN_CONFIG)
    prune = _json(path / PRUNE_REPORT) or {}
    curve = read_curve(path / METRICS)
    top1, how = summary.get('val_top1'), f'top-1: {SUMMARY}'
    if top1 is None:
        last = next((r for r in reversed(curve) if 'val_top1' in r), None)
        top1, how = (last['val_top1'], f'top-1: the last epoch of {METRICS}') if last else (None, 'no top-1 recorded')
    if top1 is None:   # a pruning run without fine-tuning: its report's row of the pruned model
        rows = [r for r in prune.get('rows') or [] if isinstance(r, dict) and r.get('name') != 'dense']
        if rows and isinstance(rows[-1].get('top1'), (int, float)):
            top1, how = rows[-1]['top1'], f'top-1: the pruned model\'s row of {PRUNE_REPORT}'
    data = summary.get('data') or (train_config or {}).get('data') or (prune.get('config') or {}).get('data')
    shown = {k: v for k, v in config.items() if k not in ('pretrained_cfg', 'label_names')}
    if config.get('label_names'):
        shown['label_names'] = f'{len(config["label_names"])} names'
    shown['input_size'] = (config.get('pretrained_cfg') or {}).get('input_size')
    record_config = {CONFIG: shown}
    if train_config:
        record_config[TRAIN_CONFIG] = train_config
    if prune.get('target'):
        record_config['pruning'] = {k: prune[k] for k in ('target', 'dense_dir', 'prune_steps', 'events')
                                    if k in prune}
    extra = {k: summary[k] for k in ('val_top5', 'best_top1', 'epochs', 'train_time_s') if k in summary}
    return ModelRecord(name=path.name, source=str(path), kind='run', data=data, top1=top1,
                       widths=_widths(config.get('model_args') or {}), dense_widths=prune.get('dense_widths'),
                       curve=curve or None, config=record_config, notes=how, extra=extra)


def measure_runs(records: Sequence[ModelRecord], paths: Sequence[Path], measure: bool = False, device=None,
                 quick: bool = False, progress: Optional[bool] = None) -> dict:
    """Fill in each record's ``params`` and ``gmacs`` from its model and, with ``measure``, its
    ``latency_ms`` (batch 1, all models interleaved in one process by ``bench.compare``, on
    ``device``: default CUDA when available, else the CPU). Returns the machine and settings the
    numbers come from, which every record also gets as its ``machine``."""
    import torch

    from ..bench import compare, count_gmacs, count_params
    from ..console import log
    from ..distributed import resolve_device
    from ..rundir import create

    dev = resolve_device(device)
    machine = dict(gmacs='counted from the weights on disk (deitlab.bench.count_gmacs, fused attention off) at '
                         "each model's own input size", params='counted from the weights on disk',
                   latency='not measured (deitlab report --measure times the run directories)')
    models = {}
    for record, path in zip(records, paths):
        model = create(str(path)).eval()
        record.params = count_params(model)
        record.gmacs = count_gmacs(model)
        if measure:
            models[record.name] = model.to(dev)
    if measure and models:
        log(f'timing {len(models)} model(s) at batch 1 on {dev}, interleaved')
        rows = compare(models, next(iter(models)), batch_size=1, throughput_steps=1, quick=quick, gmacs=False,
                       progress=progress)
        latency = {r['name']: r['latency_ms'] for r in rows}
        for record in records:
            record.latency_ms = latency[record.name]
            record.notes += '; latency: measured by deitlab report, interleaved with the other run directories'
        settings = dict(rows[0].get('settings') or {})
        settings.pop('order', None)
        machine['latency'] = 'batch 1, the median of the timed forwards (deitlab.bench.compare, interleaved rounds)'
        machine.update(settings)
    machine.setdefault('torch', torch.__version__)
    machine.setdefault('platform', platform.platform())
    for record in records:
        record.machine = machine
    return machine
