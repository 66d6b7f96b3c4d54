"""The ViT-ResNAS search over a trained supernet (``deitlab nas search``).

:func:`search` reads a ``deitlab nas train-supernet`` directory (``space.json``,
``supernet.safetensors``, ``holdout.json``), rates sub-networks with :class:`Fitness` (the top-1
of the physically sliced sub-network, ``Supernet.subnet(arch)`` in eval mode, on the supernet's
held-out training images, cached per network) and runs one of the algorithms of
:mod:`deitlab.nas.evolution` under a MACs window and / or a latency budget (a
:class:`~deitlab.nas.latency.LatencyTable`, read or timed). It writes into its output directory:

* ``search.json``: the settings, the budget, every network evaluated (arch, MACs, predicted
  latency, fitness, generation, origin), the best, NSGA-II's front, the random baseline;
* ``best_arch.json``: the best network with its space, MACs, latency and fitness, for
  ``deitlab nas export``;
* ``search.png``: fitness against MACs (and against predicted latency when there is a table),
  coloured by generation, the best (and the front) marked.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

from ..console import log as _log
from ..data import DataError, dataset_info
from ..data.for_model import model_datasets
from ..distributed import resolve_device
from ..rundir import ModelLoadError, atomic_write_bytes
from ..train.config import ConfigError
from .config import SearchConfig
from .evolution import Budget, SearchResult, evolve, nsga2_search, random_search, require_pymoo
from .latency import LatencyTable, build_latency_table
from .space import Arch, SearchSpace
from .supernet import Supernet

__all__ = ['SupernetDir', 'read_supernet_dir', 'load_supernet', 'Fitness', 'search', 'plot_search', 'SEARCH_FILES']

SPACE_NAME, WEIGHTS_NAME, HOLDOUT_NAME = 'space.json', 'supernet.safetensors', 'holdout.json'
SEARCH_NAME, BEST_NAME, PLOT_NAME, LUT_NAME = 'search.json', 'best_arch.json', 'search.png', 'latency_table.json'
SEARCH_FILES = (SEARCH_NAME, BEST_NAME, PLOT_NAME, LUT_NAME)


# ----------------------------------------------------------------------------- the supernet directory

@dataclass
class SupernetDir:
    """What ``train-supernet`` wrote: the space's name and definition, the held-out split."""

    path: Path
    name: str
    space: SearchSpace
    holdout: dict

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f'{path} is damaged ({what} is not JSON: {e})') from None


def read_supernet_dir(path) -> SupernetDir:
    """The space and held-out split of a supernet directory (no weights read); ``ModelLoadError``
    when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f'supernet directory {path} does not exist; train one with deitlab nas train-supernet')
    if not (path / SPACE_NAME).is_file():
        raise ModelLoadError(f'{path} is not a supernet directory (no {SPACE_NAME}); give a directory written by '
                             f'deitlab nas train-supernet')
    saved = _read_json(path / SPACE_NAME, 'the space definition')
    if not isinstance(saved, dict) or 'space' not in saved:
        raise ModelLoadError(f'{path / SPACE_NAME} holds no search space definition')
    space = SearchSpace.from_dict(saved['space'])
    holdout = _read_json(path / HOLDOUT_NAME, 'the held-out split') if (path / HOLDOUT_NAME).is_file() else {}
    return SupernetDir(path, str(saved.get('name', 'unnamed')), space, holdout)


def load_supernet(path, device=None) -> tuple:
    """``(Supernet, SupernetDir)``: the supernet rebuilt from ``space.json`` with its weights, in
    eval mode on ``device`` (default: CUDA when available, else the CPU)."""
    sd = path if isinstance(path, SupernetDir) else read_supernet_dir(path)
    if not sd.weights.is_file():
        raise ModelLoadError(f'{sd.path} has no {WEIGHTS_NAME} yet (train-supernet writes it after the first epoch)')
    supernet = Supernet(sd.space)
    try:
        state = load_file(str(sd.weights))
    except Exception as e:   # SafetensorError: truncated or not a safetensors file
        raise ModelLoadError(f'{sd.weights} is damaged ({e})') from None
    try:
        supernet.model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f'{sd.weights} does not fit the space in {SPACE_NAME}: {str(e)[:200]}') from None
    return supernet.to(resolve_device(device)).eval(), sd


# ----------------------------------------------------------------------------- fitness

class Fitness:
    """Top-1 (%) of a sub-network on a fixed set of images, cached per network (canonical form).

    ``images`` / ``labels``: the whole set as tensors (the held-out images, see
    :meth:`from_dir`); each call slices the sub-network out of the supernet and runs it in eval
    mode in batches of ``batch_size``."""

    def __init__(self, supernet: Supernet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64):
        self.supernet, self.images, self.labels, self.batch_size = supernet, images, labels, int(batch_size)
        self.cache: Dict[Arch, float] = {}
        self.seconds = 0.0
        self.source = dict(data=None, split='given images', images=len(labels))

    @classmethod
    def from_dir(cls, supernet: Supernet, sd: SupernetDir, batch_size: int = 64, max_batches: Optional[int] = None,
                 seed: int = 0) -> 'Fitness':
        """The held-out training images of ``holdout.json`` (a fixed random subset of
        ``max_batches * batch_size`` when ``max_batches`` is set); the validation split, with a
        warning, when the supernet held none out."""
        h = sd.holdout
        spec, indices = h.get('data'), list(h.get('indices') or [])
        if not spec:
            raise ModelLoadError(f'{sd.path} has no {HOLDOUT_NAME} naming its data; train the supernet again')
        try:
            info = dataset_info(spec)
            if indices:
                (ds,) = model_datasets(supernet.model, spec, splits=('train',), info=info)
                if len(ds) != h.get('num_images', len(ds)):
                    raise ConfigError(f'the training split of {spec} has {len(ds)} images, but the supernet held out '
                                      f'images of a split of {h.get("num_images")}: the data changed since training')
                split = 'held-out training images'
            else:
                (ds,) = model_datasets(supernet.model, spec, splits=('val',), info=info)
                indices = list(range(len(ds)))
                split = 'validation images'
                _log(f'warning: the supernet held no training images out (--holdout 0): the fitness uses the '
                     f'validation split of {spec}')
        except DataError as e:
            raise DataError(f'the supernet\'s data {spec}: {e}') from None
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
        if max_batches is not None:
            order = order[:max_batches * batch_size]
        picked = [indices[i] for i in order]
        xs, ys = zip(*(ds[i] for i in picked))
        fit = cls(supernet, torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), batch_size)
        fit.source = dict(data=spec, split=split, images=len(picked))
        return fit

    @torch.no_grad()
    def __call__(self, arch: Arch) -> float:
        key = self.supernet.space.canonical(arch)
        if key not in self.cache:
            t0 = time.perf_counter()
            model = self.supernet.subnet(key).eval()
            p = next(model.parameters())
            correct = 0
            for i in range(0, len(self.labels), self.batch_size):
                x = self.images[i:i + self.batch_size].to(p.device, p.dtype)
                y = self.labels[i:i + self.batch_size].to(p.device)
                correct += int((model(x).argmax(-1) == y).sum())
            self.cache[key] = 100.0 * correct / max(len(self.labels), 1)
            self.seconds += time.perf_counter() - t0
        return self.cache[key]


# ----------------------------------------------------------------------------- the command

def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f'--out {out} is a file, not a directory')
    foreign = sorted(p.name for p in out.iterdir() if p.name not in SEARCH_FILES) if out.is_dir() else []
    if foreign:
        shown = ', '.join(foreign[:4]) + (', ...' if len(foreign) > 4 else '')
        raise ConfigError(f'--out {out} is not empty ({shown}); choose another --out (a previous search\'s files '
                          f'are replaced, nothing else)')
    out.mkdir(parents=True, exist_ok=True)
    return out


def _latency_table(cfg: SearchConfig, space: SearchSpace, out: Path) -> Optional[LatencyTable]:
    """The table of ``--lut`` (read, or timed and written there), or timed into the output
    directory when only ``--latency`` is given; None when neither is."""
    if cfg.lut is None and cfg.latency is None:
        return None
    path = Path(cfg.lut) if cfg.lut is not None else out / LUT_NAME
    if cfg.lut is not None and path.exists():
        table = LatencyTable.load(path)
        table.check_space(space)
        _log(f'latency table {path} ({table.meta.get("device_name")}, {table.meta.get("threads")} threads, batch '
             f'{table.meta.get("batch_size")})')
        return table
    _log(f'timing a latency table of the space on this device into {path} ({cfg.lut_rounds} rounds) ...')
    device = resolve_device(cfg.device)
    table = build_latency_table(space, batch_size=cfg.lut_batch, rounds=cfg.lut_rounds, device=device,
                                seed=cfg.seed)
    table.save(path)
    return table


def _entry_text(e: dict) -> str:
    lat = f', {e["latency_ms"]:.3f} ms predicted' if e.get('latency_ms') is not None else ''
    return f'top-1 {e["fitness"]:.2f}, {e["macs"] / 1e6:.3f}M MACs{lat}'


def search(cfg: SearchConfig) -> dict:
    """Search the supernet of ``cfg.supernet`` (see the module docstring); returns the summary."""
    cfg.validate()
    t0 = time.perf_counter()
    sd = read_supernet_dir(cfg.supernet)
    space = sd.space
    if cfg.nsga2:
        require_pymoo()
    window = None if cfg.nsga2 else cfg.macs_window   # NSGA-II: MACs <= C, the front spans what is below
    Budget(macs=cfg.macs, window=window).check(space, sd.name)   # before any work
    out = _prepare_out(Path(cfg.out))
    table = _latency_table(cfg, space, out)
    budget = Budget(macs=cfg.macs, window=window, latency=cfg.latency, table=table)
    budget.check(space, sd.name)
    supernet, _ = load_supernet(sd, cfg.device)
    fitness = Fitness.from_dir(supernet, sd, cfg.batch_size, cfg.max_batches, seed=cfg.seed)
    _log(f'searching {sd.name!r} ({space.num_archs():.3g} sub-networks) with '
         f'{"NSGA-II" if cfg.nsga2 else "evolution"}; fitness: top-1 on {fitness.source["images"]} '
         f'{fitness.source["split"]}; budget {budget.to_dict()}')
    if cfg.nsga2:
        result = nsga2_search(space, fitness, budget, population=cfg.population, iterations=cfg.iterations,
                              seed=cfg.seed, name=sd.name)
    else:
        result = evolve(space, fitness, budget, population=cfg.population, iterations=cfg.iterations,
                        parents=cfg.parents, mutations=cfg.mutations, crossovers=cfg.crossovers,
                        prob=cfg.mutation_prob, seed=cfg.seed, max_tries=cfg.max_tries, name=sd.name)
    baseline: Optional[SearchResult] = None
    if cfg.random_baseline:
        baseline = random_search(space, fitness, budget, cfg.random_baseline, seed=cfg.seed + 1,
                                 max_tries=cfg.max_tries, name=sd.name)
        _log(f'random baseline: best of {len(baseline.history)}: {_entry_text(baseline.best)}')
    best = result.best
    _log(f'best: {_entry_text(best)}')
    record = dict(space=sd.name, space_def=space.to_dict(), supernet=str(sd.path), fitness=fitness.source,
                  budget=budget.to_dict(), settings=cfg.to_dict(), **result.to_dict(),
                  random_baseline=baseline.to_dict() if baseline else None,
                  latency_table=dict(path=str(Path(cfg.lut) if cfg.lut else out / LUT_NAME), meta=table.meta,
                                     scale=table.scale) if table else None,
                  fitness_evaluations=len(fitness.cache), fitness_seconds=fitness.seconds,
                  time_s=time.perf_counter() - t0)
    atomic_write_bytes(out / SEARCH_NAME, json.dumps(record, indent=1).encode())
    best_record = dict(space=sd.name, space_def=space.to_dict(), data=fitness.source['data'], **best)
    atomic_write_bytes(out / BEST_NAME, json.dumps(best_record, indent=2).encode())
    plot = plot_search(record, out / PLOT_NAME)
    return dict(out=str(out), method=result.method, best_fitness=best['fitness'], best_macs=best['macs'],
                best_latency_ms=best['latency_ms'], best_arch=best['arch'], evaluated=len(result.history),
                front=len(result.front) if result.front else None,
                random_best_fitness=baseline.best['fitness'] if baseline else None,
                search_json=str(out / SEARCH_NAME), best_arch_json=str(out / BEST_NAME), plot=str(plot),
                time_s=record['time_s'])


# ----------------------------------------------------------------------------- the plot

def plot_search(record: dict, path) -> Path:
    """``search.png``: fitness against MACs (and against predicted latency when the search has
    latencies), coloured by generation; the best as a star, NSGA-II's front as a line, the
    random baseline as grey crosses, the MACs window shaded."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    entries: List[dict] = record['evaluated']
    has_lat = any(e.get('latency_ms') is not None for e in entries)
    axes_keys = [('macs', 'MMACs', 1e-6)] + ([('latency_ms', 'predicted latency (ms)', 1.0)] if has_lat else [])
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5.2 * len(axes_keys), 4), squeeze=False)
    gens = [e['generation'] for e in entries]
    for ax, (key, label, k) in zip(axes[0], axes_keys):
        base = (record.get('random_baseline') or {}).get('evaluated') or []
        if base:
            ax.scatter([e[key] * k for e in base], [e['fitness'] for e in base], marker='x', c='0.6', s=18,
                       label='random baseline')
        sc = ax.scatter([e[key] * k for e in entries], [e['fitness'] for e in entries], c=gens, cmap='viridis',
                        s=22, vmin=0, vmax=max(max(gens), 1))
        front = record.get('front') or []
        if front and record.get('front_objective') == key:
            f = sorted(front, key=lambda e: e[key])
            ax.plot([e[key] * k for e in f], [e['fitness'] for e in f], '-', c='tab:red', lw=1, label='front')
        best = record['best']
        ax.scatter([best[key] * k], [best['fitness']], marker='*', s=220, c='tab:red', edgecolors='k', zorder=5,
                   label='best')
        budget = record['budget']
        if key == 'macs' and budget.get('macs'):
            lo = budget['macs_low'] if budget.get('macs_low') is not None else ax.get_xlim()[0] / k
            ax.axvspan(lo * k, budget['macs'] * k, color='tab:orange', alpha=0.15, label='budget')
        if key == 'latency_ms' and budget.get('latency_ms'):
            if budget['latency_ms'] <= 1.5 * max(e[key] for e in entries):
                ax.axvline(budget['latency_ms'], color='tab:orange', ls='--', label='budget')
            else:
                ax.set_title(f'budget {budget["latency_ms"]:g} ms (off the axis)', fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel('fitness: held-out top-1 (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='lower right')
    from matplotlib.ticker import MaxNLocator
    fig.colorbar(sc, ax=axes[0].tolist(), label='generation', ticks=MaxNLocator(integer=True))
    fig.suptitle(f'ViT-ResNAS {record["method"]} in {record["space"]!r}: {len(entries)} networks')
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

