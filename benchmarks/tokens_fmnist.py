"""Token reduction on Fashion-MNIST: ToMe against MCTF (and MCTF-Fast, STViT), off the shelf and
after the same short fine-tune, on the reference DeiT-nano and on its NViT-pruned version.

Models: ``benchmarks/reference/fmnist-deit-nano`` (49 patches + CLS, 6 blocks, 89.12% top-1) and
``benchmarks/reference/fmnist-nvit-0.5`` (the NViT benchmark's latency-0.5 model), so pruning and
fusion compose. For each setting: test top-1 on the 10k images, closed-form GMACs (checked against
a counted forward in the tests), and -- in one fresh process per reference model, on a quiet
machine, fixed malloc thresholds, 2 threads -- batch-1 latency and batch-256 throughput measured
interleaved against the unpatched model with fused attention (timm's default, the honest baseline)
and with explicit attention.

Fine-tune (the same for every arm, ``FINETUNE``): one epoch of Fashion-MNIST at batch 32, AdamW,
lr 5e-5 cosine to 1e-6, label smoothing 0.1, no Mixup; ToMe trains at its r, MCTF with its
token-reduction consistency (r' drawn in [0, r/2), lambda 3, gate 0.4); ``control`` fine-tunes
the unpatched model the same way; STViT starts from the reference weights (``stvit_from_deit``
initialisation) and trains for ``--stvit-epochs``.

    python benchmarks/tokens_fmnist.py offshelf        # ~3 min
    python benchmarks/tokens_fmnist.py finetune --jobs 2   # ~40 min on 2 cores (1 thread per job)
    python benchmarks/tokens_fmnist.py speed           # ~6 min; needs a quiet machine
    python benchmarks/tokens_fmnist.py plot            # results/tokens_fmnist.{json,png}
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
REFS = {'nano': HERE / 'reference' / 'fmnist-deit-nano', 'nvit': HERE / 'reference' / 'fmnist-nvit-0.5'}
RESULTS = HERE / 'results'
RUNS = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-tokens-bench'))
DATA = 'fashion-mnist'
FINETUNE = dict(epochs=1, batch_size=32, lr=5e-5, min_lr=1e-6, warmup_epochs=0.0, weight_decay=0.05, smoothing=0.1,
                mixup=0.0, cutmix=0.0, drop_path=0.0, aug='none', seed=0)


def settings() -> list:
    """Every off-the-shelf setting: (name, reference, method, r)."""
    out = []
    for ref in REFS:
        out += [dict(name=f'{ref}/tome r={r}', ref=ref, method='tome', r=r) for r in (2, 4, 6, 8, 10, 12)]
        out += [dict(name=f'{ref}/mctf r={r}', ref=ref, method='mctf', r=r) for r in (2, 4, 6, 8, 10, 12, 16)]
        out += [dict(name=f'{ref}/mctf-fast r={r}', ref=ref, method='mctf-fast', r=r) for r in (0.25, 0.35, 0.5)]
    return out


# the arms fine-tuned (ToMe r and MCTF r in pairs of about equal GMACs), plus the unpatched control.
# MCTF's token-reduction consistency runs a second forward pass per step (about twice ToMe's
# fine-tune time); the one-pass MCTF arms train without it, at ToMe's cost, so that the two methods
# are also compared at equal cost.
FINETUNED = [dict(name='nano/control', ref='nano', method='none', r=None)] + \
    [dict(name=f'nano/tome r={r}', ref='nano', method='tome', r=r) for r in (6, 8, 4, 10)] + \
    [dict(name=f'nano/mctf r={r}', ref='nano', method='mctf', r=r) for r in (8, 12, 6, 16)] + \
    [dict(name=f'nano/mctf r={r} one-pass', ref='nano', method='mctf', r=r, one_pass=True, speed_as=f'nano/mctf r={r}')
     for r in (8, 12, 6, 16)] + \
    [dict(name='nano/mctf-fast r=0.35', ref='nano', method='mctf-fast', r=0.35)]
STVIT = dict(name='nano/stvit', ref='nano', method='stvit', r=None)


def build(s: dict, run_dir=None):
    """The model of setting ``s``: the reference (or a fine-tuned run directory) patched."""
    from deitlab.rundir import create
    from deitlab.tokens.fuse import apply_token_fusion
    m = create(str(run_dir or REFS[s['ref']])).eval()
    if s['method'] in ('tome', 'mctf', 'mctf-fast'):
        apply_token_fusion(m, s['method'], s['r'])
    return m


def gmacs_of(m) -> float:
    from deitlab.bench import analytic_gmacs
    from deitlab.tokens import token_fusion_of
    tf = token_fusion_of(m)
    if tf is None:
        try:
            return analytic_gmacs(m)
        except ValueError:   # STViT: counted
            from deitlab.bench import count_gmacs
            return count_gmacs(m)
    return tf.gmacs(m)


def _tokens(m) -> list:
    from deitlab.tokens import token_fusion_of
    tf = token_fusion_of(m)
    if tf is None:
        return []
    s = tf.schedule(m.patch_embed.num_patches + m.num_prefix_tokens, len(m.blocks))
    return [b['tokens_in'] for b in s] + [s[-1]['tokens_out']]


def offshelf(args) -> None:
    import torch
    from deitlab.tokens.fuse import evaluate_models
    torch.set_num_threads(args.threads)
    rows = []
    for ref in REFS:
        group = [dict(name=f'{ref}/baseline', ref=ref, method='none', r=None)] + \
                [s for s in settings() if s['ref'] == ref]
        models = {s['name']: build(s) for s in group}
        acc = evaluate_models(models, DATA)
        for s in group:
            m = models[s['name']]
            rows.append(dict(s, stage='off-the-shelf', top1=acc[s['name']]['top1'], top5=acc[s['name']]['top5'],
                             gmacs=gmacs_of(m), tokens=_tokens(m)))
            print(f"{s['name']:>24}  top1 {rows[-1]['top1']:6.2f}  GMACs {rows[-1]['gmacs']:.5f}  {rows[-1]['tokens']}")
    _save('offshelf', rows)


def _finetune_one(s: dict, out: Path, args) -> dict:
    from deitlab.train import TrainConfig, train
    kw = dict(FINETUNE)
    extra = {}
    if s['method'] == 'stvit':
        kw.update(epochs=args.stvit_epochs, lr=args.stvit_lr)
        extra = dict(model=args.stvit_model, pretrained_file=str(REFS['nano'] / 'model.safetensors'),
                     img_size=28, in_chans=1)
    else:
        extra = dict(model=str(REFS[s['ref']]))
        if s['method'] != 'none':
            r = s['r']
            extra.update(token_fusion=s['method'], r=str(r),
                         r_teacher_max=(r / 2 if s['method'] != 'tome' and not s.get('one_pass') else 0))
    cfg = TrainConfig(data=DATA, out=str(out), tensorboard=False, progress=False, **kw, **extra)
    t0 = time.time()
    res = train(cfg)
    res['wall_s'] = time.time() - t0
    (out / 'arm.json').write_text(json.dumps(dict(setting=s, result=res, config=cfg.to_dict()), default=str))
    return res


def _slug(s: dict) -> str:
    """The run-directory name of a setting."""
    return s['name'].replace('/', '_').replace(' ', '_')


def finetune(args) -> None:
    arms = FINETUNED + [STVIT]
    if args.arm:
        s = next(a for a in arms if a['name'] == args.arm)
        _finetune_one(s, RUNS / _slug(s), args)
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    jobs = [(a['name'], [sys.executable, __file__, 'finetune', '--arm', a['name'], '--stvit-model', args.stvit_model,
                         '--stvit-epochs', str(args.stvit_epochs), '--stvit-lr', str(args.stvit_lr)],
             RUNS / (_slug(a) + '.log')) for a in arms if not (RUNS / _slug(a) / 'arm.json').exists()]
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))
    rows = []
    for s in arms:
        run = RUNS / _slug(s)
        if not (run / 'arm.json').exists():
            continue
        info = json.loads((run / 'arm.json').read_text())
        m = build(s, run) if s['method'] != 'stvit' else _load(run)
        rows.append(dict(s, stage='fine-tuned', top1=info['result']['val_top1'], top5=info['result']['val_top5'],
                         gmacs=gmacs_of(m), tokens=_tokens(m), train_wall_s=info['result']['wall_s'],
                         run_dir=str(run)))
    _save('finetune', rows)


def _load(run):
    from deitlab.rundir import create
    return create(str(run)).eval()


def speed(args) -> None:
    """Time every setting of one reference model in a fresh process (see the module docstring)."""
    if args.ref:
        return _speed_child(args)
    rows = fresh_rows(__file__, '--ref', REFS,
                      ['--rounds', str(args.rounds), '--threads', str(args.threads), '--batch', str(args.batch)])
    _save('speed', rows)


def _speed_child(args) -> None:
    import copy

    import torch
    from deitlab.bench import compare
    torch.set_num_threads(args.threads)
    base = build(dict(ref=args.ref, method='none'))
    explicit = copy.deepcopy(base)
    for mod in explicit.modules():
        if hasattr(mod, 'fused_attn'):
            mod.fused_attn = False
    models = {f'{args.ref}/baseline': base, f'{args.ref}/explicit attention': explicit}
    models.update({s['name']: build(s) for s in settings() if s['ref'] == args.ref})
    stvit = RUNS / STVIT['name'].replace('/', '_')
    if args.ref == 'nano' and (stvit / 'model.safetensors').exists():
        models[STVIT['name']] = _load(stvit)
    rows = compare(models, f'{args.ref}/baseline', batch_size=args.batch, rounds=args.rounds, gmacs=False)
    for r in rows:
        r['settings'] = dict(r['settings'], threads=args.threads, malloc=FIXED_MALLOC, torch=torch.__version__)
    print(json.dumps(rows, default=str))


def _save(phase: str, rows: list) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f'{phase}.json').write_text(json.dumps(rows, indent=2, default=str))


def _read(phase: str) -> list:
    path = RUNS / f'{phase}.json'
    return json.loads(path.read_text()) if path.exists() else []


def collect() -> dict:
    speed = {r['name']: r for r in _read('speed')}
    rows = []
    for r in _read('offshelf') + _read('finetune'):
        # a fine-tuned model runs the off-the-shelf setting's token schedule: the same speed
        s = speed.get(r['name']) if r['stage'] == 'off-the-shelf' or r['method'] == 'stvit' else \
            speed.get(r.get('speed_as', r['name']) if r['method'] != 'none' else f"{r['ref']}/baseline")
        if s:
            r.update(images_per_s=s['images_per_s'], throughput_ratio=s['throughput_ratio'],
                     latency_ms=s['latency_ms'], latency_speedup=s['latency_speedup'])
        rows.append(r)
    for ref in REFS:
        e = speed.get(f'{ref}/explicit attention')
        base = next((r for r in rows if r['name'] == f'{ref}/baseline'), {})
        if e:   # the same function as the baseline, so the same accuracy
            rows.append(dict(name=f'{ref}/explicit attention', ref=ref, method='explicit', stage='baseline',
                             top1=base.get('top1'), gmacs=base.get('gmacs'),
                             images_per_s=e['images_per_s'], throughput_ratio=e['throughput_ratio'],
                             latency_ms=e['latency_ms'], latency_speedup=e['latency_speedup']))
    first = next(iter(speed.values()), {})
    return dict(benchmark='tokens_fmnist', data=DATA, references={k: str(v.relative_to(HERE.parent)) for k, v in REFS.items()},
                finetune=FINETUNE, speed_settings=first.get('settings'), rows=rows)


def plot(args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    res = collect()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'tokens_fmnist.json').write_text(json.dumps(res, indent=2, default=str))
    rows = res['rows']
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {'tome': 'tab:orange', 'mctf': 'tab:blue', 'mctf-fast': 'tab:green', 'stvit': 'tab:purple',
              'none': 'k', 'explicit': '0.6'}
    for i, ref in enumerate(REFS):
        for j, (xkey, xlabel) in enumerate((('gmacs', 'GMACs (closed form)'),
                                            ('throughput_ratio', 'throughput / fused-attention baseline'))):
            ax = axes[i, j]
            for method, c in colors.items():
                for stage, style in (('off-the-shelf', 'o-'), ('fine-tuned', 's--'), ('baseline', 'x')):
                    pts = sorted((r[xkey], r['top1']) for r in rows if r['ref'] == ref and r['method'] == method
                                 and r['stage'] == stage and r.get(xkey) is not None and r.get('top1') is not None)
                    if pts:
                        ax.plot(*zip(*pts), style, color=c, ms=4, label=f'{method} ({stage})')
            ax.set_xlabel(xlabel)
            ax.set_ylabel('test top-1 (%)')
            ax.set_title(f'{ref}: {"GMACs" if j == 0 else "measured CPU throughput"}')
            ax.grid(alpha=.3)
        axes[i, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / 'tokens_fmnist.png', dpi=110)
    for r in rows:
        print(f"{r['name']:>26} {r['stage']:>13}  top1 {r.get('top1') or 0:6.2f}  GMACs {r.get('gmacs') or 0:.5f}  "
              f"thr x{r.get('throughput_ratio') or 0:.2f}  lat x{r.get('latency_speedup') or 0:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('phase', choices=['offshelf', 'finetune', 'speed', 'plot', 'all'])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--jobs', type=int, default=2)
    p.add_argument('--arm', default=None)
    p.add_argument('--ref', default=None)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--stvit-model', default='deitlab_stvit_nano_patch4_32')
    p.add_argument('--stvit-epochs', type=int, default=3)
    p.add_argument('--stvit-lr', type=float, default=2e-4)
    args = p.parse_args(argv)
    phases = ['offshelf', 'finetune', 'speed', 'plot'] if args.phase == 'all' else [args.phase]
    for ph in phases:
        globals()[ph](args)


if __name__ == '__main__':
    main()
