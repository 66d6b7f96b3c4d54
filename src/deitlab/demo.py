"""``deitlab demo``: the main job on the embedded default data, a few CPU minutes, no set-up.

1. Generate ``glyphs`` (synthetic Greek letters on papyrus texture) from a fixed seed.
2. Train a small DeiT on it with the DeiT recipe (scaled to a short CPU run).
3. Measure it: accuracy, parameters, GMACs, batch-1 latency and batch throughput.
4. Print a table, write ``results.json`` and ``demo.png`` (accuracy curve, predictions) to ``--out``.

Later methods (pruning, token fusion) add their steps here, each reported in the same table.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

DEMO_DATA = 'glyphs:train=24000,val=2400,size=32,seed=0'
DEMO_MODEL = 'deitlab_deit_pico_patch4_32'


def _demo_config(out: Path, quick: bool, progress: bool):
    from .train import TrainConfig
    return TrainConfig(
        model=DEMO_MODEL, data='glyphs:train=960,val=480,size=32,seed=0' if quick else DEMO_DATA,
        out=str(out / 'deit'), epochs=1 if quick else 5, batch_size=32, lr=1e-3, warmup_epochs=0.5,
        drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, aug='none', seed=0, tensorboard=False,
        progress=None if progress else False)


def _plot(out: Path, metrics: list, model, data_spec: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from .data import build_dataset

    ds = build_dataset(data_spec, 'val', img_size=32, in_chans=3, aug='none')
    idx = torch.linspace(0, len(ds) - 1, 16).long().tolist()
    x = torch.stack([ds[i][0] for i in idx])
    y = [ds[i][1] for i in idx]
    model.eval()
    with torch.no_grad():
        pred = model(x.to(next(model.parameters()).device)).argmax(1).cpu().tolist()

    fig = plt.figure(figsize=(11, 4.2))
    ax = fig.add_subplot(1, 2, 1)
    epochs = [m['epoch'] for m in metrics if 'val_top1' in m]
    ax.plot(epochs, [m['val_top1'] for m in metrics if 'val_top1' in m], 'o-', label='val top-1')
    ax.plot(epochs, [m['val_top5'] for m in metrics if 'val_top5' in m], 's--', label='val top-5')
    ax.set_xticks(epochs)
    ax.set_xlabel('epoch')
    ax.set_ylabel('accuracy (%)')
    ax.set_title(f'{DEMO_MODEL} on glyphs')
    ax.grid(alpha=.3)
    ax.legend()
    classes = ds.classes
    for j in range(16):
        a = fig.add_subplot(4, 8, 8 * (j // 4) + 5 + j % 4)
        img = x[j].permute(1, 2, 0) * 0.5 + 0.5
        a.imshow(img.clamp(0, 1).numpy())
        ok = pred[j] == y[j]
        a.set_title(classes[pred[j]], fontsize=7, color='green' if ok else 'red')
        a.axis('off')
    fig.tight_layout()
    path = out / 'demo.png'
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out: str = 'demo-out', quick: bool = False, progress: bool = True) -> dict:
    """Run the demo and return its results (also written to ``OUT/results.json``)."""
    from .bench import benchmark_model, format_table
    from .train import train
    from .train.engine import METRICS_NAME

    out_dir = Path(out)
    cfg = _demo_config(out_dir, quick, progress)
    if Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0

    from .rundir import create
    model = create(cfg.out).eval()
    bench = benchmark_model(model, batch_size=64, quick=True)
    metrics = [json.loads(ln) for ln in (Path(cfg.out) / METRICS_NAME).read_text().splitlines() if ln.strip()]
    rows = [dict(model='DeiT-pico (dense)', top1=round(summary['val_top1'], 2), params_m=round(bench['params'] / 1e6, 3),
                 gmacs=round(bench['gmacs'], 4), latency_ms=round(bench['latency_ms'], 2),
                 img_per_s=round(bench['images_per_s'], 1))]
    plot = _plot(out_dir, metrics, model, cfg.data)
    result = dict(rows=rows, train_time_s=round(train_s, 1), run_dir=cfg.out, plot=str(plot),
                  settings=dict(device=bench['settings']['device'], threads=bench['settings']['threads'],
                                batch=64, data=cfg.data, epochs=cfg.epochs))
    (out_dir / 'results.json').write_text(json.dumps(result, indent=2))
    if progress:
        print(format_table(rows, ['model', 'top1', 'params_m', 'gmacs', 'latency_ms', 'img_per_s']))
        print(f'trained in {train_s:.0f} s; run directory {cfg.out}; plot {plot}')
    return result
