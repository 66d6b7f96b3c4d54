"""Training throughput of ``deitlab train`` against a plain timm training loop, in one process.

Same model (``deitlab_deit_nano_patch4_32`` at 28 px, 1 channel), same data (Fashion-MNIST, the
same ``deitlab.data`` loader), same batch, same recipe pieces (timm AdamW, per-step cosine schedule,
Mixup/CutMix, soft-target cross-entropy, drop path). The plain loop is what a timm user writes by
hand; ``deitlab train`` adds the NaN check, progress bar, logging, EMA hook and distillation
wrapper. Which loop runs first alternates from round to round (A B, B A, A B, ...), so that
neither always runs on a cooler or warmer machine; the ratio is taken within each round and the
median over the rounds reported with its min-max range. Each loop's images per second of wall time
and per CPU-second (``time.process_time``: all of the process's threads) are both recorded: the
CPU-time ratio counts the work each loop does and moves less with other jobs on the machine than
the wall-time ratio, which is what a user waits for.

    python benchmarks/train_throughput.py [--rounds 5] [--steps 40] [--threads N]

Writes ``benchmarks/results/train_throughput.json``. Target: median ratio >= 0.95.
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import timm
from torch.utils.data import DataLoader
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import deitlab  # noqa: F401
from deitlab.data import build_dataset
from deitlab.train import TrainConfig, train

MODEL, DATA, BATCH = 'deitlab_deit_nano_patch4_32', 'fashion-mnist', 128
RESULTS = Path(__file__).resolve().parent / 'results'


def ours(steps: int, out: Path) -> float:
    cfg = TrainConfig(model=MODEL, data=DATA, out=str(out), epochs=1, batch_size=BATCH, lr=1e-3, warmup_epochs=0,
                      drop_path=0.1, mixup=0.8, cutmix=1.0, aug='light', max_steps_per_epoch=steps, tensorboard=False,
                      progress=False)
    train(cfg)
    row = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    images = row['train_img_per_s'] * row['epoch_time_s']
    return row['train_img_per_s'], images / row['epoch_cpu_s']


def plain(steps: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=28, in_chans=1, num_classes=10, drop_path_rate=0.1)
    ds = build_dataset(DATA, 'train', img_size=28, in_chans=1, aug='light')
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True)
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=1e-5, t_in_epochs=False)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion = SoftTargetCrossEntropy()
    model.train()
    seen, t0, c0 = 0, time.perf_counter(), time.process_time()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = mixup(x, y)
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step_update(step + 1)
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0), seen / (time.process_time() - c0)


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--steps', type=int, default=40)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    ap.add_argument('--out', default=str(RESULTS / 'train_throughput.json'))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()
    plain(5)  # warm-up: data cached, kernels loaded
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            if r % 2 == 0:
                a = ours(args.steps, Path(tmp) / f'r{r}')
                b = plain(args.steps)
            else:
                b = plain(args.steps)
                a = ours(args.steps, Path(tmp) / f'r{r}')
            (a, a_cpu), (b, b_cpu) = a, b
            rows.append(dict(round=r, first='deitlab' if r % 2 == 0 else 'timm loop', deitlab_img_per_s=a,
                             timm_loop_img_per_s=b, ratio=a / b, deitlab_img_per_cpu_s=a_cpu,
                             timm_loop_img_per_cpu_s=b_cpu, cpu_ratio=a_cpu / b_cpu))
            print(rows[-1], flush=True)
    ratios = [r['ratio'] for r in rows]
    cpu = [r['cpu_ratio'] for r in rows]
    res = dict(model=MODEL, data=DATA, batch=BATCH, steps_per_round=args.steps, rounds=rows,
               median_ratio=statistics.median(ratios), min_ratio=min(ratios), max_ratio=max(ratios),
               spread=max(ratios) - min(ratios), median_cpu_ratio=statistics.median(cpu), min_cpu_ratio=min(cpu),
               max_cpu_ratio=max(cpu), cpu_spread=max(cpu) - min(cpu), order='alternating: deitlab first in even rounds, the timm loop in odd',
               settings=dict(device='cpu', dtype='float32', threads=torch.get_num_threads(),
                             torch=torch.__version__, timm=timm.__version__, machine=platform.machine(),
                             load_avg_before=load_before, load_avg_after=_load()),
               target='median ratio >= 0.95')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ('median_ratio', 'min_ratio', 'max_ratio', 'spread', 'median_cpu_ratio',
                                          'min_cpu_ratio', 'max_cpu_ratio')}))


if __name__ == '__main__':
    main()
