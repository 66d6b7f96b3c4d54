"""NViT pruning of the token-mixer families (PoolFormer, SpectFormer) in their MLP hidden widths:
per-block widths in the models, units and masks, densify, closed-form MACs, the per-kind latency
table, the pruner end to end (Python and CLI), and the errors for what does not compose."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from deitlab.bench import count_gmacs, count_params
from deitlab.models.poolformer import PoolFormer, analytic_macs
from deitlab.models.spectformer import spectformer_macs
from deitlab.prune import (
    Budget, LatencyTable, Masks, MLPLatencyTable, NViTConfig, NViTPruner, PruneError, Saliency, build_latency_table,
    densify, grid_for, layout_of, load_latency_table, prune_nvit, reduce_units, rounded_masks,
)
from deitlab.prune.groups import check_prunable
from deitlab.rundir import create, save_run_dir

# pico models on 1 x 28 x 28 inputs; the SpectFormer pattern has one block of every mixer kind
FAMILIES = {
    'poolformer': ('deitlab_poolformer_pico_32', {}),
    'spectformer': ('deitlab_spectformer_pico_patch4_32', dict(mixers='spai')),
}
INPUT = dict(img_size=28, in_chans=1)
ATOL = 1e-5
DATA = 'glyphs:train=48,val=16,size=28,seed=1'   # 24 classes


@torch.no_grad()
def _model(family: str, seed: int = 0, num_classes: int = 5, **kw) -> nn.Module:
    """A random pico model with every parameter moved off its init (LayerScale 1e-5, zero biases)."""
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **INPUT, **{**extra, **kw})
    g = torch.Generator().manual_seed(seed + 1000)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _remove_some(masks: Masks, seed: int = 0) -> None:
    """Switch off about a third of every MLP's hidden units."""
    g = torch.Generator().manual_seed(seed)
    for m in masks.block['mlp']:
        m[torch.randperm(m.numel(), generator=g)[:m.numel() // 3]] = False


def _closed_form(model: nn.Module) -> int:
    return analytic_macs(model, 28) if isinstance(model, PoolFormer) else spectformer_macs(model)['total']


def _loader(n: int = 16, batch: int = 8, classes: int = 5) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)),
                      batch_size=batch)


def _cfg(**kw) -> NViTConfig:
    args = dict(model='x', data='x', out='x', target_gmacs=0.8, interval=2, groups_per_event=4, lam=0, progress=False,
                val_batches=0, group_sizes=dict(mlp=8))
    args.update(kw)
    return NViTConfig(**args)


# ---------------------------------------------------------------------------------------------
# per-block MLP widths in the models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', FAMILIES)
def test_mlp_hidden_round_trips_through_a_run_dir(family, tmp_path):
    depth = len(layout_of(_model(family)).block_names)
    widths = [7 + 5 * i for i in range(depth)]
    model = _model(family, mlp_hidden=widths)
    assert model.mlp_hidden == widths and model.model_args['mlp_hidden'] == widths
    assert 'mlp_hidden' not in _model(family).model_args          # uniform widths: config.json as before
    run = save_run_dir(model, tmp_path / 'run')
    assert json.loads((run / 'config.json').read_text())['model_args']['mlp_hidden'] == widths
    x = _x(3)
    for loaded in (timm.create_model(f'local-dir:{run}', pretrained=True), create(str(run))):
        assert loaded.mlp_hidden == widths and loaded.model_args == model.model_args
        assert torch.equal(_logits(loaded, x), _logits(model, x))
    with pytest.raises(ValueError, match=f'mlp_hidden .*{depth}'):
        _model(family, mlp_hidden=widths[:-1])


# ---------------------------------------------------------------------------------------------
# units, masks, saliency slices, densify
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', FAMILIES)
def test_an_mlp_unit_zeroes_exactly_its_fc1_row_and_fc2_column(family):
    model = _model(family)
    masks = Masks(model)
    depth = len(model.mlp_hidden)
    assert masks.types == ('mlp',) and masks.emb is None and set(masks.block) == {'mlp'}
    assert list(masks.layers()) == [('mlp', b) for b in range(depth)]
    assert masks.kept() == dict(mlp_hidden=model.mlp_hidden)
    block, unit = 1, 3
    masks.block['mlp'][block][unit] = False
    pm = masks.param_masks(model)
    prefix = layout_of(model).mlp_names[block] + '.'
    for name, p in model.named_parameters():
        expected = torch.zeros(p.shape, dtype=torch.bool)   # True: zeroed with the unit
        if name == prefix + 'fc1.weight':
            expected[unit] = True
        elif name == prefix + 'fc1.bias':
            expected[unit] = True
        elif name == prefix + 'fc2.weight':
            expected[:, unit] = True
        got = pm[name] == 0 if name in pm else torch.zeros(p.shape, dtype=torch.bool)
        assert torch.equal(got, expected), name
    sd = masks.state_dict()
    again = Masks(model)
    again.load_state_dict(sd)
    assert again.kept() == masks.kept() and 'emb' not in sd


@pytest.mark.parametrize('family', FAMILIES)
def test_saliency_sums_the_fc1_row_with_its_bias_and_not_fc2(family):
    model = _model(family)
    fc1 = model.get_submodule(layout_of(model).mlp_names[2]).fc1
    C = fc1.weight.shape[1]
    ones = reduce_units(model, lambda n, p: torch.ones_like(p))
    assert set(ones) == {'mlp'} and [t.numel() for t in ones['mlp']] == model.mlp_hidden
    assert all(torch.equal(t, torch.full_like(t, C_b + 1.0)) for t, C_b in zip(
        ones['mlp'], [layout_of(model).blocks()[b].mlp.fc1.weight.shape[1] for b in range(len(ones['mlp']))]))
    fc2_only = reduce_units(model, lambda n, p: torch.ones_like(p) if '.fc2.' in n else None)
    assert all(float(t.abs().max()) == 0 for t in fc2_only['mlp'])
    # NViT: (sum over the fc1 row and bias of w * g)^2
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    sal = Saliency('nvit', divisors=None)
    sal.accumulate(model)
    score = sal.event(model)['mlp'][2][5]
    w, b = fc1.weight.detach().reshape(-1, C), fc1.bias.detach()
    expected = (w[5] * fc1.weight.grad.reshape(-1, C)[5]).sum() + b[5] * fc1.bias.grad[5]
    assert float(score) == pytest.approx(float(expected) ** 2, rel=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
def test_masked_model_equals_densified_model(family):
    model = _model(family)
    masks = Masks(model)
    _remove_some(masks)
    masks.apply(model)
    compact = densify(model, masks)
    assert type(compact) is type(model) and compact.mlp_hidden == masks.kept()['mlp_hidden']
    assert count_params(compact) < count_params(model)
    x = _x(3)
    a, b = _logits(model, x), _logits(compact, x)
    assert torch.allclose(a, b, atol=ATOL), float((a - b).abs().max())
    # widths rounded up to multiples of 8: switched-on units have zero weights, same function
    rounded = densify(model, rounded_masks(masks, 8))
    assert all(m % 8 == 0 for m in rounded.mlp_hidden)
    assert torch.allclose(_logits(rounded, x), a, atol=ATOL)


@pytest.mark.parametrize('family', FAMILIES)
def test_closed_form_macs_and_budget_of_a_pruned_model_equal_the_counted_ones(family):
    model = _model(family)
    masks = Masks(model)
    _remove_some(masks, seed=3)
    masks.apply(model)
    compact = densify(model, masks)
    counted = count_gmacs(compact) * 1e9
    assert counted == _closed_form(compact) and counted < count_gmacs(model) * 1e9
    budget = Budget(model, gmacs=1.0)
    est = budget.absolute(masks.kept())
    assert est['gmacs'] * 1e9 == pytest.approx(counted, rel=1e-12) and est['params'] == count_params(compact)
    assert budget.dense['gmacs'] * 1e9 == pytest.approx(_closed_form(model), rel=1e-12)
    assert layout_of(compact).gmacs() == pytest.approx(counted / 1e9, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# latency table per block kind
# ---------------------------------------------------------------------------------------------

KINDS = dict(spectral=dict(mlp=[1, 128, 256], ms=[2.0, 3.0, 4.5], input=[49, 64]),
             attention=dict(mlp=[1, 256], ms=[1.0, 3.0], input=[49, 64]))


def test_mlp_latency_table_lookup_savings_and_files(tmp_path):
    lut = MLPLatencyTable('SpectFormer', ['spectral', 'attention', 'attention'], KINDS, 0.5, dict(batch_size=4))
    assert lut.block('spectral', 128) == 3.0 and lut.block('spectral', 192) == pytest.approx(3.75)
    assert lut.block('attention', 129) == pytest.approx(1.0 + 2.0 * 128 / 255)
    w = dict(mlp_hidden=[256, 256, 1])
    assert lut.model_ms(w) == pytest.approx(0.5 + 4.5 + 3.0 + 1.0)
    s = lut.unit_savings(w)['mlp']
    assert s[0] == pytest.approx(1.5 / 128) and s[1] == pytest.approx(2.0 / 255) and s[2] == 0.0
    path = lut.save(tmp_path / 'lut.json')
    for back in (load_latency_table(path), MLPLatencyTable.load(path)):
        assert isinstance(back, MLPLatencyTable) and back.to_dict() == lut.to_dict()
    with pytest.raises(PruneError, match=r"format 'deitlab-mlp-latency-table/1', expected 'deitlab-latency-table/1'"):
        LatencyTable.load(path)
    d = lut.to_dict()
    del d['kinds']['attention']
    (tmp_path / 'bad.json').write_text(json.dumps(d))
    with pytest.raises(PruneError, match=r"blocks of kinds \['attention'\] but no times"):
        load_latency_table(tmp_path / 'bad.json')
    d = lut.to_dict()
    del d['other_ms']
    (tmp_path / 'damaged.json').write_text(json.dumps(d))
    with pytest.raises(PruneError, match='is a damaged latency table'):
        load_latency_table(tmp_path / 'damaged.json')


def test_build_latency_tables_per_block_kind_and_their_coverage():
    spect, pool = _model('spectformer'), _model('poolformer')
    luts = {}
    for name, model in (('spectformer', spect), ('poolformer', pool)):
        grid = grid_for(model, {'mlp': [1, 32]})
        lut = build_latency_table(model, batch_size=2, grid=grid, passes=1, steps=1, progress=False)
        assert isinstance(lut, MLPLatencyTable) and lut.blocks == [layout_of(model).block_kind(b) for b in
                                                                   range(len(model.mlp_hidden))]
        for kind, entry in lut.kinds.items():
            assert entry['mlp'][0] == 1 and entry['mlp'][-1] == max(grid[kind]) and len(entry['mlp']) == 3
            assert all(np.isfinite(entry['ms'])) and min(entry['ms']) > 0
        assert lut.other_ms > 0 and lut.meta['batch_size'] == 2
        lut.check_covers(model)
        assert lut.model_ms(layout_of(model).widths()) > lut.other_ms
        luts[name] = lut
    assert luts['spectformer'].blocks == ['spectral', 'pooling', 'attention', 'identity']
    assert luts['spectformer'].kinds['spectral']['input'] == [49, 64]
    assert luts['poolformer'].blocks[:3] == ['stage0', 'stage0', 'stage1']
    assert luts['poolformer'].kinds['stage0']['input'] == [16, 14, 14]
    assert luts['poolformer'].kinds['stage3']['mlp'] == [1, 32, 256]
    with pytest.raises(PruneError, match=r"measured for SpectFormer blocks .* the model has PoolFormer blocks"):
        luts['spectformer'].check_covers(pool)
    with pytest.raises(PruneError, match='covers spectral MLP widths up to 256 but block 0 has 300'):
        luts['spectformer'].check_covers(_model('spectformer', mlp_hidden=[300, 256, 256, 256]))
    with pytest.raises(PruneError, match=r'timed spectral blocks on inputs \[49, 64\], block 0 of the model takes'):
        luts['spectformer'].check_covers(_model('spectformer', embed_dim=32, num_heads=1))
    deit = timm.create_model('deitlab_deit_pico_patch4_32', embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(PruneError, match='times the MLP widths of SpectFormer blocks, the model is a DeiT'):
        luts['spectformer'].check_covers(deit)
    deit_lut = LatencyTable(dict(emb=[32], heads=[2], qk=[16], v=[16], mlp=[128]), np.ones((1,) * 5), [32], [1.0])
    with pytest.raises(PruneError, match='this latency table times DeiT blocks, the model is a PoolFormer'):
        deit_lut.check_covers(pool)


# ---------------------------------------------------------------------------------------------
# the pruner
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', FAMILIES)
def test_nvit_pruner_with_a_latency_table_prunes_mlps_only(family):
    model = _model(family)
    layout = layout_of(model)
    kinds = [layout.block_kind(b) for b in range(layout.depth)]
    dense = dict(zip(kinds, model.mlp_hidden))
    # latency linear in M with a different slope per kind: the ranking sees different savings
    table = {k: dict(mlp=[1, dense[k]], ms=[1.0, 1.0 + (i + 1) * 0.01 * dense[k]], input=list(layout.block_inputs[b]))
             for i, (k, b) in enumerate({k: kinds.index(k) for k in dense}.items())}
    lut = MLPLatencyTable(layout.family, kinds, table, 2.0)
    pruner = NViTPruner(model, _cfg(target_gmacs=None, target_latency=0.9, lam=1.0), lut=lut, device=torch.device('cpu'))
    assert pruner.prune_types == ('mlp',) and set(pruner.group_sizes) == {'mlp'}
    pruner.run(_loader())
    est = pruner.estimate()
    assert est['latency'] <= 0.9 and est['gmacs'] < 1.0 and 'latency_ms' in pruner.log[-1]
    assert set(pruner.log[-1]['widths']) == {'mlp_hidden'}
    compact = pruner.densified()
    x = _x(2)
    assert torch.allclose(_logits(pruner.model, x), _logits(compact, x), atol=ATOL)
    assert lut.model_ms(layout_of(compact).widths()) == pytest.approx(est['latency_ms'])


@pytest.fixture
def steady_clock(monkeypatch):
    """The latency table's jobs run for real (one round), but their times are fixed: a block of MLP
    width m takes 0.1 + 0.01 m ms, the rest 1 ms. Timings on a busy machine can put the narrowest
    widths above the dense ones and make a latency target unreachable; these tests are about the
    pruning, not the machine."""
    import deitlab.prune.timing as timing
    real = timing.timed_rounds

    def fake(jobs, device, rounds, steps, threads=None, progress=None, **kw):
        _, n_threads = real(jobs, device, 1, 1, threads, progress)
        ms = {key: 0.1 + 0.01 * key[1] if len(key) == 2 and isinstance(key[1], int) else 1.0 for key, _ in jobs}
        return {key: [ms[key]] * rounds for key, _ in jobs}, n_threads
    monkeypatch.setattr(timing, 'timed_rounds', fake)


def test_prune_nvit_end_to_end_on_a_spectformer_run_dir(tmp_path, steady_clock):
    model = _model('spectformer', num_classes=24)
    dense_dir = save_run_dir(model, tmp_path / 'dense')
    out = tmp_path / 'nvit'
    report = prune_nvit(NViTConfig(model=str(dense_dir), data=DATA, out=str(out), target_latency=0.85, interval=2,
                                   prune_steps=4, batch_size=16, lut_batch=8, lut_passes=1, finetune_epochs=1,
                                   finetune_steps=2, val_batches=1, measure=False, progress=False,
                                   group_sizes=dict(mlp=16)))
    assert report['estimate']['latency'] <= 0.85 and report['target'] == dict(kind='latency', value=0.85)
    assert set(report['pruned_widths']) == {'mlp_hidden'} and report['masked_vs_dense_max_abs'] < ATOL
    assert isinstance(load_latency_table(out / 'latency_table.json'), MLPLatencyTable)
    assert (out / 'widths.png').is_file() and (out / 'prune_log.jsonl').is_file()
    final = create(str(out)).eval()
    assert final.mlp_hidden == report['pruned_widths']['mlp_hidden'] != model.mlp_hidden
    assert count_params(final) < count_params(model) and count_gmacs(final) < count_gmacs(model)
    again = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = _x(2)
    assert torch.equal(_logits(again, x), _logits(final, x))


def test_cli_prune_nvit_on_a_poolformer_run_dir(tmp_path, capsys, steady_clock):
    from deitlab.cli import main
    model = _model('poolformer', num_classes=24)
    dense_dir = save_run_dir(model, tmp_path / 'dense')
    out = tmp_path / 'nvit'
    args = ['prune', 'nvit', '--model', str(dense_dir), '--data', DATA, '--out', str(out), '--target-latency', '0.95',
            '--interval', '2', '--prune-steps', '4', '--batch-size', '16', '--lut-batch', '8', '--lut-passes', '1',
            '--finetune-epochs', '0', '--val-batches', '0', '--no-measure', '--group-sizes', 'mlp=8', '--json']
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['estimate']['latency'] <= 0.95 and res['rows'][1]['params_m'] < res['rows'][0]['params_m']
    final = create(str(out))
    assert isinstance(final, PoolFormer) and final.mlp_hidden == res['pruned_widths']['mlp_hidden']
    bad = ['prune', 'nvit', '--model', str(dense_dir), '--data', DATA, '--out', str(tmp_path / 'x'),
           '--target-gmacs', '0.5', '--prune-types', 'emb,mlp', '--json']
    assert main(bad) == 2
    assert 'PoolFormer models are pruned in their MLP hidden widths only' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# what does not compose
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('field,value,named', [
    ('prune_types', ('emb', 'mlp'), '--prune-types names emb'),
    ('prune_types', ('head',), '--prune-types names head'),
    ('group_sizes', {'qk': 2}, '--group-sizes names qk'),
    ('min_keep', {'emb': 8, 'mlp': 4}, '--min-keep names emb'),
    ('lut_grid', {'heads': [1, 2], 'mlp': [8]}, '--lut-grid names head'),
])
def test_settings_for_other_unit_types_are_refused(family, field, value, named):
    family_name = {'poolformer': 'PoolFormer', 'spectformer': 'SpectFormer'}[family]
    with pytest.raises(PruneError, match=rf'{family_name} models are pruned in their MLP hidden widths only '
                                         rf'\(the residual width, heads, qk and v stay fixed\); {named}'):
        NViTPruner(_model(family), _cfg(**{field: value}), lut=None, device=torch.device('cpu'))


def test_unreachable_target_and_other_models_raise_with_a_reason():
    with pytest.raises(PruneError, match=r'the gmacs target 0.1 cannot be reached: with every prunable layer at its '
                                         r'minimum \(PoolFormer models prune MLP widths only\) the model keeps 0\.'):
        NViTPruner(_model('poolformer'), _cfg(target_gmacs=0.1), lut=None, device=torch.device('cpu'))
    with torch.device('meta'):
        timm_pool = timm.create_model('poolformer_s12')
    with pytest.raises(PruneError, match='works on deitlab DeiT models, not MetaFormer; .*PoolFormer and SpectFormer'):
        check_prunable(timm_pool)
    sigmoid = _model('poolformer')
    sigmoid.stages[1].blocks[0].mlp.act = nn.Sigmoid()
    with pytest.raises(PruneError, match=r'block stages.1.blocks.0: the MLP activation Sigmoid is not 0 at 0'):
        Masks(sigmoid)
    normed = _model('spectformer')
    normed.blocks[2].mlp.norm = nn.LayerNorm(256)
    with pytest.raises(PruneError, match='an MLP with a norm between fc1 and fc2 is not supported'):
        densify(normed, None)
