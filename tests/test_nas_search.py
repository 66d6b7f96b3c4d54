"""Tests for the ViT-ResNAS search and export (nas/cost.py, latency.py, evolution.py, search.py,
export.py; ViT-ResNAS parts 3-4), on a tiny supernet trained for two steps."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from types import SimpleNamespace

import pytest
import torch

from deitlab.cli import main
from deitlab.models.vitres import ViTRes
from deitlab.nas import SPACES, Arch, SearchSpace, SearchSpaceError
from deitlab.nas.config import SupernetConfig
from deitlab.nas.cost import arch_macs
from deitlab.nas.evolution import (Budget, decode, encode, evolve, gene_sizes, nsga2_search, pareto_front,
                                   random_search)
from deitlab.nas.latency import LatencyTable, LatencyTableError, build_latency_table, check_predictions
from deitlab.nas.search import Fitness, load_supernet
from deitlab.nas.train import train_supernet
from deitlab.rundir import create

DATA = 'glyphs:train=96,val=32,size=32,seed=1'   # 24 classes, 4 training images each
HAS_PYMOO = importlib.util.find_spec('pymoo') is not None
C = 230_000   # a MACs budget inside the tiny space (112k .. 350k MACs)


def _tiny(**kw) -> SearchSpace:
    """Two stages of two blocks (the second of each skippable), heads of width 8, 32 px, patch 8."""
    args = dict(widths=[[16, 24], [32, 48]], depths=[2, 2], heads=[[1, 2], [2, 3]], mlp_hidden=[[16, 32], [32, 64]],
                skippable=[1, 3], head_dim=8, img_size=32, patch_size=8, num_classes=24,
                model_name='deitlab_vitres_mu_patch4_32')
    return SearchSpace(**{**args, **kw})


@pytest.fixture(scope='module')
def sn(tmp_path_factory):
    """A tiny supernet trained for two steps, loaded, with its fitness on the 24 held-out images."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('nas')
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SPACES, 'tiny', _tiny())
        train_supernet(SupernetConfig(data=DATA, out=str(root / 'sn'), space='tiny', epochs=1, batch_size=8,
                                      ex_per_arch=2, holdout=1, max_steps_per_epoch=2, width_warmup_epochs=0,
                                      warmup_epochs=0.5, progress=False, seed=3))
    supernet, sd = load_supernet(root / 'sn', 'cpu')
    yield SimpleNamespace(root=root, dir=root / 'sn', supernet=supernet, sd=sd, space=sd.space,
                          fitness=Fitness.from_dir(supernet, sd))
    torch.set_num_threads(before)


def _toy_fitness(a: Arch) -> float:
    """A fitness without a supernet: wider and deeper is better, MLP width costs a little."""
    return sum(a.widths) / 10 + sum(h for h, k in zip(a.heads, a.keep) if k) - 1e-3 * sum(a.mlp_hidden)


# ----------------------------------------------------------------------------- genes, MACs, budget

def test_closed_form_macs_and_genes_round_trip():
    for space in (SPACES['mu'], SPACES['mu_distilled'], SPACES['mu_conv'], _tiny(), _tiny(stem='conv')):
        rng = random.Random(0)
        for a in [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(6)]:
            assert arch_macs(space, a) == space.macs(a)
            genes = encode(space, a)
            assert len(genes) == len(gene_sizes(space)) and all(0 <= g < n for g, n in zip(genes, gene_sizes(space)))
            assert decode(space, genes) == a


def test_budget_refuses_what_no_network_can_meet():
    mu = SPACES['mu']
    with pytest.raises(SearchSpaceError, match=r"the smallest network of space 'mu' has 5.739M MACs \(5739328\), "
                                               r"above the budget of 1.000M MACs"):
        Budget(macs=1e6).check(mu, 'mu')
    with pytest.raises(SearchSpaceError, match=r"the largest network of space 'mu' has .* below the MACs window"):
        Budget(macs=1e9).check(mu, 'mu')
    Budget(macs=1e9, window=None).check(mu, 'mu')   # no lower end: fine
    with pytest.raises(SearchSpaceError, match='a latency budget needs a latency table'):
        Budget(latency=1.0)
    b = Budget(macs=2e7)
    assert b.ok(2e7, None) and b.ok(0.975 * 2e7, None) and not b.ok(0.97 * 2e7, None) and not b.ok(2e7 + 1, None)


# ----------------------------------------------------------------------------- evolution and random search

def test_evolution_window_duplicates_reproducible_and_improving(sn):
    space, window = sn.space, 0.9
    budget = Budget(macs=C, window=window)
    res = evolve(space, sn.fitness, budget, seed=5, log=False)
    hist = res.history
    assert len(hist) == 16 + 3 * 8 and {e['generation'] for e in hist} == {0, 1, 2, 3}
    for e in hist:   # every evaluated network within the MACs window, MACs and fitness recorded
        a = Arch.from_dict(e['arch'])
        assert window * C <= e['macs'] <= C and e['macs'] == arch_macs(space, a)
        assert e['fitness'] == sn.fitness(a) and 0 <= e['fitness'] <= 100
    keys = [space.canonical(Arch.from_dict(e['arch'])) for e in hist]
    assert len(set(keys)) == len(keys)   # duplicates skipped
    assert res.best['fitness'] >= max(e['fitness'] for e in hist if e['generation'] == 0)
    assert res.best['fitness'] == max(e['fitness'] for e in hist)
    assert {e['origin'] for e in hist} == {'random', 'mutation', 'crossover'}
    again = evolve(space, sn.fitness, budget, seed=5, log=False)
    assert again.history == hist and again.best == res.best
    assert evolve(space, sn.fitness, budget, seed=6, log=False).history != hist


def test_evolution_climbs_a_known_fitness():
    mu = SPACES['mu']
    budget = Budget(macs=1.6e7)
    res = evolve(mu, _toy_fitness, budget, iterations=6, seed=0, log=False)
    first = max(e['fitness'] for e in res.history if e['generation'] == 0)
    assert res.best['fitness'] > first
    assert res.stats['duplicates'] + res.stats['over_budget'] > 0 and res.stats['gave_up'] == 0
    rnd = random_search(mu, _toy_fitness, budget, 6, seed=0)
    assert len(rnd.history) == 6 and len({json.dumps(e['arch']) for e in rnd.history}) == 6
    assert all(0.975 * 1.6e7 <= e['macs'] <= 1.6e7 for e in rnd.history)
    assert rnd.best['fitness'] == max(e['fitness'] for e in rnd.history)


def test_random_baseline_on_the_supernet(sn):
    res = random_search(sn.space, sn.fitness, Budget(macs=C, window=0.9), 5, seed=1)
    assert len(res.history) == 5 and res.best in res.history and res.method == 'random'


def test_a_window_nothing_fits_is_an_error():
    space = _tiny()
    lo = arch_macs(space, space.smallest())
    with pytest.raises(SearchSpaceError, match=r'no network within the budget .* was found in 10 random draws'):
        random_search(space, _toy_fitness, Budget(macs=lo + 1, window=0.999999), 1, max_tries=10)


# ----------------------------------------------------------------------------- NSGA-II

def test_pareto_front_is_non_dominated():
    pts = [dict(macs=m, fitness=f) for m, f in [(1, 1), (2, 3), (2, 2), (3, 3), (4, 5), (5, 4), (0.5, 0.5)]]
    front = pareto_front(pts)
    assert [(e['macs'], e['fitness']) for e in front] == [(0.5, 0.5), (1, 1), (2, 3), (4, 5)]


@pytest.mark.skipif(not HAS_PYMOO, reason='pymoo is not installed (pip install pymoo)')
def test_nsga2_returns_a_non_dominated_front(sn):
    res = nsga2_search(sn.space, sn.fitness, Budget(macs=C), population=8, iterations=2, seed=0, log=False)
    front, hist = res.front, res.history
    assert front and all(e in hist for e in front) and res.best in front
    assert all(e['macs'] <= C for e in hist)

    def dominates(a, b):
        return a['fitness'] >= b['fitness'] and a['macs'] <= b['macs'] and (a['fitness'], a['macs']) != (
            b['fitness'], b['macs'])
    assert not any(dominates(a, b) for a in front for b in front)
    assert all(any(dominates(f, e) or (f['fitness'], f['macs']) == (e['fitness'], e['macs']) for f in front)
               for e in hist)
    again = nsga2_search(sn.space, sn.fitness, Budget(macs=C), population=8, iterations=2, seed=0, log=False)
    assert again.history == hist


# ----------------------------------------------------------------------------- latency table

def test_latency_table_predicts_interpolates_and_reports(tmp_path, one_thread):
    space = _tiny(mlp_hidden=[[16, 24, 32], [32, 48, 64]])
    table = build_latency_table(space, rounds=2, mlp_points=2, calibrate=2, target_ms=0.2)
    assert table.meta['threads'] == 1 and table.meta['batch_size'] == 1 and table.scale > 0
    assert len(table.blocks) == 2 * 2 * 2 + 2 * 2 * 2 and len(table.reductions) == 4
    assert all(v > 0 for v in [*table.blocks.values(), *table.reductions.values(), *table.stems.values(),
                               *table.heads.values()])
    mid = table.block_ms(0, 16, 1, 24)   # not timed: halfway between 16 and 32 hidden units
    assert mid == pytest.approx((table.blocks[(0, 16, 1, 16)] + table.blocks[(0, 16, 1, 32)]) / 2)
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(3)]
    preds = [table.predict(space, a) for a in archs]
    assert all(p > 0 for p in preds)
    parts = table.parts(space, space.smallest())
    assert parts['total'] == pytest.approx(table.scale * (parts['stem'] + parts['blocks'] + parts['reductions']
                                                          + parts['head']))
    loaded = LatencyTable.load(table.save(tmp_path / 'lut.json'))
    assert [loaded.predict(space, a) for a in archs] == preds and loaded.meta == table.meta
    with pytest.raises(LatencyTableError, match='timed for another search space'):
        loaded.check_space(SPACES['mu'])
    with pytest.raises(LatencyTableError, match='no timings for stage 1 widths \\[40\\]'):
        loaded.check_space(_tiny(widths=[[16, 24], [32, 40, 48]]))
    report = check_predictions(space, table, archs, rounds=1, target_ms=0.2)   # reports; no claim on time
    assert len(report['rows']) == 3 and (report['spearman'] is None or -1 <= report['spearman'] <= 1)
    assert all(r['measured_ms'] > 0 and r['predicted_ms'] > 0 for r in report['rows'])
    assert report['mean_abs_rel_error'] >= 0
    # a latency budget: every network evaluated is predicted within it (timings under load need not be
    # monotone in size, so the limit is at least the smallest network's prediction)
    limit = max(sorted(preds)[1], table.predict(space, space.smallest()))
    res = evolve(space, _toy_fitness, Budget(latency=limit, table=table), population=4, iterations=1, parents=2,
                 mutations=2, crossovers=2, seed=0, log=False)
    assert all(e['latency_ms'] <= limit for e in res.history)


def test_latency_table_times_the_spaces_stem(one_thread):
    """A conv-stem space's table times the conv stem its networks are built with, and a table of the
    linear stem does not fit it (nor the other way round); tables written before the stem option
    are the linear stem's."""
    from deitlab.models.vitres_stems import ConvStem
    from deitlab.nas.latency import _parts
    space = _tiny(stem='conv', widths=[[16], [32]], heads=[[1], [2]], mlp_hidden=[[16], [32]], skippable=[])
    items, _ = _parts(space, 1, 'cpu', None, 0, 0)
    stem = items[('stem', 16)][0].patch_embed
    net = ViTRes(**space.model_args(space.largest()))
    assert isinstance(stem, ConvStem)
    assert {k: v.shape for k, v in stem.state_dict().items()} == \
        {k: v.shape for k, v in net.patch_embed.state_dict().items()}
    table = build_latency_table(space, rounds=1, calibrate=0, target_ms=0.05)
    assert table.space['stem'] == 'conv' and set(table.stems) == {16}
    table.check_space(space)
    linear = dataclasses.replace(space, stem='linear')
    with pytest.raises(LatencyTableError, match=r"timed for another search space \(stem 'conv' vs 'linear'\)"):
        table.check_space(linear)
    old = dict(table.to_dict(), space={k: v for k, v in linear.to_dict().items() if k != 'stem'})
    LatencyTable.from_dict(old).check_space(linear)
    with pytest.raises(LatencyTableError, match=r"stem 'linear' vs 'conv'"):
        LatencyTable.from_dict(old).check_space(space)


# ----------------------------------------------------------------------------- the fitness

def test_fitness_is_the_held_out_top1_cached(sn):
    f, space = sn.fitness, sn.space
    assert f.source == dict(data=DATA, split='held-out training images', images=24)
    arch = space.largest()
    value = f(arch)
    n = len(f.cache)
    assert f(arch) == value and len(f.cache) == n
    with torch.no_grad():   # the masked forward of the supernet agrees (up to an image on a near tie)
        masked = 100 * (sn.supernet(f.images, arch).argmax(-1) == f.labels).float().mean().item()
    assert abs(masked - value) <= 100 / 24 + 1e-9
    small = Fitness.from_dir(sn.supernet, sn.sd, batch_size=4, max_batches=2)
    assert small.source['images'] == 8 and 0 <= small(arch) <= 100


# ----------------------------------------------------------------------------- the commands

def test_search_cli_writes_its_outputs(sn, tmp_path, capsys):
    out = tmp_path / 'search'
    argv = ['nas', 'search', '--supernet', str(sn.dir), '--macs', str(C), '--macs-window', '0.9', '--out', str(out),
            '--iterations', '1', '--random-baseline', '4', '--seed', '2', '--json']
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p.name for p in out.iterdir()} == {'search.json', 'best_arch.json', 'search.png'}
    rec = json.loads((out / 'search.json').read_text())
    best = json.loads((out / 'best_arch.json').read_text())
    assert len(rec['evaluated']) == res['evaluated'] == 24 and rec['method'] == 'evolution'
    assert rec['best'] == {k: best[k] for k in rec['best']} and best['space'] == 'tiny' and best['data'] == DATA
    assert rec['budget'] == dict(macs=C, window=0.9, macs_low=0.9 * C, latency_ms=None)
    assert len(rec['random_baseline']['evaluated']) == 4 and res['random_best_fitness'] is not None
    assert rec['settings']['population'] == 16 and rec['fitness']['images'] == 24
    assert (out / 'search.png').stat().st_size > 1000
    assert main(argv) == 0   # a search's own files are replaced
    (out / 'notes.txt').write_text('mine')
    assert main(argv) == 2 and 'is not empty (notes.txt)' in capsys.readouterr().err


@pytest.mark.skipif(not HAS_PYMOO, reason='pymoo is not installed (pip install pymoo)')
def test_search_cli_nsga2_with_a_latency_table(sn, tmp_path, capsys):
    out = tmp_path / 'nsga'
    lut = tmp_path / 'lut.json'
    argv = ['nas', 'search', '--supernet', str(sn.dir), '--macs', str(C), '--latency', '50', '--lut', str(lut),
            '--lut-rounds', '1', '--nsga2', '--population', '6', '--iterations', '1', '--out', str(out), '--json']
    assert main(argv) == 0 and lut.is_file()   # timed now and written where --lut points
    rec = json.loads((out / 'search.json').read_text())
    assert rec['front'] and rec['front_objective'] == 'latency_ms' and rec['latency_table']['path'] == str(lut)
    assert all(e['latency_ms'] is not None and e['latency_ms'] <= 50 and e['macs'] <= C for e in rec['evaluated'])


def _arch_file(path, arch: Arch, **record):
    path.write_text(json.dumps(dict(record, arch=arch.to_dict()) if record else arch.to_dict()))
    return str(path)


def test_export_inherits_the_supernet_weights_and_trains(sn, tmp_path, capsys):
    space = sn.space
    arch = Arch([24, 32], [2, 1, 3, 2], [32, 16, 64, 32], [True, False, True, True])
    arch_file = _arch_file(tmp_path / 'best_arch.json', arch, space='tiny', space_def=space.to_dict(), data=DATA)
    run = tmp_path / 'inherited'
    assert main(['nas', 'export', '--arch', arch_file, '--out', str(run), '--supernet', str(sn.dir), '--json']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['weights'] == 'supernet' and res['depths'] == [1, 2] and res['macs'] == arch_macs(space, arch)
    model = create(str(run)).eval()
    assert model.widths == [24, 32] and model.depths == [1, 2]
    assert model.block_widths['num_heads'] == [2, 3, 2] and model.block_widths['mlp_hidden'] == [32, 64, 32]
    assert len(model.pretrained_cfg['label_names']) == 24   # the supernet's data's classes
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), sn.supernet.subnet(arch).eval()(x))
        assert torch.allclose(model(x), sn.supernet(x, arch), atol=1e-5)
    import timm
    assert timm.create_model(f'local-dir:{run}', pretrained=True).depths == [1, 2]
    assert json.loads((run / 'arch.json').read_text())['weights'] == 'supernet'
    assert main(['nas', 'export', '--arch', arch_file, '--out', str(run)]) == 2   # holds a model already
    assert 'already holds a model' in capsys.readouterr().err
    # the run directory trains like any other model
    assert main(['train', '--model', str(run), '--data', DATA, '--epochs', '1', '--batch-size', '8', '--no-progress',
                 '--no-tensorboard', '--max-steps-per-epoch', '1', '--out', str(tmp_path / 'trained')]) == 0
    trained = create(str(tmp_path / 'trained'))
    assert trained.widths == [24, 32] and trained.depths == [1, 2]


def test_export_fresh_weights_from_a_bare_arch(sn, tmp_path, capsys):
    mu = SPACES['mu']
    arch = mu.sample(random.Random(3))
    arch_file = _arch_file(tmp_path / 'arch.json', arch)
    runs = [tmp_path / 'a', tmp_path / 'b']
    for run in runs:
        assert main(['nas', 'export', '--arch', arch_file, '--out', str(run), '--seed', '1']) == 0
    a, b = (create(str(r)) for r in runs)
    args = mu.model_args(arch)
    assert a.widths == args['widths'] and a.depths == args['depths'] and a.num_classes == 10
    assert a.block_widths['num_heads'] == args['num_heads'] and a.block_widths['mlp_hidden'] == args['mlp_hidden']
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))   # seeded
    assert main(['nas', 'export', '--arch', arch_file, '--out', str(tmp_path / 'c'), '--num-classes', '24']) == 0
    assert create(str(tmp_path / 'c')).num_classes == 24
    # architectures of another space are refused with the space's own message
    capsys.readouterr()
    other = _arch_file(tmp_path / 'other.json', sn.space.largest())
    assert main(['nas', 'export', '--arch', other, '--out', str(tmp_path / 'd')]) == 2
    assert 'the architecture has 2 stage widths but the space has 3 stages' in capsys.readouterr().err
    other = _arch_file(tmp_path / 'other.json', dataclasses.replace(mu.largest(), widths=(40, 128, 256)))
    assert main(['nas', 'export', '--arch', other, '--out', str(tmp_path / 'd')]) == 2
    assert 'stage 0 width 40 is not in the search space; choices: [48, 56, 64]' in capsys.readouterr().err
    assert not (tmp_path / 'd').exists()
    from deitlab.nas.config import ExportConfig
    from deitlab.nas.export import export_arch
    with pytest.raises(SearchSpaceError, match="searched in space 'mu', but the supernet"):
        export_arch(ExportConfig(arch=_arch_file(tmp_path / 'mu.json', arch, space='mu', space_def=mu.to_dict()),
                                 out=str(tmp_path / 'e'), supernet=str(sn.dir)))
    assert dataclasses.asdict(ExportConfig(arch='a', out='o'))['seed'] == 0
