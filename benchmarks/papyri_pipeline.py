"""Crop refiners and their vote on generated papyrus pages: Turnbull & Mannix's recognition pipeline
(a detector's letters re-classified by a DeiT and a SimCLR-pretrained ResNet, then a vote), scored by
the competition's metric on the part-1 test pages.

Pages (``_papyri_pages.py``, shared with ``papyri_detect.py``): ``train`` 16 pages, seed 0, DejaVu
fonts; ``test`` 8 pages, seed 1, STIX fonts (never seen in training); and, for SimCLR only,
``unlabelled`` 32 pages, seed 3, DejaVu fonts, whose annotations are never read.

Runs (each ``deitlab`` command with the settings below; 1 thread):

* detector: ``fcos-r18`` with ``train-detector``'s defaults, as ``papyri_detect.py`` trains it
  (``--detector-run DIR`` uses that benchmark's run instead, read only);
* crops (``deitlab papyri crops``, 32 px, margin 0.15, bt1/bt2): the training pages' letters; their
  val split is the test pages' letters, so every crop accuracy below is on the unseen hand;
* SimCLR (``pretrain-simclr``): ResNet-18 (timm, from scratch) at 32 px on 16-40 px windows of the
  unlabelled pages, 20 epochs of 50 updates of 128 windows (two views each), tau 0.2; seeds 0, 1, 2;
* SimCLR refiner: seed 0's backbone fine-tuned on all the crops (``deitlab train --model RUN``,
  recipe short, aug light, 30 epochs);
* DeiT refiner: DeiT-nano (distilled, patch 4, 32 px) trained with the DeiT recipe's hard
  distillation from the SimCLR refiner (recipe short, aug light, lr 1e-3, 60 epochs);
* 10 % of the labels (``crops --label-fraction 0.1``, drawn per seed): each seed's SimCLR backbone
  and a randomly initialised ResNet-18 of the same shape fine-tuned alike (100 epochs); and the
  random ResNet-18 on all the labels, as a reference.

Measured: recognition mAP@[.5:.95] and mAP@.5 (and detection mAP@.5) of the test pages predicted by
the detector alone, with each refiner (a vote of two), with both (majority vote; and score averaging);
the linear-probe top-1 (``deitlab.papyri.probe``: logistic regression on frozen features) of the
SimCLR backbones against randomly initialised ones; the 10 %-label fine-tuned top-1, mean +- std over
the 3 seeds. Bars: each refiner raises recognition mAP over the detector alone, the vote is best,
SimCLR beats random initialisation in the linear probe and at 10 % labels.

Context, not comparable: on the real competition data the winning system reached 42.16 recognition
mAP@[.5:.95] (ICDAR 2023 papyri competition).

    PAPYRI_PIPELINE_RUNS=/work/papyri-pipeline python benchmarks/papyri_pipeline.py all [--detector-run DIR]
    PAPYRI_SMOKE=1 python benchmarks/papyri_pipeline.py all   # every step in minutes, numbers meaningless
    python benchmarks/papyri_pipeline.py demo                  # deitlab papyri demo -> results/papyri_demo.json
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import run_cli
from _papyri_pages import PAGES, SMOKE_PAGES, deitlab_json as _deitlab, fonts

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
WORK = Path(os.environ.get('PAPYRI_PIPELINE_RUNS', '/tmp/deitlab-papyri-pipeline'))
SMOKE = bool(os.environ.get('PAPYRI_SMOKE'))
SEEDS = (0, 1) if SMOKE else (0, 1, 2)
UNLABELLED = (2 if SMOKE else 32, 3, 'train')
CROP = 32
S = dict(  # the runs' budgets (smoke: a few updates each)
    simclr=['--model', 'resnet18', '--img-size', str(CROP), '--window', '16,40', '--epochs', '1' if SMOKE else '20',
            '--steps', '2' if SMOKE else '50', '--batch-size', '16' if SMOKE else '128', '--temperature', '0.2'],
    ft_epochs='1' if SMOKE else '30', deit_epochs='1' if SMOKE else '60', ft10_epochs='2' if SMOKE else '100',
    deit='deitlab_deit_nano_distilled_patch4_32',
    detector=['--epochs', '1', '--steps', '4', '--detections', '50'] if SMOKE else [])
TRAIN = ['--recipe', 'short', '--aug', 'light', '--batch-size', '8' if SMOKE else '32', '--no-tensorboard']
VARIANTS = [('detector', 'detector alone', [], {}), ('deit', '+ DeiT refiner', ['deit'], {}),
            ('simclr', '+ SimCLR refiner', ['simclr'], {}),
            ('vote', '+ both, majority vote', ['deit', 'simclr'], {}),
            ('average', '+ both, score averaging', ['deit', 'simclr'], {'--vote': 'average'})]


def _pages() -> dict:
    pages = dict(SMOKE_PAGES if SMOKE else PAGES)
    pages.pop('test-seen')   # part 1's other test set: not needed here
    return dict(pages, unlabelled=UNLABELLED)


def _timed(name: str, fn):
    """``fn()``, its wall time and its children's CPU time recorded in WORK/timings.json."""
    t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    value = fn()
    c2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    path = WORK / 'timings.json'
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = dict(wall_s=round(time.perf_counter() - t, 1),
                         cpu_s=round(c2.ru_utime + c2.ru_stime - c.ru_utime - c.ru_stime, 1))
    path.write_text(json.dumps(timings, indent=1))
    return value


def _run(name: str, *args) -> dict:
    """A training command, once: its summary cached in WORK/summaries/NAME.json."""
    cached = WORK / 'summaries' / f'{name}.json'
    if cached.exists():
        return json.loads(cached.read_text())
    summary = _timed(name, lambda: _deitlab(*args))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(summary, indent=1))
    print('trained', name, flush=True)
    return summary


def _detector(args) -> Path:
    return Path(args.detector_run) if getattr(args, 'detector_run', None) else WORK / 'runs' / 'detector'


def cmd_pages(args) -> None:
    for name, (n, seed, which) in _pages().items():
        out = WORK / 'pages' / name
        if not (out / 'annotations.json').exists():
            _timed(f'pages {name}', lambda: _deitlab('papyri', 'synth', '--pages', str(n), '--seed', str(seed),
                                                     '--fonts', ','.join(fonts(which)), '--out', str(out)))


def cmd_train(args) -> None:
    cmd_pages(args)
    pages, runs, crops = WORK / 'pages', WORK / 'runs', WORK / 'crops'
    if not getattr(args, 'detector_run', None):
        _run('detector', 'papyri', 'train-detector', '--data', str(pages / 'train'), '--out', str(runs / 'detector'),
             '--seed', '0', '--overwrite', *S['detector'])
    crop = ['--data', str(pages / 'train'), '--val', str(pages / 'test'), '--size', str(CROP), '--overwrite']
    _run('crops', 'papyri', 'crops', *crop, '--out', str(crops / 'full'))
    for s in SEEDS:
        _run(f'crops-ten-s{s}', 'papyri', 'crops', *crop, '--out', str(crops / f'ten-s{s}'), '--label-fraction', '0.1',
             '--seed', str(s))
        _run(f'simclr-s{s}', 'papyri', 'pretrain-simclr', '--images', str(pages / 'unlabelled' / 'images'), '--out',
             str(runs / f'simclr-s{s}'), '--seed', str(s), '--overwrite', *S['simclr'])
    full = ['train', '--data', f'folder:{crops / "full"}', *TRAIN, '--seed', '0', '--overwrite']
    _run('simclr-ft', *full, '--model', str(runs / 'simclr-s0'), '--epochs', S['ft_epochs'], '--out',
         str(runs / 'simclr-ft'))
    _run('deit', *full, '--model', S['deit'], '--teacher', str(runs / 'simclr-ft'), '--distill', 'hard', '--lr', '1e-3',
         '--epochs', S['deit_epochs'], '--out', str(runs / 'deit'))
    _run('ft100-random-s0', *full, '--model', 'resnet18', '--img-size', str(CROP), '--epochs', S['ft_epochs'], '--out',
         str(runs / 'ft100-random-s0'))
    for s in SEEDS:
        ten = ['train', '--data', f'folder:{crops / f"ten-s{s}"}', *TRAIN, '--seed', str(s), '--overwrite', '--epochs',
               S['ft10_epochs']]
        _run(f'ft10-simclr-s{s}', *ten, '--model', str(runs / f'simclr-s{s}'), '--out', str(runs / f'ft10-simclr-s{s}'))
        _run(f'ft10-random-s{s}', *ten, '--model', 'resnet18', '--img-size', str(CROP), '--out',
             str(runs / f'ft10-random-s{s}'))


def _score(args, name: str, members: list, extra: dict) -> dict:
    """The test pages predicted by the detector and ``members`` (refiner names), scored; cached."""
    out = WORK / 'pred' / name
    cached = out.parent / f'{name}.json'
    if cached.exists():
        return json.loads(cached.read_text())
    test = WORK / 'pages' / 'test'
    refiners = ','.join(f'{m}={WORK / "runs" / ("simclr-ft" if m == "simclr" else m)}' for m in members)
    if out.exists():
        shutil.rmtree(out)
    flags = [a for kv in extra.items() for a in kv] + (['--refiners', refiners] if members else [])
    _timed(f'predict {name}', lambda: _deitlab('papyri', 'predict', str(test / 'images'), '--detector',
                                               str(_detector(args)), '--ids-from', str(test / 'annotations.json'),
                                               '--out', str(out), *([] if name == 'vote' else ['--no-overlays']),
                                               *flags))
    scores = {}
    for task in ('recognition', 'detection'):
        r = _deitlab('papyri', 'evaluate', '--pred', str(out / 'results.json'), '--gt', str(test / 'annotations.json'),
                     '--task', task)
        scores[task] = {k: r[task][k] for k in ('mAP', 'mAP50', 'mAR')}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(scores))
    return scores


def _probes() -> dict:
    """Linear-probe top-1 on the test pages' crops of each seed's SimCLR backbone and of a randomly
    initialised ResNet-18 of the same shape (seeded alike); cached in WORK/probe.json."""
    path = WORK / 'probe.json'
    if path.exists():
        return json.loads(path.read_text())
    import torch
    from deitlab.papyri.probe import probe_crops
    from deitlab.papyri.simclr import build_backbone
    torch.set_num_threads(1)
    out = {'simclr': [], 'random': []}
    for s in SEEDS:
        out['simclr'].append(probe_crops(WORK / 'runs' / f'simclr-s{s}', WORK / 'crops' / 'full')['top1'])
        torch.manual_seed(s)
        out['random'].append(probe_crops(build_backbone('resnet18', CROP), WORK / 'crops' / 'full')['top1'])
    path.write_text(json.dumps(out))
    return out


def cmd_measure(args) -> None:
    for name, label, members, extra in VARIANTS:
        print(name, json.dumps(_score(args, name, members, extra)), flush=True)
    print('probe', json.dumps(_timed('probes', _probes)), flush=True)


def _mean_std(values: list) -> dict:
    return dict(values=values, mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)


def _beats(arms: dict) -> dict:
    """SimCLR against random initialisation over the seeds: the gap of the means, the larger std, and
    whether the gap is positive (``met``) and larger than that spread (``beyond_spread``)."""
    gap, spread = arms['simclr']['mean'] - arms['random']['mean'], max(arms['simclr']['std'], arms['random']['std'])
    return dict(gap=gap, spread=spread, met=gap > 0, beyond_spread=gap > spread)


def _figure(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    rows = result['rows']
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], [r['recognition']['mAP'] for r in rows], 0.4, label='mAP@[.5:.95]')
    a.bar([i + 0.2 for i in x], [r['recognition']['mAP50'] for r in rows], 0.4, label='mAP@.5')
    a.set_xticks(list(x), [r['label'] for r in rows], rotation=20, ha='right', fontsize=8)
    a.set_title('recognition on the test pages (unseen STIX hand)')
    a.legend(fontsize=8)
    groups = [('linear probe', result['probe']), ('10% labels, fine-tuned', result['ft10'])]
    for j, (name, d) in enumerate(groups):
        for k, (arm, colour) in enumerate((('simclr', 'tab:green'), ('random', 'tab:gray'))):
            b.bar(j + (k - 0.5) * 0.4, d[arm]['mean'], 0.4, yerr=d[arm]['std'], color=colour, capsize=4,
                  label=('SimCLR' if arm == 'simclr' else 'random init') if j == 0 else None)
    b.set_xticks([0, 1], [g[0] for g in groups])
    b.set_ylabel('top-1 (%) on the test crops')
    b.set_title(f'ResNet-18: SimCLR pretraining vs none ({len(SEEDS)} seeds)')
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args) -> None:
    summaries = {p.stem: json.loads(p.read_text()) for p in (WORK / 'summaries').glob('*.json')}
    rows = [dict(name=name, label=label, refiners=members, vote=extra.get('--vote', 'majority') if members else None,
                 **_score(args, name, members, extra)) for name, label, members, extra in VARIANTS]
    by = {r['name']: r for r in rows}
    probe = {arm: _mean_std(v) for arm, v in _probes().items()}
    ft10 = {arm: _mean_std([summaries[f'ft10-{arm}-s{s}']['val_top1'] for s in SEEDS]) for arm in ('simclr', 'random')}
    rec = lambda n: by[n]['recognition']['mAP']
    verdict = {
        'deit_raises_mAP': dict(gain=rec('deit') - rec('detector'), met=rec('deit') > rec('detector')),
        'simclr_raises_mAP': dict(gain=rec('simclr') - rec('detector'), met=rec('simclr') > rec('detector')),
        'vote_best': dict(best=max(by, key=rec), met=max(rec('vote'), rec('average')) > max(
            rec('detector'), rec('deit'), rec('simclr'))),
        'simclr_probe': _beats(probe), 'simclr_ten_percent': _beats(ft10)}
    timings = json.loads((WORK / 'timings.json').read_text()) if (WORK / 'timings.json').exists() else {}
    result = dict(
        benchmark='papyri_pipeline', smoke=SMOKE, seeds=list(SEEDS),
        pages={k: dict(pages=n, seed=seed, fonts=[Path(p).name for p in fonts(w)]) for k, (n, seed, w) in _pages().items()},
        detector=str(_detector(args)), settings=dict(crop_px=CROP, simclr=' '.join(S['simclr']), deit=S['deit'],
                                                     deit_epochs=S['deit_epochs'], ft_epochs=S['ft_epochs'],
                                                     ft10_epochs=S['ft10_epochs'], train=' '.join(TRAIN)),
        rows=rows, crop_top1=dict(deit=summaries['deit']['val_top1'], simclr=summaries['simclr-ft']['val_top1'],
                                  random_full=summaries['ft100-random-s0']['val_top1']),
        probe=probe, ft10=ft10, verdict=verdict,
        cpu_min=round(sum(t['cpu_s'] for t in timings.values()) / 60, 1), timings=timings,
        paper=dict(recognition_mAP=42.16, note='real competition data; not comparable to generated pages'))
    sys.path.insert(0, str(HERE))
    from tables_papyri import pipeline_table
    print(pipeline_table(result))
    print(json.dumps(verdict, indent=1))
    if not SMOKE:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / 'papyri_pipeline.json').write_text(json.dumps(result, indent=1) + '\n')
        _figure(result, RESULTS / 'papyri_pipeline.png')
        overlays = sorted((WORK / 'pred' / 'vote' / 'overlays').glob('*.png'))
        if overlays:
            shutil.copy(overlays[0], RESULTS / 'papyri_pipeline_overlay.png')
    else:
        _figure(result, WORK / 'papyri_pipeline.png')


def cmd_all(args) -> None:
    cmd_train(args)
    cmd_measure(args)
    cmd_report(args)


def cmd_demo(args) -> None:
    """``deitlab papyri demo`` in full, its results.json kept as results/papyri_demo.json (with the
    machine's load average at the start and end, so a run on a busy machine can be told apart)."""
    from deitlab.papyri.demo import run_papyri_demo
    out = tempfile.mkdtemp(prefix='deitlab-papyri-demo-')
    load0 = os.getloadavg()[0]
    res = run_papyri_demo(out=out, quick=SMOKE, progress=True)
    res['load_avg'] = dict(start=round(load0, 2), end=round(os.getloadavg()[0], 2))
    for row in res['rows']:
        row.pop('predictions', None)   # temporary paths
    for key in ('detector', 'refiners'):
        for v in ([res[key]] if key == 'detector' else res[key].values()):
            v.pop('run_dir', None)
            v.pop('pretrained', None)
    if not SMOKE:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / 'papyri_demo.json').write_text(json.dumps(res, indent=1, ensure_ascii=False) + '\n')
    shutil.rmtree(out, ignore_errors=True)


def flags(name, p) -> None:
    if name in ('train', 'measure', 'report', 'all'):
        p.add_argument('--detector-run', default=None,
                       help="a trained detector's run directory to use (e.g. papyri_detect.py's fcos-r18), read only")


if __name__ == '__main__':
    run_cli(__doc__, dict(pages=cmd_pages, train=cmd_train, measure=cmd_measure, report=cmd_report, all=cmd_all,
                          demo=cmd_demo), flags)
