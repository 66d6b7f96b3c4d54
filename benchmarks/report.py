"""Build ``results/report.html``: the models of the committed benchmark results on one page.

    python benchmarks/report.py            # a few seconds; needs plotly: pip install -e '.[report]'

The page is what ``deitlab report`` writes (``deitlab.report.write_report``), over

* ``results/nvit_fmnist.json`` and ``results/ofb_fmnist.json``: the pruned DeiT-nanos (NViT, OFB,
  Torch-Pruning, uniform) at each budget, seeds averaged, with their widths against the dense model's;
* ``results/tokens_fmnist.json``: ToMe, MCTF, MCTF-Fast and STViT on the reference nano and on
  NViT-0.5, off the shelf and fine-tuned;
* ``results/mixers.json``: DeiT, PoolFormer and the SpectFormers on Fashion-MNIST and on glyphs;
* ``results/reference_fmnist.json``: the reference DeiT-nano, with its training curve;
* ``reference/fmnist-nvit-0.5``: the committed NViT-0.5 run directory (its widths against the dense
  model's, its configuration; GMACs counted from its weights; latency blank unless ``--measure``,
  because a single model timed now would not be comparable with the files' interleaved timings).

It shows top-1 against GMACs and against measured batch-1 latency with each dataset's Pareto front,
a table sortable by any column, each model's details, and the machine and settings every file
records. Left out: ``nvit_fmnist_ablation.json`` (single-seed repeats of ``nvit_fmnist.json``'s
arms), ``demo.json`` (the demo's own glyph data, a third dataset of four models) and ``export.json``
(no accuracy: its models could only sit in the table); ``deitlab report`` reads all three.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ('benchmarks/results/nvit_fmnist.json', 'benchmarks/results/ofb_fmnist.json',
           'benchmarks/results/tokens_fmnist.json', 'benchmarks/results/mixers.json',
           'benchmarks/results/reference_fmnist.json', 'benchmarks/reference/fmnist-nvit-0.5')
TITLE = 'deitlab benchmarks: every model of benchmarks/results'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='benchmarks/results/report.html', help='the page (relative to the repository)')
    p.add_argument('--measure', action='store_true', help='time the run directory at batch 1 (see the docstring)')
    args = p.parse_args()
    os.chdir(REPO)   # the page names its sources by their paths in the repository
    from deitlab.report import write_report
    summary = write_report(list(SOURCES), args.out, title=TITLE, measure=args.measure)
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
