"""ViT-ResNAS (Liao, Karaman, Sze) on Fashion-MNIST at 32 px: a supernet of the ``nano`` space, searched
at DeiT-nano's MACs and at DeiT-nano's latency on this CPU, the found networks retrained against
DeiT-nano, the supernet's ranking checked on stand-alone networks.

Phases (each skips the work already on disk under ``DEITLAB_BENCH_RUNS``):

* ``supernet``  ``deitlab nas train-supernet --space nano`` (``SUPERNET`` settings, 2 threads);
* ``latency``   the space's latency table on this CPU (1 thread, batch 1, paired timing,
  calibrated), and DeiT-nano timed with the same reference: its milliseconds are the latency
  budget. Run on an idle machine;
* ``search``    evolution at ``macs`` (0.975 C <= MACs <= C, C = DeiT-nano's MACs at 32 px) with the
  best of 16 random networks in the same window as the baseline; evolution at ``latency``
  (predicted <= DeiT-nano's measured ms); NSGA-II on held-out top-1 and predicted latency (the
  front of the plot);
* ``train``     the two found networks (exported fresh, one export per seed) and DeiT-nano with one
  recipe (``TRAIN``), ``SEEDS``; ``STANDALONE`` networks spread over the space's MACs, also
  ``SEEDS``, for the ranking (Kendall tau of supernet fitness against stand-alone top-1, the mean
  over the seeds). 1 thread per run, two runs at a time;
* ``measure``   every trained network and DeiT-nano timed together (paired, 1 thread), next to the
  table's predictions; the supernet fitness of each network on the held-out images the search
  ranks by, and on the 10,000 test images (less noisy, for tau only). Run on an idle machine; run
  again, it keeps the earlier runs (``measure_earlier*.json``), whose latencies are checked too;
* ``report``    ``results/resnas_fmnist.json`` and ``.png``.

Every finished training run is also kept in ``results/resnas_fmnist_runs.json`` (its network, seed,
recipe and summary): ``train`` skips a run recorded there with the same network, seed and recipe, so
the stand-alone and DeiT-nano runs, which need no supernet, can be trained on one day and the rest
on another (``collect`` records the runs finished so far).

    DEITLAB_BENCH_RUNS=/work/resnas-runs python benchmarks/resnas_fmnist.py all --jobs 2
"""
from __future__ import annotations

import functools
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import run_cli, run_pool, seed_stats

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
WORK = Path(os.environ.get('DEITLAB_BENCH_RUNS', '/tmp/deitlab-resnas-bench'))
SPACE, BASELINE, IMG = 'nano', 'deitlab_deit_nano_patch4_32', 32
SEEDS = (0, 1, 2)
STANDALONE = 8
SUPERNET = dict(epochs=12, max_steps_per_epoch=300, batch_size=64, ex_per_arch=16, holdout=100, lr=1e-3)
SEARCH = ['--population', '16', '--iterations', '6', '--parents', '4', '--mutations', '4', '--crossovers', '4',
          '--max-tries', '5000']
TRAIN = ['--recipe', 'short', '--img-size', str(IMG), '--epochs', '10', '--max-steps-per-epoch', '300',
         '--workers', '0', '--no-tensorboard', '--no-progress']
ARMS = ('deit_nano', 'macs', 'latency')
LUT_ROUNDS, MEASURE_ROUNDS = 5, 7
if os.environ.get('RESNAS_SMOKE'):   # the whole pipeline in minutes, to check the script (numbers meaningless)
    SEEDS, STANDALONE, LUT_ROUNDS, MEASURE_ROUNDS = (0,), 3, 1, 1
    RESULTS = WORK / 'results'   # the committed results stay untouched
    SUPERNET.update(epochs=1, max_steps_per_epoch=4, holdout=10)
    SEARCH = ['--population', '4', '--iterations', '1', '--parents', '2', '--mutations', '2', '--crossovers', '2',
              '--max-tries', '5000']
    TRAIN = [*TRAIN[:-7], '1', '--max-steps-per-epoch', '4', *TRAIN[-4:]]


def _deitlab(*args) -> dict:
    """``python -m deitlab ARGS --json``: the JSON on its last line (the output echoed on failure)."""
    cmd = [sys.executable, '-m', 'deitlab', *map(str, args), '--json']
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.stdout.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f'failed: {" ".join(cmd)}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _space():
    from deitlab.nas.space import SPACES
    return SPACES[SPACE]


def _baseline_model():
    import timm
    import deitlab  # noqa: F401  (registers the models)
    return timm.create_model(BASELINE, num_classes=10, img_size=IMG)


def baseline_macs() -> float:
    from deitlab.bench import count_gmacs
    return count_gmacs(_baseline_model(), (3, IMG, IMG)) * 1e9


# ----------------------------------------------------------------------------- phases

def _costed(threads: int, *args) -> tuple:
    """``_deitlab(*args)`` on ``threads`` threads: its summary and its cost (wall seconds, and the CPU
    minutes the command used, from the children's resource usage, right also on a busy machine)."""
    os.environ['OMP_NUM_THREADS'] = str(threads)
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = _deitlab(*args)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return summary, dict(wall_s=time.time() - t0, threads=threads, cpu_min=cpu / 60)


def cmd_supernet(args) -> None:
    out = WORK / 'supernet'
    if (WORK / 'supernet_cost.json').exists():
        return
    flags = [f'--{k.replace("_", "-")}={v}' for k, v in SUPERNET.items()]
    summary, cost = _costed(args.threads, 'nas', 'train-supernet', '--space', SPACE, '--data', 'fashion-mnist', '--out',
                            out, *flags, '--resume' if (out / 'supernet_checkpoint.pt').exists() else '--seed=0')
    _save(WORK / 'supernet_cost.json', dict(cost, summary=summary))


def cmd_latency(args) -> None:
    if (WORK / 'latency_budget.json').exists():
        return
    import torch
    from deitlab.nas.latency import build_latency_table, time_models
    torch.set_num_threads(1)
    space = _space()
    t0 = time.time()
    table = build_latency_table(space, threads=1, rounds=LUT_ROUNDS, calibrate=5)
    table.save(WORK / 'lut.json')
    times, settings = time_models(space, {'deit_nano': _baseline_model()}, threads=1, rounds=LUT_ROUNDS)
    _save(WORK / 'latency_budget.json', dict(latency_ms=times['deit_nano'], settings=settings,
                                             table_s=time.time() - t0, table_scale=table.scale))


def cmd_search(args) -> None:
    sn, lut = WORK / 'supernet', WORK / 'lut.json'
    budget = _load(WORK / 'latency_budget.json')
    if budget is None:
        raise SystemExit('run the latency phase first')
    runs = {'macs': ['--macs', f'{baseline_macs():.0f}', '--random-baseline', '16', *SEARCH],
            'latency': ['--latency', f'{budget["latency_ms"]:.4f}', *SEARCH],
            'nsga2': ['--nsga2', '--population', SEARCH[1], '--iterations', '4']}
    for name, flags in runs.items():
        cost = WORK / f'search_{name}' / 'cost.json'
        if cost.exists():
            continue
        summary, spent = _costed(args.threads, 'nas', 'search', '--supernet', sn, '--out', WORK / f'search_{name}',
                                 '--lut', lut, *flags)
        _save(cost, dict(spent, summary=summary))


@functools.lru_cache(maxsize=None)
def standalone_archs() -> list:
    """``STANDALONE`` networks spread over the space's MACs: 400 random draws sorted by MACs, one
    at each of evenly spaced quantiles (distinct networks)."""
    space = _space()
    draws = space.sample_distinct(400, random.Random(1234))
    draws.sort(key=space.macs)
    picks = [draws[round(q * (len(draws) - 1) / (STANDALONE - 1))] for q in range(STANDALONE)]
    return [space.canonical(a) for a in picks]


RUNS_FILE = RESULTS / 'resnas_fmnist_runs.json'


def _run_key(name: str, seed: int) -> dict:
    """What makes a training run the same run: the network (the baseline's name or the exported
    architecture), the seed and the recipe."""
    if name == 'deit_nano' or name.startswith('deit_nano_'):
        model = BASELINE
    elif name.startswith('standalone'):
        model = standalone_archs()[int(name[len('standalone'):].split('_s')[0])].to_dict()
    else:
        best = _load(WORK / f'search_{name.rsplit("_s", 1)[0]}' / 'best_arch.json')
        model = best['arch'] if best else None
    return dict(model=model, seed=seed, train=' '.join(TRAIN))


def _run_names() -> list:
    """``(name, seed)`` of every training run of the benchmark."""
    return [(f'{arm}_s{s}', s) for s in SEEDS for arm in [*ARMS, *(f'standalone{j}' for j in range(STANDALONE))]]


def restore_runs() -> int:
    """Write ``train/NAME/summary.json`` for every recorded run whose key still matches; the count."""
    records, n = _load(RUNS_FILE) or {}, 0
    for name, seed in _run_names():
        rec, out = records.get(name), WORK / 'train' / name / 'summary.json'
        if rec and not out.exists() and rec['key'] == _run_key(name, seed):
            _save(out, rec['summary'])
            n += 1
    return n


def cmd_collect(args) -> None:
    """Record every finished training run under WORK in ``results/resnas_fmnist_runs.json``."""
    records = _load(RUNS_FILE) or {}
    for name, seed in _run_names():
        summary = _load(WORK / 'train' / name / 'summary.json')
        if summary is not None:
            records[name] = dict(key=_run_key(name, seed), summary=summary)
    _save(RUNS_FILE, dict(sorted(records.items())))
    print(f'{len(records)} runs recorded in {RUNS_FILE}', flush=True)


def _export(arch_file: Path, out: Path, seed: int) -> None:
    if not (out / 'config.json').exists():
        _deitlab('nas', 'export', '--arch', arch_file, '--out', out, '--space', SPACE, '--seed', seed)


def _train_job(label: str, model: str, out: Path, seed: int) -> tuple:
    cmd = [sys.executable, '-m', 'deitlab', 'train', '--model', model, '--data', 'fashion-mnist', '--out', str(out),
           '--seed', str(seed), *TRAIN, '--json']
    script = f'{" ".join(cmd)} > {out}.log 2>&1 && tail -n 1 {out}.log > {out}/summary.json'
    return label, ['bash', '-c', f'rm -rf {out} && {script}'], f'{out}.out'


def cmd_train(args) -> None:
    print(f'{restore_runs()} runs restored from {RUNS_FILE.name}', flush=True)
    jobs = []
    for seed in args.seeds:
        for arm in args.arms:
            out = WORK / 'train' / f'{arm}_s{seed}'
            if (out / 'summary.json').exists():
                continue
            model = BASELINE
            if arm != 'deit_nano':
                model = str(WORK / 'export' / f'{arm}_s{seed}')
                _export(WORK / f'search_{arm}' / 'best_arch.json', Path(model), seed)
            jobs.append(_train_job(f'{arm}_s{seed}', model, out, seed))
    for seed in args.seeds:
        for j, arch in enumerate(standalone_archs()):
            name = f'standalone{j}_s{seed}'
            out, model = WORK / 'train' / name, WORK / 'export' / name
            if (out / 'summary.json').exists() or j not in args.standalone:
                continue
            arch_file = WORK / 'export' / f'standalone{j}.json'
            _save(arch_file, arch.to_dict())
            _export(arch_file, model, seed)
            jobs.append(_train_job(name, str(model), out, seed))
    print(f'{len(jobs)} runs to do', flush=True)
    run_pool(jobs, args.jobs, dict(os.environ, OMP_NUM_THREADS='1'))
    cmd_collect(args)


def cmd_measure(args) -> None:
    """Every network timed in one run, next to the table's prediction; and the supernet fitness of
    every searched and stand-alone network (for Kendall tau), on the held-out images and on the
    test images. The best random network of the MACs search is scored on the test images too."""
    import timm
    import torch
    from deitlab.data.for_model import model_datasets
    from deitlab.nas.latency import LatencyTable, time_models
    from deitlab.nas.search import Fitness, load_supernet
    from deitlab.nas.space import Arch
    torch.set_num_threads(1)
    space, table = _space(), LatencyTable.load(WORK / 'lut.json')
    archs = {arm: Arch.from_dict(_load(WORK / f'search_{arm}' / 'best_arch.json')['arch']) for arm in ('macs', 'latency')}
    archs.update({f'standalone{j}': a for j, a in enumerate(standalone_archs())})
    models = {'deit_nano': _baseline_model()}
    models.update({k: timm.create_model(f'local-dir:{WORK / "export" / (k + "_s0")}') for k in archs})
    times, settings = time_models(space, models, threads=1, rounds=MEASURE_ROUNDS)
    supernet, sd = load_supernet(WORK / 'supernet', 'cpu')
    fitness = Fitness.from_dir(supernet, sd)
    (test,) = model_datasets(supernet.model, sd.holdout['data'], splits=('val',))
    xs, ys = zip(*(test[i] for i in range(len(test))))
    fitness_test = Fitness(supernet, torch.stack(xs), torch.as_tensor(ys), batch_size=250)
    rows = {k: dict(measured_ms=times[k]) for k in models}
    for k, a in archs.items():
        rows[k].update(arch=a.to_dict(), macs=space.macs(a), predicted_ms=table.predict(space, a), fitness=fitness(a),
                       fitness_test=fitness_test(a))
    rows['deit_nano']['macs'] = baseline_macs()
    rnd = Arch.from_dict(_load(WORK / 'search_macs' / 'search.json')['random_baseline']['best']['arch'])
    random_best = dict(arch=rnd.to_dict(), fitness=fitness(rnd), fitness_test=fitness_test(rnd))
    if (WORK / 'measure.json').exists():   # an earlier measuring run: kept, its latencies are checked too
        (WORK / 'measure.json').rename(WORK / f'measure_earlier{len(_earlier_measures())}.json')
    _save(WORK / 'measure.json', dict(rows=rows, settings=settings, random_best=random_best,
                                      fitness_images=dict(held_out=len(fitness.labels), test=len(ys))))


def _earlier_measures() -> list:
    return sorted(WORK.glob('measure_earlier*.json'), key=lambda f: int(f.stem[len('measure_earlier'):]))


def _latency_check(measure: dict) -> dict:
    """One measuring run's latencies against the table's predictions."""
    rows = [dict(name=k, predicted_ms=r['predicted_ms'], measured_ms=r['measured_ms'],
                 rel_error=r['predicted_ms'] / r['measured_ms'] - 1) for k, r in measure['rows'].items() if 'predicted_ms' in r]
    from scipy.stats import spearmanr
    rho = spearmanr([r['predicted_ms'] for r in rows], [r['measured_ms'] for r in rows])[0]
    return dict(rows=rows, max_abs_rel_error=max(abs(r['rel_error']) for r in rows), spearman=float(rho),
                settings=measure['settings'])


def cmd_report(args) -> None:
    from scipy.stats import kendalltau
    restore_runs()
    measure = _load(WORK / 'measure.json')
    if measure is None:
        raise SystemExit('run the measure phase first')
    rows = measure['rows']
    trained = {}
    for arm in ARMS:
        tops = [_load(WORK / 'train' / f'{arm}_s{s}' / 'summary.json') for s in SEEDS]
        tops = [t['val_top1'] for t in tops if t]
        trained[arm] = dict(top1=seed_stats(tops), top1_runs=tops, macs=rows[arm]['macs'],
                            measured_ms=rows[arm]['measured_ms'], predicted_ms=rows[arm].get('predicted_ms'),
                            fitness=rows[arm].get('fitness'), arch=rows[arm].get('arch'))
        trained[arm]['params'] = _load(WORK / 'train' / f'{arm}_s0' / 'summary.json').get('params')
    stand = []
    for j in range(STANDALONE):
        tops = [_load(WORK / 'train' / f'standalone{j}_s{s}' / 'summary.json') for s in SEEDS]
        tops = [t['val_top1'] for t in tops if t]
        r = rows[f'standalone{j}']
        stand.append(dict(name=f'standalone{j}', top1=seed_stats(tops)['mean'] if tops else None, top1_runs=tops,
                          **{k: r[k] for k in ('fitness', 'fitness_test', 'macs', 'predicted_ms', 'measured_ms')}))
    done = [s for s in stand if s['top1'] is not None]
    tau = kendalltau([s['fitness'] for s in done], [s['top1'] for s in done])
    tau_test = kendalltau([s['fitness_test'] for s in done], [s['top1'] for s in done])
    searches = {n: dict(cost=_load(WORK / f'search_{n}' / 'cost.json'), record=_load(WORK / f'search_{n}' / 'search.json'))
                for n in ('macs', 'latency', 'nsga2')}
    macs_rec = searches['macs']['record']
    base = trained['deit_nano']
    result = dict(
        benchmark='resnas_fmnist', space=SPACE, space_def=_space().to_dict(), baseline=BASELINE, img_size=IMG,
        supernet=dict(settings=SUPERNET, cost=_load(WORK / 'supernet_cost.json')),
        latency_budget=_load(WORK / 'latency_budget.json'), latency_table_meta=_load(WORK / 'lut.json')['meta'],
        train_recipe=' '.join(TRAIN), seeds=list(SEEDS),
        trained=trained, standalone=stand, kendall_tau=dict(tau=float(tau[0]), p=float(tau[1]), n=len(done)),
        kendall_tau_test=dict(tau=float(tau_test[0]), p=float(tau_test[1]), n=len(done)),
        fitness_images=measure['fitness_images'],
        latency_check=_latency_check(measure),
        latency_check_earlier=[_latency_check(_load(f)) for f in _earlier_measures()],
        search=dict(
            macs=dict(best=macs_rec['best'], evaluated=len(macs_rec['evaluated']),
                      random_best=macs_rec['random_baseline']['best'], random_best_test=measure['random_best'],
                      best_fitness_test=rows['macs']['fitness_test'],
                      random_evaluated=len(macs_rec['random_baseline']['evaluated']),
                      cpu_min=searches['macs']['cost']['cpu_min']),
            latency=dict(best=searches['latency']['record']['best'],
                         evaluated=len(searches['latency']['record']['evaluated']),
                         cpu_min=searches['latency']['cost']['cpu_min']),
            nsga2=dict(front=searches['nsga2']['record']['front'], cpu_min=searches['nsga2']['cost']['cpu_min'])))
    gap = lambda arm: trained[arm]['top1']['mean'] - base['top1']['mean']   # noqa: E731
    spread = lambda arm: max(trained[arm]['top1']['std'] or 0, base['top1']['std'] or 0)   # noqa: E731
    result['bar'] = dict(
        macs_beats_baseline=gap('macs') > spread('macs') and trained['macs']['macs'] <= base['macs'],
        tau_above_0_3=result['kendall_tau']['tau'] > 0.3,
        tau_above_0_3_test=result['kendall_tau_test']['tau'] > 0.3,
        evolution_beats_random=macs_rec['best']['fitness'] > macs_rec['random_baseline']['best']['fitness'],
        evolution_beats_random_test=rows['macs']['fitness_test'] > measure['random_best']['fitness_test'],
        latency_model_faster_and_better=(trained['latency']['measured_ms'] <= base['measured_ms']
                                         and gap('latency') > spread('latency')),
        latency_predictions_within_15pct=all(c['max_abs_rel_error'] <= 0.15 for c in
                                             [result['latency_check'], *result['latency_check_earlier']]))
    _save(RESULTS / 'resnas_fmnist.json', result)
    plot(result, searches)
    print(json.dumps(dict(bar=result['bar'], tau=result['kendall_tau'],
                          top1={a: t['top1'] for a, t in trained.items()}), indent=1))


def plot(result: dict, searches: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    base = result['trained']['deit_nano']
    styles = {'macs': ('tab:blue', 'evolution, MACs window'), 'latency': ('tab:green', 'evolution, latency budget'),
              'nsga2': ('tab:purple', 'NSGA-II')}
    for name, (color, label) in styles.items():
        ev = searches[name]['record']['evaluated']
        axes[0].scatter([e['macs'] / 1e6 for e in ev], [e['fitness'] for e in ev], s=10, color=color, alpha=0.5,
                        label=label)
        axes[1].scatter([e['latency_ms'] for e in ev], [e['fitness'] for e in ev], s=10, color=color, alpha=0.5)
    rnd = searches['macs']['record']['random_baseline']['evaluated']
    axes[0].scatter([e['macs'] / 1e6 for e in rnd], [e['fitness'] for e in rnd], marker='x', color='0.5', s=14,
                    label='random, MACs window')
    front = sorted(searches['nsga2']['record']['front'], key=lambda e: e['latency_ms'])
    axes[1].plot([e['latency_ms'] for e in front], [e['fitness'] for e in front], color='tab:purple', lw=1.5,
                 label='NSGA-II front')
    axes[0].axvline(base['macs'] / 1e6, color='k', ls=':', label='DeiT-nano MACs')
    axes[1].axvline(result['latency_budget']['latency_ms'], color='k', ls=':', label='DeiT-nano latency')
    axes[0].set(xlabel='MACs (M)', ylabel='supernet held-out top-1 (%)', title='every network evaluated')
    axes[1].set(xlabel='predicted latency (ms, batch 1, 1 thread)', title='against predicted latency')
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    colors = {'deit_nano': 'k', 'macs': 'tab:blue', 'latency': 'tab:green'}
    for arm, t in result['trained'].items():
        ax.errorbar(t['measured_ms'], t['top1']['mean'], yerr=t['top1']['std'] or 0, fmt='o', color=colors[arm],
                    capsize=3, label=f'{arm} ({t["macs"] / 1e6:.1f}M MACs)')
    st = [s for s in result['standalone'] if s['top1'] is not None]
    ax.scatter([s['measured_ms'] for s in st], [s['top1'] for s in st], marker='s', s=14, color='0.6',
               label=f'stand-alone networks, {len(result["seeds"])} seeds (tau {result["kendall_tau"]["tau"]:.2f}, '
                     f'{result["kendall_tau_test"]["tau"]:.2f} on test images)')
    ax.set(xlabel='measured latency (ms, batch 1, 1 thread)', ylabel='test top-1 (%), retrained',
           title=f'retrained, {len(result["seeds"])} seeds')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle('ViT-ResNAS on Fashion-MNIST (32 px): search in the nano space against DeiT-nano')
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / 'resnas_fmnist.png', dpi=100)


def cmd_all(args) -> None:
    for fn in (cmd_supernet, cmd_latency, cmd_search, cmd_train, cmd_measure, cmd_report):
        print('phase', fn.__name__[4:], flush=True)
        fn(args)


def _flags(name: str, q) -> None:
    q.add_argument('--jobs', type=int, default=2)
    q.add_argument('--threads', type=int, default=2, help='supernet, search: torch threads')
    q.add_argument('--seeds', nargs='*', type=int, default=list(SEEDS))
    q.add_argument('--arms', nargs='*', choices=ARMS, default=list(ARMS),
                   help='train: the arms to train (deit_nano needs no supernet)')
    q.add_argument('--standalone', nargs='*', type=int, default=list(range(STANDALONE)), metavar='J',
                   help='train: the stand-alone networks to train (their indices; none: --standalone alone)')


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    run_cli(__doc__, {name: globals()[f'cmd_{name}'] for name in
                      ('supernet', 'latency', 'search', 'train', 'collect', 'measure', 'report', 'all')}, _flags)


if __name__ == '__main__':
    main()
