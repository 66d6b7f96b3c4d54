"""The demo's table for the README: run ``deitlab demo`` in full and keep its ``results.json``.

    python benchmarks/demo_run.py            # ~2 CPU-minutes from the committed dense run; writes
                                             # results/demo.json (--train: train it too, ~5 more)
    python benchmarks/demo_run.py --result benchmarks/results/demo_busy.json   # again, while another
                                             # training job loads the CPU (the README shows both)
    python benchmarks/tables.py              # regenerates the README's demo table from them

The JSON is the demo's own ``results.json`` (rows: accuracy, parameters, GMACs, batch-1 latency,
throughput, measured and predicted speed-up) with the machine's load average at the start and end,
so a run on a busy machine can be told apart.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / 'results'


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=None, help='demo output directory (default: a temporary one)')
    p.add_argument('--result', default=str(RESULTS / 'demo.json'))
    p.add_argument('--train', action='store_true', help='train the dense model (deitlab demo --train)')
    args = p.parse_args(argv)
    from deitlab.bench.speed import fix_malloc_thresholds
    from deitlab.demo import run_demo
    fix_malloc_thresholds()   # as ``deitlab demo`` does
    out = args.out or tempfile.mkdtemp(prefix='deitlab-demo-')
    load0 = os.getloadavg()[0]
    res = run_demo(out=out, progress=False, train_dense=args.train)
    res['load_avg'] = dict(start=round(load0, 2), end=round(os.getloadavg()[0], 2))
    for k in ('run_dir', 'pruned_run_dir', 'mixer_run_dir', 'plot', 'widths_plot'):
        res.pop(k, None)   # temporary paths
    Path(args.result).write_text(json.dumps(res, indent=1) + '\n')
    print(json.dumps(res['rows'], indent=1))


if __name__ == '__main__':
    main()
