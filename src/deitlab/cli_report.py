"""``deitlab report``: its parser and the function it runs, imported by :mod:`deitlab.cli` when the
command is asked for. The report package is imported only when the command runs, so ``--help`` stays
torch- and plotly-free."""
from __future__ import annotations

from pathlib import Path

from .cli_flags import add_output_flags


def cmd_report(args) -> dict:
    if args.measure:
        from .bench.speed import fix_malloc_thresholds
        fix_malloc_thresholds()   # the same allocation pattern in every round and every run
    from .report import write_report
    result = write_report(args.sources, args.out, title=args.title, measure=args.measure, device=args.device,
                          quick=args.quick, progress=False if args.json else None)
    if args.json:
        return result
    rows = {'written': f'{result["out"]} ({result["bytes"] / 1e6:.1f} MB, self-contained: nothing is fetched when '
                       f'it is viewed)',
            'models': f'{result["models"]} from {result["sources"]} source(s); {result["charted"]["gmacs"]} drawn '
                      f'against GMACs, {result["charted"]["latency"]} against latency'}
    for axis, fronts in result['pareto'].items():
        for data, names in fronts.items():
            rows[f'Pareto front ({axis}, {data})'] = ', '.join(names)
    rows['open'] = Path(result['out']).resolve().as_uri()
    return rows


def report_parser(p, groups) -> None:
    groups['data'].add_argument(
        'sources', nargs='*', metavar='SOURCES',
        help='run directories, directories holding run directories, or benchmark result files '
             '(benchmarks/results/*.json: nvit_fmnist, ofb_fmnist, tokens_fmnist, mixers, reference_fmnist, demo, '
             'export)')
    run = groups['run']
    run.add_argument('--out', required=True, help='the HTML file to write (its directory must exist)')
    run.add_argument('--title', default=None, help='the page\'s title (default: "deitlab report: N models")')
    measurement = groups['measurement']
    measurement.add_argument('--measure', action='store_true',
                             help="time the run directories' models at batch 1, interleaved in one process "
                                  '(benchmark files keep the latencies they hold); without it their latency is '
                                  'blank')
    measurement.add_argument('--device', default=None,
                             help='device for --measure (default: CUDA when available, else the CPU)')
    measurement.add_argument('--quick', action='store_true', help='fewer timing rounds with --measure')
    add_output_flags(groups)
    p.set_defaults(func=cmd_report)
