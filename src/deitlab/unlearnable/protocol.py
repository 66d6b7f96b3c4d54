"""The CUDA paper's protocol: train one recipe on clean data and on a poisoned copy (with and
without training-time defences) and report clean test accuracy (``deitlab unlearnable eval``).

Sadasivan, Soltanolkotabi and Feizi, "CUDA: Convolution-based Unlearnable Datasets", CVPR 2023,
Sec. 5: a protected dataset should leave a model near chance on clean test data, also under the
defences of :mod:`deitlab.unlearnable.defences`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from .cuda import UnlearnableError
from .defences import parse_defence

__all__ = ['evaluate_unlearnable']


def evaluate_unlearnable(poisoned_dir: Union[str, Path], cfg, out_dir: Union[str, Path],
                         defences: Sequence[str] = ('none',), data_spec: Optional[str] = None,
                         clean: bool = True) -> dict:
    """Train one recipe on the clean source and on a poisoned copy; report clean test accuracy.

    ``cfg`` is a :class:`deitlab.train.TrainConfig` (its ``data``, ``out`` and ``defence`` are
    replaced). The clean run trains on ``data_spec`` (default: the manifest's source); the poisoned
    runs train on ``folder:poisoned_dir``, once per defence of :mod:`deitlab.unlearnable.defences`. Every
    model is tested on the clean val split (the poisoned copy's ``val/`` is the source's, unfiltered).
    Runs go to ``out_dir/clean`` and ``out_dir/poisoned-<defence>``.
    """
    from dataclasses import replace
    from ..train import train

    poisoned = Path(poisoned_dir).expanduser()
    manifest_path = poisoned / 'manifest.json'
    if not manifest_path.is_file():
        raise UnlearnableError(f'{poisoned} has no manifest.json: make it with deitlab unlearnable make')
    manifest = json.loads(manifest_path.read_text())
    for d in defences:
        parse_defence(d)
    out = Path(out_dir).expanduser()
    source = data_spec or manifest['source']
    # folder: data defaults to 224 px RGB; train both runs at the poisoned copy's native shape
    size, chans = manifest.get('image_size'), manifest.get('channels')
    if cfg.img_size is None and size and size[0] == size[1]:
        cfg = replace(cfg, img_size=int(size[0]))
    if cfg.in_chans is None and chans:
        cfg = replace(cfg, in_chans=int(chans))
    row = dict(poisoned_dir=str(poisoned), source=source, fraction=manifest['fraction'],
               kernel_size=manifest['kernel_size'], blur=manifest['blur'], key_fingerprint=manifest['key_fingerprint'],
               model=str(cfg.model), epochs=cfg.epochs, chance_top1=100.0 / manifest['num_classes'], runs={})
    if clean:
        res = train(replace(cfg, data=source, out=str(out / 'clean'), defence='none'))
        row['runs']['clean'] = dict(data=source, defence='none', top1=res['val_top1'], run_dir=res['run_dir'],
                                    train_time_s=res['train_time_s'])
    for d in defences:
        name = 'poisoned' if parse_defence(d)[0] == 'none' else f'poisoned+{d}'
        slug = ''.join(ch if ch.isalnum() or ch in '.-' else '-' for ch in d)
        res = train(replace(cfg, data=f'folder:{poisoned}', out=str(out / f'poisoned-{slug}'), defence=d))
        row['runs'][name] = dict(data=f'folder:{poisoned}', defence=d, top1=res['val_top1'], run_dir=res['run_dir'],
                                 train_time_s=res['train_time_s'])
    out.mkdir(parents=True, exist_ok=True)
    (out / 'unlearnable_eval.json').write_text(json.dumps(row, indent=2) + '\n')
    return row
