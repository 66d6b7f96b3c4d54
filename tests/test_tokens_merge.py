"""deitlab.tokens merge machinery: schedules and their closed-form GMACs, exactness of proportional
attention on duplicate tokens, bipartite matching and the MCTF criteria."""

import pytest
import torch
import torch.nn.functional as F

# importing deitlab registers the deitlab_* model names with timm
from deitlab.bench import analytic_gmacs, analytic_macs, count_gmacs
from deitlab.tokens import (apply_mctf, apply_tome, fusion_gmacs, fusion_macs, mctf_fast_layers, parse_r,
                            token_schedule)
from deitlab.tokens.mctf import (POOLINGS, fuse_attention, fuse_tokens, fusion_weights, mctf_scores)
from deitlab.tokens.merge import bipartite_plan, cosine_scores, merge_weighted
from deitlab.layers.attention import attend, attention_output, attention_probs, project

from _tokens_helpers import (_ab_positions, _apply, _duplicate_pairs, _groups, _images, _log_bias, _logits,
                             MCTF_MODE, _meta, METHODS, _model, _paired_images, _source, _tokens, _tokens_in)


# ---------------------------------------------------------------------------------------------
# 2. Schedules
# ---------------------------------------------------------------------------------------------

def test_mctf_r16_schedule():
    s = token_schedule(197, 12, 16, method='mctf', layers=range(1, 12))
    assert _tokens_in(s) == [197, 197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37]
    assert s[-1]['tokens_out'] == 21
    assert [b['r'] for b in s] == [0] + [16] * 11
    assert all(b['tokens_out'] == b['tokens_in'] - b['r'] for b in s)


def test_mctf_fast_schedule():
    assert mctf_fast_layers(12) == [3, 6, 9]
    assert mctf_fast_layers(4) == [1, 2, 3]
    s = token_schedule(197, 12, 0.35, method='mctf', layers=mctf_fast_layers(12))
    assert _tokens_in(s) == [197] * 4 + [129] * 3 + [85] * 3 + [56] * 2
    assert s[-1]['tokens_out'] == 56


def test_apply_mctf_and_apply_tome_defaults_give_the_paper_schedules():
    for fast, expected in ((False, [197, 197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]),
                           (True, [197] * 4 + [129] * 3 + [85] * 3 + [56] * 3)):
        model = apply_mctf(_meta('deit_tiny_patch16_224'), fast=fast)
        plan = model.token_fusion.schedule(197, 12)
        assert _tokens_in(plan) + [plan[-1]['tokens_out']] == expected
    model = apply_tome(_meta('deit_tiny_patch16_224'), r=13)
    assert model.token_fusion.schedule(197, 12)[-1]['tokens_out'] == 41


def test_tome_r13_ends_at_41():
    s = token_schedule(197, 12, 13, method='tome')
    assert [b['r'] for b in s] == [13] * 12 and s[-1]['tokens_out'] == 41


def test_r_inflect_forms_match_tomes_parse_r():
    # ToMe: from int(r (1 - inflect)) to 2 r - that, linearly over the blocks, truncated
    assert parse_r(12, (8, -1)) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert parse_r(12, (8, 1)) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    assert parse_r(12, (8, 0.5)) == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]
    assert parse_r(12, (8, 0)) == parse_r(12, 8) == [8] * 12
    assert parse_r(1, (8, -1)) == [16]
    s = token_schedule(197, 12, (8, -1))
    assert [b['r'] for b in s] == parse_r(12, (8, -1))
    assert s[-1]['tokens_out'] == 197 - 91


def test_r_lists_are_padded_and_layers_select_blocks():
    assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
    assert parse_r(4, (3, 2, 1)) == [3, 2, 1, 0]   # a tuple that is not (r, inflect) is a list
    assert parse_r(3, []) == [0, 0, 0]
    assert parse_r(3, 0.25) == [0.25] * 3
    assert [b['r'] for b in token_schedule(65, 4, [3, 2])] == [3, 2, 0, 0]
    assert [b['r'] for b in token_schedule(65, 4, 8, layers=[3, 1, 1])] == [0, 8, 0, 8]
    assert [b['r'] for b in token_schedule(65, 3, [0.5, 4, 0.25])] == [32, 4, 7]   # fractions per block


def test_schedule_clamps():
    # half cap: r <= (T - p) // 2, for both methods
    assert [b['r'] for b in token_schedule(15, 3, 8, method='tome')] == [7, 3, 2]
    assert [b['r'] for b in token_schedule(15, 3, 8, protected=2, method='tome')] == [6, 3, 2]
    # MCTF keeps T - r >= 10 before the half cap
    assert [b['r'] for b in token_schedule(15, 3, 8, method='mctf')] == [5, 0, 0]
    assert [b['r'] for b in token_schedule(30, 3, 8, method='mctf')] == [8, 8, 4]
    assert [b['tokens_out'] for b in token_schedule(9, 2, 3, method='mctf')] == [9, 9]
    # fractions of the non-protected tokens are floored: int(196 * 0.35) = 68, int(48 * 0.01) = 0
    assert token_schedule(197, 1, 0.35, method='mctf')[0]['r'] == 68
    assert token_schedule(49, 1, 0.01, method='mctf')[0]['r'] == 0
    assert token_schedule(197, 1, 0.99, method='tome')[0]['r'] == 98   # then the half cap
    # a model patched with a huge r still runs, at the clamped schedule
    model = apply_tome(_model(), r=1000)
    _logits(model, _images(model))
    assert model.token_fusion.last['tokens'] == [65, 33, 17, 9]


@pytest.mark.parametrize('args,match', [
    ((0, 8), 'depth must be >= 1'),
    ((12, True), 'r must be a number'),
    ((12, -1), 'non-negative number'),
    ((12, float('nan')), 'non-negative number'),
    ((12, 'eight'), 'non-negative number'),
    ((12, (8, 2)), r'inflection .* must be in \[-1, 1\]'),
    ((12, (0.5, 0)), 'needs an integer r'),
    ((2, [1, 2, 3]), 'has 3 entries but the model has 2 blocks'),
    ((3, [1, -2]), 'non-negative numbers'),
    ((3, [1, 'x']), 'non-negative numbers'),
])
def test_parse_r_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        parse_r(*args)


def test_token_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match=r'active layers \[3, 5\] are out of range for a model with 3 blocks'):
        token_schedule(65, 3, 8, layers=[0, 3, 5])
    with pytest.raises(ValueError, match="method must be one of"):
        token_schedule(65, 3, 8, method='ToMe')


# ---------------------------------------------------------------------------------------------
# 3. GMACs: published figures, and the closed form equals the counted forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,method,r,layers,expected', [
    ('deit_tiny_patch16_224', 'tome', 0, None, 1.258),
    ('deit_small_patch16_224', 'tome', 0, None, 4.608),
    ('deit_tiny_patch16_224', 'mctf', 16, range(1, 12), 0.709),
    ('deit_tiny_patch16_224', 'mctf', 0.35, [3, 6, 9], 0.748),
    ('deit_small_patch16_224', 'mctf', 16, range(1, 12), 2.602),
    ('deit_small_patch16_224', 'mctf', 0.35, [3, 6, 9], 2.756),
    ('deit_small_patch16_224', 'tome', 13, None, 2.708),
], ids=['T', 'S', 'T-mctf16', 'T-mctf-fast', 'S-mctf16', 'S-mctf-fast', 'S-tome13'])
def test_fvcore_gmacs_reproduce_the_papers(name, method, r, layers, expected):
    model = _meta(name)
    gmacs = fusion_gmacs(model, token_schedule(197, 12, r, method=method, layers=layers), method,
                         convention='fvcore')
    assert abs(gmacs - expected) < 0.005
    if r == 0:
        assert gmacs == analytic_gmacs(model, convention='fvcore')


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('kind', ['vit', 'distilled', 'scale_norms', 'registers', 'nvit'])
def test_counted_gmacs_equal_the_closed_form(kind, method):
    model = _apply(_model(kind), method, 9)
    schedule = model.token_fusion.schedule(_tokens(model), len(model.blocks))
    assert sum(s['r'] for s in schedule) > 9
    closed = fusion_gmacs(model, schedule, method.split('-')[0], MCTF_MODE.get(method, 'one_step_ahead'))
    assert count_gmacs(model) == closed == model.token_fusion.gmacs(model)
    assert closed < analytic_gmacs(model) or method == 'mctf-previous'


@pytest.mark.parametrize('convention', ['matmul', 'fvcore'])
@pytest.mark.parametrize('kind', ['vit', 'distilled', 'qk_norm', 'scale_norms', 'registers', 'nvit'])
def test_fusion_macs_at_r0_equal_analytic_macs(kind, convention):
    model = _model(kind)
    schedule = token_schedule(_tokens(model), len(model.blocks), 0)
    for method, mode in (('tome', 'one_step_ahead'), ('mctf', 'one_step_ahead'), ('mctf', 'precise')):
        macs = fusion_macs(model, schedule, method, mode, convention=convention)
        assert macs['total'] == analytic_macs(model, convention=convention)['total']


def test_fusion_macs_rejects_bad_input():
    model = _model()
    schedule = token_schedule(65, 3, 8)
    with pytest.raises(ValueError, match='the schedule has 2 blocks, the model 3'):
        fusion_macs(model, schedule[:2])
    with pytest.raises(ValueError, match='the schedule starts at 66 tokens, the model has 65'):
        fusion_macs(model, token_schedule(66, 3, 8))
    with pytest.raises(ValueError, match='mode must be one of'):
        fusion_macs(model, schedule, 'mctf', 'ahead')
    with pytest.raises(ValueError, match='method must be one of'):
        fusion_macs(model, schedule, 'ToMe')


# ---------------------------------------------------------------------------------------------
# 5. Exactness of proportional attention on duplicate tokens
# ---------------------------------------------------------------------------------------------

# positions (A token, B token) of duplicates in a 1 + 14-token sequence (A: even, B: odd positions)
DUPLICATES = [(2, 1), (6, 9), (12, 13)]
PAIRS = {tuple(sorted(d)) for d in DUPLICATES}


def _duplicate_setup(seed: int = 0):
    """An attention layer, tokens (2, 15, 48) with the DUPLICATES pairs, integer sizes as after
    earlier merges, and the plan that merges those pairs (ToMe's rule on the tokens)."""
    attn = _model().blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    x = _duplicate_pairs(torch.randn(2, 15, 48, generator=g), DUPLICATES)
    size = torch.randint(1, 4, (2, 15, 1), generator=g).float()
    size[:, 0] = 1
    plan = bipartite_plan(cosine_scores(x, 1), len(DUPLICATES), 1)
    assert _groups(_source(plan, 2, 15), 0) == _groups(_source(plan, 2, 15), 1) == PAIRS   # exactly the copies
    return attn, x, size, plan


def _attention(attn, x, size, prop_attn=True):
    """Per-token output of the attention layer with the ``+ log s`` bias over keys."""
    q, k, v = project(attn, x)
    return attention_output(attn, attend(attn, q, k, v, _log_bias(x, size) if prop_attn else None), x)


@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
def test_merging_duplicates_with_log_size_leaves_attention_outputs_unchanged(fused):
    attn, x, size, plan = _duplicate_setup()
    attn.fused_attn = fused
    with torch.no_grad():
        full = _attention(attn, x, size)
        merged_x, merged_size = merge_weighted(plan, x, size), plan.merge(size, 'sum')
        merged = _attention(attn, merged_x, merged_size)
        assert merged.shape == (2, 15 - len(DUPLICATES), 48)
        # each merged group is a token and its copy, so its output is either one's
        assert torch.allclose(merged, merge_weighted(plan, full, size), atol=1e-6)
        # without the bias a merged pair counts once instead of twice: outputs change
        assert not torch.allclose(_attention(attn, merged_x, merged_size, False), merged, atol=1e-3)


@pytest.mark.parametrize('pooling', POOLINGS)
def test_fused_attention_map_equals_the_recomputed_map_on_duplicates(pooling):
    attn, x, size, _ = _duplicate_setup()
    with torch.no_grad():
        plan = bipartite_plan(mctf_scores(x, None, None, 1, 1.0, 0, 0), len(DUPLICATES), 1, bidirectional=True)
        source = _source(plan, 2, 15)
        assert plan.r == len(DUPLICATES) and _groups(source, 0) == _groups(source, 1) == PAIRS
        a = attention_probs(attn, *project(attn, x, 'qk'), _log_bias(x, size))
        w = fusion_weights(a, size, pooling)
        fused = fuse_attention(plan, a, w, pooling)
        fx, fsize = fuse_tokens(plan, x, w, pooling), plan.merge(size, 'sum')
        again = attention_probs(attn, *project(attn, fx, 'qk'), _log_bias(fx, fsize))
        assert fused.shape == again.shape == (2, 3, 12, 12)
        assert torch.allclose(fused, again, atol=1e-6)
        assert torch.allclose(fx, merge_weighted(plan, x, size), atol=1e-6)   # copies fuse to themselves


@pytest.mark.parametrize('bidirectional', [False, True])
@pytest.mark.parametrize('pooling', POOLINGS)
def test_fused_attention_rows_sum_to_one(pooling, bidirectional):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 15, 48, generator=g)
    size = torch.randint(1, 5, (2, 15, 1), generator=g).float()
    a = torch.randn(2, 3, 15, 15, generator=g).mul(3).softmax(-1)
    plan = bipartite_plan(mctf_scores(x, a, size, 1), 5, 1, bidirectional)
    fused = fuse_attention(plan, a, fusion_weights(a, size, pooling), pooling)
    assert fused.shape == (2, 3, 10, 10)
    if pooling == 'max':   # query rows are max-pooled, not averaged: only the key sums keep rows at 1
        assert torch.allclose(plan.merge(a, 'sum', dim=-1).sum(-1), torch.ones(2, 3, 15))
        assert (fused.sum(-1) >= 1 - 1e-6).all()
    else:
        assert torch.allclose(fused.sum(-1), torch.ones(2, 3, 10), atol=1e-6)


@pytest.mark.parametrize('pooling', POOLINGS)
def test_fusion_equals_its_source_matrix_form(pooling):
    """With S the (T', T) 0/1 source matrix of a plan and w the fusion weights: tokens fuse to
    S (w x) / S w, the map to S diag(w) (A S^T) / S w (key columns summed, query rows averaged
    with w); 'max' takes the group maximum instead of the weighted mean."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 15, 6, generator=g)
    size = torch.randint(1, 5, (2, 15, 1), generator=g).float()
    a = torch.randn(2, 3, 15, 15, generator=g).mul(3).softmax(-1)
    plan = bipartite_plan(mctf_scores(x, a, size, 1), 5, 1, bidirectional=True)
    w = fusion_weights(a, size, pooling)
    expected_w = {'attn_size': a.mean(dim=(1, 2))[..., None] * size / size.amax(1, keepdim=True), 'size': size}
    assert torch.allclose(w, expected_w.get(pooling, torch.ones_like(size)))
    S = _source(plan, 2, 15)
    keys = a @ S[:, None].transpose(-1, -2)                            # (2, 3, 15, 10)
    if pooling == 'max':
        groups = [[S[b, i].bool() for i in range(10)] for b in range(2)]
        tokens = torch.stack([torch.stack([x[b, m].amax(0) for m in groups[b]]) for b in range(2)])
        amap = torch.stack([torch.stack([keys[b][:, m].amax(1) for m in groups[b]], 1) for b in range(2)])
    else:
        tokens = (S @ (w * x)) / (S @ w)
        amap = (S[:, None] @ (w[:, None] * keys)) / (S @ w)[:, None]
    assert torch.allclose(fuse_tokens(plan, x, w, pooling), tokens, atol=1e-6)
    assert torch.allclose(fuse_attention(plan, a, w, pooling), amap, atol=1e-6)


@pytest.mark.parametrize('method', METHODS)
def test_model_merging_duplicate_patches_keeps_the_logits(method):
    """End to end: with the position embedding zeroed, images whose patches come in identical
    pairs give duplicate tokens; merging exactly those pairs (r = 8 in one block) with
    proportional attention is exact, so the logits equal the unpatched model's."""
    model = _model()
    with torch.no_grad():
        model.pos_embed.zero_()
    x = _paired_images(model, 8)
    ref = _logits(model, x)
    options = {} if method == 'tome' else dict(tau_info=0, tau_size=0)   # MCTF: similarity only
    _apply(model, method, 8, layers=[1], trace_source=True, **options)
    out = _logits(model, x)
    last = model.token_fusion.last
    assert last['tokens'][-1] == 65 - 8
    assert _groups(last['source']) == {(2 * m + 1, 2 * m + 2) for m in range(8)}   # patches 2m, 2m+1 after CLS
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    model.token_fusion.prop_attn = False
    assert not torch.allclose(_logits(model, x), ref, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# 6. Matching
# ---------------------------------------------------------------------------------------------

def _reference_slots(scores: torch.Tensor, r: int, p: int, bidirectional: bool) -> torch.Tensor:
    """The matching as documented, written out per sample with lists: the output position of
    every input token. One pass: the r A tokens with the best edges go into their best B token;
    output [protected, kept A ascending, every B]. Two passes: r // 2 that way, then every B
    token (with what it absorbed) picks its best kept A token on the same scores and the
    r - r // 2 best go there; output [protected, kept A ascending, kept B by score descending]."""
    B, n_a, n_b = scores.shape
    pos_a, pos_b = (t[0, :, 0].tolist() for t in _ab_positions(p + n_a + n_b, p))
    r1 = r // 2 if bidirectional else r
    out = []
    for s in scores.tolist():
        best_b = [max(range(n_b), key=row.__getitem__) for row in s]
        by_edge = sorted(range(n_a), key=lambda i: -s[i][best_b[i]])
        src, kept_a = by_edge[:r1], sorted(by_edge[r1:])
        a_groups = [[pos_a[i]] for i in kept_a]
        b_groups = [[pos_b[j]] + [pos_a[i] for i in src if best_b[i] == j] for j in range(n_b)]
        if bidirectional:
            best_a = [max(range(len(kept_a)), key=lambda k: s[kept_a[k]][j]) for j in range(n_b)]
            by_edge2 = sorted(range(n_b), key=lambda j: -s[kept_a[best_a[j]]][j])
            for j in by_edge2[:r - r1]:
                a_groups[best_a[j]] += b_groups[j]
            b_groups = [b_groups[j] for j in by_edge2[r - r1:]]
        slot = [0] * (p + n_a + n_b)
        for k, group in enumerate([[i] for i in range(p)] + a_groups + b_groups):
            for t in group:
                slot[t] = k
        out.append(slot)
    return torch.tensor(out)


@pytest.mark.parametrize('p', [0, 1, 2, 3])
@pytest.mark.parametrize('r', [1, 2, 5, 6])
@pytest.mark.parametrize('bidirectional', [False, True], ids=['one_pass', 'two_passes'])
def test_bipartite_plan_follows_the_documented_matching(bidirectional, r, p):
    B, T = 3, p + 13
    pa, pb = _ab_positions(T, p)
    scores = torch.randn(B, pa.shape[1], pb.shape[1], generator=torch.Generator().manual_seed(r + 10 * p))
    plan = bipartite_plan(scores, r, p, bidirectional)
    assert plan.r == r and plan.tokens == T - r
    assert torch.equal(plan.slot, _reference_slots(scores, r, p, bidirectional))
    # exactly r tokens gone, every output a group of inputs, protected tokens first and alone
    assert torch.equal(_source(plan, B, T).sum(1), torch.ones(B, T))
    assert torch.equal(plan.merge(torch.ones(B, T, 1)).sum(1), torch.full((B, 1), float(T)))
    assert plan.merge(torch.randn(B, T, 4)).shape == (B, T - r, 4)
    assert torch.equal(plan.slot[:, :p], torch.arange(p).expand(B, p))
    assert ((plan.slot[:, p:] >= p)).all()


@pytest.mark.parametrize('scores_shape,r,bidirectional', [
    ((1, 3, 4), 4, False), ((1, 3, 4), -1, False), ((1, 3, 4), 4, True), ((1, 0, 1), 1, False),
    ((1, 1, 0), 1, True)])
def test_bipartite_plan_rejects_impossible_r(scores_shape, r, bidirectional):
    p = 1 if scores_shape[1] <= scores_shape[2] else 0   # A is the smaller set after an odd prefix
    with pytest.raises(ValueError, match=f'cannot merge r={r} tokens between sets of'):
        bipartite_plan(torch.zeros(scores_shape), r, p, bidirectional)


@pytest.mark.parametrize('tau_sim', [1.0, 0.5])
@pytest.mark.parametrize('p', [1, 2])
def test_mctf_scores_without_info_and_size_pick_the_tome_pairs(p, tau_sim):
    g = torch.Generator().manual_seed(p)
    x = torch.randn(2, 31, 8, generator=g)
    a = torch.randn(2, 3, 31, 31, generator=g).softmax(-1)
    size = torch.randint(1, 5, (2, 31, 1), generator=g).float()
    ours = bipartite_plan(mctf_scores(x, a, size, p, tau_sim, 0, 0), 9, p, bidirectional=False)
    tome = bipartite_plan(cosine_scores(x, p), 9, p)
    assert torch.equal(ours.slot, tome.slot)


def test_mctf_scores_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    T, taus = 9, (0.5, 2.0, 4.0)
    x = torch.randn(2, T, 6, generator=g, dtype=torch.float64)
    a = torch.randn(2, 2, T, T, generator=g, dtype=torch.float64).softmax(-1)
    size = torch.randint(1, 4, (2, T, 1), generator=g).double()
    W = mctf_scores(x, a, size, 1, *taus)
    recv = a.mean(dim=(1, 2))
    for b in range(2):
        for i, pa in enumerate(range(2, T, 2)):
            for j, pb in enumerate(range(1, T, 2)):
                sim = (1 + F.cosine_similarity(x[b, pa], x[b, pb], dim=0)) / 2
                info = recv[b].min() ** 2 / (recv[b, pa] * recv[b, pb])        # (1/a)/max(1/a) per token
                sz = size[b].min() ** 2 / (size[b, pa, 0] * size[b, pb, 0])
                expected = sim ** (1 / taus[0]) * info ** (1 / taus[1]) * sz ** (1 / taus[2])
                assert torch.allclose(W[b, i, j], expected, rtol=1e-12), (b, i, j)


def test_mctf_criteria_monotonicity_and_off_switch():
    """Two B tokens with identical features (positions 3 and 5) that differ only in attention
    received, or only in size: the less attended / smaller one gets the higher edge from every A
    token, and turning the criterion off (tau = 0) makes the two edges equal."""
    g = torch.Generator().manual_seed(1)
    x = _duplicate_pairs(torch.randn(1, 11, 8, generator=g), [(5, 3)])
    a = torch.rand(1, 2, 11, 11, generator=g) + 0.5
    a[..., 3], a[..., 5] = 0.2, 0.6          # token 3 receives less attention than token 5
    ones = torch.ones(1, 11, 1)
    j3, j5 = 1, 2                             # B indices of positions 3 and 5
    w = mctf_scores(x, a, ones, 1, 1.0, 20.0, 40.0)
    assert (w[0, :, j3] > w[0, :, j5]).all()
    w = mctf_scores(x, a, ones, 1, 1.0, 0, 40.0)
    assert torch.equal(w[0, :, j3], w[0, :, j5])
    size = ones.clone()
    size[0, 3], size[0, 5] = 2, 5             # token 3 is smaller
    flat = torch.ones(1, 2, 11, 11)
    w = mctf_scores(x, flat, size, 1, 1.0, 20.0, 40.0)
    assert (w[0, :, j3] > w[0, :, j5]).all()
    w = mctf_scores(x, a, size, 1, 1.0, 20.0, 0)
    assert (w[0, :, j3] > w[0, :, j5]).all()   # attention still counts
    w = mctf_scores(x, flat, size, 1, 1.0, 20.0, 0)
    assert torch.equal(w[0, :, j3], w[0, :, j5])
    # the same on the A side: positions 4 and 8 identical, 4 less attended and smaller
    x = _duplicate_pairs(torch.randn(1, 11, 8, generator=g), [(4, 8)])
    a = torch.rand(1, 2, 11, 11, generator=g) + 0.5
    a[..., 4], a[..., 8] = 0.3, 0.9
    size = ones.clone()
    size[0, 4], size[0, 8] = 1, 3
    i4, i8 = 1, 3
    for taus, higher in (((1.0, 20.0, 40.0), True), ((1.0, 0, 40.0), True), ((1.0, 20.0, 0), True),
                         ((1.0, 0, 0), False)):
        w = mctf_scores(x, a, size, 1, *taus)
        assert ((w[0, i4] > w[0, i8]).all() if higher else torch.equal(w[0, i4], w[0, i8])), taus
    # tau_sim = 0: similarity off, every edge 1 without other criteria
    assert torch.equal(mctf_scores(x, a, size, 1, 0, 0, 0), torch.ones(1, 5, 5))
