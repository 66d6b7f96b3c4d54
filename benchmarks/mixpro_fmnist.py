"""Batch mixing on Fashion-MNIST: none, Mixup+CutMix, TransMix and MixPro on the reference DeiT-nano.

Every arm trains ``deitlab_deit_nano_patch4_32`` (28 px, 1 channel, 7x7 tokens) from scratch with
the reference recipe (``benchmarks/reference_fmnist.py``: AdamW lr 5e-4, batch 32, warm-up 0.5
epoch, label smoothing 0.1, no drop path, no other augmentation) for the same epochs and seeds;
only ``--mix`` changes, at its defaults (Mixup 0.8 / CutMix 1.0, switch 0.5 or 0.8 for TransMix;
MaskMix with probability 0.5, 8-pixel cells = 2x2 tokens, a 4x4 grid). Each model is then tested on
the 10k test images clean and under two corruptions, the same draw for every model:

* noise: ``clip(x + N(0, 0.2^2))`` in [0, 1] pixel units;
* occlusion: one 12x12 grey (0.5) square at a random position inside the image.

    python benchmarks/mixpro_fmnist.py train --jobs 2     # 12 runs, ~15 CPU-min each at 1 thread
    python benchmarks/mixpro_fmnist.py eval               # ~5 min (--arms mixpro: re-measure one arm)
    python benchmarks/mixpro_fmnist.py plot               # results/mixpro_fmnist.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from _common import run_pool

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
RUNS = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-mixpro-bench'))
ARMS = ['none', 'mixup-cutmix', 'transmix', 'mixpro']
SEEDS = [0, 1, 2]
EPOCHS = 3
RECIPE = ['--model', 'deitlab_deit_nano_patch4_32', '--data', 'fashion-mnist', '--batch-size', '32', '--lr', '5e-4',
          '--warmup-epochs', '0.5', '--weight-decay', '0.05', '--smoothing', '0.1', '--drop-path', '0',
          '--aug', 'none', '--workers', '0', '--no-tensorboard', '--no-progress']
NOISE_STD, OCCLUDER, GREY = 0.2, 12, 0.5


def run_dir(arm: str, seed: int) -> Path:
    return RUNS / f'{arm}-s{seed}'


def cmd_train(args) -> None:
    jobs = []
    for seed in args.seeds:          # seed-major: a partial sweep covers every arm
        for arm in args.arms:
            out = run_dir(arm, seed)
            if (out / 'summary.json').exists():
                continue
            cmd = [sys.executable, '-m', 'deitlab', 'train', '--out', str(out), *RECIPE, '--epochs', str(args.epochs),
                   '--mix', arm, '--seed', str(seed), '--json']
            if args.max_steps:  # a smoke run of the pipeline
                cmd += ['--max-steps-per-epoch', str(args.max_steps)]
            script = f'{" ".join(cmd)} > {out}.log 2>&1 && tail -n 1 {out}.log > {out}/summary.json'
            jobs.append((f'{arm} seed {seed}', ['bash', '-c', f'rm -rf {out} && {script}'], f'{out}.out'))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    run_pool(jobs, args.jobs, env)


class Corrupted:
    """A normalised test set with a fixed per-image corruption in pixel space."""

    def __init__(self, ds, kind: str, mean: float, std: float):
        self.ds, self.kind, self.mean, self.std = ds, kind, mean, std

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        import torch
        x, y = self.ds[i]
        g = torch.Generator().manual_seed(10_000 + i)
        px = x * self.std + self.mean
        if self.kind == 'noise':
            px = (px + NOISE_STD * torch.randn(px.shape, generator=g)).clamp(0, 1)
        elif self.kind == 'occlusion':
            h, w = px.shape[-2:]
            top = int(torch.randint(0, h - OCCLUDER + 1, (1,), generator=g))
            left = int(torch.randint(0, w - OCCLUDER + 1, (1,), generator=g))
            px = px.clone()
            px[..., top:top + OCCLUDER, left:left + OCCLUDER] = GREY
        return (px - self.mean) / self.std, y


def cmd_eval(args) -> None:
    import torch
    from torch.utils.data import DataLoader
    from deitlab.data import build_dataset
    from deitlab.rundir import create
    from deitlab.train.engine import evaluate, model_input, norm_stats

    torch.set_num_threads(2)
    rows, kept = [], []
    if set(args.arms) != set(ARMS):
        # re-measure only these arms; the others keep their rows from the last full run (their code
        # path did not change and training is deterministic per seed)
        previous = json.loads((RESULTS / 'mixpro_fmnist.json').read_text())
        rows = [r for r in previous['runs'] if r['arm'] not in args.arms]
        kept = sorted({r['arm'] for r in rows})
    for arm in args.arms:
        for seed in SEEDS:
            out = run_dir(arm, seed)
            if not (out / 'summary.json').exists():
                print('missing', out, flush=True)
                continue
            model = create(str(out)).eval()
            chans, size = model_input(model)
            mean, std = norm_stats(model, chans)
            ds = build_dataset('fashion-mnist', 'val', img_size=size, in_chans=chans, aug='none', mean=mean, std=std)
            row = dict(arm=arm, seed=seed)
            for kind in ('clean', 'noise', 'occlusion'):
                data = ds if kind == 'clean' else Corrupted(ds, kind, float(mean[0]), float(std[0]))
                res = evaluate(model, DataLoader(data, batch_size=500), torch.device('cpu'), progress=False)
                row[kind] = res['top1']
            metrics = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines() if line.strip()]
            row['curve'] = [{k: m[k] for k in ('epoch', 'train_loss', 'val_top1', 'pal_alpha', 'pal_lambda_shift',
                                               'transmix_lam_attn', 'train_img_per_s') if k in m} for m in metrics]
            row['train_time_s'] = json.loads((out / 'summary.json').read_text())['train_time_s']
            print(json.dumps({k: v for k, v in row.items() if k != 'curve'}), flush=True)
            rows.append(row)
    rows.sort(key=lambda r: (ARMS.index(r['arm']), r['seed']))
    summary = {}
    for arm in ARMS:
        got = [r for r in rows if r['arm'] == arm]
        if not got:
            continue
        summary[arm] = {k: dict(mean=statistics.mean(r[k] for r in got),
                                std=statistics.stdev(r[k] for r in got) if len(got) > 1 else 0.0,
                                values=[r[k] for r in got]) for k in ('clean', 'noise', 'occlusion')}
        summary[arm]['seeds'] = [r['seed'] for r in got]
    RESULTS.mkdir(exist_ok=True)
    result = dict(setup=dict(model='deitlab_deit_nano_patch4_32', data='fashion-mnist (10k test)', epochs=EPOCHS,
                             seeds=SEEDS, recipe=' '.join(RECIPE), noise_std=NOISE_STD, occluder=OCCLUDER,
                             occluder_value=GREY, threads_per_run=1, remeasured=list(args.arms), kept_from_previous_run=kept),
                  summary=summary, runs=rows)
    (RESULTS / 'mixpro_fmnist.json').write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


def cmd_plot(args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    res = json.loads((RESULTS / 'mixpro_fmnist.json').read_text())
    summary = res['summary']
    arms = [a for a in ARMS if a in summary]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, kind in zip(axes, ('clean', 'noise', 'occlusion')):
        means = [summary[a][kind]['mean'] for a in arms]
        stds = [summary[a][kind]['std'] for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color=['0.6', 'tab:blue', 'tab:orange', 'tab:green'])
        for i, a in enumerate(arms):
            ax.plot([i] * len(summary[a][kind]['values']), summary[a][kind]['values'], 'k.', ms=4)
        lo = min(min(summary[a][kind]['values']) for a in arms)
        hi = max(max(summary[a][kind]['values']) for a in arms)
        ax.set_ylim(lo - 2, hi + 1)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_title(f'{kind} test top-1 (%)')
        ax.grid(axis='y', alpha=.3)
    ax = axes[3]
    for r in res['runs']:
        if r['arm'] == 'mixpro':
            ax.plot([c['epoch'] for c in r['curve']], [c['pal_alpha'] for c in r['curve']], 'o-',
                    color='tab:green', label=f"seed {r['seed']}")
    ax.set_title('MixPro: mean PAL alpha per epoch')
    ax.set_xlabel('epoch')
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    fig.suptitle(f"DeiT-nano on Fashion-MNIST, {res['setup']['epochs']} epochs, mean and spread over seeds "
                 f"{res['setup']['seeds']}")
    fig.tight_layout()
    fig.savefig(RESULTS / 'mixpro_fmnist.png', dpi=110)
    print('wrote', RESULTS / 'mixpro_fmnist.png')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    t = sub.add_parser('train')
    t.add_argument('--jobs', type=int, default=2)
    t.add_argument('--epochs', type=int, default=EPOCHS)
    t.add_argument('--seeds', type=lambda s: [int(v) for v in s.split(',')], default=SEEDS)
    t.add_argument('--arms', type=lambda s: s.split(','), default=ARMS)
    t.add_argument('--max-steps', type=int, default=None, help='cap steps per epoch (smoke test only)')
    t.set_defaults(func=cmd_train)
    e = sub.add_parser('eval')
    e.add_argument('--arms', type=lambda s: s.split(','), default=ARMS,
                   help='evaluate these arms only; the others keep their rows from results/mixpro_fmnist.json')
    e.set_defaults(func=cmd_eval)
    sub.add_parser('plot').set_defaults(func=cmd_plot)
    args = p.parse_args()
    args.func(args)


if __name__ == '__main__':
    main()
