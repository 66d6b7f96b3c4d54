"""``deitlab report``: many models on one self-contained HTML page.

:func:`write_report` reads each source -- a run directory, a directory of run directories, or a
benchmark result file (``benchmarks/results/*.json``, see :mod:`deitlab.report.adapters`) -- into
model records, counts the GMACs and parameters of the run directories' models (and times them with
``measure``), and writes the page of :mod:`deitlab.report.page`. Bad input (no sources, a missing
path, a file of an unknown kind, a directory without runs, an output path that cannot be written)
is a :class:`ReportError` that says what was wrong, raised before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .adapters import read_benchmark_json
from .records import ModelRecord, ReportError, front_of, unique_names
from .runs import find_run_dirs, read_run_dir

__all__ = ['write_report', 'collect_records']

Source = Union[str, Path]
NO_SOURCES = ('no runs to report on: give run directories (or directories holding them) or benchmark result '
              'files (benchmarks/results/*.json)')


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ReportError(f'--out {out} is a directory; give the HTML file to write (e.g. {out / "report.html"})')
    if not out.parent.is_dir():
        raise ReportError(f'the directory of --out does not exist: {out.parent} (create it first)')


def collect_records(sources: Sequence[Source]) -> Tuple[List[ModelRecord], List[Path]]:
    """The records of ``sources`` in the order given (a directory of runs in name order), with
    unique names, and the run directories among them (their records are the last ones, in the same
    order, once GMACs are to be counted)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ReportError(NO_SOURCES)
    records: List[ModelRecord] = []
    runs: List[Tuple[ModelRecord, Path]] = []
    seen = set()
    for source in sources:
        path = Path(source)
        if not str(source).strip():
            raise ReportError('a source is empty: give run directories or benchmark result files')
        if not path.exists():
            raise ReportError(f'source does not exist: {path}')
        paths = find_run_dirs(path) if path.is_dir() else [path]
        for p in paths:
            key = p.resolve()
            if key in seen:
                continue
            seen.add(key)
            if p.is_dir():
                record = read_run_dir(p)
                runs.append((record, p))
                records.append(record)
            else:
                got = read_benchmark_json(p)
                if not got:
                    raise ReportError(f'{p} holds no models (its rows are empty)')
                records.extend(got)
    unique_names(records)
    return records, [p for _, p in runs]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(sources: Sequence[Source], out: Source, title: Optional[str] = None, *, measure: bool = False,
                 device: Optional[str] = None, quick: bool = False, progress: Optional[bool] = None) -> dict:
    """Write the report page over ``sources`` to ``out`` (see the module docstring).

    ``measure``: time the run directories' models at batch 1, interleaved, on ``device`` (default:
    CUDA when available, else the CPU; ``quick``: fewer rounds); without it their latency is left
    blank. Benchmark files are never re-measured: their latencies are the ones they hold.

    Returns a summary: ``out``, ``models`` (how many), ``sources``, ``charted`` (how many are drawn
    against GMACs and against latency), ``pareto`` (the names on each axis's fronts, per dataset),
    ``bytes``, ``measured`` and ``records`` (per model its name, source, kind, dataset, top-1, GMACs,
    parameters and latency, as the page shows them).
    """
    from .page import render_page, require_plotly

    out = Path(out)
    _check_out(out)
    require_plotly()   # before any model is built or timed
    records, run_dirs = collect_records(sources)
    run_records = [r for r in records if r.kind == 'run']
    if run_records:
        from .runs import measure_runs
        measure_runs(run_records, run_dirs, measure=measure, device=device, quick=quick, progress=progress)
    title = title or f'deitlab report: {len(records)} models'
    page = render_page(records, title, [str(s) for s in ([sources] if isinstance(sources, (str, Path)) else sources)])
    data = page.encode('utf-8')
    _write_atomic(out, data)
    pareto = {axis: {str(d): [records[i].name for i in idx] for d, idx in front_of(records, attr).items()}
              for axis, attr in (('gmacs', 'gmacs'), ('latency', 'latency_ms'))}
    return dict(out=str(out), models=len(records), sources=len({r.source for r in records}),
                charted=dict(gmacs=sum(r.has('gmacs') for r in records),
                             latency=sum(r.has('latency_ms') for r in records)),
                pareto=pareto, bytes=len(data), measured=bool(measure and run_records),
                records=[{k: getattr(r, k) for k in ('name', 'source', 'kind', 'data', 'top1', 'gmacs', 'params',
                                                     'latency_ms')} for r in records])
