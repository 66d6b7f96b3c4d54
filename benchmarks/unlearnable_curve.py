"""How long CUDA's protection lasts: clean test accuracy of models trained on clean and on
CUDA-poisoned data, at several training lengths, on two small real grey-image datasets.

Data (each about 1,500 training images of 28 px, the size of a user's own folder):

* ``fmnist-1500``: the first 150 training images of each Fashion-MNIST class (Debian's
  ``dataset-fashion-mnist``); validation: the first 200 test images of each class (2,000, clean).
* ``digits``: scikit-learn's handwritten digits (1,797 images of 8x8 px with 17 grey levels, shipped
  inside the package), scaled to 0-255 and upscaled bilinearly to 28 px; a stratified split with
  seed 0 into 1,437 training and 360 validation images. ``pip install scikit-learn`` (not a
  deitlab dependency).

Every poisoned copy is ``make_unlearnable(folder, KEY, fraction=1, kernel_size=k, blur=p_b)`` of
the clean folder, at the training resolution (28 px, no resize after poisoning); the validation
images stay clean. Models: DeiT-nano (``deitlab_deit_nano_patch4_32``) and timm's ResNet-18 (the
paper's model), 1 channel at 28 px, one recipe (AdamW lr 5e-4, batch 32, 0.1 warm-up epochs,
label smoothing 0.1, no augmentation or mixing), 1 thread per run.

* The curve: clean and poisoned (k = 3, p_b = 0.3, the defaults) on ``fmnist-1500`` for ``LENGTHS``
  epochs (each length its own run with its own cosine schedule), seed 0, and the longest for seeds
  0, 1, 2; on ``digits`` the longest, seed 0. Validation every 5 epochs (the curve within a run).
* The sweep: DeiT-nano on ``fmnist-1500`` poisoned with each ``(k, p_b)`` of ``SWEEP``, the longest
  length, seed 0; with each setting's visibility (PSNR of the poisoned training images against
  the clean ones, median over the set).

    python benchmarks/unlearnable_curve.py make             # the folders and poisoned copies, ~1 min
    python benchmarks/unlearnable_curve.py train --jobs 2   # every run not done yet (~4 h on 2 cores)
    python benchmarks/unlearnable_curve.py report           # results/unlearnable_curve.{json,png}
    python benchmarks/unlearnable_curve.py examples         # results/unlearnable_curve_examples.png
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
WORK = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/work/unlearnable-curve-runs'))
KEY = 'deitlab benchmark key (public, for reproduction only)'
MODELS = {'deit-nano': 'deitlab_deit_nano_patch4_32', 'resnet18': 'resnet18'}
DATASETS = ('fmnist-1500', 'digits')
LENGTHS = (5, 15, 40)
SEEDS = (0, 1, 2)
DEFAULT = (3, 0.3)
SWEEP = ((3, 0.1), (3, 0.6), (5, 0.3), (7, 0.3), (7, 0.6))
RESIZE = 32   # the resize test: trained at 32 px, poisoned at 28 px (then resized) or at 32 px
PER_CLASS, VAL_PER_CLASS = 150, 200
RECIPE = ['--batch-size', '32', '--lr', '5e-4', '--warmup-epochs', '0.1', '--smoothing', '0.1',
          '--drop-path', '0', '--aug', 'none', '--mix', 'none', '--img-size', '28', '--in-chans', '1',
          '--workers', '0', '--no-tensorboard', '--no-progress', '--eval-every', '5']


def clean_dir(data: str) -> Path:
    return WORK / data


def poisoned_dir(data: str, k: int, blur: float, size: int = 28) -> Path:
    return WORK / (f'{data}-cuda-k{k}-pb{blur:g}' + ('' if size == 28 else f'-at{size}'))


def _write_png(img, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def make_fmnist() -> None:
    """``fmnist-1500``: the first images of each class of Debian's Fashion-MNIST as PNG folders."""
    import numpy as np
    from deitlab.data import build_dataset
    out = clean_dir('fmnist-1500')
    if (out / 'done').exists():
        return
    for split, per in (('train', PER_CLASS), ('val', VAL_PER_CLASS)):
        ds = build_dataset('fashion-mnist', split, img_size=28, in_chans=1, aug='none')
        images = np.asarray(ds.images)
        targets = np.asarray(ds.targets)
        for c in range(10):
            for i in np.flatnonzero(targets == c)[:per]:
                _write_png(images[i, 0], out / split / f'{c}' / f'{i:05d}.png')
    (out / 'done').write_text('')


def make_digits() -> None:
    """``digits``: scikit-learn's 8x8 digits at 28 px as PNG folders (stratified 80/20 split)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    out = clean_dir('digits')
    if (out / 'done').exists():
        return
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit('the digits dataset comes with scikit-learn: pip install scikit-learn')
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, size=(28, 28), mode='bilinear', align_corners=False).round().clamp(0, 255)
    x = x[:, 0].to(torch.uint8).numpy()
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        n_val = int(round(0.2 * len(idx)))
        for split, part in (('val', idx[:n_val]), ('train', idx[n_val:])):
            for i in part:
                _write_png(x[i], out / split / f'{c}' / f'{i:04d}.png')
    (out / 'done').write_text('')


def settings() -> list:
    """Every ``(data, k, p_b)`` that gets a poisoned copy."""
    return [(d, *DEFAULT) for d in DATASETS] + [('fmnist-1500', k, b) for k, b in SWEEP]


def cmd_make(args) -> None:
    from deitlab.unlearnable import make_unlearnable
    make_fmnist()
    make_digits()
    for data, k, blur in settings():
        out = poisoned_dir(data, k, blur)
        if not (out / 'manifest.json').exists():
            make_unlearnable(f'folder:{clean_dir(data)}', KEY, out, kernel_size=k, blur=blur, fraction=1.0,
                             overwrite=True, progress=False)
            print('poisoned', out, flush=True)
    out = poisoned_dir('fmnist-1500', *DEFAULT, RESIZE)
    if not (out / 'manifest.json').exists():
        make_unlearnable(f'folder:{clean_dir("fmnist-1500")}', KEY, out, kernel_size=DEFAULT[0], blur=DEFAULT[1],
                         fraction=1.0, overwrite=True, progress=False, img_size=RESIZE)
        print('poisoned', out, flush=True)


def runs() -> list:
    """Every run, most informative first: the longest runs of seed 0 on both datasets, the other
    lengths and seeds on Fashion-MNIST, the sweep."""
    longest = max(LENGTHS)
    out = []

    def add(data, model, poison, epochs, seed, train_px=28, poison_px=28):
        k, b = poison or (None, None)
        name = f"{data}/{model}/{'clean' if poison is None else f'cuda-k{k}-pb{b:g}'}/e{epochs}/s{seed}"
        if train_px != 28:
            name += f'/train{train_px}-poison{poison_px}'
        folder = clean_dir(data) if poison is None else poisoned_dir(data, k, b, poison_px)
        out.append(dict(name=name, data=data, model=model, poison=poison, epochs=epochs, seed=seed,
                        folder=str(folder), train_px=train_px, poison_px=poison_px))

    def both(data, epochs, seed):
        for model in MODELS:
            for poison in (None, DEFAULT):
                add(data, model, poison, epochs, seed)
    for data in DATASETS:
        both(data, longest, 0)
    for epochs in LENGTHS[:-1]:
        both('fmnist-1500', epochs, 0)
    for seed in SEEDS[1:]:
        both('fmnist-1500', longest, seed)
    for k, b in SWEEP:
        add('fmnist-1500', 'deit-nano', (k, b), longest, 0)
    for poison_px in (28, RESIZE):
        add('fmnist-1500', 'deit-nano', DEFAULT, longest, 0, RESIZE, poison_px)
    return out


def run_dir(run: dict) -> Path:
    return WORK / 'runs' / run['name'].replace('/', '_')


def cmd_train(args) -> None:
    jobs = []
    for run in runs():
        out = run_dir(run)
        if (out / 'summary.json').exists() or (args.only and not any(s in run['name'] for s in args.only)):
            continue
        cmd = [sys.executable, '-m', 'deitlab', 'train', '--out', str(out), '--model', MODELS[run['model']],
               '--data', f"folder:{run['folder']}", '--epochs', str(run['epochs']), '--seed', str(run['seed']),
               *RECIPE, '--img-size', str(run['train_px']), '--json']
        script = f'{" ".join(cmd)} > {out}.log 2>&1 && tail -n 1 {out}.log > {out}/summary.json'
        jobs.append((run['name'], ['bash', '-c', f'rm -rf {out} && mkdir -p {out.parent} && {script}'], f'{out}.out'))
    print(f'{len(jobs)} runs to do', flush=True)
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))


def psnr(data: str, k: int, blur: float, size: int = 28) -> float:
    """Median PSNR (dB) of the poisoned training images against the clean ones (resized to ``size``
    the way ``make_unlearnable`` resizes them when the copy was poisoned at another size)."""
    import numpy as np
    import torch
    from PIL import Image
    from deitlab.data.transforms import resize_images
    clean, poisoned = clean_dir(data) / 'train', poisoned_dir(data, k, blur, size) / 'train'
    # a poisoned file is named by the image's position in the source split (ImageFolder order)
    sources = [f for d in sorted(clean.iterdir()) for f in sorted(d.iterdir())]
    out = []
    for f in sorted(poisoned.glob('*/*.png')):
        a = np.asarray(Image.open(f), dtype=np.float64)
        b = np.array(Image.open(sources[int(f.stem)]))
        if b.shape[0] != size:
            b = resize_images(torch.from_numpy(b)[None, None], size)[0, 0].numpy()
        mse = float(((a - b.astype(np.float64)) ** 2).mean())
        out.append(99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
    return float(np.median(out))


def filter_contrast(data: str, k: int, blur: float) -> float:
    """How far apart two classes' filters put the same image: median PSNR (dB) between an image
    poisoned with its own class's filter and with each other class's, over the clean training
    images. High on smooth images (every k x k filter changes them little, so the shortcut the
    filters offer is faint next to the content); low where the filters leave distinct marks."""
    import numpy as np
    import torch
    from PIL import Image
    from deitlab.unlearnable import apply_filters, class_filters
    files = sorted((clean_dir(data) / 'train').glob('*/*.png'))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files]))[:, None]
    labels = torch.tensor([int(f.parent.name) for f in files])
    filters = class_filters(KEY, 10, k, blur)
    own = apply_filters(images, labels, filters).double()
    out = []
    for shift in range(1, 10):
        other = apply_filters(images, (labels + shift) % 10, filters).double()
        mse = (own - other).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        out.append(10 * torch.log10(255.0 ** 2 / mse))
    return float(torch.cat(out).median())


def cmd_report(args) -> None:
    import numpy as np
    rows = []
    for run in runs():
        out = run_dir(run)
        if not (out / 'summary.json').exists():
            print('missing', run['name'], flush=True)
            continue
        s = json.loads((out / 'summary.json').read_text())
        curve = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines() if line.strip()]
        rows.append(dict(run, top1=s['val_top1'], train_time_s=s['train_time_s'],
                         curve=[dict(epoch=c['epoch'], val_top1=c['val_top1']) for c in curve if 'val_top1' in c]))
    groups = {}
    for r in rows:
        groups.setdefault((r['data'], r['model'], r['poison'] and tuple(r['poison']), r['epochs'], r['train_px'],
                           r['poison_px']), []).append(r)
    summary = []
    for (data, model, poison, epochs, train_px, poison_px), rs in groups.items():
        acc = [r['top1'] for r in rs]
        summary.append(dict(data=data, model=model, poison=list(poison) if poison else None, epochs=epochs,
                            train_px=train_px, poison_px=poison_px, n_seeds=len(acc), top1=float(np.mean(acc)),
                            top1_std=float(np.std(acc, ddof=1)) if len(acc) > 1 else None))
    visibility = {f'{data}/k{k}-pb{b:g}': round(psnr(data, k, b), 2) for data, k, b in settings()
                  if (poisoned_dir(data, k, b) / 'manifest.json').exists()}
    visibility[f'fmnist-1500/k{DEFAULT[0]}-pb{DEFAULT[1]:g}-at{RESIZE}'] = round(psnr('fmnist-1500', *DEFAULT, RESIZE), 2)
    result = dict(benchmark='unlearnable_curve', key=KEY, lengths=list(LENGTHS), seeds=list(SEEDS),
                  default=list(DEFAULT), sweep=[list(s) for s in SWEEP], resize=RESIZE, recipe=' '.join(RECIPE), chance_top1=10.0,
                  data={'fmnist-1500': f'{PER_CLASS} train / {VAL_PER_CLASS} val images a class of Fashion-MNIST',
                        'digits': 'scikit-learn digits, 8 -> 28 px, 1,437 train / 360 val'},
                  psnr_db=visibility, summary=summary, runs=rows,
                  filter_contrast_db={f'{data}/k{k}-pb{b:g}': round(filter_contrast(data, k, b), 2)
                                      for data, k, b in settings()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'unlearnable_curve.json').write_text(json.dumps(result, indent=1))
    plot(result)
    for s in summary:
        print(s, flush=True)


def plot(result: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(DATASETS) + 1, figsize=(6 * (len(DATASETS) + 1), 4.4))
    colors = {'deit-nano': 'tab:blue', 'resnet18': 'tab:red'}
    default = list(DEFAULT)
    for ax, data in zip(axes, DATASETS):
        for model, c in colors.items():
            for poison, ls in ((None, '-'), (default, '--')):
                pts = sorted((s['epochs'], s['top1'], s['top1_std'] or 0.0) for s in result['summary']
                             if s['data'] == data and s['model'] == model and s['poison'] == poison
                             and s['train_px'] == 28)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=c, ls=ls,
                                marker='o', capsize=3,
                                label=f"{model}, {'clean' if poison is None else 'CUDA k=3, p_b=0.3'}")
            for poison, ls in ((None, '-'), (default, '--')):   # within the longest run of seed 0
                run = next((r for r in result['runs'] if r['data'] == data and r['model'] == model and
                            r['epochs'] == max(LENGTHS) and r['seed'] == 0 and r['train_px'] == 28 and
                            (list(r['poison']) if r['poison'] else None) == poison), None)
                if run:
                    ax.plot([c['epoch'] for c in run['curve']], [c['val_top1'] for c in run['curve']], color=c,
                            ls=ls, lw=0.8, alpha=0.4)
        ax.axhline(result['chance_top1'], color='0.5', ls=':', label='chance')
        ax.set_xlabel('training epochs')
        ax.set_ylabel('clean validation top-1 (%)')
        ax.set_title(data)
        ax.set_ylim(0, 100)
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    sweep = [s for s in result['summary'] if s['data'] == 'fmnist-1500' and s['model'] == 'deit-nano'
             and s['poison'] is not None and s['epochs'] == max(LENGTHS)]
    for s in sweep:
        k, b = s['poison']
        at = '' if s['poison_px'] == 28 else f"-at{s['poison_px']}"
        db = result['psnr_db'].get(f'fmnist-1500/k{k}-pb{b:g}' + at)
        label = f'k={k}, p_b={b:g}' + ('' if s['train_px'] == 28 else
                                       f", trained at {s['train_px']} px, poisoned at {s['poison_px']}")
        ax.scatter(db, s['top1'], color='tab:blue' if s['train_px'] == 28 else 'tab:orange')
        ax.annotate(label, (db, s['top1']), fontsize=7, xytext=(3, 3), textcoords='offset points')
    clean = [s['top1'] for s in result['summary'] if s['data'] == 'fmnist-1500' and s['model'] == 'deit-nano'
             and s['poison'] is None and s['epochs'] == max(LENGTHS) and s['train_px'] == 28]
    if clean:
        ax.axhline(clean[0], color='tab:blue', ls='-', label='clean data')
    ax.axhline(result['chance_top1'], color='0.5', ls=':', label='chance')
    ax.set_xlabel('PSNR of the poisoned images (dB; lower = more visible)')
    ax.set_ylabel(f'clean validation top-1 after {max(LENGTHS)} epochs (%)')
    ax.set_title('fmnist-1500, DeiT-nano: filter settings')
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    fig.suptitle('CUDA: how long the protection lasts (clean accuracy of models trained on poisoned data; markers: each '
                 'length its own run, thin lines: within the 40-epoch run)', fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / 'unlearnable_curve.png', dpi=100)


def cmd_examples(args) -> None:
    """A few training images of each dataset, clean and as each poisoned copy shows them
    (``results/unlearnable_curve_examples.png``): how visible each setting is."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    rows = [('fmnist-1500', None)] + [(d, s[1:]) for s in settings() for d in [s[0]] if d == 'fmnist-1500'] + \
        [('digits', None), ('digits', DEFAULT)]
    n = 8
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.1, len(rows) * 1.25))
    for i, (data, poison) in enumerate(rows):
        clean = clean_dir(data) / 'train'
        sources = [f for d in sorted(clean.iterdir()) for f in sorted(d.iterdir())]
        pick = [sorted((clean / c).iterdir())[0] for c in sorted(os.listdir(clean))][:n]
        by_index = {} if poison is None else {int(q.stem): q for q in
                                              (poisoned_dir(data, *poison) / 'train').glob('*/*.png')}
        for j, f in enumerate(pick):
            path = f if poison is None else by_index[sources.index(f)]
            axes[i, j].imshow(np.asarray(Image.open(path)), cmap='gray', vmin=0, vmax=255)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        label = 'clean' if poison is None else f'k={poison[0]}, p_b={poison[1]:g}'
        axes[i, 0].set_ylabel(f'{data}\n{label}', fontsize=7)
    fig.suptitle('CUDA: training images, clean and poisoned (each row one setting)', fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / 'unlearnable_curve_examples.png', dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('make')
    t = sub.add_parser('train')
    t.add_argument('--jobs', type=int, default=2)
    t.add_argument('--only', nargs='*', help='run only the runs whose name contains one of these')
    sub.add_parser('report')
    sub.add_parser('examples')
    args = p.parse_args()
    {'make': cmd_make, 'train': cmd_train, 'report': cmd_report, 'examples': cmd_examples}[args.cmd](args)


if __name__ == '__main__':
    main()
