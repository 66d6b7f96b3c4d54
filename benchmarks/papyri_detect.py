"""Glyph detection and recognition on generated papyrus pages: each detector alone and their boxes
fused (weighted boxes fusion), scored by the competition's metric (``deitlab papyri evaluate``).

Pages (``_papyri_pages.py``: ``deitlab papyri synth``, 512 x 384, the default hands and damage):
``train`` 16 pages, seed 0, the DejaVu fonts bundled with matplotlib; ``test`` 8 pages, seed 1, the
STIX fonts, never seen in training (the bar's pages); ``test-seen`` 8 pages, seed 2, the training fonts.

Every detector trains with the same command (``deitlab papyri train-detector``, its defaults:
20 epochs of random 128 px crops, AdamW, batch 4; 1 thread) and predicts the test pages tiled:
FCOS and RetinaNet, and YOLOv8-n when ultralytics (the optional AGPL extra) is installed. The
ensembles fuse their boxes with WBF (equal weights, IoU 0.55, class-aware: ``predict``'s
defaults): the permissive pair, and all three with YOLOv8-n. Metrics: detection (class-agnostic) mAP@.5 and mAP@[.5:.95], recognition (class-aware)
mAP@[.5:.95] and mAP@.5; training cost in CPU-seconds of the training process.

Context, not comparable: on the real competition data the winning ensemble reached 42.16
recognition and 51.42 detection mAP@[.5:.95] (ICDAR 2023 papyri competition, Seuret et al.).
Bar: detection mAP@.5 >= 0.5 on ``test`` with the default detector trained in under 20 CPU-minutes,
and the fused ensemble above its best member.

    DEITLAB_BENCH_RUNS=/work/papyri-runs python benchmarks/papyri_detect.py all
    PAPYRI_SMOKE=1 python benchmarks/papyri_detect.py all     # the pipeline in a minute, numbers meaningless
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from _common import run_cli
from _papyri_pages import PAGES as FULL_PAGES, SMOKE_PAGES, deitlab_json as _deitlab, fonts as _fonts

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
WORK = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-papyri-bench'))
SMOKE = bool(os.environ.get('PAPYRI_SMOKE'))
DEFAULT = 'fcos-r18'
DETECTORS = ['fcos-r18', 'retinanet-r18']
if importlib.util.find_spec('ultralytics') is not None:   # the optional AGPL extra
    DETECTORS.append('yolov8n')
TRAIN_FLAGS = ['--epochs', '1', '--steps', '4', '--detections', '50'] if SMOKE else []
PAGES = SMOKE_PAGES if SMOKE else FULL_PAGES
BAR_MAP50, BAR_CPU_MIN = 0.5, 20.0


def cmd_pages(args) -> None:
    for name, (n, seed, fonts) in PAGES.items():
        out = WORK / 'pages' / name
        if (out / 'annotations.json').exists():
            continue
        _deitlab('papyri', 'synth', '--pages', str(n), '--seed', str(seed), '--fonts', ','.join(_fonts(fonts)),
                 '--out', str(out))
        print('pages', name, flush=True)


def cmd_train(args) -> None:
    cmd_pages(args)
    for det in args.detectors:
        out = WORK / 'runs' / det
        if (out / 'summary.json').exists():
            continue
        s = _deitlab('papyri', 'train-detector', '--data', str(WORK / 'pages' / 'train'), '--detector', det,
                     '--out', str(out), '--seed', '0', '--overwrite', *TRAIN_FLAGS)
        (out / 'summary.json').write_text(json.dumps(s, indent=1))
        print('trained', det, f"{s['train_cpu_s'] / 60:.1f} CPU-min", flush=True)


def _members(name: str) -> list:
    return name.split('+')


def _score(name: str, split: str) -> dict:
    """Predict ``split``'s pages with the detector(s) ``name`` (``a+b``: fused) and score them."""
    pages = WORK / 'pages' / split
    out = WORK / 'pred' / split / name
    cached = out / 'scores.json'
    if cached.exists():
        return json.loads(cached.read_text())
    runs = ','.join(str(WORK / 'runs' / m) for m in _members(name))
    if out.exists():
        shutil.rmtree(out)
    _deitlab('papyri', 'predict', str(pages / 'images'), '--detector', runs, '--ids-from',
             str(pages / 'annotations.json'), '--out', str(out))
    scores = {}
    for task in ('detection', 'recognition'):
        r = _deitlab('papyri', 'evaluate', '--pred', str(out / 'results.json'), '--gt', str(pages / 'annotations.json'),
                     '--task', task)
        scores[task] = {k: r[task][k] for k in ('mAP', 'mAP50', 'mAR')}
    cached.write_text(json.dumps(scores))
    return scores


def _per_page(name: str, split: str) -> list:
    """mAP@[.5:.95] per page of ``split`` (detection, recognition) of the detector(s) ``name``, cached."""
    out = WORK / 'pred' / split / name
    cached = out / 'per_page.json'
    if not cached.exists():
        from deitlab.papyri.metric import evaluate
        gt = json.loads((WORK / 'pages' / split / 'annotations.json').read_text())
        preds = json.loads((out / 'results.json').read_text())
        pages = []
        for image in gt['images']:
            one = dict(gt, images=[image], annotations=[a for a in gt['annotations'] if a['image_id'] == image['id']])
            r = evaluate(one, [p for p in preds if p['image_id'] == image['id']])
            pages.append(dict(image=image['file_name'], detection=r['detection']['mAP'],
                              recognition=r['recognition']['mAP']))
        cached.write_text(json.dumps(pages))
    return json.loads(cached.read_text())


def _trained() -> list:
    return [d for d in DETECTORS if (WORK / 'runs' / d / 'summary.json').exists()]


def _ensembles(trained: list) -> list:
    """The permissive pair fused, and with YOLOv8 too when it was trained."""
    pair = [d for d in ('fcos-r18', 'retinanet-r18') if d in trained]
    out = ['+'.join(pair)] if len(pair) == 2 else []
    if len(trained) > 2:
        out.append('+'.join(trained))
    return out


def cmd_measure(args) -> None:
    trained = _trained()
    names = trained + _ensembles(trained)
    for split in ('test', 'test-seen'):
        for name in names:
            s = _score(name, split)
            print(split, name, json.dumps(s), flush=True)


def cmd_report(args) -> None:
    trained = _trained()
    ensembles = _ensembles(trained)
    rows = []
    for name in trained + ensembles:
        members = _members(name)
        train = [json.loads((WORK / 'runs' / m / 'summary.json').read_text()) for m in members]
        row = dict(name=name, members=members, fused=len(members) > 1,
                   train_cpu_min=sum(t['train_cpu_s'] for t in train) / 60,
                   train_wall_min=sum(t['train_time_s'] for t in train) / 60,
                   params_m=sum(t['params'] for t in train) / 1e6, updates=[t.get('updates') for t in train])
        for split in ('test', 'test-seen'):
            row[split] = _score(name, split)
        rows.append(row)
    by = {r['name']: r for r in rows}
    verdict = {}
    if DEFAULT in by:
        d = by[DEFAULT]
        verdict['default_map50'] = dict(value=d['test']['detection']['mAP50'], bar=BAR_MAP50,
                                        cpu_min=d['train_cpu_min'], bar_cpu_min=BAR_CPU_MIN,
                                        met=d['test']['detection']['mAP50'] >= BAR_MAP50
                                        and d['train_cpu_min'] < BAR_CPU_MIN)
    for ensemble in ensembles:
        for task in ('detection', 'recognition'):
            best = max(_members(ensemble), key=lambda m: by[m]['test'][task]['mAP'])
            gap = by[ensemble]['test'][task]['mAP'] - by[best]['test'][task]['mAP']
            pages = zip(_per_page(ensemble, 'test'), _per_page(best, 'test'))
            wins = [e[task] > b[task] for e, b in pages]
            key = f'ensemble_{task}' if ensemble == ensembles[0] else f'ensemble_{task}_{ensemble}'
            verdict[key] = dict(ensemble=ensemble, best_member=best, gap_mAP=gap, met=gap > 0,
                                pages_better=sum(wins), pages=len(wins))
    pages = {k: dict(pages=n, seed=seed, fonts=[Path(p).name for p in _fonts(f)]) for k, (n, seed, f) in PAGES.items()}
    result = dict(benchmark='papyri_detect', smoke=SMOKE, pages=pages, train_flags=' '.join(TRAIN_FLAGS) or 'defaults',
                  default=DEFAULT, fusion='wbf, equal weights, iou 0.55, class-aware', rows=rows, verdict=verdict,
                  paper=dict(recognition_mAP=42.16, detection_mAP=51.42,
                             note='real competition data; not comparable to generated pages'))
    RESULTS.mkdir(exist_ok=True)
    if not SMOKE:
        (RESULTS / 'papyri_detect.json').write_text(json.dumps(result, indent=1))
        overlay = sorted((WORK / 'pred' / 'test' / (ensembles[0] if ensembles else DEFAULT) / 'overlays').glob('*.png'))
        if overlay:
            shutil.copy(overlay[0], RESULTS / 'papyri_overlay.png')
    print(json.dumps(dict(verdict=verdict, rows=[{k: r[k] for k in ('name', 'train_cpu_min', 'test')} for r in rows]),
                     indent=1))


def cmd_all(args) -> None:
    cmd_train(args)
    cmd_measure(args)
    cmd_report(args)


def flags(name, p) -> None:
    if name in ('train', 'all'):
        p.add_argument('--detectors', nargs='+', default=DETECTORS, choices=DETECTORS)


if __name__ == '__main__':
    run_cli(__doc__, dict(pages=cmd_pages, train=cmd_train, measure=cmd_measure, report=cmd_report, all=cmd_all),
            flags)
