"""The reference DeiT on Fashion-MNIST: the model later benchmarks start from.

Trains ``deitlab_deit_nano_patch4_32`` (28 px, 1 channel, 7x7 tokens) with the DeiT recipe scaled
to a ~30 CPU-minute run, evaluates on the full 10k test set each epoch, measures it with
``deitlab bench``, and writes:

* ``benchmarks/reference/fmnist-deit-nano/`` - the run directory (config.json, model.safetensors,
  metrics.jsonl, train_config.json), loadable with ``timm.create_model('local-dir:...', pretrained=True)``
* ``benchmarks/results/reference_fmnist.json`` and ``reference_fmnist.png`` (accuracy curve).

Rebuild (needs ``apt-get install dataset-fashion-mnist``)::

    python benchmarks/reference_fmnist.py            # trains, then measures
    python benchmarks/reference_fmnist.py --measure  # only re-measure the committed run directory
"""
import argparse
import os
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUN = ROOT / 'reference' / 'fmnist-deit-nano'
RESULTS = ROOT / 'results'
TRAIN_ARGS = [
    '--model', 'deitlab_deit_nano_patch4_32', '--data', 'fashion-mnist', '--epochs', '9',
    '--batch-size', '32', '--lr', '5e-4', '--warmup-epochs', '0.5', '--weight-decay', '0.05',
    '--smoothing', '0.1', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--aug', 'none',
    '--seed', '0', '--workers', '0',
]


def train(out: Path, threads: int) -> dict:
    cmd = [sys.executable, '-m', 'deitlab', 'train', '--out', str(out), *TRAIN_ARGS, '--json']
    print(f'$ OMP_NUM_THREADS={threads}', ' '.join(cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res['wall_s'] = time.time() - t0
    res['cpu_s'] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res['threads'] = threads
    return res


def measure(run: Path) -> dict:
    import torch
    from deitlab.bench import benchmark_model
    from deitlab.evaluate import evaluate_model
    from deitlab.rundir import create
    model = create(str(run)).eval()
    bench = benchmark_model(model, batch_size=128)
    ev = evaluate_model(str(run), 'fashion-mnist', progress=False)
    metrics = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    return dict(test_top1=ev['top1'], test_top5=ev['top5'], test_count=ev['count'], bench=bench,
                curve=[{k: m[k] for k in ('epoch', 'train_loss', 'val_top1', 'val_top5', 'train_img_per_s')
                        if k in m} for m in metrics], torch_threads=torch.get_num_threads())


def plot(curve: list, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = [c['epoch'] for c in curve]
    ax[0].plot(ep, [c['val_top1'] for c in curve], 'o-')
    ax[0].set_title('Fashion-MNIST test top-1 (%)')
    ax[0].set_xlabel('epoch')
    ax[0].grid(alpha=.3)
    ax[1].plot(ep, [c['train_loss'] for c in curve], 'o-', color='tab:red')
    ax[1].set_title('train loss (label smoothing 0.1)')
    ax[1].set_xlabel('epoch')
    ax[1].grid(alpha=.3)
    fig.suptitle('deitlab_deit_nano_patch4_32, 28 px, 1 channel')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--measure', action='store_true', help='only measure the committed run directory')
    ap.add_argument('--threads', type=int, default=1, help='torch threads for training (1 is the most CPU-efficient here)')
    ap.add_argument('--scratch', default='/tmp/deitlab-reference-fmnist', help='where training writes')
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {}
    if not args.measure:
        scratch = Path(args.scratch)
        if scratch.exists():
            shutil.rmtree(scratch)
        out['train'] = train(scratch, args.threads)
        if RUN.exists():
            shutil.rmtree(RUN)
        RUN.mkdir(parents=True)
        for name in ('config.json', 'model.safetensors', 'metrics.jsonl', 'train_config.json'):
            shutil.copy(scratch / name, RUN / name)
    elif (RESULTS / 'reference_fmnist.json').exists():
        out = json.loads((RESULTS / 'reference_fmnist.json').read_text())
    out['command'] = f'OMP_NUM_THREADS={args.threads} deitlab train ' + ' '.join(TRAIN_ARGS) + ' --out RUN_DIR'
    out['measured'] = measure(RUN)
    (RESULTS / 'reference_fmnist.json').write_text(json.dumps(out, indent=2))
    plot(out['measured']['curve'], RESULTS / 'reference_fmnist.png')
    m = out['measured']
    print(json.dumps(dict(test_top1=m['test_top1'], params=m['bench']['params'], gmacs=m['bench']['gmacs'],
                          cpu_s=out.get('train', {}).get('cpu_s'))))


if __name__ == '__main__':
    main()
