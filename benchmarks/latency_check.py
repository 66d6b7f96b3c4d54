"""Does the NViT latency table predict the measured speed-up? Every pruned model of the NViT
benchmark against a table timed now, on this machine.

The models are the widths recorded in ``results/nvit_fmnist.json`` (every arm, budget and seed:
NViT, Torch-Pruning Taylor and Hessian, the uniform DeiT), rebuilt with random weights (latency
does not depend on the values), plus four probes: the dense DeiT-nano with one width moved off a
multiple of 8 or onto another one (embedding 95 and 88, per-head QK 31 and 24). In one process
with fixed malloc thresholds (2 threads, batch 64):

1. Two latency tables of the reference DeiT-nano over the default grid, 5 interleaved rounds each:
   ``paired`` (the default of ``build_latency_table``: every call timed against a reference block
   called just before and after it, median ratio over the rounds, and the measured cost of widths
   off a multiple of 8 applied per block), the same table without that cost (``plain``), and
   ``fastest`` (the fastest round of each node, no alignment cost: the table before).
2. The measured speed-up of every model: whole-model forwards timed paired against the dense model
   (``D M D M ... D``) in ``--rounds`` interleaved rounds; the speed-up is the inverse of the
   median ratio, with the range over rounds.

Each row gives both tables' predicted speed-up and ``error = predicted / measured - 1``; the
summary gives the mean and largest |error| per arm and table.

    python benchmarks/latency_check.py        # ~7 min on 2 cores: results/latency_check{.json,.png,_table.json}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import fresh_json

HERE = Path(__file__).resolve().parent
REF = HERE / 'reference' / 'fmnist-deit-nano'
RESULTS = HERE / 'results'
SOURCE = RESULTS / 'nvit_fmnist.json'
OUT = RESULTS / 'latency_check.json'
KEYS = ('embed_dim', 'num_heads', 'qk_dim', 'v_dim', 'mlp_hidden')
# the dense model with one width changed: (name, key, value)
PROBES = (('dense E=95', 'embed_dim', 95), ('dense E=88', 'embed_dim', 88),
          ('dense qk=31', 'qk_dim', 31), ('dense qk=24', 'qk_dim', 24))


def models_to_time() -> list:
    """``(row, widths)`` for every seed of every pruned row of the NViT benchmark, and the probes."""
    src = json.loads(SOURCE.read_text())
    dense = next(r for r in src['rows'] if r['arm'] == 'dense')['widths']
    out = []
    for r in src['rows']:
        for s in r.get('seeds', []):
            out.append((dict(name=f"{r['arm']} {r['budget']} s{s['seed']}", arm=r['arm'], budget=r['budget'],
                             seed=s['seed']), {k: s['widths'][k] for k in KEYS}))
    for name, key, value in PROBES:
        w = {k: dense[k] for k in KEYS}
        w[key] = value if key == 'embed_dim' else [value] * len(dense[key])
        out.append((dict(name=name, arm='probe'), w))
    return out


def aligned(widths: dict, step: int = 8) -> bool:
    """Every width of the model a multiple of ``step`` (heads aside)."""
    vals = [widths['embed_dim']] + [v for k in ('qk_dim', 'v_dim', 'mlp_hidden') for v in widths[k]]
    return all(v % step == 0 for v in vals)


def run(args) -> dict:
    import copy

    import numpy as np
    import torch
    from deitlab.prune.families import layout_of
    from deitlab.prune.timing import build_latency_table, timed_rounds
    from deitlab.rundir import create

    torch.manual_seed(0)
    dense = create(str(REF)).eval()
    tables = {}
    for name, paired in (('paired', True), ('fastest', False)):
        with torch.inference_mode():
            tables[name] = build_latency_table(dense, batch_size=64, passes=args.lut_passes, threads=args.threads,
                                               progress=False, paired=paired)
    # the paired table without its misalignment factors, and the estimator before (fastest, none)
    tables['plain'] = copy.copy(tables['paired'])
    tables['plain'].misalign = {}
    tables['fastest'].misalign = {}
    tables['paired'].save(Path(args.out).with_name(Path(args.out).stem + '_table.json'))   # for re-analysis
    layout = layout_of(dense)
    todo = models_to_time()
    models = {'dense': dense}
    for row, w in todo:
        models[row['name']] = layout.build(w).eval()
    image = torch.randn(64, 1, 28, 28)
    jobs = [(name, lambda m=m: (lambda: m(image))) for name, m in models.items()]
    with torch.inference_mode():
        per_round, threads = timed_rounds(jobs, torch.device('cpu'), args.rounds, args.steps, args.threads,
                                          progress=False, reference='dense')
    dense_w = dict(dense.block_widths, embed_dim=dense.embed_dim)
    rows = []
    for row, w in todo:
        speed = [per_round['dense'][i] / v for i, v in enumerate(per_round[row['name']])]
        measured = float(np.median(speed))
        row.update(widths=w, aligned=aligned(w), measured=round(measured, 4),
                   measured_lo=round(min(speed), 4), measured_hi=round(max(speed), 4))
        for name, lut in tables.items():
            pred = lut.model_ms(dense_w) / lut.model_ms(w)
            row[f'predicted_{name}'] = round(pred, 4)
            row[f'error_{name}'] = round(pred / measured - 1, 4)
        rows.append(row)
    summary = {}
    for arm in dict.fromkeys(r['arm'] for r in rows):
        sel = [r for r in rows if r['arm'] == arm]
        summary[arm] = {name: dict(mean_abs_error=round(float(np.mean([abs(r[f'error_{name}']) for r in sel])), 4),
                                   max_abs_error=round(float(max(abs(r[f'error_{name}']) for r in sel)), 4),
                                   mean_error=round(float(np.mean([r[f'error_{name}'] for r in sel])), 4))
                        for name in tables}
    return dict(benchmark='latency_check', source=str(SOURCE.relative_to(HERE.parent)),
                settings=dict(threads=threads, batch=64, rounds=args.rounds, steps=args.steps,
                              lut_passes=args.lut_passes, torch=torch.__version__),
                tables={name: dict(meta=lut.meta, misalign=lut.misalign) for name, lut in tables.items()}, rows=rows, summary=summary)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colors = {'nvit': 'tab:red', 'tp_taylor': 'tab:blue', 'tp_hessian': 'tab:purple', 'uniform': 'tab:green',
              'probe': 'tab:gray'}
    names = ('paired', 'plain', 'fastest')
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), sharey=True)
    hi = max(max(r['measured'], *(r[f'predicted_{n}'] for n in names)) for r in result['rows']) * 1.08
    for ax, name in zip(axes, names):
        for arm, c in colors.items():
            sel = [r for r in result['rows'] if r['arm'] == arm]
            ax.scatter([r[f'predicted_{name}'] for r in sel], [r['measured'] for r in sel], s=22, c=c, label=arm,
                       marker='o' if arm != 'probe' else 'x')
        ax.plot([0.5, hi], [0.5, hi], 'k-', lw=0.8)
        ax.fill_between([0.5, hi], [0.5 / 1.1, hi / 1.1], [0.5 / 0.9, hi / 0.9], color='k', alpha=0.08)
        ax.set_xlabel(f'predicted speed-up ({name} table)')
        ax.set_title(f'{name} table: mean |error| '
                     f'{sum(abs(r["error_" + name]) for r in result["rows"]) / len(result["rows"]):.1%}')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('measured speed-up (paired, median)')
    axes[0].legend(fontsize=8)
    fig.suptitle('NViT latency table: predicted vs measured speed-up (DeiT-nano, batch 64, 2 threads; band: 10%)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('phase', nargs='?', default='all', choices=['all', 'run'])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=9)
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--lut-passes', type=int, default=5)
    ap.add_argument('--out', default=str(OUT))
    args = ap.parse_args()
    if args.phase == 'run':
        print(json.dumps(run(args)))
        return
    flags = ['--threads', str(args.threads), '--rounds', str(args.rounds), '--steps', str(args.steps),
             '--lut-passes', str(args.lut_passes), '--out', args.out]
    result = fresh_json([sys.executable, __file__, 'run', *flags])
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix('.png'))
    for arm, s in result['summary'].items():
        print(arm, s)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
