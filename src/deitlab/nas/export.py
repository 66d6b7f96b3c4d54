"""A searched architecture as an ordinary ViT-Res run directory (``deitlab nas export``).

:func:`export_arch` reads an architecture file (``best_arch.json`` of ``deitlab nas search``, or
a bare ``{widths, heads, mlp_hidden, keep}``), checks it against its search space and writes
``config.json`` + ``model.safetensors`` (:func:`deitlab.rundir.save_run_dir`), so that
``deitlab.rundir.create(RUN_DIR)``, ``timm.create_model('local-dir:RUN_DIR')`` and
``deitlab train --model RUN_DIR`` use it like any other model. The weights are freshly
initialised (seeded), or with ``supernet`` the supernet's slices (``Supernet.subnet``: the
sub-network computes exactly what it computed inside the supernet). ``arch.json`` in the run
directory records the architecture, its space and where the weights came from.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..console import log as _log
from ..data import DataError, dataset_info
from ..rundir import CONFIG_NAME, WEIGHTS_NAME, ModelLoadError, atomic_write_bytes, save_run_dir
from ..train.config import ConfigError
from .config import ExportConfig, read_json_file
from .cost import arch_macs
from .search import load_supernet, read_supernet_dir
from .space import SPACES, Arch, SearchSpace, SearchSpaceError
from .supernet import Supernet

__all__ = ['export_arch', 'read_arch_file', 'build_subnet']

ARCH_NAME = 'arch.json'


def read_arch_file(path) -> Tuple[Arch, dict]:
    """``(arch, record)``: the architecture of a ``best_arch.json`` (``record`` holds its space's
    name and definition, data, MACs, fitness) or of a bare architecture dict (``record`` empty)."""
    path = Path(path)
    d = read_json_file(path, 'architecture file', ConfigError)
    if not isinstance(d, dict):
        raise SearchSpaceError(f'{path} holds a {type(d).__name__}, not an architecture')
    record = d if isinstance(d.get('arch'), dict) else {}
    return Arch.from_dict(record['arch'] if record else d), record


def _space_for(cfg: ExportConfig, record: dict) -> Tuple[str, SearchSpace]:
    """The space named by ``--space``, else the one recorded in the file, else ``mu``; with
    ``--num-classes`` applied."""
    if cfg.space is not None:
        name, space = cfg.space, SPACES[cfg.space]
        recorded = record.get('space_def')
        if recorded and cfg.num_classes is None:   # keep the classes the search ran with
            space = dataclasses.replace(space, num_classes=int(recorded.get('num_classes', space.num_classes)))
    elif record.get('space_def'):
        name, space = str(record.get('space', 'recorded')), SearchSpace.from_dict(record['space_def'])
    else:
        name, space = 'mu', SPACES['mu']
    if cfg.num_classes is not None:
        space = dataclasses.replace(space, num_classes=cfg.num_classes)
    return name, space


def build_subnet(space: SearchSpace, arch: Arch, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A freshly initialised ViT-Res of ``arch`` built through ``space.model_name`` (timm),
    seeded; ``kwargs`` go to the constructor (e.g. ``drop_path_rate``)."""
    if space.model_name is None:
        raise SearchSpaceError('the search space has no model_name: a run directory needs a timm architecture name')
    import timm
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model(space.model_name, **space.model_args(arch), **kwargs)


def _label_names(data: Optional[str]) -> Optional[list]:
    if not data:
        return None
    try:
        return list(dataset_info(data).classes)
    except (DataError, OSError):
        return None


def _check_out(cfg: ExportConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f'--out {out} is a file, not a directory')
    held = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (out / n).exists()]
    if held and not cfg.overwrite:
        raise ConfigError(f'--out {out} already holds a model ({", ".join(held)}); pass --overwrite to replace it or '
                          f'choose another --out')
    return out


def export_arch(cfg: ExportConfig) -> dict:
    """Write the run directory of ``cfg.arch`` (see the module docstring); returns a summary."""
    cfg.validate()
    arch, record = read_arch_file(cfg.arch)
    supernet: Optional[Supernet] = None
    data = record.get('data')
    if cfg.supernet is not None:
        sd = read_supernet_dir(cfg.supernet)
        name, space = sd.name, sd.space
        if cfg.space is not None and cfg.space != sd.name:
            raise SearchSpaceError(f'--space {cfg.space} but the supernet {sd.path} is of space {sd.name!r}')
        if record.get('space') and record['space'] != sd.name:
            raise SearchSpaceError(f'{cfg.arch} was searched in space {record["space"]!r}, but the supernet {sd.path} '
                                   f'is of space {sd.name!r}')
        if cfg.num_classes is not None and cfg.num_classes != space.num_classes:
            raise ConfigError(f'the supernet {sd.path} classifies {space.num_classes} classes, not --num-classes '
                              f'{cfg.num_classes}; export without --supernet for fresh weights of another size')
        data = sd.holdout.get('data') or data
    else:
        name, space = _space_for(cfg, record)
    space.validate(arch)
    out = _check_out(cfg)
    if cfg.supernet is not None:
        supernet, _ = load_supernet(sd, 'cpu')
        model = supernet.subnet(arch).eval()
    else:
        model = build_subnet(space, arch, cfg.seed)
    try:
        save_run_dir(model, out, label_names=_label_names(data))
    except ModelLoadError as e:
        raise SearchSpaceError(f'cannot write the run directory: {e}') from None
    macs = arch_macs(space, arch)
    info = dict(space=name, space_def=space.to_dict(), arch=space.canonical(arch).to_dict(), macs=macs,
                weights='supernet' if supernet is not None else 'fresh', supernet=cfg.supernet, seed=cfg.seed,
                source=str(cfg.arch), fitness=record.get('fitness'))
    atomic_write_bytes(out / ARCH_NAME, json.dumps(info, indent=2).encode())
    args = space.model_args(arch)
    _log(f'{out}: ViT-Res widths {args["widths"]}, depths {args["depths"]}, {macs / 1e6:.3f}M MACs, '
         f'{"weights inherited from the supernet" if supernet is not None else "freshly initialised"}')
    return dict(run_dir=str(out), space=name, widths=args['widths'], depths=args['depths'],
                num_heads=args['num_heads'], mlp_hidden=args['mlp_hidden'], num_classes=space.num_classes, macs=macs,
                params=sum(p.numel() for p in model.parameters()), weights=info['weights'],
                architecture=space.model_name)
