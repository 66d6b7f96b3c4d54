"""CUDA unlearnable Fashion-MNIST: clean test accuracy after training on clean vs poisoned data.

The training set is poisoned with ``deitlab unlearnable make`` (k = 3, p_b = 0.3, the paper's
CIFAR setting) at fractions 0.25 / 0.5 / 0.75 / 1 of every class; the test set stays clean. Two
models train with one recipe (AdamW lr 5e-4, batch 32, label smoothing 0.1, no augmentation or
mixing, 1 channel at 28 px): the reference DeiT-nano (``deitlab_deit_nano_patch4_32``) and timm's
ResNet-18 (the paper's model).

- Short budget (``STEPS`` steps, a third of an epoch): every poisoned fraction for both models, and
  DeiT-nano on fully poisoned copies with p_b = 0.1 / 0.5 / 0.7.
- Long budget (5 epochs DeiT-nano, 3 epochs ResNet-18): clean vs fully poisoned, and DeiT-nano on the
  fully poisoned set with the cheap defences of ``deitlab train --defence``: random blur
  (p_b' = 0.3), one-step L-inf adversarial training from a random start (4/255, step 5/255) and
  augmentation (random crop + flip with Mixup / CutMix).
- Controls (the paper's): each model trained on clean or fully poisoned data is also tested on the
  test set filtered with each image's own class filter, and with the next class's filter.

    python benchmarks/unlearnable_fmnist.py make            # the poisoned copies, ~3 min
    python benchmarks/unlearnable_fmnist.py train --jobs 2  # ~3.5 h on 2 cores (--budget short: ~40 min)
    python benchmarks/unlearnable_fmnist.py plot            # controls (~8 min), results/unlearnable_fmnist.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _common import run_pool

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
WORK = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-unlearnable-bench'))
KEY = 'deitlab benchmark key (public, for reproduction only)'
FRACTIONS = [0.25, 0.5, 0.75, 1.0]
MODELS = {'deit-nano': 'deitlab_deit_nano_patch4_32', 'resnet18': 'resnet18'}
LONG_EPOCHS = {'deit-nano': 5, 'resnet18': 3}   # the long budget: full epochs
DEFENCES = ['blur:p=0.3', 'adv:eps=4,steps=1,alpha=5']   # adv: one-step PGD from a random start
AUGMENT = ['--aug', 'light', '--mix', 'mixup-cutmix']   # crop + flip, Mixup / CutMix
BLUR, BLURS = 0.3, [0.1, 0.5, 0.7]   # the paper's CIFAR p_b; a sweep on the fully poisoned set (short budget)
STEPS = 625   # the short budget: a third of an epoch
SUBSET, SUBSET_EPOCHS = 1000, 10   # the subset budget: 1000 images a class, 10 epochs
RECIPE = ['--batch-size', '32', '--lr', '5e-4', '--warmup-epochs', '0.1', '--smoothing', '0.1',
          '--drop-path', '0', '--aug', 'none', '--mix', 'none', '--img-size', '28', '--in-chans', '1',
          '--workers', '0', '--no-tensorboard', '--no-progress']


def poisoned_dir(fraction: float, blur: float = BLUR) -> Path:
    return WORK / (f'fmnist-cuda-{fraction:g}' + ('' if blur == BLUR else f'-pb{blur:g}'))


def cmd_make(args) -> None:
    from deitlab.unlearnable import make_unlearnable
    for f, blur in [(f, BLUR) for f in FRACTIONS] + [(1.0, b) for b in BLURS]:
        if not (poisoned_dir(f, blur) / 'manifest.json').exists():
            m = make_unlearnable('fashion-mnist', KEY, poisoned_dir(f, blur), blur=blur, fraction=f, overwrite=True)
            print(f, blur, m['splits']['train']['poisoned'], 'of', m['splits']['train']['total'], flush=True)
    make_subset()


def make_subset() -> None:
    """The first ``SUBSET`` training images of each class (and the whole test set) as a clean
    ImageFolder, from a clean copy in the poisoned copies' layout, and its fully poisoned copy."""
    from deitlab.unlearnable import make_unlearnable
    clean, small = WORK / 'fmnist-cuda-0', WORK / 'fmnist-10k'
    if not (clean / 'manifest.json').exists():
        make_unlearnable('fashion-mnist', KEY, clean, fraction=0.0, overwrite=True)
    if not (small / 'done').exists():
        for split in ('train', 'val'):
            for d in sorted((clean / split).iterdir()):
                (small / split / d.name).mkdir(parents=True, exist_ok=True)
                files = sorted(d.iterdir())
                for f in files[:SUBSET] if split == 'train' else files:
                    if not (small / split / d.name / f.name).exists():
                        os.link(f, small / split / d.name / f.name)
        (small / 'done').write_text('')
    if not (subset_dir(1.0) / 'manifest.json').exists():
        make_unlearnable(f'folder:{small}', KEY, subset_dir(1.0), fraction=1.0, overwrite=True)


def subset_dir(fraction: float) -> Path:
    return WORK / ('fmnist-10k' if fraction == 0 else f'fmnist-10k-cuda-{fraction:g}')


def _arm(tag: str, fraction: float, budget: str, defence: str = 'none', label: str = '', extra=(),
         blur: float = BLUR) -> dict:
    data = 'fashion-mnist' if fraction == 0 else f'folder:{poisoned_dir(fraction, blur)}'
    if budget == 'subset':
        data = f'folder:{subset_dir(fraction)}'
    name = f'{tag}/' + ('clean' if fraction == 0 else f'cuda {fraction:g}') + (f'+{label}' if label else '')
    name += '' if blur == BLUR else f' pb{blur:g}'
    return dict(name=name, model=MODELS[tag], data=data, fraction=fraction, defence=defence, budget=budget,
                extra=list(extra), blur=blur)


def arms() -> list:
    """Short budget: every poisoned fraction for both models. Long budget: clean vs fully poisoned for
    both models, and DeiT-nano on the fully poisoned set with each defence."""
    out = []
    for tag in MODELS:
        out += [_arm(tag, f, 'short') for f in [0.0, *FRACTIONS]]
    out += [_arm('deit-nano', 1.0, 'short', blur=b) for b in BLURS]
    defended = [dict(defence=d, label=d.split(':')[0]) for d in DEFENCES] + [dict(label='augment', extra=AUGMENT)]
    for tag in MODELS:
        out += [_arm(tag, f, 'long') for f in (0.0, 1.0)]
    out += [_arm('deit-nano', 1.0, 'long', **d) for d in defended]
    out += [_arm('deit-nano', f, 'subset') for f in (0.0, 1.0)]
    return out


def run_dir(arm: dict) -> Path:
    name = arm['name'].replace('/', '_').replace(' ', '_').replace('+', '_')
    return WORK / {'short': 'runs', 'long': 'long', 'subset': 'subset'}[arm['budget']] / name


def budget_flags(arm: dict, steps: int) -> list:
    if arm['budget'] == 'short':
        return ['--epochs', '1', '--max-steps-per-epoch', str(steps)]
    if arm['budget'] == 'subset':
        return ['--epochs', str(SUBSET_EPOCHS)]
    return ['--epochs', str(LONG_EPOCHS[arm['name'].split('/')[0]])]


def cmd_train(args) -> None:
    jobs = []
    for arm in arms():
        out, key = run_dir(arm), f"{arm['name']}@{arm['budget']}"
        if arm['budget'] not in args.budget or (out / 'summary.json').exists() or (args.arms and key not in args.arms):
            continue
        cmd = [sys.executable, '-m', 'deitlab', 'train', '--out', str(out), '--model', arm['model'], '--data',
               arm['data'], '--defence', arm['defence'], *budget_flags(arm, args.steps), *RECIPE, *arm['extra'],
               '--json']
        script = f'{" ".join(cmd)} > {out}.log 2>&1 && tail -n 1 {out}.log > {out}/summary.json'
        jobs.append((key, ['bash', '-c', f'rm -rf {out} && mkdir -p {out.parent} && {script}'], f'{out}.out'))
    if args.arms:
        jobs.sort(key=lambda job: args.arms.index(job[0]))
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))


def filter_controls(run: Path, manifest: dict, subset: bool = False) -> dict:
    """Top-1 of a trained model on the clean test set, on the test set filtered with each image's own
    class filter, and filtered with another class's filter (class c gets class c+1's), as in the
    paper's controls. Labels are compared in Fashion-MNIST's numbering; ``manifest`` is a full copy's
    (its folder labels); the subset's filters are numbered by folder label."""
    import torch
    from deitlab.data import build_dataset
    from deitlab.rundir import create
    from deitlab.train.engine import model_input, norm_stats
    from deitlab.unlearnable import apply_filters, class_filters

    model = create(str(run)).eval()
    chans, size = model_input(model)
    mean, std = norm_stats(model, chans)
    ds = build_dataset('fashion-mnist', 'val', img_size=size, in_chans=chans, aug='none', mean=mean, std=std)
    k = manifest['num_classes']
    filters = class_filters(KEY, k, manifest['kernel_size'], manifest['blur'])
    # a model trained on folder:POISONED predicts folder labels: map them back to the source's
    to_source = torch.arange(k)
    if json.loads((run / 'summary.json').read_text())['data'].startswith('folder:'):
        for c in manifest['classes']:
            to_source[c['folder_label']] = c['label']
    y = ds.targets
    folder_of = torch.empty(k, dtype=torch.long)
    for c in manifest['classes']:
        folder_of[c['label']] = c['folder_label']
    own = folder_of[y] if subset else y
    out = {}
    for kind, images in (('clean', ds.images), ('own filter', apply_filters(ds.images, own, filters)),
                         ('other filter', apply_filters(ds.images, (own + 1) % k, filters))):
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y), 500):
                x = torch.stack([ds.transform(img) for img in images[i:i + 500]])
                correct += int((to_source[model(x).argmax(1)] == y[i:i + 500]).sum())
        out[kind] = 100.0 * correct / len(y)
    return out


def _curve(run: Path) -> list:
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ('epoch', 'train_loss', 'val_top1') if k in r} for r in rows]


def cmd_plot(args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch
    torch.set_num_threads(2)
    manifest = json.loads((poisoned_dir(1.0) / 'manifest.json').read_text())   # the paper's setting
    rows = []
    for arm in arms():
        run = run_dir(arm)
        if not (run / 'summary.json').exists():
            print('missing', arm['budget'], arm['name'], flush=True)
            continue
        s = json.loads((run / 'summary.json').read_text())
        row = dict(arm, top1=s['val_top1'], epochs=s['epochs'], train_time_s=s['train_time_s'], params=s['params'],
                   curve=_curve(run))
        if arm['fraction'] in (0.0, 1.0) and arm['defence'] == 'none' and not arm['extra']:
            row['controls'] = filter_controls(run, json.loads(
                (poisoned_dir(1.0, arm['blur']) / 'manifest.json').read_text()), arm['budget'] == 'subset')
        print(json.dumps({k: v for k, v in row.items() if k != 'curve'}), flush=True)
        rows.append(row)
    result = dict(setup=dict(data='fashion-mnist (60k train, 10k clean test)', short_steps=args.steps,
                             long_epochs=LONG_EPOCHS, batch_size=32, kernel_size=manifest['kernel_size'],
                             blur=manifest['blur'], key_fingerprint=manifest['key_fingerprint'],
                             recipe=' '.join(RECIPE), chance_top1=10.0, threads_per_run=1),
                  runs=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'unlearnable_fmnist.json').write_text(json.dumps(result, indent=1))
    plot(rows, plt)


def plot(rows: list, plt) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    colors = {'deit-nano': 'tab:blue', 'resnet18': 'tab:red'}
    short = [r for r in rows if r['budget'] == 'short' and r['defence'] == 'none' and not r['extra']]
    for tag, color in colors.items():
        pts = sorted((r['fraction'], r['top1']) for r in short if r['name'].startswith(tag) and r['blur'] == BLUR)
        ax[0].plot([p[0] for p in pts], [p[1] for p in pts], 'o-', color=color, label=tag)
    ax[0].set_xlabel('poisoned fraction of the training set')
    ax[0].set_title(f'short budget ({STEPS} steps), p_b = {BLUR}')
    pts = sorted((r['blur'], r['top1']) for r in short if r['name'].startswith('deit-nano') and r['fraction'] == 1)
    clean = [r['top1'] for r in short if r['name'] == 'deit-nano/clean']
    ax[1].plot([p[0] for p in pts], [p[1] for p in pts], 'o-', color='tab:blue', label='deit-nano, CUDA')
    if clean:
        ax[1].axhline(clean[0], color='tab:blue', ls='--', label='deit-nano, clean data')
    ax[1].set_xlabel('blur parameter p_b (k = 3, all poisoned)')
    ax[1].set_title(f'short budget ({STEPS} steps): by p_b')
    for r in rows:
        if r['name'].split('/')[1] in ('clean', 'cuda 1') and r['budget'] in ('long', 'subset'):
            color = 'tab:green' if r['budget'] == 'subset' else colors[r['name'].split('/')[0]]
            ax[2].plot([c['epoch'] for c in r['curve']], [c['val_top1'] for c in r['curve']], 'o-', color=color,
                       ls='-' if r['fraction'] == 0 else '--', label=f"{r['name']} ({r['budget']})")
    ax[2].set_xlabel(f'epoch (long: 60k images; subset: {SUBSET} a class)')
    ax[2].set_title('clean vs fully poisoned training')
    for a in ax[:3]:
        a.axhline(10, color='0.5', ls=':', label='chance')
        a.set_ylabel('clean test top-1 (%)')
        a.grid(alpha=.3)
        a.legend(fontsize=8)
    d = [r for r in rows if r['name'].startswith('deit-nano') and r['fraction'] in (0.0, 1.0) and r['blur'] == BLUR]
    labels = [f"{r['name'].split('/')[1]} ({r['budget']})" for r in d]
    ax[3].barh(range(len(d)), [r['top1'] for r in d],
               color=[{'long': 'tab:blue', 'short': 'tab:cyan', 'subset': 'tab:green'}[r['budget']] for r in d])
    ax[3].set_yticks(range(len(d)), labels, fontsize=8)
    ax[3].axvline(10, color='0.5', ls=':')
    ax[3].set_xlabel('clean test top-1 (%)')
    ax[3].set_title('DeiT-nano: clean, CUDA, CUDA + defences')
    for i, r in enumerate(d):
        ax[3].text(r['top1'] + 0.5, i, f"{r['top1']:.1f}", va='center', fontsize=7)
    fig.suptitle('CUDA on Fashion-MNIST: clean test accuracy after training on poisoned data')
    fig.tight_layout()
    fig.savefig(RESULTS / 'unlearnable_fmnist.png', dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('make').set_defaults(func=cmd_make)
    t = sub.add_parser('train')
    t.add_argument('--jobs', type=int, default=2)
    t.add_argument('--steps', type=int, default=STEPS)
    t.add_argument('--budget', nargs='+', choices=['short', 'long', 'subset'], default=['short', 'long', 'subset'])
    t.add_argument('--arms', nargs='*', help="only these arms, in order, as NAME@BUDGET ('deit-nano/cuda 1@long')")
    t.set_defaults(func=cmd_train)
    q = sub.add_parser('plot')
    q.add_argument('--steps', type=int, default=STEPS)
    q.set_defaults(func=cmd_plot)
    args = p.parse_args()
    args.func(args)


if __name__ == '__main__':
    main()
