"""Structural pruning: the latency table and the global ranking of groups."""
import json
import math

import numpy as np
import pytest
import timm
import torch

from deitlab.prune import build_latency_table, default_grid, LatencyTable, Masks, PruneError, rank_groups
from deitlab.prune.latency import AXES, FORMAT
from deitlab.prune.ranking import remove_group
from _prune_helpers import _model, _unit, BLOCK_KINDS, PICO


# ---------------------------------------------------------------------------------------------
# 6. Latency table
# ---------------------------------------------------------------------------------------------

GRID = dict(emb=[4, 8, 16], heads=[1, 2, 4], qk=[2, 4, 8], v=[2, 8], mlp=[8, 32, 64])


def _f(emb, heads, qk, v, mlp):
    return 1 + 2 * emb + 3 * heads + 0.5 * qk + 0.25 * v + 0.1 * mlp + 0.01 * emb * mlp


def _other(emb):
    return 0.5 + 0.1 * emb


def _table(meta=None) -> LatencyTable:
    block = np.zeros([len(GRID[k]) for k in AXES])
    for idx in np.ndindex(*block.shape):
        block[idx] = _f(*(GRID[k][j] for k, j in zip(AXES, idx)))
    return LatencyTable(GRID, block, GRID['emb'], [_other(e) for e in GRID['emb']], meta)


WIDTHS = dict(embed_dim=12, num_heads=[3, 2], qk_dim=[5, 2], v_dim=[7, 3], mlp_hidden=[20, 50])


def test_latency_table_is_exact_at_nodes_and_for_multilinear_functions():
    lut = _table()
    for idx in np.ndindex(*[len(GRID[k]) for k in AXES]):
        point = [GRID[k][j] for k, j in zip(AXES, idx)]
        assert lut.block(*point) == pytest.approx(_f(*point), rel=1e-12, abs=1e-12)
    g = np.random.default_rng(0)
    for _ in range(50):
        point = [float(g.uniform(min(GRID[k]), max(GRID[k]))) for k in AXES]
        assert lut.block(*point) == pytest.approx(_f(*point), rel=1e-10)
    for e in (4, 6, 9.5, 16):
        assert lut.other(e) == pytest.approx(_other(e))


def test_latency_table_model_ms_and_unit_savings():
    lut = _table()
    w = WIDTHS
    E = w['embed_dim']
    rows = list(zip(w['num_heads'], w['qk_dim'], w['v_dim'], w['mlp_hidden']))
    assert lut.model_ms(w) == pytest.approx(_other(E) + sum(_f(E, *r) for r in rows), rel=1e-10)
    s = lut.unit_savings(w)
    assert s['emb'] == pytest.approx(_other(E) - _other(E - 1) + sum(_f(E, *r) - _f(E - 1, *r) for r in rows))
    for b, (h, q, v, m) in enumerate(rows):
        base = _f(E, h, q, v, m)
        assert s['head'][b] == pytest.approx(base - _f(E, h - 1, q, v, m))
        assert s['qk'][b] == pytest.approx(base - _f(E, h, q - 1, v, m))
        assert s['v'][b] == pytest.approx(base - _f(E, h, q, v - 1, m))
        assert s['mlp'][b] == pytest.approx(base - _f(E, h, q, v, m - 1))
    flat = [s['emb']] + [x for k in BLOCK_KINDS for x in s[k]]
    assert all(x > 0 for x in flat)
    # a layer down to one unit saves nothing
    one = dict(embed_dim=8, num_heads=[1], qk_dim=[1], v_dim=[4], mlp_hidden=[1])
    s1 = lut.unit_savings(one)
    assert s1['head'] == [0.0] and s1['qk'] == [0.0] and s1['mlp'] == [0.0] and s1['v'][0] > 0


def test_latency_table_json_round_trip(tmp_path):
    lut = _table(meta=dict(tokens=65, device='test'))
    path = lut.save(tmp_path / 'sub' / 'lut.json')
    back = LatencyTable.load(path)
    assert back.axes == lut.axes and back.meta == lut.meta
    assert np.array_equal(back.block_ms, lut.block_ms)
    g = np.random.default_rng(1)
    for _ in range(10):
        point = [float(g.uniform(min(GRID[k]), max(GRID[k]))) for k in AXES]
        assert back.block(*point) == lut.block(*point)
    assert back.model_ms(WIDTHS) == lut.model_ms(WIDTHS)
    assert back.unit_savings(WIDTHS) == lut.unit_savings(WIDTHS)


def test_misalign_factors_price_blocks_with_widths_off_multiples_of_8(tmp_path):
    """``misalign`` prices widths off multiples of ALIGN (8) in ``model_ms``: a block pays the
    embedding's factor (interpolated in E) when E is off, times the largest factor of its inner
    widths that are off; aligned blocks and ``unit_savings`` (the pruner's finite differences) are
    untouched. Code that priced aligned widths, compounded the inner factors, read the embedding's
    factor at a node instead of between them, or lost the factors in the JSON, fails here."""
    from deitlab.prune.latency import ALIGN
    assert ALIGN == 8
    plain = _table()
    lut = _table()
    lut.misalign = dict(emb=[[16, 1.5], [8, 1.2]], qk=[[8, 1.2]], v=[[8, 1.1]], mlp=[[64, 1.05]])
    assert lut.misalign['emb'] == [[8, 1.2], [16, 1.5]]        # sorted by width
    w = dict(embed_dim=16, num_heads=[2, 2, 1, 1], qk_dim=[8, 5, 3, 8], v_dim=[8, 8, 7, 7],
             mlp_hidden=[32, 40, 20, 32])
    E = 16
    rows = list(zip(w['num_heads'], w['qk_dim'], w['v_dim'], w['mlp_hidden']))
    factors = [1.0, 1.2, 1.2, 1.1]     # 0 aligned; 1: qk 5; 2: qk 3, v 7, mlp 20 -> the largest; 3: v 7
    assert lut.model_ms(w) == pytest.approx(_other(E) + sum(f * _f(E, *r) for f, r in zip(factors, rows)), rel=1e-10)
    assert lut.unit_savings(w) == plain.unit_savings(w)
    # an embedding off the multiple prices every block, at its factor between the nodes 8 and 16
    w12 = dict(w, embed_dim=12)
    assert lut.misalign_factor(12, 8, 8, 32) == pytest.approx(1.35)
    assert lut.model_ms(w12) == pytest.approx(
        _other(12) + sum(1.35 * f * _f(12, *r) for f, r in zip(factors, rows)), rel=1e-10)
    assert lut.misalign_factor(5, 8, 8, 32) == pytest.approx(1.2)      # constant outside the measured widths
    aligned = dict(embed_dim=16, num_heads=[2], qk_dim=[8], v_dim=[8], mlp_hidden=[64])
    assert lut.model_ms(aligned) == plain.model_ms(aligned)
    back = LatencyTable.load(lut.save(tmp_path / 'lut.json'))
    assert back.misalign == lut.misalign and back.model_ms(w) == lut.model_ms(w)
    assert 'misalign' not in plain.to_dict()          # tables without factors keep their format
    with pytest.raises(PruneError, match='unknown axes'):
        LatencyTable(GRID, plain.block_ms, GRID['emb'], plain.other_ms, misalign=dict(heads=[[2, 1.1]]))


def test_latency_table_bad_files_and_shapes(tmp_path):
    with pytest.raises(PruneError, match='does not exist'):
        LatencyTable.load(tmp_path / 'missing.json')
    bad = tmp_path / 'bad.json'
    bad.write_text('{not json')
    with pytest.raises(PruneError, match='is not valid JSON'):
        LatencyTable.load(bad)
    other = tmp_path / 'other.json'
    d = _table().to_dict()
    d['format'] = 'something-else/2'
    other.write_text(json.dumps(d))
    with pytest.raises(PruneError, match=r"is not a deitlab latency table \(format 'something-else/2', expected"):
        LatencyTable.load(other)
    with pytest.raises(PruneError, match='latency table has shape'):
        LatencyTable(GRID, np.zeros((3, 3, 3, 2, 2)), [4], [1.0])
    with pytest.raises(PruneError, match='axis qk must be strictly increasing'):
        LatencyTable(dict(GRID, qk=[8, 4, 2]), _table().block_ms, [4], [1.0])


@pytest.mark.parametrize('content', ['[1, 2, 3]', json.dumps({'format': FORMAT})], ids=['list', 'no-axes'])
def test_latency_table_load_valid_json_of_wrong_shape_raises_prune_error(tmp_path, content):
    path = tmp_path / 'odd.json'
    path.write_text(content)
    with pytest.raises(PruneError):
        LatencyTable.load(path)


def test_default_grid_covers_every_width_the_model_can_be_pruned_to():
    model = timm.create_model(PICO)
    grid = default_grid(model)
    w = model.block_widths
    dense = dict(emb=model.embed_dim, heads=max(w['num_heads']), qk=max(w['qk_dim']), v=max(w['v_dim']),
                 mlp=max(w['mlp_hidden']))
    assert set(grid) == set(AXES)
    for k in AXES:
        assert grid[k] == sorted(set(grid[k])) and grid[k][0] >= 1 and grid[k][-1] == dense[k], k
    assert grid['heads'] == [1, 2] and grid['qk'][0] == 1 and grid['mlp'][0] == 1
    block = np.zeros([len(grid[k]) for k in AXES])
    LatencyTable(grid, block, grid['emb'], [0.0] * len(grid['emb'])).check_covers(model)


def test_build_latency_table_on_a_real_model():
    model = _model()
    grid = dict(emb=[16, 32], heads=[2, 4], qk=[4, 8], v=[3, 6], mlp=[32, 64])
    lut = build_latency_table(model, batch_size=2, grid=grid, passes=1, steps=1, progress=False)
    assert lut.block_ms.shape == (2, 2, 2, 2, 2)
    assert np.isfinite(lut.block_ms).all() and (lut.block_ms > 0).all()
    assert lut.other_emb == [16, 32] and all(math.isfinite(v) and v > 0 for v in lut.other_ms)
    assert lut.meta['tokens'] == 65 and lut.meta['batch_size'] == 2
    lut.check_covers(model)
    dense = dict(model.block_widths, embed_dim=model.embed_dim)
    ms = lut.model_ms(dense)
    assert math.isfinite(ms) and ms > 0
    s = lut.unit_savings(dense)
    assert len(s['head']) == len(s['mlp']) == 2 and math.isfinite(s['emb'])
    big = _model(embed_dim=48)
    with pytest.raises(PruneError, match='covers emb up to 32'):
        lut.check_covers(big)
    with pytest.raises(PruneError, match='measured with 65 tokens, the model has 50'):
        lut.check_covers(_model(img_size=28))


# ---------------------------------------------------------------------------------------------
# 7. Ranking
# ---------------------------------------------------------------------------------------------

ONES = dict(emb=1, head=1, qk=1, v=1, mlp=1)


def _random_scores(masks: Masks, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {'emb': torch.rand(masks.emb.numel(), generator=g) + 0.1}
    for kind in BLOCK_KINDS:
        out[kind] = [torch.rand(m.numel(), generator=g) + 0.1 for m in masks.block[kind]]
    return out


def _layer_sizes(masks):
    return {(k, b): int(masks.layer(k, b).sum()) for k, b in masks.layers()}


def test_rank_lam_zero_is_pure_saliency_order():
    model = _model()
    masks = Masks(model)
    scores = _random_scores(masks)
    groups = rank_groups(scores, None, masks, 0.0, ONES, ONES)
    sizes = _layer_sizes(masks)
    assert len(groups) == sum(n - 1 for n in sizes.values())
    mean = float(torch.cat([scores['emb']] + [t for k in BLOCK_KINDS for t in scores[k]]).mean())
    vals = [g.score for g in groups]
    assert vals == sorted(vals)
    for g in groups:
        assert g.score == pytest.approx(_unit(scores, g.kind, g.block, int(g.units[0])) / mean, rel=1e-6)
    # the globally least salient unit goes first
    best = min(((k, b, i) for (k, b) in sizes for i in range(sizes[(k, b)])), key=lambda u: _unit(scores, *u))
    first = groups[0]
    assert (first.kind, first.block, int(first.units[0])) == best
    # lam = 0 ignores latency savings; savings=None with lam > 0 too
    savings = dict(emb=5.0, head=[1.0, 2.0], qk=[0.1, 0.1], v=[0.2, 0.3], mlp=[0.5, 9.0])
    for s, lam in ((savings, 0.0), (None, 3.0)):
        again = rank_groups(scores, s, masks, lam, ONES, ONES)
        assert [(g.kind, g.block, g.units.tolist()) for g in again] == \
               [(g.kind, g.block, g.units.tolist()) for g in groups]


def test_rank_large_lam_puts_the_largest_latency_saving_first():
    model = _model()
    masks = Masks(model)
    scores = _random_scores(masks)
    savings = dict(emb=0.5, head=[1.0, 2.0], qk=[0.1, 0.1], v=[0.2, 0.3], mlp=[0.4, 9.0])
    groups = rank_groups(scores, savings, masks, 1e6, ONES, ONES)
    n = int(masks.block['mlp'][1].sum()) - 1
    assert all((g.kind, g.block) == ('mlp', 1) for g in groups[:n])
    assert (groups[n].kind, groups[n].block) == ('head', 1)
    # negative savings (timing noise) count as zero, not as a bonus
    savings_neg = dict(savings, v=[-50.0, 0.3])
    groups_neg = rank_groups(scores, savings_neg, masks, 1e6, ONES, ONES)
    assert all((g.kind, g.block) == ('v', 0) for g in groups_neg[-5:])
    mean = float(torch.cat([scores['emb']] + [t for k in BLOCK_KINDS for t in scores[k]]).mean())
    v0 = [g for g in groups_neg if (g.kind, g.block) == ('v', 0)]
    for g in v0:
        assert g.score == pytest.approx(float(scores['v'][0][g.units].sum()) / mean, rel=1e-6)


def test_rank_respects_group_sizes_and_min_keep():
    model = _model()
    masks = Masks(model)
    masks.block['mlp'][0][:10] = False       # already removed units are never offered again
    masks.emb[[0, 31]] = False
    scores = _random_scores(masks, seed=1)
    sizes = dict(emb=4, head=2, qk=3, v=2, mlp=16)
    keep = dict(emb=8, head=1, qk=2, v=3, mlp=20)
    groups = rank_groups(scores, None, masks, 0.0, sizes, keep)
    by_layer = {}
    for g in groups:
        assert g.units.numel() == sizes[g.kind]
        assert bool(masks.layer(g.kind, g.block)[g.units].all())
        by_layer.setdefault((g.kind, g.block), []).append(g)
    mean = float(torch.cat([scores['emb'][masks.emb]] + [t[m] for k in BLOCK_KINDS
                                                          for t, m in zip(scores[k], masks.block[k])]).mean())
    for (k, b), n in _layer_sizes(masks).items():
        gs = by_layer.get((k, b), [])
        assert len(gs) == (n - keep[k]) // sizes[k], (k, b)
        units = torch.cat([g.units for g in gs]) if gs else torch.zeros(0, dtype=torch.long)
        assert units.unique().numel() == units.numel()
        vals = scores[k] if b is None else scores[k][b]
        # groups of a layer are consecutive chunks of its units sorted by score
        chunks = [sorted(float(vals[u]) for u in g.units) for g in sorted(gs, key=lambda g: g.score)]
        for a, c in zip(chunks, chunks[1:]):
            assert a[-1] <= c[0]
        for g in gs:
            assert g.score == pytest.approx(float(vals[g.units].sum()) / mean, rel=1e-5)
    # removing everything offered leaves every layer at >= min_keep and < min_keep + one group
    for g in groups:
        remove_group(masks, g)
    for (k, b), n in _layer_sizes(masks).items():
        assert keep[k] <= n < keep[k] + sizes[k], (k, b, n)
    assert rank_groups(scores, None, masks, 0.0, sizes, keep) == []
    with pytest.raises(PruneError, match='group size of mlp must be >= 1'):
        rank_groups(scores, None, Masks(model), 0.0, dict(sizes, mlp=0), keep)


def test_rank_types_restricts_the_layers():
    model = _model()
    masks = Masks(model)
    groups = rank_groups(_random_scores(masks), None, masks, 0.0, ONES, ONES, types=('head', 'mlp'))
    assert {g.kind for g in groups} == {'head', 'mlp'}
