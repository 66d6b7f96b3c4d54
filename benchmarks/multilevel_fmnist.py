"""Multi-level training (a V-cycle of coalesced models, Zou et al., ICLR 2024) against plain training
of the same DeiT on Fashion-MNIST, 3 seeds.

Model: DeiT-micro (``deitlab_deit_micro_patch4_32``: depth 8, width 128, 4 heads of 32, MLP 512) at
28 px, 1 channel; coalesced once it is depth 4, width 64, 2 heads, twice depth 2, width 32, 1 head.
Recipe ``short`` (AdamW, batch 32, lr 5e-4, no mixing or augmentation), an "epoch" of
``STEPS_PER_EPOCH`` steps (a random 9,600 of the 60,000 training images), ``EPOCHS`` epochs, the
10,000 test images evaluated after every epoch, 1 thread per run, two runs at a time.

* ``plain``    ``EPOCHS`` epochs of the large model;
* ``2-level``  ``--multilevel levels=2,down=2,small=6,up=4`` (methods notes: 2 large, 6 small,
  4 large), alpha 0.25;
* ``3-level``  ``--multilevel levels=3,down=1,small=4,up=3``;
* two variants of the 2-level cycle on seed 0: ``alpha=1`` (the large model takes all of the small
  one's weights) and ``lr x4`` (the small model at 4x the learning rate, the ratio of the method's
  GPT-2 example).

Per run: final top-1, training GFLOPs (``train_gflops``: forward + backward as three forwards,
deitlab.train.flops), training wall time (the epochs' ``epoch_time_s``, evaluation left out), and
the GFLOPs and wall time at the first evaluation that reaches the plain runs' mean final top-1 (none
when it is not reached). ``results/multilevel_fmnist.json`` and ``.png`` (accuracy against training
GFLOPs and against wall time).

    python benchmarks/multilevel_fmnist.py train --jobs 2      # 9 runs, ~45 min on 2 cores
    python benchmarks/multilevel_fmnist.py train --arms '2-level alpha=1' '2-level lr x4' --seeds 0
    python benchmarks/multilevel_fmnist.py report              # the JSON and the plot
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from _common import run_cli, run_pool, seed_stats

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
WORK = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-multilevel-bench'))
MODEL = 'deitlab_deit_micro_patch4_32'
EPOCHS, STEPS_PER_EPOCH = 12, 300
SEEDS = (0, 1, 2)
ARMS = {'plain': None, '2-level': 'levels=2,down=2,small=6,up=4', '3-level': 'levels=3,down=1,small=4,up=3',
        # variants of the 2-level cycle, seed 0 only (``train --arms NAME --seeds 0``): all of the small model's
        # weights (alpha 1), and the small model at 4x the learning rate (the GPT-2 example's ratio)
        '2-level alpha=1': 'levels=2,down=2,small=6,up=4,alpha=1.0',
        '2-level lr x4': 'levels=2,down=2,small=6,up=4,lr_scale=4.0'}
MAIN_ARMS = ('plain', '2-level', '3-level')
RECIPE = ['--recipe', 'short', '--img-size', '28', '--in-chans', '1', '--epochs', str(EPOCHS),
          '--max-steps-per-epoch', str(STEPS_PER_EPOCH), '--workers', '0', '--no-tensorboard', '--no-progress']


def run_dir(arm: str, seed: int) -> Path:
    slug = arm.replace(' ', '_').replace('=', '').replace('.', '')
    return WORK / f'{slug}_s{seed}'


def cmd_train(args) -> None:
    jobs = []
    for seed in args.seeds:
        for arm in args.arms:
            out = run_dir(arm, seed)
            if (out / 'summary.json').exists():
                continue
            cmd = [sys.executable, '-m', 'deitlab', 'train', '--model', MODEL, '--data', 'fashion-mnist', '--out',
                   str(out), '--seed', str(seed), *RECIPE, '--json']
            if ARMS[arm]:
                cmd += ['--multilevel', ARMS[arm]]
            cmd = [f"'{c}'" if ' ' in c else c for c in cmd]
            script = f'{" ".join(cmd)} > "{out}.log" 2>&1 && tail -n 1 "{out}.log" > "{out}/summary.json"'
            jobs.append((f'{arm}_s{seed}', ['bash', '-c', f'rm -rf "{out}" && {script}'], f'{out}.out'))
    print(f'{len(jobs)} runs to do', flush=True)
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))


def _curve(out: Path) -> list:
    """Per epoch: epoch, level, val top-1, cumulative training GFLOPs and wall time."""
    rows, wall = [], 0.0
    for line in (out / 'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        wall += r['epoch_time_s']
        rows.append(dict(epoch=r['epoch'], level=r.get('multilevel_level', 1), val_top1=r['val_top1'],
                         gflops=r['train_gflops'], wall_s=round(wall, 1)))
    return rows


def _reach(curve: list, target: float):
    """The first evaluation at or above ``target``: (GFLOPs, wall seconds), or (None, None)."""
    for c in curve:
        if c['val_top1'] >= target:
            return c['gflops'], c['wall_s']
    return None, None


def _at(curve: list, gflops: float) -> float:
    """Test top-1 of a run's curve at ``gflops`` training GFLOPs, linear between its evaluations."""
    import numpy as np
    return float(np.interp(gflops, [0.0] + [c['gflops'] for c in curve], [0.0] + [c['val_top1'] for c in curve]))


def cmd_report(args) -> None:
    runs = []
    for arm in ARMS:
        for seed in SEEDS:
            out = run_dir(arm, seed)
            if not (out / 'summary.json').exists():
                print('missing', out.name, flush=True)
                continue
            s = json.loads((out / 'summary.json').read_text())
            curve = _curve(out)
            trace = json.loads((out / 'multilevel.json').read_text()) if ARMS[arm] else None
            runs.append(dict(arm=arm, seed=seed, top1=s['val_top1'], gflops=s['train_gflops'],
                             wall_s=curve[-1]['wall_s'], curve=curve, stages=trace and trace['stages'],
                             gflops_by_level=trace and trace['gflops_by_level']))
    plain = [r['top1'] for r in runs if r['arm'] == 'plain']
    target = sum(plain) / len(plain) if plain else None
    summary = {}
    for arm in ARMS:
        rs = [r for r in runs if r['arm'] == arm]
        if not rs:
            continue
        for r in rs:
            r['reach_gflops'], r['reach_wall_s'] = _reach(r['curve'], target) if target is not None else (None, None)
        summary[arm] = dict(top1=seed_stats([r['top1'] for r in rs]), gflops=seed_stats([r['gflops'] for r in rs]),
                            wall_s=seed_stats([r['wall_s'] for r in rs]),
                            reached=sum(r['reach_gflops'] is not None for r in rs))
    if 'plain' in summary:
        base = summary['plain']
        plain_curves = [r['curve'] for r in runs if r['arm'] == 'plain']
        for arm, s in summary.items():
            s['gflops_saving'] = 1 - s['gflops']['mean'] / base['gflops']['mean']
            s['wall_saving'] = 1 - s['wall_s']['mean'] / base['wall_s']['mean']
            # plain training's test top-1 after the same training GFLOPs (its evaluations interpolated)
            s['plain_top1_same_gflops'] = seed_stats([_at(c, s['gflops']['mean']) for c in plain_curves])
    result = dict(benchmark='multilevel_fmnist', model=MODEL, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                  main_arms=list(MAIN_ARMS),
                  batch_size=32, seeds=list(SEEDS), arms=ARMS, recipe=' '.join(RECIPE), target_top1=target,
                  summary=summary, runs=runs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'multilevel_fmnist.json').write_text(json.dumps(result, indent=1))
    plot(result)
    print(json.dumps(summary, indent=1))


def plot(result: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    colors = {'plain': 'k', '2-level': 'tab:blue', '3-level': 'tab:red', '2-level alpha=1': 'tab:cyan',
              '2-level lr x4': 'tab:purple'}
    for ax, key, label in ((axes[0], 'gflops', 'training GFLOPs (forward + backward)'),
                           (axes[1], 'wall_s', 'training wall time (s, 1 thread)')):
        for r in result['runs']:
            ax.plot([c[key] for c in r['curve']], [c['val_top1'] for c in r['curve']], color=colors[r['arm']],
                    alpha=0.7, lw=1, marker='.', label=r['arm'] if r['seed'] == 0 else None)
        if result['target_top1'] is not None:
            ax.axhline(result['target_top1'], color='0.5', ls=':', label='plain, mean final top-1')
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test top-1 (%)')
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Multi-level training of DeiT-micro on Fashion-MNIST ({result['epochs']} x "
                 f"{result['steps_per_epoch']} steps, one line per seed)")
    fig.tight_layout()
    fig.savefig(RESULTS / 'multilevel_fmnist.png', dpi=100)


def _flags(name: str, q) -> None:
    if name == 'train':
        q.add_argument('--jobs', type=int, default=2)
        q.add_argument('--arms', nargs='*', default=list(MAIN_ARMS), choices=list(ARMS))
        q.add_argument('--seeds', nargs='*', type=int, default=list(SEEDS))


def main():
    run_cli(__doc__, {'train': cmd_train, 'report': cmd_report}, _flags)


if __name__ == '__main__':
    main()
