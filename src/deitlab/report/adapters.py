"""Model records from the committed benchmark results (``benchmarks/results/*.json``).

Each kind of result file has one adapter that turns it into :class:`ModelRecord`\\ s: the accuracy,
GMACs, parameters and measured batch-1 latency it holds per model, the per-block widths and training
curve where it has them, and its settings as the machine the numbers come from. Nothing is
re-measured or derived: a number the file does not hold stays None (the page leaves it blank).
Torch-free.

| kind | files | one record per |
|---|---|---|
| ``prune`` | ``nvit_fmnist.json``, ``ofb_fmnist.json``, ``nvit_fmnist_ablation.json`` | arm and budget (seed mean) |
| ``tokens`` | ``tokens_fmnist.json`` | token-fusion setting and stage (off the shelf, fine-tuned) |
| ``mixers`` | ``mixers.json`` | token mixer and dataset |
| ``reference`` | ``reference_fmnist.json`` | the reference run |
| ``demo`` | ``demo.json`` | row of the demo's table |
| ``export`` | ``export.json`` | exported model (no accuracy: shown in the table only) |
| ``pipeline`` | ``pipeline.json`` (``deitlab pipeline``'s records) | completed step without a run directory: a fused model, an exported file |

A pipeline's train and prune steps wrote run directories, which the report reads as such (``deitlab
pipeline`` gives them with its ``pipeline.json``), so its adapter leaves them out: no model is listed twice.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .records import ModelRecord, ReportError

__all__ = ['KINDS', 'kind_of', 'read_benchmark_json']


def _rows(d) -> list:
    rows = d.get('rows') if isinstance(d, dict) else None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else []


def params_of(row: dict) -> Optional[int]:
    """A row's parameter count from ``params`` or ``params_m`` (millions); None without either."""
    if isinstance(row.get('params'), (int, float)):
        return int(row['params'])
    if isinstance(row.get('params_m'), (int, float)):
        return int(round(row['params_m'] * 1e6))
    return None


def pick(row: dict, keys) -> dict:
    """The entries of ``row`` under ``keys`` that are set (not None)."""
    return {k: row[k] for k in keys if row.get(k) is not None}


def _prune(d: dict, source: str) -> List[ModelRecord]:
    settings = d.get('settings') or {}
    kind = settings.get('target', 'latency')
    dense = next((r.get('widths') for r in d['rows'] if r['arm'] == 'dense'), None)
    records = []
    for row in d['rows']:
        seeds = row.get('seeds') or []
        measured = [s['latency_ms'] for s in seeds if isinstance(s.get('latency_ms'), (int, float))]
        if not seeds and isinstance(row.get('latency_ms'), (int, float)):
            measured = [row['latency_ms']]
        dense_row = row['arm'] == 'dense'
        notes = []
        if len(seeds) > 1:
            notes.append(f'top-1, params and GMACs: mean of {len(seeds)} seeds; widths: seed {seeds[0].get("seed")}')
        if measured:
            notes.append('latency: ' + ('the median of the seeds\' measurements' if len(measured) > 1 else 'measured')
                         + ', interleaved with the dense model (bench.compare)')
        records.append(ModelRecord(
            name='dense' if dense_row else f'{row["arm"]} {kind} {row["budget"]}', source=source, kind='prune',
            data=settings.get('data'), top1=row.get('top1'), gmacs=row.get('gmacs'), params=params_of(row),
            latency_ms=statistics.median(measured) if measured else None, widths=row.get('widths'),
            dense_widths=None if dense_row else dense, notes='; '.join(notes),
            config=dict(pick(row, ('arm', 'budget')), target=kind, reference=d.get('reference'),
                        **pick(settings, ('prune_steps', 'interval', 'lam', 'total_steps', 'common'))),
            extra=pick(row, ('top1_std', 'n_seeds', 'throughput_ratio', 'latency_speedup', 'predicted_speedup',
                              'images_per_s', 'train_wall_s'))))
    return records


def _tokens(d: dict, source: str) -> List[ModelRecord]:
    return [ModelRecord(
        name=f'{r["name"]} ({r.get("stage", "")})', source=source, kind='tokens', data=d.get('data'),
        top1=r.get('top1'), gmacs=r.get('gmacs'), params=params_of(r), latency_ms=r.get('latency_ms'),
        notes='latency: measured with every other model of the file, interleaved (bench.compare)'
              + (f'; speed of {r["speed_as"]} (the same fused model)' if r.get('speed_as') else ''),
        config=dict(pick(r, ('ref', 'method', 'r', 'stage', 'one_pass', 'run_dir')),
                    reference=(d.get('references') or {}).get(r.get('ref')),
                    **({'finetune': d.get('finetune')} if r.get('stage') == 'fine-tuned' else {})),
        extra=pick(r, ('top5', 'images_per_s', 'throughput_ratio', 'latency_speedup', 'tokens', 'train_wall_s')))
        for r in d['rows']]


def _mixers(d: dict, source: str) -> List[ModelRecord]:
    datasets = d.get('datasets') or {}
    return [ModelRecord(
        name=f'{r["name"]} / {r["dataset"]}', source=source, kind='mixers', data=r.get('dataset'),
        top1=r.get('top1'), gmacs=r.get('gmacs'), params=params_of(r), latency_ms=r.get('latency_ms'),
        notes='latency: measured with the other mixers, interleaved (bench.compare)',
        config=dict(pick(r, ('model', 'kwargs', 'run_dir')), recipe=d.get('recipe'),
                    **(datasets.get(r.get('dataset')) or {})),
        extra=pick(r, ('top5', 'best_top1', 'images_per_s', 'throughput_ratio', 'latency_speedup', 'train_wall_s')))
        for r in d['rows']]


def _reference(d: dict, source: str) -> List[ModelRecord]:
    train, measured = d.get('train') or {}, d.get('measured') or {}
    bench = measured.get('bench') or {}
    return [ModelRecord(
        name=f'{train.get("model", "reference")} (reference run)', source=source, kind='reference',
        data=train.get('data'), top1=measured.get('test_top1', train.get('val_top1')), gmacs=bench.get('gmacs'),
        params=params_of(bench) or params_of(train), latency_ms=bench.get('latency_ms'),
        curve=measured.get('curve'), config=dict(command=d.get('command'), train=train),
        notes='latency: measured alone (bench.benchmark_model)',
        machine=bench.get('settings'),
        extra=pick(dict(top5=measured.get('test_top5'), images_per_s=bench.get('images_per_s'),
                         peak_memory_mb=bench.get('peak_memory_mb')), ('top5', 'images_per_s', 'peak_memory_mb')))]


def _demo(d: dict, source: str) -> List[ModelRecord]:
    settings = d.get('settings') or {}
    return [ModelRecord(
        name=r['model'], source=source, kind='demo', data=settings.get('data'), top1=r.get('top1'),
        gmacs=r.get('gmacs'), params=params_of(r), latency_ms=r.get('latency_ms'),
        notes='numbers rounded as the demo prints them', config=dict(r, fusion=d.get('fusion')),
        extra=pick(r, ('img_per_s', 'speedup', 'predicted')))
        for r in d['rows']]


def _export(d: dict, source: str) -> List[ModelRecord]:
    records = []
    for r in d['rows']:
        b1 = ((r.get('speed') or {}).get('batch_1')) or {}
        records.append(ModelRecord(
            name=r['name'], source=source, kind='export', params=params_of(r), latency_ms=b1.get('pytorch_ms'),
            notes='an export check (weights: ' + str(r.get('weights')) + '): no accuracy or GMACs, so the table '
                  'shows it and the charts do not; latency: PyTorch at batch 1, interleaved with ONNX Runtime',
            config=pick(r, ('model', 'spec', 'weights', 'token_fusion', 'input_size', 'opset')),
            extra=dict(pick(b1, ('onnxruntime_ms', 'ratio')), **pick(r, ('max_abs_diff', 'bytes')))))
    return records


def _pipeline(d: dict, source: str) -> List[ModelRecord]:
    records = []
    for s in d['steps']:
        if s.get('run_dir') or s.get('status') not in ('done', 'skipped') or s.get('kind') not in ('fuse', 'export'):
            continue
        extra = dict(s.get('extra') or {})
        config = dict(pick(s, ('command', 'model', 'fusion', 'path')), pipeline=d.get('pipeline'))
        if s['kind'] == 'fuse':
            notes = (f'{s.get("top1_from") or "deitlab fuse"}: top-1 on {s.get("data")}, GMACs of the fused model'
                     if s.get('top1') is not None else 'deitlab fuse without data: no top-1')
            if s.get('latency_ms') is not None:
                notes += '; latency: measured by deitlab fuse, interleaved with the model it fused (bench.compare)'
        else:
            notes = ('an exported file: no accuracy of its own (its logits match PyTorch\'s within the tolerance, '
                     'max_abs_diff), so the table shows it and the charts do not'
                     + (f'; GMACs and parameters of the model of step {s["model_step"]}' if s.get('model_step') else '')
                     + ('; latency: ONNX Runtime at batch 1, interleaved with PyTorch (pytorch_ms)'
                        if s.get('latency_ms') is not None else ''))
        records.append(ModelRecord(
            name=s.get('name') or f'step {s.get("step")}', source=source, kind='pipeline', data=s.get('data'),
            top1=s.get('top1'), gmacs=s.get('gmacs'), params=params_of(s), latency_ms=s.get('latency_ms'),
            notes=notes, config=config, machine=s.get('settings') if isinstance(s.get('settings'), dict) else None,
            extra=dict(pick(s, ('top5', 'seconds')), **extra)))
    return records


def _is_pipeline(d) -> bool:
    steps = d.get('steps') if isinstance(d, dict) else None
    return (isinstance(d.get('pipeline'), str) and isinstance(steps, list)
            and all(isinstance(s, dict) and 'step' in s and 'kind' in s for s in steps))


def _is_prune(d) -> bool:
    rows = _rows(d)
    return bool(rows) and all('arm' in r and 'budget' in r for r in rows)


def _is_tokens(d) -> bool:
    rows = _rows(d)
    return d.get('benchmark') == 'tokens_fmnist' and all('name' in r and 'stage' in r for r in rows)


def _is_mixers(d) -> bool:
    rows = _rows(d)
    return d.get('benchmark') == 'mixers' and all('name' in r and 'dataset' in r for r in rows)


def _is_reference(d) -> bool:
    return isinstance(d.get('train'), dict) and isinstance(d.get('measured'), dict)


def _is_demo(d) -> bool:
    rows = _rows(d)
    return bool(rows) and 'fusion' in d and all('model' in r and 'top1' in r for r in rows)


def _is_export(d) -> bool:
    rows = _rows(d)
    return d.get('benchmark') == 'export' and all('name' in r for r in rows)


#: kind -> (does a parsed JSON object look like it, its adapter, the files it reads)
KINDS: Dict[str, Tuple[Callable[[dict], bool], Callable[[dict, str], List[ModelRecord]], str]] = {
    'prune': (_is_prune, _prune, 'nvit_fmnist.json, ofb_fmnist.json, nvit_fmnist_ablation.json'),
    'tokens': (_is_tokens, _tokens, 'tokens_fmnist.json'),
    'mixers': (_is_mixers, _mixers, 'mixers.json'),
    'reference': (_is_reference, _reference, 'reference_fmnist.json'),
    'demo': (_is_demo, _demo, 'demo.json'),
    'export': (_is_export, _export, 'export.json'),
    'pipeline': (_is_pipeline, _pipeline, 'pipeline.json of deitlab pipeline'),
}


def _supported() -> str:
    return '; '.join(f'{k} ({files})' for k, (_, _, files) in KINDS.items())


def kind_of(d, path) -> str:
    """The kind of benchmark result ``d`` (parsed from ``path``) is, or a ReportError naming the file
    and the kinds this report reads."""
    if isinstance(d, dict):
        for kind, (looks_like, _, _) in KINDS.items():
            if looks_like(d):
                return kind
        what = f'"benchmark": {d["benchmark"]!r}' if 'benchmark' in d else f'keys {", ".join(list(d)[:6])}'
    else:
        what = f'a JSON {type(d).__name__}'
    raise ReportError(f'{path} is not a benchmark result this report reads ({what}); the kinds it reads: '
                      f'{_supported()}')


def _machine(d: dict, kind: str) -> Optional[dict]:
    key = {'tokens': 'speed_settings', 'mixers': 'speed_settings'}.get(kind, 'settings')
    value = d.get(key)
    return value if isinstance(value, dict) else None


def read_benchmark_json(path) -> List[ModelRecord]:
    """The model records of one benchmark result file (see the module docstring for the kinds).
    Every record's ``source`` is the file's stem and its ``machine`` the file's settings."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding='utf-8'))
    except UnicodeDecodeError:
        raise ReportError(f'{path} is not a text file: give run directories or benchmark JSON files') from None
    except json.JSONDecodeError as e:
        raise ReportError(f'{path} is not JSON ({e.msg}: line {e.lineno}, column {e.colno})') from None
    kind = kind_of(d, path)
    records = KINDS[kind][1](d, path.stem)
    machine = _machine(d, kind)
    for r in records:
        if r.machine is None:
            r.machine = machine
    return records
