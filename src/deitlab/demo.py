"""``deitlab demo``: the main job on the embedded default data, a few CPU minutes, no set-up.

1. Generate ``glyphs`` (synthetic Greek letters on papyrus texture) from a fixed seed.
2. The dense model: a small DeiT trained on it for ``DEMO_EPOCHS`` epochs (batch 32, AdamW lr 1e-3,
   cosine, label smoothing, no mixing), long enough to converge: with this budget top-1 on the
   2,400 validation glyphs went 39, 61, 75, 86, 91, 94, 95, 95.3, 95.8, 95.7% epoch by epoch (the last
   two epochs within 0.5 pt), where the earlier 5-epoch budget stopped at 85.9% while still gaining
   2 pt an epoch. That training takes 4-5 CPU minutes, most of the demo, so by default the demo starts
   from the run it produced, committed in ``deitlab/assets/demo_deit_pico`` (0.8 MB; rebuilt by
   ``python benchmarks/demo_dense.py``, bit for bit at 2 threads), and evaluates it; ``--train``
   trains it again instead.
3. Prune it with NViT to half its latency, predicted by the committed latency table of this model
   (``prune/tables/deit_pico_patch4_32_b64_t2.json``, timed on a 2-core CPU at batch 64 with fixed
   malloc thresholds, so that how busy the machine is does not change which widths are pruned),
   densify and fine-tune it with distillation from the dense model.
3b. Fuse tokens in the pruned model with MCTF-Fast, off the shelf (no training).
3c. Swap the token mixer: train PoolFormer-pico (pooling instead of attention, 4 stages) with the
    same recipe and data for one epoch.
4. Measure all four: accuracy, parameters, GMACs, batch-1 latency and batch throughput, measured
   interleaved in one process, and the speed-up the latency table predicted.
5. Print a table, write ``results.json``, ``demo.png`` (accuracy curve, predictions) and
   ``widths.png`` (per-block widths of the pruned model) to ``--out``.

Later methods add their steps here, each reported in the same table.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

DEMO_DATA = 'glyphs:train=24000,val=2400,size=32,seed=0'
DEMO_MODEL = 'deitlab_deit_pico_patch4_32'
DEMO_EPOCHS = 10
# token fusion applied off the shelf to the pruned model (pruning and fusion compose)
DEMO_FUSION = dict(method='mctf-fast', r=0.35)
# the token-mixer row: the same recipe and data with pooling as the token mixer, one epoch (PoolFormer
# reaches DeiT-pico's 5-epoch accuracy in one on glyphs; five would add 2.5 CPU minutes to the demo)
DEMO_MIXER_MODEL = 'deitlab_poolformer_pico_32'
DEMO_MIXER_EPOCHS = 1
#: the dense run the demo's own recipe produced (``python benchmarks/demo_dense.py`` rebuilds it)
DEMO_DENSE_RUN = Path(__file__).resolve().parent / 'assets' / 'demo_deit_pico'
DENSE_FILES = ('config.json', 'model.safetensors', 'metrics.jsonl', 'train_config.json')


def _demo_config(out: Path, quick: bool, progress: bool, model: str = DEMO_MODEL, name: str = 'deit',
                 epochs: int = DEMO_EPOCHS):
    from .train import TrainConfig
    return TrainConfig(
        model=model, data='glyphs:train=960,val=480,size=32,seed=0' if quick else DEMO_DATA,
        out=str(out / name), epochs=1 if quick else epochs, batch_size=32, lr=1e-3, warmup_epochs=0.5,
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


# The latency-table grid for pico (embed 64, 2 heads of 32, MLP 256), coarse so that timing it takes
# minutes, and the committed table timed on it (re-time it on your device with
# ``deitlab prune nvit ... --lut measure --lut-passes 9 --lut-grid 'emb=[16,32,48,64]' 'heads=[1,2]'
# 'qk=[1,16,32]' 'v=[1,16,32]' 'mlp=[1,64,128,256]'``; its ``latency_table.json`` is the table)
_DEMO_GRID = dict(emb=[16, 32, 48, 64], heads=[1, 2], qk=[1, 16, 32], v=[1, 16, 32], mlp=[1, 64, 128, 256])
DEMO_LUT = 'deit_pico_patch4_32_b64_t2'


def _prune_config(out: Path, quick: bool, progress: bool, dense_dir: str, data: str):
    from .prune import NViTConfig
    # --quick is a smoke run on a few hundred images: it prunes to half the GMACs (the full demo to half
    # the latency); both predict speed with the committed table
    target = dict(target_gmacs=0.5) if quick else dict(target_latency=0.5)
    return NViTConfig(
        model=dense_dir, data=data, out=str(out / 'nvit'), **target, lam=0.02, interval=10 if quick else 20,
        prune_steps=20 if quick else 300, total_steps=30 if quick else 750, batch_size=32, finetune_lr=5e-4,
        lut=DEMO_LUT, val_batches=0 if quick else 4,
        measure=False, seed=0,
        progress=None if progress else False)


def dense_run(cfg, train_dense: bool) -> tuple:
    """The demo's dense model in ``cfg.out``: trained there (``train_dense``, or when no committed
    run matches ``cfg``), else the committed run copied there. Returns ``(top-1 or None, source)``;
    None when the caller evaluates the copied model itself."""
    from .train import train
    if Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    if not train_dense and committed_dense_matches(cfg):
        Path(cfg.out).mkdir(parents=True)
        for name in DENSE_FILES:
            shutil.copy(DEMO_DENSE_RUN / name, Path(cfg.out) / name)
        return None, 'committed'
    return train(cfg)['val_top1'], 'trained'


def committed_dense_matches(cfg) -> bool:
    """True when the committed dense run was trained with ``cfg``'s settings (all but the output
    directory, the device, data-loading workers and the progress bars): a changed recipe retrains
    rather than reuse a stale model."""
    path = DEMO_DENSE_RUN / 'train_config.json'
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(cfg.to_dict()))   # tuples as lists, as in the file
    from .train.config import with_defaults
    saved = json.loads(json.dumps(with_defaults(saved)))   # an option added since: its default
    return all(saved.get(k) == v for k, v in now.items() if k not in ('out', 'progress', 'device', 'workers'))


def run_demo(out: str = 'demo-out', quick: bool = False, progress: bool = True, train_dense: bool = False) -> dict:
    """Run the demo and return its results (also written to ``OUT/results.json``). The dense model is
    the committed run (see :func:`dense_run`) unless ``train_dense`` or ``quick``."""
    from .bench import format_table
    from .train import train
    from .train.engine import METRICS_NAME

    out_dir = Path(out)
    start = time.perf_counter()
    cfg = _demo_config(out_dir, quick, progress)
    t0 = time.perf_counter()
    dense_top1, dense_source = dense_run(cfg, train_dense or quick)
    train_s = time.perf_counter() - t0

    from .prune import prune_nvit
    from .prune.report import speed_rows
    from .rundir import create
    pcfg = _prune_config(out_dir, quick, progress, cfg.out, cfg.data)
    if Path(pcfg.out).exists():
        shutil.rmtree(pcfg.out)
    t0 = time.perf_counter()
    pruned = prune_nvit(pcfg)
    prune_s = time.perf_counter() - t0

    mcfg = _demo_config(out_dir, quick, progress, DEMO_MIXER_MODEL, 'poolformer', DEMO_MIXER_EPOCHS)
    if Path(mcfg.out).exists():
        shutil.rmtree(mcfg.out)
    t0 = time.perf_counter()
    mixer = train(mcfg)
    mixer_s = time.perf_counter() - t0

    from .tokens.fuse import apply_token_fusion, evaluate_models
    model = create(cfg.out).eval()
    small = create(pcfg.out).eval()
    fused = apply_token_fusion(create(pcfg.out).eval(), **DEMO_FUSION)
    models = {'dense': model, 'nvit': small, 'fused': fused, 'poolformer': create(mcfg.out).eval()}
    speed = {r['name']: r for r in speed_rows(models, 'dense', 64, _lut(pcfg), quick=quick)}
    speed['fused']['predicted_speedup'] = None   # the latency table knows widths, not token counts
    if dense_top1 is None:
        dense_top1 = evaluate_models({'dense': model}, cfg.data)['dense']['top1']
    top1 = dict(dense=dense_top1, nvit=next(r['top1'] for r in pruned['rows'] if r['name'] == 'nvit'),
                fused=evaluate_models({'fused': fused}, cfg.data)['fused']['top1'], poolformer=mixer['val_top1'])
    labels = dict(dense=f'DeiT-pico (dense{", committed run" if dense_source == "committed" else ""})', nvit=f'NViT-pruned ({"GMACs" if quick else "latency"} 0.5)',
                  fused=f'NViT + {DEMO_FUSION["method"]} r={DEMO_FUSION["r"]} (no training)',
                  poolformer=f'PoolFormer-pico (pooling mixer, {mcfg.epochs} epoch{"s" * (mcfg.epochs > 1)})')
    rows = [dict(model=labels[k], top1=round(top1[k], 2), params_m=round(r['params_m'], 3), gmacs=round(r['gmacs'], 4),
                 latency_ms=round(r['latency_ms'], 2), img_per_s=round(r['images_per_s'], 1),
                 speedup=round(r['throughput_ratio'], 2),
                 speedup_range=[round(r['throughput_ratio_lo'], 2), round(r['throughput_ratio_hi'], 2)],
                 predicted=None if r['predicted_speedup'] is None else round(r['predicted_speedup'], 2))
            for k, r in speed.items()]
    metrics = [json.loads(ln) for ln in (Path(cfg.out) / METRICS_NAME).read_text().splitlines() if ln.strip()]
    plot = _plot(out_dir, metrics, model, cfg.data)
    widths = shutil.copy(Path(pcfg.out) / 'widths.png', out_dir / 'widths.png')
    result = dict(rows=rows, dense=dense_source, train_time_s=round(train_s, 1), prune_time_s=round(prune_s, 1),
                  mixer_train_time_s=round(mixer_s, 1), total_time_s=round(time.perf_counter() - start, 1),
                  mixer_run_dir=mcfg.out, run_dir=cfg.out,
                  pruned_run_dir=pcfg.out, plot=str(plot), widths_plot=str(widths),
                  fusion=dict(fused.token_fusion.describe(), tokens=fused.token_fusion.last.get('tokens')),
                  settings=dict(device=speed['dense']['device'], threads=speed['dense']['settings']['threads'],
                                batch=64, data=cfg.data, epochs=cfg.epochs))
    (out_dir / 'results.json').write_text(json.dumps(result, indent=2))
    if progress:
        shown = [dict(r, speedup_range='{:.2f}-{:.2f}'.format(*r['speedup_range'])) for r in rows]
        print(format_table(shown, ['model', 'top1', 'params_m', 'gmacs', 'latency_ms', 'img_per_s', 'speedup',
                                   'speedup_range', 'predicted']))
        dense_how = (f'trained in {train_s:.0f} s' if dense_source == 'trained' else
                     f'the committed dense run ({DEMO_EPOCHS} epochs, 4-5 CPU minutes; --train trains it again)')
        print(f'dense model: {dense_how}, pruned and fine-tuned in {prune_s:.0f} s, PoolFormer trained in '
              f'{mixer_s:.0f} s; speed-up = measured '
              f'throughput at batch 64 over the dense model (median of the rounds; range: min-max over them); predicted = the latency table\'s; tokens per block '
              f'with fusion {fused.token_fusion.last.get("tokens")}; run directories {cfg.out}, {pcfg.out}; '
              f'plots {plot}, {widths}')
        if speed['fused']['images_per_s'] < speed['nvit']['images_per_s']:
            print('token fusion cut GMACs but not time here: this pruned model is so small that merging costs more than '
                  'the tokens it saves on this device; on larger models the overhead is amortised (README, token '
                  'reduction)')
    return result


def _lut(pcfg):
    from .prune import LatencyTable
    from .prune.nvit import LUT_NAME
    return LatencyTable.load(Path(pcfg.out) / LUT_NAME)
