"""Running a pipeline: its steps in order, each a ``python -m deitlab ... --json`` subprocess.

A step's progress goes to standard error as the command prints it; the JSON on the last line of its
standard output is kept in ``OUT/NN-name.step.json`` with the step's hash (its command and every
command before it, :attr:`Step.hash`). On a re-run a step whose record has the same hash and whose
output is there is skipped; the first step that runs (changed, forced by ``start``, or its output
gone) runs every step after it too, and before it runs the records and outputs from it on are
removed. A step that fails stops the pipeline with a :class:`PipelineError` that names it and its
command's error; the steps before it keep their outputs and records, and the report page shows them.
A train or prune step that was interrupted or failed with a checkpoint in its output continues from
that checkpoint (its command with ``--resume``) when the pipeline runs again with the step unchanged
(``start`` runs it from scratch).
At the end ``OUT/pipeline.json``
holds every step (command, status, time, numbers) and :func:`deitlab.report.write_report` puts the
run directories and the pipeline's own records (the fused model, the exported file) on one page.

Numbers per step: top-1 on the pipeline's ``data`` from the step's own JSON (``deitlab eval`` when the
step ran on other data), the fused model's top-1, GMACs and speed-ups from ``deitlab fuse``, the
export's parity and ONNX Runtime speed from ``deitlab export``; the run directories' GMACs and
parameters (and batch-1 latency with ``measure: true``) as the report counts them from the weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from . import PipelineError, PipelineInterrupted
from ..report.adapters import params_of as _params, pick as _pick   # the same fields as the report reads
from .spec import Pipeline, Step

__all__ = ['StepRun', 'subprocess_runner', 'plan_pipeline', 'run_pipeline']

FUSE_BASE = ('fused attention', 'explicit attention')   # deitlab fuse's rows of the model it fused


@dataclass
class StepRun:
    """What a step's command did: its exit status and standard output."""
    returncode: int
    stdout: str


Runner = Callable[[List[str]], StepRun]


def subprocess_runner(argv: List[str]) -> StepRun:
    """``python -m deitlab ARGV`` in this environment and directory; its standard error goes to ours."""
    proc = subprocess.run([sys.executable, '-m', 'deitlab', *argv], stdout=subprocess.PIPE, encoding='utf-8',
                          errors='replace', env=os.environ.copy())
    return StepRun(proc.returncode, proc.stdout)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f'[deitlab pipeline] {msg}', file=sys.stderr, flush=True)


def _read_record(pipe: Pipeline, step: Step) -> Optional[dict]:
    path = pipe.record_of(step)
    try:
        rec = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _output_there(step: Step) -> bool:
    if step.output is None:
        return True
    if step.makes_run_dir:
        return (step.output / 'config.json').is_file() and (step.output / 'model.safetensors').is_file()
    return step.output.is_file()


def completed(pipe: Pipeline, step: Step) -> Optional[dict]:
    """The step's record if it completed with the command it has now (same hash) and its output is
    there; else None."""
    rec = _read_record(pipe, step)
    if rec is None or rec.get('hash') != step.hash or not _output_there(step):
        return None
    return rec


def plan_pipeline(pipe: Pipeline, start: Optional[int] = None) -> List[Tuple[Step, str]]:
    """Each step with ``'skip'`` (completed before with the same command) or ``'run'``. ``start``
    (1-based) runs that step and every later one; the steps before it must have completed."""
    n = len(pipe.steps)
    if start is not None and not 1 <= start <= n:
        raise PipelineError(f'--from {start}: {pipe.path} has {n} step{"s" if n > 1 else ""} (1-{n})')
    plan, forced = [], False
    for step in pipe.steps:
        done = completed(pipe, step) is not None
        if start is not None and step.index < start and not done:
            raise PipelineError(f'--from {start}: step {step.index} ({step.label}) has not completed with its '
                                f'present command; run the pipeline without --from, or --from {step.index}')
        forced = forced or (start is not None and step.index >= start) or not done
        plan.append((step, 'run' if forced else 'skip'))
    return plan


def _remove(path: Optional[Path]) -> None:
    if path is None or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        tmp.write_text(json.dumps(value, indent=2, default=str) + '\n', encoding='utf-8')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _last_json(stdout: str) -> Optional[dict]:
    lines = [line for line in (stdout or '').strip().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def step_numbers(step: Step, result: dict) -> dict:
    """What a step's JSON says of the model it made (see the module docstring)."""
    if step.kind == 'train':
        return dict(data=result.get('data'), top1=result.get('val_top1'), top5=result.get('val_top5'),
                    params=_params(result), top1_from='deitlab train (the last evaluation)')
    if step.kind == 'prune':
        rows = result.get('rows') or [{}]
        final = next((r for r in reversed(rows) if r.get('name') != 'dense'), rows[-1])
        dense = next((r for r in rows if r.get('name') == 'dense'), {})
        return dict(data=(result.get('config') or {}).get('data', step.data), top1=final.get('top1'),
                    gmacs=final.get('gmacs'), params=_params(final), latency_ms=final.get('latency_ms'),
                    top1_from=f'deitlab prune {step.method} (the final model)',
                    extra=_pick(dict(model_top1=dense.get('top1'), target=result.get('target'),
                                     latency_speedup=final.get('latency_speedup'),
                                     throughput_ratio=final.get('throughput_ratio')),
                                ('model_top1', 'target', 'latency_speedup', 'throughput_ratio')))
    if step.kind == 'fuse':
        rows = result.get('rows') or [{}]
        fused = next((r for r in rows if r.get('name') not in FUSE_BASE), rows[-1])
        base = next((r for r in rows if r.get('name') == 'fused attention'), {})
        gmacs = fused.get('gmacs', fused.get('gmacs_closed_form'))
        return dict(data=(result.get('config') or {}).get('data'), top1=fused.get('top1'), top5=fused.get('top5'),
                    gmacs=gmacs, params=_params(fused), latency_ms=fused.get('latency_ms'),
                    top1_from=f'deitlab fuse {step.method}', fusion=result.get('fusion'),
                    settings=result.get('settings'),
                    extra=_pick(dict(model_top1=base.get('top1'), gmacs_ratio=result.get('gmacs_ratio'),
                                     tokens=result.get('tokens'), latency_speedup=fused.get('latency_speedup'),
                                     throughput_ratio=fused.get('throughput_ratio'),
                                     images_per_s=fused.get('images_per_s')),
                                ('model_top1', 'gmacs_ratio', 'tokens', 'latency_speedup', 'throughput_ratio',
                                 'images_per_s')))
    speed = result.get('speed') or {}
    b1 = speed.get('batch_1') or {}
    parity = result.get('parity') or {}
    config = result.get('config') or {}
    return dict(path=result.get('path'), latency_ms=b1.get('onnxruntime_ms'), settings=speed.get('settings'),
                extra=_pick(dict(max_abs_diff=parity.get('max_abs_diff'), tolerance=parity.get('tolerance'),
                                 bytes=result.get('bytes'), opset=result.get('opset'),
                                 token_fusion=config.get('token_fusion'), r=config.get('r'),
                                 pytorch_ms=b1.get('pytorch_ms'), onnxruntime_vs_pytorch=b1.get('ratio')),
                            ('max_abs_diff', 'tolerance', 'bytes', 'opset', 'token_fusion', 'r', 'pytorch_ms',
                             'onnxruntime_vs_pytorch')))


def _top1_on(pipe: Pipeline, step: Step, numbers: dict, runner: Runner, quiet: bool) -> dict:
    """A run directory's top-1 on the pipeline's data, by ``deitlab eval``, when the step ran on other data."""
    if not step.makes_run_dir or pipe.data is None or numbers.get('data') == pipe.data:
        return numbers
    argv = ['eval', '--model', str(step.output), '--data', pipe.data, '--json']
    _log(f'step {step.index} ({step.label}) trained on {numbers.get("data")}: top-1 on {pipe.data} by '
         f'deitlab {" ".join(argv)}', quiet)
    got = runner(argv + (['--quiet'] if quiet else []))
    res = _last_json(got.stdout) or {}
    if got.returncode != 0 or 'top1' not in res:
        _log(f'warning: step {step.index} ({step.label}): top-1 on {pipe.data} not measured '
             f'({res.get("error") or f"deitlab eval exited with status {got.returncode}"})', False)
        return numbers
    return dict(numbers, data=pipe.data, top1=res['top1'], top5=res.get('top5'), top1_from='deitlab eval')


def _entry(step: Step, status: str, rec: Optional[dict] = None) -> dict:
    """The step as ``pipeline.json`` lists it."""
    entry = dict(step=step.index, kind=step.kind, method=step.method, name=step.name, status=status,
                 command=step.command, argv=step.argv, model=step.model, source_step=step.source,
                 output=None if step.output is None else str(step.output), run_dir=step.makes_run_dir)
    if step.fusion is not None:
        entry['fusion_carried'] = {k: v for k, v in step.fusion.items() if k != 'inflect'}
    if rec is not None:
        entry.update(seconds=rec.get('seconds'), finished=rec.get('finished'), hash=rec.get('hash'),
                     **(rec.get('numbers') or {}))
    return entry


def _summary_doc(pipe: Pipeline, entries: List[dict], status: str, started: float) -> dict:
    return dict(pipeline=str(pipe.path), out=str(pipe.out), data=pipe.data, measure=pipe.measure, status=status,
                report=str(pipe.report), title=pipe.title, seconds=round(time.time() - started, 1),
                settings=dict(python=sys.version.split()[0], executable=sys.executable), steps=entries)


def _stop(pipe: Pipeline, entries: List[dict], step: Step, started: float, status: str, report: bool,
          quiet: bool) -> str:
    """Write ``pipeline.json`` for a pipeline stopped at ``step`` (and, with ``report`` when a step
    had completed, the report page of the completed steps); the sentence on what is kept."""
    done = [e['step'] for e in entries if e['status'] in ('done', 'skipped')]
    rest = [_entry(s, 'not run') for s in pipe.steps if s.index > step.index]
    stopped = dict(_entry(step, status), hash=step.hash, resumable=_checkpoint(step) is not None)
    doc = _summary_doc(pipe, entries + [stopped] + rest, f'{status} at step {step.index}', started)
    _write_json(pipe.records, doc)
    if not done:
        return 'no step had completed'
    kept = (f'step {done[0]} is kept in {pipe.out}' if len(done) == 1 else
            f'steps {done[0]}-{done[-1]} are kept in {pipe.out}')
    if report:
        try:
            _report(pipe, entries, True)
        except Exception as e:   # the step's failure is the error to report, not the page's
            return f'{kept} (no report page: {e})'
        _write_json(pipe.records, _summary_doc(pipe, entries + [stopped] + rest, doc['status'], started))
        kept += f', with their report page {pipe.report}'
    return kept


def _checkpoint(step: Step) -> Optional[Path]:
    """The checkpoint a train or prune step's command writes into its output as it goes, when it
    is there (``--resume`` continues from it); else None."""
    if step.output is None or step.kind not in ('train', 'prune'):
        return None
    if step.kind == 'train':
        from ..train.engine import CHECKPOINT_NAME as name
    elif step.method == 'nvit':
        from ..prune.nvit import CHECKPOINT as name
    else:
        from ..prune.ofb_search import CHECKPOINT as name
    path = step.output / name
    return path if path.is_file() else None


def _stopped_before(pipe: Pipeline) -> Optional[Tuple[int, str]]:
    """``(step, hash)`` of the step at which the last run of the pipeline stopped (interrupted or
    failed), from ``pipeline.json``; None when it completed or never ran."""
    try:
        doc = json.loads(pipe.records.read_text(encoding='utf-8'))
        stopped = [s for s in doc['steps'] if s.get('status') in ('interrupted', 'failed') and s.get('hash')]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return (stopped[0]['step'], stopped[0]['hash']) if stopped else None


def _report(pipe: Pipeline, entries: List[dict], quiet: bool) -> dict:
    """The report page over the run directories and ``pipeline.json``; the run directories' counted
    numbers (GMACs, parameters, latency with ``measure``) go into their entries."""
    from ..report import write_report
    sources = [e['output'] for e in entries if e['run_dir']]
    if any(e['kind'] in ('fuse', 'export') for e in entries):   # the records no run directory holds
        sources.append(str(pipe.records))
    summary = write_report(sources, pipe.report, pipe.title, measure=pipe.measure, progress=False if quiet else None)
    counted = {r['source']: r for r in summary.get('records', []) if r.get('kind') == 'run'}
    for e in entries:
        got = counted.get(e['output']) if e['run_dir'] else None
        if got:
            e.update(gmacs=got.get('gmacs'), params=got.get('params'))
            if pipe.measure:
                e['latency_ms'] = got.get('latency_ms')
            e['counted_by'] = 'deitlab report (GMACs and parameters from the weights' + (
                ', batch-1 latency interleaved with the other run directories)' if pipe.measure else ')')
    _fill_exports(pipe, entries)
    return summary


def _fill_exports(pipe: Pipeline, entries: List[dict]) -> None:
    """An export's GMACs and parameters: those of the model it wrote, the step it read (or the fuse
    step whose fusion it carried)."""
    for e in entries:
        if e['kind'] == 'export' and e['status'] in ('done', 'skipped'):
            src = next((x for x in entries if x['step'] == _export_source(pipe, e['step'])), None)
            if src is not None:
                e.update(gmacs=src.get('gmacs'), params=src.get('params'), model_step=src['step'])


def _export_source(pipe: Pipeline, index: int) -> Optional[int]:
    """The step whose model an export writes: the fuse step whose fusion it applies, else the step it reads."""
    step = pipe.steps[index - 1]
    return step.fusion_from or step.source


def _check_report_path(pipe: Pipeline) -> None:
    """The report can be written at the end: not a directory, in a directory that exists or that the
    pipeline makes (under OUT)."""
    report, out = pipe.report.absolute(), pipe.out.absolute()
    if report.is_dir():
        raise PipelineError(f'report: {pipe.report} is a directory; give the HTML file to write (e.g. '
                            f'{pipe.report / "report.html"})')
    if not report.parent.is_dir() and out not in (report.parent, *report.parent.parents):
        raise PipelineError(f'report: the directory of {pipe.report} does not exist (create it first, or drop '
                            f'report: for OUT/report.html)')


def run_pipeline(pipe: Pipeline, *, start: Optional[int] = None, runner: Optional[Runner] = None,
                 report: bool = True, quiet: bool = False) -> dict:
    """Run ``pipe`` (see the module docstring). ``start``: run from that step on (1-based), the
    steps before it must have completed; ``runner`` runs one command (default: a subprocess);
    ``report``: write the report page at the end. Returns ``pipeline.json``'s content with
    ``ran``, ``skipped`` and the report's summary."""
    runner = runner or subprocess_runner
    plan = plan_pipeline(pipe, start)
    if report:
        from ..report.page import require_plotly
        try:
            require_plotly()   # before any step runs
        except ValueError as e:
            raise PipelineError(f'{e} (the pipeline writes a report)') from None
        _check_report_path(pipe)
    pipe.out.mkdir(parents=True, exist_ok=True)
    if report:
        pipe.report.parent.mkdir(parents=True, exist_ok=True)   # under OUT (checked above)
    started, n = time.time(), len(pipe.steps)
    stopped = _stopped_before(pipe)
    entries: List[dict] = []
    ran = skipped = 0
    for step, action in plan:
        if action == 'skip':
            entries.append(_entry(step, 'skipped', completed(pipe, step)))
            skipped += 1
            _log(f'step {step.index}/{n} ({step.label}): skipped, done before with the same command'
                 + (f' ({step.output})' if step.output else ''), quiet)
            continue
        checkpoint = _checkpoint(step) if start is None and stopped == (step.index, step.hash) else None
        resume = checkpoint is not None
        for later in pipe.steps[step.index - 1:]:   # its record and output, and those after it, no longer hold
            pipe.record_of(later).unlink(missing_ok=True)
            if not (resume and later is step):
                _remove(later.output)
        _log(f'step {step.index}/{n} ({step.label}): {step.command}'
             + (f' --resume (continuing from {checkpoint})' if resume else ''), quiet)
        t0 = time.time()
        try:
            got = runner(step.argv + (['--resume'] if resume else []) + (['--quiet'] if quiet else []))
        except KeyboardInterrupt:
            kept = _stop(pipe, entries, step, started, 'interrupted', False, quiet)   # Ctrl-C: stop now
            raise PipelineInterrupted(f'at step {step.index} ({step.label}); {kept}; run the pipeline again to '
                                      f'continue from step {step.index}') from None
        seconds = round(time.time() - t0, 1)
        result = _last_json(got.stdout)
        if got.returncode != 0 or result is None or 'error' in result:
            why = (result or {}).get('error') or (
                f'exit status {got.returncode} (its messages are above)' if got.returncode else
                'it printed no JSON result on its last line')
            kept = _stop(pipe, entries, step, started, 'failed', report, quiet)
            raise PipelineError(f'step {step.index} ({step.label}) failed: {why}; {kept}; fix the step and run the '
                                f'pipeline again to continue from step {step.index}')
        numbers = _top1_on(pipe, step, step_numbers(step, result), runner, quiet)
        rec = dict(step=step.index, kind=step.kind, method=step.method, name=step.name, hash=step.hash,
                   command=step.command, argv=step.argv, output=None if step.output is None else str(step.output),
                   seconds=seconds, finished=time.strftime('%Y-%m-%dT%H:%M:%S'), numbers=numbers, result=result,
                   resumed=resume)
        _write_json(pipe.record_of(step), rec)
        entries.append(_entry(step, 'done', rec))
        ran += 1
        top1 = f', top-1 {numbers["top1"]:.2f} on {numbers.get("data")}' if numbers.get('top1') is not None else ''
        _log(f'step {step.index}/{n} ({step.label}): done in {seconds} s{top1}', quiet)
    _fill_exports(pipe, entries)
    doc = _summary_doc(pipe, entries, 'complete', started)
    _write_json(pipe.records, doc)
    summary = None
    if report:
        _log(f'report: {pipe.report}', quiet)
        summary = _report(pipe, entries, quiet)
        doc = _summary_doc(pipe, entries, 'complete', started)
        _write_json(pipe.records, doc)
    return dict(doc, records=str(pipe.records), ran=ran, skipped=skipped,
                report_summary=None if summary is None else {k: summary[k] for k in ('out', 'models', 'bytes')})
