"""``deitlab papyri demo``: Turnbull & Mannix's whole pipeline on generated pages, in a few CPU minutes.

1. **Pages** (``deitlab papyri synth``): training pages in the DejaVu fonts, test pages in the STIX
   fonts (a hand never seen in training), and unlabelled pages (DejaVu, other seeds) for SimCLR.
2. **Detector** (``deitlab papyri train-detector``): the default, torchvision's FCOS from scratch.
3. **Crops** (``deitlab papyri crops``): the training pages' letters, cut as the refiners will see them.
4. **SimCLR refiner**: a ResNet pretrained with SimCLR on windows of the unlabelled pages (``deitlab
   papyri pretrain-simclr``), then fine-tuned on the crops (``deitlab train --model SIMCLR_RUN``).
5. **DeiT refiner** (``deitlab train`` on the crops): a small distilled DeiT trained with the DeiT
   recipe's hard distillation from a convnet teacher, here the SimCLR refiner. On a thousand crops a
   DeiT from scratch learns little (about 25 % of the crops in 40 epochs here; a ViT lacks a
   convnet's inductive biases, the point of the DeiT paper), with the teacher about 60 %.
6. **Predict and evaluate** (``deitlab papyri predict`` / ``evaluate``) the test pages four ways: the
   detector alone, re-classified by each refiner (a vote of two: a disagreement goes to the more
   confident), and by both (the majority vote of three); print recognition mAP@[.5:.95] and mAP@.5
   and detection mAP@.5 (the boxes are the detector's; their scores, and so the ranking, change).

Everything is written under ``--out`` (pages, run directories, predictions with overlays,
``results.json``). ``quick`` is a smoke run of the same steps on small pages (its numbers mean
little). The sizes keep the full demo under about 10 CPU minutes and ``quick`` under 2.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ..console import log
from .config import PapyriError

__all__ = ['DEMO_SETTINGS', 'VARIANTS', 'run_papyri_demo']

#: Per mode: the pages, and the training budgets of each step.
DEMO_SETTINGS = {
    'full': dict(size='512x384', lines=8, letters=24, train_pages=8, test_pages=2, unlabelled_pages=8,
                 detector_epochs=15, crop_size=32, refiner_epochs=15, deit='deitlab_deit_pico_distilled_patch4_32',
                 deit_epochs=40, simclr_model='resnet18', simclr_kwargs={'channels': [32, 64, 128, 256]},
                 simclr_epochs=8, simclr_steps=30, simclr_batch=128, window='16,40'),
    'quick': dict(size='256x192', lines=5, letters=14, train_pages=6, test_pages=1, unlabelled_pages=4,
                  detector_epochs=15, crop_size=32, refiner_epochs=15, deit='deitlab_deit_pico_distilled_patch4_32',
                  deit_epochs=20, simclr_model='resnet18', simclr_kwargs={'channels': [16, 32, 64, 128]},
                  simclr_epochs=4, simclr_steps=10, simclr_batch=64, window='12,32'),
}
#: The rows of the table: (name, label, refiners voting with the detector).
VARIANTS = (('detector', 'detector alone', ()), ('deit', '+ DeiT refiner', ('deit',)),
            ('simclr', '+ SimCLR refiner', ('simclr',)), ('vote', '+ both, majority vote', ('deit', 'simclr')))
_OWN = ('pages', 'detector', 'crops', 'deit', 'simclr', 'simclr-ft', 'predictions', 'results.json')


def _fonts(which: str) -> str:
    from ..data.glyphs import find_fonts
    paths = find_fonts('bundled')
    chosen = [p for p in paths if Path(p).stem.startswith('STIXGeneral')] if which == 'held-out' else \
        [p for p in paths if Path(p).stem.split('-')[0] in ('DejaVuSans', 'DejaVuSerif', 'DejaVuSansMono')]
    if not chosen:
        raise PapyriError(f'the demo needs matplotlib\'s bundled {which} fonts, and none was found')
    return ','.join(chosen)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PapyriError(f'--out {out} is a file, not a directory')
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN) if out.is_dir() else []
    if foreign:
        raise PapyriError(f'--out {out} holds files the demo did not write ({", ".join(foreign[:4])}); choose another '
                          f'--out')


def _train_refiner(model: str, crops: Path, out: Path, epochs: int, progress: Optional[bool],
                   teacher: Optional[Path] = None) -> dict:
    from ..train import TrainConfig, train
    distill = dict(teacher=str(teacher), distill='hard', lr=1e-3) if teacher is not None else {}
    cfg = TrainConfig.from_recipe('short', model=model, data=f'folder:{crops}', out=str(out), epochs=epochs,
                                  aug='light', seed=0, tensorboard=False, overwrite=True, progress=progress, **distill)
    return train(cfg)


def _evaluate_variants(out: Path, test: Path, detector: Path, runs: dict, progress: Optional[bool]) -> list:
    """The test pages predicted by the detector once, then refined as each variant says and scored."""
    from .detect import load_detector
    from .metric import evaluate
    from .predict import image_files, number_pages, predict_pages, write_outputs
    from .refine import load_refiner, refine_pages
    from .vote import VoteConfig
    annotations = test / 'annotations.json'
    paths = image_files([test / 'images'])
    pages = predict_pages(paths, [load_detector(detector)], records=number_pages(paths, annotations),
                          progress_bar=progress)
    refiners = {name: load_refiner(run, name) for name, run in runs.items()}
    gt = json.loads(annotations.read_text(encoding='utf-8'))
    rows = []
    for name, label, members in VARIANTS:
        refined = refine_pages(pages, [refiners[m] for m in members], VoteConfig()) if members else pages
        where = out / 'predictions' / name
        write_outputs(where, refined, overwrite=True, overlays=name == 'vote',
                      info={'detectors': [str(detector)], 'refiners': {m: str(runs[m]) for m in members}})
        scores = evaluate(gt, json.loads((where / 'results.json').read_text(encoding='utf-8')))
        rows.append(dict(variant=label, recognition_mAP=scores['recognition']['mAP'],
                         recognition_mAP50=scores['recognition']['mAP50'],
                         detection_mAP50=scores['detection']['mAP50'], predictions=str(where)))
    return rows


def run_papyri_demo(out: str = 'papyri-demo', quick: bool = False, progress: bool = True) -> dict:
    """Run the demo (the module's docstring) into ``out``; returns its results, also written to
    ``OUT/results.json``, and prints the table when ``progress``."""
    from ..bench import format_table
    from .config import DetectorConfig, SynthConfig
    from .crops import write_crops
    from .detect import train_detector
    from .refine_config import CropsConfig, SimCLRConfig
    from .simclr import pretrain_simclr
    from .synth import synthesize
    mode = 'quick' if quick else 'full'
    s = DEMO_SETTINGS[mode]
    root = Path(out)
    _check_out(root)
    bars = None if progress else False
    wall, cpu = time.perf_counter(), time.process_time()
    steps = {}

    def step(name: str, fn):
        t, c = time.perf_counter(), time.process_time()
        log(f'papyri demo: {name}')
        value = fn()
        steps[name] = dict(wall_s=round(time.perf_counter() - t, 1), cpu_s=round(time.process_time() - c, 1))
        return value

    pages = root / 'pages'
    page_kw = dict(size=s['size'], lines=s['lines'], letters=s['letters'], overwrite=True, progress=bars)
    step('pages', lambda: [synthesize(SynthConfig(pages=n, out=str(pages / split), seed=seed, fonts=_fonts(f), **page_kw))
                           for split, n, seed, f in (('train', s['train_pages'], 0, 'train'),
                                                     ('test', s['test_pages'], 1, 'held-out'),
                                                     ('unlabelled', s['unlabelled_pages'], 2, 'train'))])
    det = step('detector', lambda: train_detector(DetectorConfig(
        data=str(pages / 'train'), out=str(root / 'detector'), epochs=s['detector_epochs'], seed=0, overwrite=True,
        progress=bars)))
    crops = root / 'crops'
    step('crops', lambda: write_crops(CropsConfig(data=str(pages / 'train'), out=str(crops), size=s['crop_size'],
                                                  overwrite=True, progress=bars)))
    simclr = step('SimCLR pretraining', lambda: pretrain_simclr(SimCLRConfig(
        images=(str(pages / 'unlabelled' / 'images'),), out=str(root / 'simclr'), model=s['simclr_model'],
        model_kwargs=s['simclr_kwargs'], img_size=s['crop_size'], window=s['window'], epochs=s['simclr_epochs'],
        steps=s['simclr_steps'], batch_size=s['simclr_batch'], seed=0, overwrite=True, progress=bars)))
    ft = step('SimCLR refiner', lambda: _train_refiner(str(root / 'simclr'), crops, root / 'simclr-ft',
                                                       s['refiner_epochs'], bars))
    deit = step('DeiT refiner', lambda: _train_refiner(s['deit'], crops, root / 'deit', s['deit_epochs'], bars,
                                                       teacher=root / 'simclr-ft'))
    rows = step('predict and evaluate', lambda: _evaluate_variants(
        root, pages / 'test', root / 'detector', {'deit': root / 'deit', 'simclr': root / 'simclr-ft'}, bars))
    result = dict(mode=mode, rows=rows, settings=s, steps=steps,
                  detector=dict(run_dir=det['run_dir'], updates=det['updates']),
                  refiners={'deit': dict(run_dir=deit['run_dir'], model=s['deit'], teacher='simclr',
                                         crop_val_top1=deit['val_top1']),
                            'simclr': dict(run_dir=ft['run_dir'], pretrained=simclr['run_dir'], model=s['simclr_model'],
                                           contrastive_top1=simclr['contrastive_top1'],
                                           crop_val_top1=ft['val_top1'])},
                  cpu_s=round(time.process_time() - cpu, 1), wall_s=round(time.perf_counter() - wall, 1))
    (root / 'results.json').write_text(json.dumps(result, indent=1), encoding='utf-8')
    if progress:
        print(format_table(rows, [('variant', 'test pages (unseen STIX hand)'),
                                  ('recognition_mAP', 'recognition mAP@[.5:.95]'), ('recognition_mAP50', 'mAP@.5'),
                                  ('detection_mAP50', 'detection mAP@.5')]))
        print(f'crop classifiers (val top-1 on held-out training crops): SimCLR-pretrained ResNet fine-tuned '
              f'{ft["val_top1"]:.1f}%, DeiT distilled from it {deit["val_top1"]:.1f}%; {mode} demo: '
              f'{result["cpu_s"] / 60:.1f} CPU minutes '
              f'({result["wall_s"] / 60:.1f} min wall); everything in {root} (results.json, predictions/vote/overlays)')
    return result
