"""``deitlab pipeline FILE.yaml``: its parser and the function it runs, imported by :mod:`deitlab.cli`
when the command is asked for. :mod:`deitlab.pipeline` is imported only when the command runs, so
``--help`` stays torch-free."""
from __future__ import annotations

import argparse

from .cli_flags import add_output_flags

_FILE_HELP = ("the pipeline: out: (the directory every step writes under), optional data: (--data of the steps "
              "that take one), measure: (true: time the models), report:, title:, and steps:, each one deitlab "
              "command with its flags as options, e.g. '- train: {model: deitlab_deit_pico_patch4_32, epochs: 2}', "
              "'- prune: {method: nvit, target-gmacs: 0.5}', '- fuse: {method: tome, r: 4}', '- export: {}'; "
              "paths are relative to the current directory")


def _step_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a step number, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'steps are numbered from 1, got {value}')
    return value


def _number(value, fmt: str, unit: str = '') -> str:
    return f'{value:{fmt}}{unit}' if isinstance(value, (int, float)) else ''


def _step_line(e: dict) -> str:
    if e['status'] not in ('done', 'skipped'):
        return e['status']
    parts = [f'top-1 {_number(e.get("top1"), ".2f")} on {e.get("data")}' if e.get('top1') is not None else '',
             _number(e.get('gmacs'), '.4g', ' GMACs'),
             _number(e['params'] / 1e6 if isinstance(e.get('params'), (int, float)) else None, '.3f', 'M params'),
             _number(e.get('latency_ms'), '.3g', ' ms at batch 1')]
    extra = e.get('extra') or {}
    if e['kind'] == 'export' and extra.get('max_abs_diff') is not None:
        parts.append(f'max |ONNX Runtime - PyTorch| {extra["max_abs_diff"]:.2g}')
    if e['kind'] == 'fuse' and extra.get('gmacs_ratio') is not None:
        parts.append(f'{extra["gmacs_ratio"]:.3f} of the model\'s GMACs')
    status = f'done in {e.get("seconds")} s' if e['status'] == 'done' else 'skipped (done before)'
    where = f' -> {e["output"]}' if e.get('output') else ''
    return f'{status}: ' + ', '.join(p for p in parts if p) + where


def cmd_pipeline(args) -> dict:
    from .pipeline.spec import load_pipeline
    pipe = load_pipeline(args.file)
    if args.dry_run:
        from .pipeline.run import plan_pipeline
        plan = plan_pipeline(pipe, args.start)
        if args.json:
            return dict(pipeline=str(pipe.path), out=str(pipe.out), report=str(pipe.report), dry_run=True,
                        steps=[dict(step=s.index, kind=s.kind, method=s.method, name=s.name, action=action,
                                    command=s.command, argv=s.argv) for s, action in plan])
        return {f'step {s.index} ({s.label}, {"skipped: done before" if action == "skip" else "runs"})': s.command
                for s, action in plan}
    if pipe.measure:
        from .bench.speed import fix_malloc_thresholds
        fix_malloc_thresholds()   # the report times the run directories in this process
    from .pipeline.run import run_pipeline
    result = run_pipeline(pipe, start=args.start, quiet=args.quiet)
    if args.json:
        return result
    rows = {f'step {e["step"]} ({e["kind"]}{" " + e["method"] if e["method"] else ""})': _step_line(e)
            for e in result['steps']}
    rows['records'] = result['records']
    if result.get('report_summary'):
        rows['report'] = result['report_summary']['out']
    return rows


def pipeline_parser(p, groups) -> None:
    groups['config'].add_argument('file', metavar='FILE.yaml', help=_FILE_HELP)
    run = groups['run']
    run.add_argument('--dry-run', action='store_true',
                     help='check the file and print each step\'s command, and whether it would run or be skipped '
                          '(done before with the same command); nothing runs')
    run.add_argument('--from', dest='start', type=_step_number, default=None, metavar='N',
                     help='run step N and every step after it again, from scratch, even if done before (the steps '
                          'before it must have completed)')
    add_output_flags(groups)
    p.epilog = ('Each step writes OUT/NN-name (a run directory; an export: OUT/NN-name.onnx) and keeps its JSON in '
                'OUT/NN-name.step.json; at the end OUT/pipeline.json lists every step (command, status, time, '
                'top-1, GMACs, params) and the report shows them all. Run again, a step done before with the same '
                'command (and the same steps before it) is skipped; a changed step runs again with every step after '
                'it. A failed step stops the pipeline; the steps before it are kept, with their report. A train or '
                'prune step that was interrupted (or failed) continues from its checkpoint when run again unchanged.')
    p.set_defaults(func=cmd_pipeline)
