"""DCAL (Zhu et al., CVPR 2022) against its backbone on three tasks, with each cross-attention branch
alone: the same small DeiT (``deitlab_deit_pico_patch4_32``), recipe and steps for every arm, 3 seeds.

Arms: ``baseline`` (the backbone), ``dcal`` (SA + GLCA + PWCA, inference softmax(SA) + softmax(GLCA)),
``glca`` (``--dcal-no-pwca``) and ``pwca`` (``--dcal-no-glca --dcal-inference sa``: PWCA only
regularises training, the SA head answers).

Tasks (``TASKS``):

* ``fine``    ``glyphs-fine`` (128 classes = 8 letters x 16 fonts, 15 training images per class):
  top-1; GLCA ratio 0.1 (the paper's for fine-grained data);
* ``fmnist``  Fashion-MNIST at 32 px: top-1 and the confusions among T-shirt, pullover, coat and
  shirt (the classes that differ in local detail); ratio 0.1;
* ``reid``    ``glyphs-reid`` (writers as identities, views as cameras, disjoint test writers): mAP
  and Rank-1 of ``deitlab eval --retrieval``; every arm, the baseline included, with ``--triplet``
  and P x K batches (``--pk 8,4``); ratio 0.3 (the paper's for re-ID).

The training cost of each arm is its training GFLOPs (``train_gflops``) and training time (two runs
at a time, 1 thread each; the ratio to the baseline of the same task and seed). The paper's anchors:
+2.5 pt top-1 on CUB with DeiT-Tiny, +2.8 mAP on MSMT17, training 3.8 h against 2.1 h.

    DEITLAB_BENCH_RUNS=/work/dcal-runs python benchmarks/dcal.py train --jobs 2   # 36 runs
    DEITLAB_BENCH_RUNS=/work/dcal-runs python benchmarks/dcal.py report            # JSON + plot
    DEITLAB_BENCH_RUNS=/work/dcal-runs python benchmarks/dcal.py figure            # the rollout picture
    DEITLAB_BENCH_RUNS=/work/dcal-runs python benchmarks/dcal.py features          # re-ID, each feature alone

``features`` asks why DCAL loses on re-ID: the re-ID runs of the arms with GLCA, ranked by the SA
feature alone (the backbone's), by GLCA's alone and by both joined (what ``eval --retrieval`` uses),
into ``results/dcal_reid_features.json``. It trains the runs it lacks first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _common import run_cli, run_pool, seed_stats

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
WORK = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-dcal-bench'))
MODEL = 'deitlab_deit_pico_patch4_32'
SEEDS = (0, 1, 2)
ARMS = {'baseline': [], 'dcal': ['--dcal'], 'glca': ['--dcal', '--dcal-no-pwca'],
        'pwca': ['--dcal', '--dcal-no-glca', '--dcal-inference', 'sa']}
COMMON = ['--recipe', 'short', '--img-size', '32', '--workers', '0', '--no-tensorboard', '--no-progress']
TASKS = {
    'fine': dict(data='glyphs-fine', ratio=0.1, flags=['--epochs', '40']),
    'fmnist': dict(data='fashion-mnist', ratio=0.1, flags=['--epochs', '10', '--max-steps-per-epoch', '300']),
    'reid': dict(data='glyphs-reid', ratio=0.3, flags=['--epochs', '40', '--triplet', '--pk', '8,4',
                                                        '--batch-size', '32']),
}
# Fashion-MNIST's upper-body garments: T-shirt/top, pullover, coat, shirt
GARMENTS = {0: 'T-shirt/top', 2: 'pullover', 4: 'coat', 6: 'shirt'}
if os.environ.get('DCAL_SMOKE'):   # the whole pipeline in minutes, to check the script (numbers meaningless)
    SEEDS = (0,)
    for _t in TASKS.values():
        _t['flags'] = [*_t['flags'][2:], '--epochs', '1', '--max-steps-per-epoch', '3']


def run_dir(task: str, arm: str, seed: int) -> Path:
    return WORK / f'{task}_{arm}_s{seed}'


def cmd_train(args) -> None:
    jobs = []
    for seed in args.seeds:
        for task in args.tasks:
            t = TASKS[task]
            for arm in args.arms:
                out = run_dir(task, arm, seed)
                if (out / 'summary.json').exists():
                    continue
                dcal = [*ARMS[arm], '--dcal-ratio', str(t['ratio'])] if ARMS[arm] else []
                cmd = [sys.executable, '-m', 'deitlab', 'train', '--model', MODEL, '--data', t['data'], '--out',
                       str(out), '--seed', str(seed), *COMMON, *t['flags'], *dcal, '--json']
                script = f'{" ".join(cmd)} > {out}.log 2>&1 && tail -n 1 {out}.log > {out}/summary.json'
                jobs.append((out.name, ['bash', '-c', f'rm -rf {out} && {script}'], f'{out}.out'))
    print(f'{len(jobs)} runs to do', flush=True)
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))


def _retrieval(out: Path) -> dict:
    """``deitlab eval --retrieval`` of a re-ID run, cached in the run directory."""
    cached = out / 'retrieval.json'
    if not cached.exists():
        res = subprocess.run([sys.executable, '-m', 'deitlab', 'eval', '--model', str(out), '--data',
                              TASKS['reid']['data'], '--retrieval', '--json', '--quiet'],
                             check=True, capture_output=True, text=True)
        cached.write_text(res.stdout.strip().splitlines()[-1])
    return json.loads(cached.read_text())


def _feature_retrieval(out: Path) -> dict:
    """mAP and Rank-1 of a re-ID run with DCAL's retrieval feature split into its two halves: the SA
    feature (the backbone's pre-logits feature) and GLCA's, each alone and joined; cached in the run
    directory."""
    cached = out / 'retrieval_features.json'
    if not cached.exists():
        import torch
        from deitlab.distributed import resolve_device
        from deitlab.retrieval import cosine_distance, query_gallery_features, retrieval_metrics
        from deitlab.rundir import create
        torch.set_num_threads(1)
        device = resolve_device(None)
        model = create(str(out)).to(device).eval()
        with torch.no_grad():
            (qf, qi, qv), (gf, gi, gv) = query_gallery_features(model, TASKS['reid']['data'], device)
        d = model.backbone.embed_dim
        if qf.shape[1] != 2 * d:
            raise SystemExit(f'{out}: a feature of {qf.shape[1]} channels is not SA and GLCA joined ({2 * d})')
        parts = {'sa': slice(0, d), 'glca': slice(d, None), 'sa+glca': slice(None)}
        res = {}
        for name, sl in parts.items():
            m = retrieval_metrics(cosine_distance(qf[:, sl], gf[:, sl]), qi, qv, gi, gv)
            res[name] = dict(mAP=m['mAP'], rank1=m['rank1'])
        cached.write_text(json.dumps(res))
    return json.loads(cached.read_text())


FEATURE_ARMS = ('dcal', 'glca')


def cmd_features(args) -> None:
    args.tasks, args.arms = ['reid'], list(FEATURE_ARMS)
    cmd_train(args)
    runs = [dict(arm=arm, seed=seed, **_feature_retrieval(run_dir('reid', arm, seed)))
            for arm in FEATURE_ARMS for seed in args.seeds]
    summary = {arm: {part: {k: seed_stats([r[part][k] for r in runs if r['arm'] == arm]) for k in ('mAP', 'rank1')}
                     for part in ('sa', 'glca', 'sa+glca')} for arm in FEATURE_ARMS}
    result = dict(benchmark='dcal_reid_features', model=MODEL, data=TASKS['reid']['data'], seeds=list(args.seeds),
                  arms={a: ' '.join(ARMS[a]) for a in FEATURE_ARMS}, flags=' '.join([*COMMON, *TASKS['reid']['flags']]),
                  ratio=TASKS['reid']['ratio'], summary=summary, runs=runs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'dcal_reid_features.json').write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


def _garment_confusions(out: Path) -> dict:
    """On the Fashion-MNIST test images: for each pair of upper-body garments (a, b), how many images
    of a are predicted b; cached in the run directory."""
    cached = out / 'confusions.json'
    if not cached.exists():
        import torch
        from deitlab.data.for_model import eval_loader, model_datasets
        from deitlab.rundir import create
        torch.set_num_threads(1)
        model = create(str(out)).eval()
        val, = model_datasets(model, TASKS['fmnist']['data'], ('val',))
        counts = torch.zeros(10, 10, dtype=torch.long)
        with torch.no_grad():
            for x, y in eval_loader(val, 256):
                pred = model(x).argmax(-1)
                counts.index_put_((y, pred), torch.ones_like(y), accumulate=True)
        pairs = {f'{GARMENTS[a]} -> {GARMENTS[b]}': int(counts[a, b]) for a in GARMENTS for b in GARMENTS if a != b}
        per_class = {GARMENTS[a]: 100.0 * float(counts[a, a]) / max(int(counts[a].sum()), 1) for a in GARMENTS}
        cached.write_text(json.dumps(dict(pairs=pairs, total=sum(pairs.values()), recall=per_class)))
    return json.loads(cached.read_text())


def cmd_report(args) -> None:
    runs = []
    for task in TASKS:
        for arm in ARMS:
            for seed in SEEDS:
                out = run_dir(task, arm, seed)
                if not (out / 'summary.json').exists():
                    print('missing', out.name, flush=True)
                    continue
                s = json.loads((out / 'summary.json').read_text())
                r = dict(task=task, arm=arm, seed=seed, top1=s['val_top1'], train_gflops=s['train_gflops'],
                         train_time_s=s['train_time_s'], gmacs_sa=s.get('gmacs_sa'), gmacs_sa_glca=s.get('gmacs_sa_glca'),
                         dcal_w=s.get('dcal_w'))
                if task == 'reid':
                    ret = _retrieval(out)
                    r.update(mAP=ret['mAP'], rank1=ret['rank1'])
                if task == 'fmnist':
                    r['garments'] = _garment_confusions(out)
                runs.append(r)
    summary = {}
    for task in TASKS:
        summary[task] = {}
        base = {r['seed']: r for r in runs if r['task'] == task and r['arm'] == 'baseline'}
        for arm in ARMS:
            rs = [r for r in runs if r['task'] == task and r['arm'] == arm]
            if not rs:
                continue
            s = dict(top1=seed_stats([r['top1'] for r in rs]), train_gflops=seed_stats([r['train_gflops'] for r in rs]),
                     time_ratio=seed_stats([r['train_time_s'] / base[r['seed']]['train_time_s'] for r in rs
                                           if r['seed'] in base]),
                     gflops_ratio=seed_stats([r['train_gflops'] / base[r['seed']]['train_gflops'] for r in rs
                                             if r['seed'] in base]))
            if task == 'reid':
                s.update(mAP=seed_stats([r['mAP'] for r in rs]), rank1=seed_stats([r['rank1'] for r in rs]))
            if task == 'fmnist':
                s['garment_confusions'] = seed_stats([r['garments']['total'] for r in rs])
            summary[task][arm] = s
    verdict = {}
    for task, key in (('fine', 'top1'), ('fmnist', 'top1'), ('reid', 'mAP')):
        b, d = summary[task].get('baseline'), summary[task].get('dcal')
        if b and d and b[key]['mean'] is not None and d[key]['mean'] is not None:
            spread = max(b[key]['std'] or 0.0, d[key]['std'] or 0.0)
            gap = d[key]['mean'] - b[key]['mean']
            verdict[task] = dict(metric=key, gap=gap, spread=spread, beats=gap > spread)
    result = dict(benchmark='dcal', model=MODEL, seeds=list(SEEDS), arms={k: ' '.join(v) for k, v in ARMS.items()},
                  tasks={k: dict(data=v['data'], ratio=v['ratio'], flags=' '.join(v['flags'])) for k, v in TASKS.items()},
                  common=' '.join(COMMON), summary=summary, verdict=verdict, runs=runs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'dcal.json').write_text(json.dumps(result, indent=1))
    plot(result)
    print(json.dumps(dict(verdict=verdict, summary={t: {a: {k: v for k, v in s.items() if k in ('top1', 'mAP')}
                                                        for a, s in arms.items()} for t, arms in summary.items()}),
                     indent=1))


# seed 0's baseline and DCAL runs on glyphs-fine, committed for the picture
REFERENCE = {arm: HERE / 'reference' / f'glyphs-fine-{arm}' for arm in ('baseline', 'dcal')}


def cmd_figure(args) -> None:
    """Where the baseline and DCAL look on glyphs-fine test images: the class token's attention
    rollout of each (the same seed) and the patches DCAL's GLCA takes as queries (the top
    ``ratio`` of its rollout). Both run directories are committed (``benchmarks/reference``)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch
    from deitlab.data.for_model import model_datasets
    from deitlab.layers.rollout import attention_rollout, cls_row, top_tokens
    from deitlab.rundir import create
    for arm, ref in REFERENCE.items():
        if not (ref / 'model.safetensors').exists():
            ref.mkdir(parents=True, exist_ok=True)
            for name in ('config.json', 'model.safetensors', 'summary.json', 'train_config.json'):
                (ref / name).write_bytes((run_dir('fine', arm, 0) / name).read_bytes())
    base, dcal = (create(str(REFERENCE[arm])).eval() for arm in ('baseline', 'dcal'))
    val, = model_datasets(dcal, TASKS['fine']['data'], ('val',))
    picks = [val[i] for i in range(0, 8 * 37, 37)]
    x = torch.stack([p[0] for p in picks])
    with torch.no_grad():
        rows = {name: cls_row(attention_rollout(m, x), m) for name, m in
                (('baseline', base), ('DCAL (SA)', dcal.backbone))}
        chosen = top_tokens(rows['DCAL (SA)'], TASKS['fine']['ratio'])
        correct = dict(baseline=(base(x).argmax(-1) == torch.tensor([p[1] for p in picks])).tolist(),
                       dcal=(dcal(x).argmax(-1) == torch.tensor([p[1] for p in picks])).tolist())
    grid = int(rows['baseline'].shape[1] ** 0.5)
    img = (x * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(4, len(picks), figsize=(1.6 * len(picks), 6.8))
    side = x.shape[-1] / grid
    for j in range(len(picks)):
        axes[0, j].imshow(img[j])
        for r, (name, row) in enumerate(rows.items(), start=1):
            axes[r, j].imshow(row[j].reshape(grid, grid).numpy(), cmap='magma')
        axes[3, j].imshow(img[j])
        for k in chosen[j].tolist():
            axes[3, j].add_patch(plt.Rectangle(((k % grid) * side - 0.5, (k // grid) * side - 0.5), side, side,
                                               fill=False, edgecolor='tab:red', linewidth=1.5))
        axes[1, j].set_title('baseline: ' + ('right' if correct['baseline'][j] else 'wrong'), fontsize=8)
        axes[2, j].set_title('DCAL: ' + ('right' if correct['dcal'][j] else 'wrong'), fontsize=8)
    labels = ['test image', 'baseline rollout', 'DCAL SA rollout', f"GLCA queries (top {TASKS['fine']['ratio']:.0%})"]
    for r, label in enumerate(labels):
        axes[r, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f'glyphs-fine, seed 0: the class token\'s attention rollout ({MODEL})', fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / 'dcal_rollout.png', dpi=100)
    print('wrote', RESULTS / 'dcal_rollout.png')


def plot(result: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [('fine', 'top1', 'glyphs-fine: test top-1 (%)'), ('fmnist', 'top1', 'Fashion-MNIST: test top-1 (%)'),
              ('reid', 'mAP', 'glyphs-reid: mAP (%)'), ('reid', 'rank1', 'glyphs-reid: Rank-1 (%)')]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    colors = dict(baseline='0.4', dcal='tab:red', glca='tab:blue', pwca='tab:green')
    for ax, (task, key, title) in zip(axes, panels):
        arms = [a for a in ARMS if a in result['summary'].get(task, {})]
        for i, arm in enumerate(arms):
            s = result['summary'][task][arm][key]
            ax.bar(i, s['mean'], yerr=s['std'] or 0, color=colors[arm], capsize=3)
            xs = [r[key] for r in result['runs'] if r['task'] == task and r['arm'] == arm]
            ax.scatter([i] * len(xs), xs, color='k', s=8, zorder=3)
        ax.set_xticks(range(len(arms)), arms)
        vals = [r[key] for r in result['runs'] if r['task'] == task]
        if vals:
            ax.set_ylim(min(vals) - 3, max(vals) + 2)
        ax.set_title(title, fontsize=10)
        ax.grid(axis='y', alpha=0.3)
    fig.suptitle(f"DCAL vs its backbone ({result['model']}), mean and std over {len(result['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(RESULTS / 'dcal.png', dpi=100)


def _flags(name: str, q) -> None:
    if name in ('train', 'features'):
        q.add_argument('--jobs', type=int, default=2)
        q.add_argument('--seeds', nargs='*', type=int, default=list(SEEDS))
    if name == 'train':
        q.add_argument('--tasks', nargs='*', default=list(TASKS), choices=list(TASKS))
        q.add_argument('--arms', nargs='*', default=list(ARMS), choices=list(ARMS))


def main():
    run_cli(__doc__, {'train': cmd_train, 'report': cmd_report, 'figure': cmd_figure, 'features': cmd_features},
            _flags)


if __name__ == '__main__':
    main()
