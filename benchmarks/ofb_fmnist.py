"""OFB against NViT, Torch-Pruning (Taylor) and a uniform small DeiT on Fashion-MNIST, at three GMACs
budgets (0.7, 0.5, 0.35 of the reference DeiT-nano), 3 seeds.

The arms and protocol are ``nvit_fmnist.py``'s with ``--target gmacs``: every arm starts from the
reference model and trains ``--total-steps`` (1875, batch 32) with the same soft distillation from
it; NViT prunes over 800 steps (an event every 20) to the GMACs target, Torch-Pruning Taylor prunes
in 4 steps over the same 800 steps to the GMACs schedule, OFB searches for 800 steps
(``--search-steps``) and fine-tunes for the rest, the uniform DeiT matches NViT's GMACs and trains
from scratch. ``ofb_nopmim`` and ``ofb_paper`` (the paper's even head counts) are ablations.
Measured as ``nvit_fmnist.py measure`` does (accuracy on the 10k test set, GMACs, parameters, speed
against the dense model interleaved in one process), into ``results/ofb_fmnist.json``; ``plot``
draws accuracy against GMACs and against measured speed-up, with the latency-budget runs of
``results/nvit_fmnist.json`` beside them. OFB's search cost (CPU time, forward passes, modules cut
short by the step budget) is in each seed's ``detail``.

    pip install --no-deps torch-pruning==1.6.1          # the Torch-Pruning peer
    python benchmarks/ofb_fmnist.py all --jobs 2         # 36 runs, several hours on 2 cores
    python benchmarks/ofb_fmnist.py all --arms ofb_nopmim ofb_paper --seeds 0   # the ablations
    python benchmarks/ofb_fmnist.py plot                 # results/ofb_fmnist.png
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
RESULT = RESULTS / 'ofb_fmnist.json'
ARMS = ['ofb', 'nvit', 'tp_taylor', 'uniform']
COLORS = {'ofb': 'tab:red', 'ofb_nopmim': 'salmon', 'ofb_paper': 'darkred', 'nvit': 'tab:blue',
          'tp_taylor': 'tab:green', 'uniform': 'tab:gray'}


def plot() -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = json.loads(RESULT.read_text())['rows']
    dense = next(r for r in rows if r['arm'] == 'dense')
    latency_rows = []
    if (RESULTS / 'nvit_fmnist.json').exists():
        latency_rows = [r for r in json.loads((RESULTS / 'nvit_fmnist.json').read_text())['rows']
                        if r['arm'] == 'nvit']
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, key, label in ((axes[0], 'gmacs', 'GMACs'), (axes[1], 'throughput_ratio', 'measured speed-up (batch 64)')):
        for arm, color in COLORS.items():
            pts = sorted((r[key] if key != 'gmacs' else r[key], r['top1'], r.get('top1_std', 0.0))
                         for r in rows if r['arm'] == arm and r.get(key) is not None)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker='o',
                            capsize=3, color=color, label=f'{arm} (GMACs budget)')
        pts = sorted((r[key], r['top1']) for r in latency_rows if r.get(key) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], 's--', color='tab:blue', alpha=0.5,
                    label='nvit (latency budget, nvit_fmnist)')
        ax.axhline(dense['top1'], color='k', ls=':', label='dense')
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test top-1 (%), mean ± std over seeds')
    axes[0].legend(fontsize=7)
    fig.suptitle('OFB, NViT, Torch-Pruning and a uniform DeiT on Fashion-MNIST (reference DeiT-nano)')
    fig.tight_layout()
    path = RESULT.with_suffix('.png')
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['plot']:
        print(plot())
        return
    sys.path.insert(0, str(HERE))
    os.environ.setdefault('DEITLAB_BENCH_RUNS', '/tmp/deitlab-nvit-bench')
    import nvit_fmnist
    if '--arms' not in argv:
        argv += ['--arms', *ARMS]
    if '--result' not in argv:
        argv += ['--result', str(RESULT)]
    nvit_fmnist.main(argv + ['--target', 'gmacs'])
    if argv[:1] in (['all'], ['measure']) and RESULT.exists():
        print(plot())


if __name__ == '__main__':
    main()
