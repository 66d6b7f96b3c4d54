"""How visible CUDA's class filters are, and what a resize after poisoning leaves of them.

No training: the Fashion-MNIST test split (10,000 clean 28 px images), the filters of a public
benchmark key, and for each filter side ``k`` and blur parameter ``p_b``:

- **PSNR** of the poisoned image against the clean one (dB; median and 10th percentile over the
  images): how much the filter changes what a person sees.
- **What a resize leaves of the poison.** A folder poisoned at 28 px and trained at 32 px passes
  through a bilinear resize (antialiased, as ``deitlab``'s data path resizes). Let
  ``r_after = resize(poison(x)) - resize(x)`` (poisoned, then resized) and
  ``r_before = poison(resize(x)) - resize(x)`` (resized, then poisoned: ``make --img-size 32``).
  ``resize_kept`` is ``||r_after|| / ||r_before||`` (median over images): the share of the poison's
  signal a resize keeps, by energy. ``resize_agree`` is the cosine between the two residuals:
  whether what survives still points the way the filter does.

    python benchmarks/unlearnable_visibility.py      # ~1 min; results/unlearnable_visibility.{json,png}

Issue 27 asks for these as two of the measured causes of the protection fading; how long the
protection lasts under training (the protection curve) is a separate, training benchmark.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from deitlab.data import build_dataset
from deitlab.data.transforms import resize_images
from deitlab.unlearnable import apply_filters, class_filters

RESULTS = Path(__file__).resolve().parent / 'results'
KEY = 'deitlab benchmark key (public, for reproduction only)'   # the key of unlearnable_fmnist.py
KERNELS = [3, 5, 7, 9]
BLURS = [0.1, 0.3, 0.5]
TRAIN_SIZE = 32


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 batches; inf where the images are equal."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def residual_stats(clean: torch.Tensor, labels: torch.Tensor, filters: torch.Tensor) -> dict:
    """``resize_kept`` and ``resize_agree`` (see the module doc), medians over the images."""
    up = resize_images(clean, TRAIN_SIZE).double()
    after = resize_images(apply_filters(clean, labels, filters), TRAIN_SIZE).double() - up
    before = apply_filters(up.round().to(torch.uint8), labels, filters).double() - up
    a, b = after.flatten(1), before.flatten(1)
    kept = a.norm(dim=1) / b.norm(dim=1).clamp_min(1e-9)
    agree = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-9)
    return dict(resize_kept=float(kept.median()), resize_agree=float(agree.median()))


def main() -> None:
    ds = build_dataset('fashion-mnist', 'val')
    clean, labels = ds.images, ds.targets
    rows = []
    for k in KERNELS:
        for blur in BLURS:
            filters = class_filters(KEY, 10, kernel_size=k, blur=blur)
            p = psnr(apply_filters(clean, labels, filters), clean)
            finite = p[torch.isfinite(p)]
            row = dict(kernel_size=k, blur=blur, psnr_median=float(finite.median()),
                       psnr_p10=float(torch.quantile(finite, 0.1)), **residual_stats(clean, labels, filters))
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = dict(data='fashion-mnist test (10,000 images, 28 px, grey)', key='public benchmark key',
               train_size=TRAIN_SIZE, resize='bilinear, antialiased (deitlab.data.transforms.resize_images)',
               rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'unlearnable_visibility.json').write_text(json.dumps(res, indent=1) + '\n')
    plot(res, clean[:4], labels[:4])


def plot(res: dict, images: torch.Tensor, labels: torch.Tensor) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(3, 10, height_ratios=[2.4, 1.2, 1.2], hspace=0.3, wspace=0.08, left=0.06, right=0.98,
                            top=0.97, bottom=0.02)
    for col, (key, label) in enumerate((('psnr_median', 'PSNR, poisoned vs clean (dB, median)'),
                                        ('resize_kept', f'poison energy kept by a 28 -> {TRAIN_SIZE} px resize'))):
        ax = fig.add_subplot(grid[0, 5 * col + col:5 * col + 4 + col])
        for blur in BLURS:
            r = [x for x in res['rows'] if x['blur'] == blur]
            ax.plot([x['kernel_size'] for x in r], [x[key] for x in r], 'o-', label=f'p_b = {blur}')
        ax.set_xlabel('filter side k')
        ax.set_ylabel(label)
        ax.set_xticks(KERNELS)
        ax.grid(alpha=.3)
        ax.legend()
    shown = [(3, 0.3), (5, 0.3), (9, 0.3), (9, 0.5)]
    for j in range(len(images)):
        cols = [('clean', images[j])] + [(f'k={k}, p_b={b}', apply_filters(images[j:j + 1], labels[j:j + 1],
                                                                           class_filters(KEY, 10, k, b))[0])
                                         for k, b in shown]
        for i, (title, img) in enumerate(cols):
            a = fig.add_subplot(grid[1 + j // 2, 5 * (j % 2) + i])
            a.imshow(img[0].numpy(), cmap='gray', vmin=0, vmax=255)
            if j < 2:
                a.set_title(title, fontsize=8)
            a.axis('off')
    fig.savefig(RESULTS / 'unlearnable_visibility.png', dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
