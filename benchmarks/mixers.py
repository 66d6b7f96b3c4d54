"""Token mixers at one training budget: attention (DeiT), pooling (PoolFormer) and spectral gating
then attention (SpectFormer, alpha = 0, 2, 4, depth), on Fashion-MNIST and on glyphs.

Every model has about the parameters of ``deitlab_deit_nano_patch4_32`` (0.68 M): PoolFormer-nano
matches as registered, SpectFormer-H-nano has 0.74 M (8% more; as registered); a spectral layer has fewer parameters than an attention layer
(h (w/2+1) C 2 against 4 C^2), so each SpectFormer is widened to the embedding width (a multiple
of 6, 3 heads) whose parameter count is closest to DeiT-nano's. All arms train with the same
recipe (``RECIPE``: the reference DeiT-nano recipe of ``reference_fmnist.py``, shorter), one
process per arm at one thread, two arms at a time.

Measured per arm: top-1 on the validation split (Fashion-MNIST: the 10k test images; glyphs: the
2,400-image val split), parameters, closed-form GMACs, and -- in one fresh process per dataset
on a quiet machine, fixed malloc thresholds, 2 threads -- batch-1 latency and batch-256
throughput interleaved against DeiT-nano (``deitlab.bench.compare``).

    python benchmarks/mixers.py train --jobs 2   # ~80 min on 2 cores
    python benchmarks/mixers.py speed            # ~3 min; needs a quiet machine
    python benchmarks/mixers.py plot             # results/mixers.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import FIXED_MALLOC, fresh_rows, run_pool

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
RUNS = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-mixers-bench'))
RECIPE = dict(batch_size=32, lr=5e-4, warmup_epochs=0.5, weight_decay=0.05, smoothing=0.1, mixup=0.0,
              cutmix=0.0, drop_path=0.0, aug='none', seed=0)
DATASETS = {
    'fashion-mnist': dict(epochs=3, img_size=28, in_chans=1, num_classes=10),
    'glyphs': dict(epochs=6, img_size=32, in_chans=3, num_classes=24),
}
DEPTH = 6
ALPHAS = (0, 2, 4, DEPTH)


def _params(name: str, ds: dict, **kw) -> int:
    import timm
    from deitlab.bench import count_params   # importing deitlab registers the deitlab_* names
    return count_params(timm.create_model(name, num_classes=ds['num_classes'], img_size=ds['img_size'],
                                          in_chans=ds['in_chans'], **kw))


def arms(dataset: str) -> list:
    """The arms of one dataset: name, timm model name and constructor kwargs."""
    ds = DATASETS[dataset]
    out = [dict(name='DeiT', model='deitlab_deit_nano_patch4_32', kwargs={}),
           dict(name='PoolFormer', model='deitlab_poolformer_nano_32', kwargs={})]
    target = _params('deitlab_deit_nano_patch4_32', ds)
    for a in ALPHAS:
        dims = range(60, 181, 6)
        best = min(dims, key=lambda d: abs(_params('deitlab_spectformer_nano_patch4_32', ds, alpha=a, embed_dim=d)
                                           - target))
        out.append(dict(name=f'SpectFormer a={a}', model='deitlab_spectformer_nano_patch4_32',
                        kwargs=dict(alpha=a, embed_dim=best)))
    # the hierarchical SpectFormer as registered (0.74 M): 2 spectral then 2 attention stages
    out.append(dict(name='SpectFormer-H', model='deitlab_spectformer_h_nano_32', kwargs={}))
    return out


def _run_dir(dataset: str, arm: dict) -> Path:
    return RUNS / dataset / arm['name'].replace(' ', '_').replace('=', '')


def _train_one(dataset: str, arm: dict) -> None:
    from deitlab.train import TrainConfig, train
    ds = DATASETS[dataset]
    out = _run_dir(dataset, arm)
    cfg = TrainConfig(model=arm['model'], data=dataset, out=str(out), epochs=ds['epochs'], img_size=ds['img_size'],
                      in_chans=ds['in_chans'], model_kwargs=dict(arm['kwargs']), tensorboard=False, progress=False,
                      **RECIPE)
    t0 = time.time()
    res = train(cfg)
    res['wall_s'] = time.time() - t0
    (out / 'arm.json').write_text(json.dumps(dict(dataset=dataset, arm=arm, result=res, config=cfg.to_dict()),
                                             default=str))


def train_all(args) -> None:
    if args.arm:
        return _train_one(args.dataset, next(a for a in arms(args.dataset) if a['name'] == args.arm))
    jobs = [(f"{d} {a['name']}", [sys.executable, __file__, 'train', '--dataset', d, '--arm', a['name']],
             str(_run_dir(d, a)) + '.log') for d in DATASETS for a in arms(d) if not (_run_dir(d, a) / 'arm.json').exists()]
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))


def _load(run: Path):
    from deitlab.rundir import create
    return create(str(run)).eval()


def speed(args) -> None:
    """Time every trained arm of one dataset in a fresh process (see the module docstring)."""
    if args.dataset:
        return _speed_child(args)
    rows = fresh_rows(__file__, '--dataset', DATASETS,
                      ['--rounds', str(args.rounds), '--threads', str(args.threads), '--batch', str(args.batch)])
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / 'speed.json').write_text(json.dumps(rows, indent=2, default=str))


def _speed_child(args) -> None:
    import torch
    from deitlab.bench import compare
    torch.set_num_threads(args.threads)
    models = {a['name']: _load(_run_dir(args.dataset, a)) for a in arms(args.dataset)
              if (_run_dir(args.dataset, a) / 'model.safetensors').exists()}
    rows = compare(models, 'DeiT', batch_size=args.batch, rounds=args.rounds, gmacs=False)
    for r in rows:
        r['dataset'] = args.dataset
        r['settings'] = dict(r['settings'], threads=args.threads, malloc=FIXED_MALLOC, torch=torch.__version__)
    print(json.dumps(rows, default=str))


def collect() -> dict:
    from deitlab.bench import analytic_gmacs, count_gmacs, count_params
    speed_path = RUNS / 'speed.json'
    speed = {(r['dataset'], r['name']): r for r in json.loads(speed_path.read_text())} if speed_path.exists() else {}
    rows = []
    for d in DATASETS:
        for a in arms(d):
            run = _run_dir(d, a)
            if not (run / 'arm.json').exists():
                continue
            info = json.loads((run / 'arm.json').read_text())
            m = _load(run)
            row = dict(dataset=d, name=a['name'], model=a['model'], kwargs=a['kwargs'],
                       top1=info['result']['val_top1'], top5=info['result']['val_top5'],
                       best_top1=info['result'].get('best_top1'), params=count_params(m),
                       gmacs=analytic_gmacs(m), gmacs_counted=count_gmacs(m),
                       train_wall_s=info['result']['wall_s'], run_dir=str(run))
            s = speed.get((d, a['name']))
            if s:
                row.update({k: s[k] for k in ('images_per_s', 'throughput_ratio', 'latency_ms', 'latency_speedup')})
            rows.append(row)
    first = next(iter(speed.values()), {})
    return dict(benchmark='mixers', recipe=RECIPE, datasets=DATASETS, speed_settings=first.get('settings'),
                rows=rows)


def plot(args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    res = collect()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'mixers.json').write_text(json.dumps(res, indent=2, default=str))
    fig, axes = plt.subplots(2, len(DATASETS), figsize=(5.5 * len(DATASETS), 8.5), squeeze=False)
    for j, d in enumerate(DATASETS):
        rows = [r for r in res['rows'] if r['dataset'] == d]
        for i, x in enumerate(('gmacs', 'images_per_s')):
            ax = axes[i][j]
            for k, r in enumerate(rows):
                if r.get(x) is None:
                    continue
                ax.scatter(r[x], r['top1'], s=45, color=f'C{k}', marker='os^v<>D'[k % 7],
                           label=f"{r['name']} ({r['params'] / 1e6:.2f} M)")
            if i == 1 and j == len(DATASETS) - 1:   # the emptiest panel
                ax.legend(fontsize=7, loc='center')
            ax.set_xlabel({'gmacs': 'GMACs / image (closed form)',
                           'images_per_s': 'images/s, batch 256, 2 threads'}[x])
            ax.set_ylabel('top-1 (%)')
            ax.set_title(f"{d}, {DATASETS[d]['epochs']} epochs")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / 'mixers.png', dpi=120)
    for r in res['rows']:
        print(f"{r['dataset']:>14} {r['name']:>18}  top1 {r['top1']:6.2f}  params {r['params'] / 1e6:.3f}M  "
              f"GMACs {r['gmacs']:.4f}  img/s {r.get('images_per_s', float('nan')):8.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('phase', choices=('train', 'speed', 'plot'))
    p.add_argument('--jobs', type=int, default=2)
    p.add_argument('--dataset', choices=tuple(DATASETS))
    p.add_argument('--arm')
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch', type=int, default=256)
    args = p.parse_args(argv)
    {'train': train_all, 'speed': speed, 'plot': plot}[args.phase](args)


if __name__ == '__main__':
    main()
