"""deitlab.tokens: ToMe and MCTF on tiny random-weight ViTs -- identity at r=0, schedules and their
closed-form GMACs, size/source conservation, exactness of proportional attention on duplicate
tokens, matching, batch independence, autograd, consistency training and unsupported models."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import Attention, ResPostBlock

# importing deitlab registers the deitlab_* model names with timm
from deitlab.bench import analytic_gmacs, analytic_macs, count_gmacs, resolve_input_size
from deitlab.tokens import (ConsistencyLoss, TokenFusionError, apply_mctf, apply_tome, fusion_gmacs, fusion_macs,
                            mctf_fast_layers, parse_r, remove_token_fusion, token_fusion_of, token_schedule)
from deitlab.tokens.mctf import (POOLINGS, ConsistencyOutput, fuse_attention, fuse_tokens, fusion_weights,
                                 mctf_scores)
from deitlab.tokens.merge import MergePlan, TokenState, bipartite_plan, cosine_scores, merge_weighted, split_ab
from deitlab.tokens.patch import attend, attention_output, attention_probs, project
from deitlab.train.distill import DistillationLoss

# ---------------------------------------------------------------------------------------------
# models, inputs and shared checks
# ---------------------------------------------------------------------------------------------

# 8x8 patches of 4 px + prefix tokens; 3 blocks of width 48 (3 heads of 16)
VIT = dict(img_size=32, patch_size=4, depth=3, embed_dim=48, num_heads=3, num_classes=10)
# NViT-style: every block has its own heads, q/k and v widths per head, and MLP width
NVIT = dict(num_heads=[3, 2, 1, 3, 2, 1], qk_dim=[32, 16, 8, 32, 24, 16], v_dim=[32, 8, 16, 24, 32, 16],
            mlp_hidden=[384, 100, 50, 200, 17, 384], num_classes=10)
MODELS = {
    'vit': ('vit_tiny_patch16_224', VIT),
    'distilled': ('deit_tiny_distilled_patch16_224', VIT),
    'layerscale': ('vit_tiny_patch16_224', dict(VIT, init_values=0.5)),
    'qk_norm': ('vit_tiny_patch16_224', dict(VIT, qk_norm=True)),
    'registers': ('vit_tiny_patch16_224', dict(VIT, reg_tokens=2)),
    'scale_norms': ('vit_tiny_patch16_224', dict(VIT, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True,
                                                 fc_norm=True)),
    'deitlab_distilled': ('deitlab_deit_pico_distilled_patch4_32', dict(img_size=28, in_chans=1, num_classes=10)),
    'nvit': ('deitlab_deit_nano_patch4_32', NVIT),
}
# 'mctf-precise' is MCTF with mode='precise', and so on
METHODS = ('tome', 'mctf', 'mctf-precise', 'mctf-previous')
MCTF_MODE = {'mctf': 'one_step_ahead', 'mctf-precise': 'precise', 'mctf-previous': 'previous'}


def _model(kind: str = 'vit', seed: int = 0, **kw) -> nn.Module:
    """A tiny model with random weights, perturbed so that zero-initialised biases and heads are not 0."""
    name, args = MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**args, **kw})
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _meta(name: str) -> nn.Module:
    """A full-size timm model built on the meta device (shapes only)."""
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False)


def _images(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *resolve_input_size(model), generator=torch.Generator().manual_seed(seed))


def _tokens(model: nn.Module) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def _apply(model: nn.Module, method: str, r, **kw) -> nn.Module:
    if method == 'tome':
        return apply_tome(model, r=r, **kw)
    return apply_mctf(model, r=r, mode=MCTF_MODE[method], **kw)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _ab_positions(T: int, p: int, batch: int = 1):
    """Positions (batch, n, 1) of the A and B tokens of a T-token sequence with p protected tokens."""
    pos = torch.arange(T).expand(batch, T)[..., None]
    return split_ab(pos, p)


def _source(plan: MergePlan, batch: int, T: int) -> torch.Tensor:
    """Which input tokens each output token holds, (batch, T - r, T) of 0/1."""
    return plan.merge(torch.eye(T).expand(batch, T, T), 'amax')


def _groups(source: torch.Tensor, b: int = 0) -> set:
    """The merged groups (input positions of every output token holding more than one) of sample b."""
    return {tuple(torch.nonzero(row)[:, 0].tolist()) for row in source[b] if row.sum() > 1}


def _log_bias(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The proportional-attention bias ``log s`` over keys for tokens x of the given sizes."""
    st = TokenState(x, 1)
    st.size = size
    return st.log_size_bias()


def _duplicate_pairs(x: torch.Tensor, pairs):
    """Copy token j onto token i for each (i, j) in pairs."""
    x = x.clone()
    for i, j in pairs:
        x[:, i] = x[:, j]
    return x


def _paired_images(model: nn.Module, pairs: int, batch: int = 2) -> torch.Tensor:
    """Images whose first ``pairs`` horizontal pairs of patches (row-major: patches 2m, 2m+1) are
    identical; with the position embedding zeroed, those patches are duplicate tokens, one in set
    A and one in set B (their positions differ by one)."""
    x = _images(model, batch)
    P = model.patch_embed.patch_size[0]
    cols = model.patch_embed.grid_size[1] // 2
    for m in range(pairs):
        r, c = divmod(m, cols)
        rows = slice(r * P, (r + 1) * P)
        x[..., rows, (2 * c + 1) * P:(2 * c + 2) * P] = x[..., rows, 2 * c * P:(2 * c + 1) * P]
    return x


class _CE(nn.Module):
    """Cross-entropy under the (inputs, outputs, targets) signature of the training losses."""

    def forward(self, inputs, outputs, targets):
        return F.cross_entropy(outputs, targets)


# ---------------------------------------------------------------------------------------------
# 1. Identity at r=0, and remove_token_fusion
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('kind', list(MODELS))
def test_r0_gives_the_unpatched_logits(kind, method):
    model = _model(kind)
    x = _images(model)
    ref = _logits(model, x)
    _apply(model, method, 0, trace_source=True)
    assert torch.equal(_logits(model, x), ref)
    last = model.token_fusion.last
    T = _tokens(model)
    assert last['tokens'] == [T] * (len(model.blocks) + 1)
    assert torch.equal(last['size'], torch.ones(2, T, 1))
    assert torch.equal(last['source'], torch.eye(T).expand(2, T, T))


@pytest.mark.parametrize('method', ['tome', 'mctf'])
@pytest.mark.parametrize('kind', ['vit', 'distilled', 'nvit'])
def test_remove_token_fusion_restores_class_and_logits(kind, method):
    model = _model(kind)
    cls, keys = type(model), list(model.state_dict())
    x = _images(model)
    ref = _logits(model, x)
    _apply(model, method, 8)
    assert token_fusion_of(model).method == method.split('-')[0]
    assert isinstance(model, cls) and list(model.state_dict()) == keys   # same checkpoint layout
    reduced = _logits(model, x)
    assert model.token_fusion.last['tokens'][-1] < _tokens(model)
    assert not torch.allclose(reduced, ref, atol=1e-3)
    assert remove_token_fusion(model) is model
    assert type(model) is cls and not hasattr(model, 'token_fusion') and token_fusion_of(model) is None
    assert torch.equal(_logits(model, x), ref)
    assert remove_token_fusion(model) is model   # a no-op on a plain model
    _apply(model, 'tome', 4)                      # and it can be patched again
    assert model.token_fusion.method == 'tome'


# ---------------------------------------------------------------------------------------------
# 2. Schedules
# ---------------------------------------------------------------------------------------------

def _tokens_in(schedule):
    return [s['tokens_in'] for s in schedule]


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
                         convention='fvcore', av='map')   # the paper fuses the map before A V
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
# 4. Conservation: sizes and the source map
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('kind', ['vit', 'distilled', 'registers', 'deitlab_distilled', 'nvit'])
def test_sizes_and_sources_partition_the_input(kind, method):
    model = _apply(_model(kind), method, 8, trace_source=True)
    x = _images(model, batch=3)
    out = _logits(model, x)
    assert out.shape == (3, 10)
    T0, p = _tokens(model), model.num_prefix_tokens
    last = model.token_fusion.last
    plan = model.token_fusion.schedule(T0, len(model.blocks))
    assert last['tokens'] == _tokens_in(plan) + [plan[-1]['tokens_out']]
    size, source = last['size'][..., 0], last['source']
    T = last['tokens'][-1]
    assert T < T0 and size.shape == (3, T) and source.shape == (3, T, T0)
    assert torch.equal(size.sum(1), torch.full((3,), float(T0)))
    assert size.min() >= 1
    assert torch.equal(source, (source > 0).float())                 # 0/1
    assert torch.equal(source.sum(1), torch.ones(3, T0))              # every input token in exactly one
    assert torch.equal(source.sum(2), size)
    # protected tokens (CLS, DIST, registers) stay first, in order, alone
    assert torch.equal(size[:, :p], torch.ones(3, p))
    assert torch.equal(source[:, :p], torch.eye(T0)[:p].expand(3, p, T0))


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


# ---------------------------------------------------------------------------------------------
# 7. Batch independence, determinism, bfloat16
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('kind', ['vit', 'distilled'])
def test_batch_independence_and_determinism(kind, method):
    model = _apply(_model(kind), method, 8, trace_source=True)
    x = _images(model, batch=4)
    out = _logits(model, x)
    source = model.token_fusion.last['source']
    assert torch.equal(_logits(model, x), out)
    assert torch.equal(model.token_fusion.last['source'], source)
    for i in range(4):
        alone = _logits(model, x[i:i + 1])
        assert torch.allclose(alone, out[i:i + 1], rtol=1e-5, atol=1e-5)
        assert torch.equal(model.token_fusion.last['source'][0], source[i])   # the same merges
    flipped = _logits(model, x.flip(0))
    assert torch.allclose(flipped, out.flip(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
@pytest.mark.parametrize('method', METHODS)
def test_bfloat16_runs_with_float32_bookkeeping(method, fused):
    model = _apply(_model(), method, 8, trace_source=True)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = _images(model)
    ref = _logits(model, x)
    out = _logits(model.to(torch.bfloat16), x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    last = model.token_fusion.last
    assert last['size'].dtype == last['source'].dtype == torch.float32
    assert torch.equal(last['size'].sum(1), torch.full((2, 1), 65.))
    assert torch.equal(last['source'].sum(1), torch.ones(2, 65))


# ---------------------------------------------------------------------------------------------
# 8. Autograd and consistency training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', METHODS)
def test_gradients_reach_every_parameter_and_every_patch(method):
    model = _apply(_model('vit', init_values=0.5, qk_norm=True), method, 8).train()
    x = _images(model).requires_grad_()
    out = model(x)
    assert model.token_fusion.last['tokens'][-1] < 65
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    patches = x.grad.abs().unfold(2, 4, 4).unfold(3, 4, 4).sum(dim=(1, 4, 5))   # (B, 8, 8)
    assert (patches > 0).all()   # merged-away patches still get gradient


def _consistency_model(r=8, r_teacher_max=4, kind='vit'):
    model = apply_mctf(_model(kind), r=r, r_teacher_max=r_teacher_max)
    return model, _images(model, batch=3)


def test_training_forward_returns_both_passes():
    model, x = _consistency_model()
    torch.manual_seed(0)
    out = model.train()(x)
    assert isinstance(out, ConsistencyOutput)
    assert out.r_teacher in range(4)
    assert out.student.shape == out.teacher.shape == (3, 10)
    assert out.student_cls.shape == out.teacher_cls.shape == (3, 48)
    assert out.student_cls.requires_grad and out.teacher.requires_grad and not out.teacher_cls.requires_grad
    assert model.token_fusion.r == 8   # the teacher's r' did not stick
    student = _logits(model, x)
    assert torch.allclose(out.student, student, atol=1e-6)
    model.token_fusion.r = out.r_teacher
    assert torch.allclose(out.teacher, _logits(model, x), atol=1e-6)
    assert isinstance(model(x), torch.Tensor)   # eval: plain logits
    model.token_fusion.r_teacher_max = 0
    assert isinstance(model.train()(x), torch.Tensor)   # consistency off


def test_r_teacher_draws():
    model = _consistency_model(r_teacher_max=4)[0]
    torch.manual_seed(0)
    assert {model.token_fusion.draw_r_teacher() for _ in range(200)} == {0, 1, 2, 3}
    model.token_fusion.r_teacher_max = 0.05
    assert {model.token_fusion.draw_r_teacher() for _ in range(200)} == {0, 0.01, 0.02, 0.03, 0.04}


@pytest.mark.parametrize('base', [_CE(), DistillationLoss(nn.CrossEntropyLoss())], ids=['ce', 'distillation_loss'])
def test_consistency_loss_is_two_ce_when_r_teacher_equals_r(base):
    model, x = _consistency_model()
    model.token_fusion.draw_r_teacher = lambda: 8
    y = torch.tensor([0, 3, 7])
    out = model.train()(x)
    assert out.r_teacher == 8 and torch.equal(out.student_cls, out.teacher_cls)
    loss = ConsistencyLoss(base, gate=0.0)
    value = loss(x, out, y)
    assert value == F.cross_entropy(out.student, y) + F.cross_entropy(out.teacher, y)
    assert loss.last['consistency'] == 0 and loss.last['gate_pass'] == 1 and loss.last['r_teacher'] == 8
    # and outside consistency training the loss is the base loss
    logits = model.eval()(x)
    assert loss(x, logits, y) == F.cross_entropy(logits, y)


def test_teacher_gets_no_gradient_from_the_consistency_term():
    model, x = _consistency_model()
    y = torch.tensor([0, 3, 7])
    torch.manual_seed(1)
    out = model.train()(x)
    params = list(model.parameters())
    total = ConsistencyLoss(_CE(), weight=3.0, gate=0.0)(x, out, y)
    got = torch.autograd.grad(total, params, retain_graph=True)
    # the same loss written out, the teacher's class token taken as a constant
    mse = ((out.student_cls - out.teacher_cls.detach()) ** 2).mean(1).mean()
    manual = F.cross_entropy(out.student, y) + F.cross_entropy(out.teacher, y) + 3.0 * mse
    expected = torch.autograd.grad(manual, params)
    assert mse > 0
    for (name, _), a, b in zip(model.named_parameters(), got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def _output(logits: torch.Tensor) -> ConsistencyOutput:
    """Student and teacher logits as given, random class tokens of width 6."""
    g = torch.Generator().manual_seed(0)
    B = logits.shape[0]
    return ConsistencyOutput(logits, logits, torch.randn(B, 6, generator=g), torch.randn(B, 6, generator=g), 2)


def test_consistency_gate_keeps_confident_samples_only():
    # sample 0: p(true) = 0.6 > 0.4 (kept); sample 1: p(true) = 0.2 (dropped)
    logits = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]).log()
    y = torch.tensor([0, 1])
    out = _output(logits)
    loss = ConsistencyLoss(_CE())
    value = loss(None, out, y)
    mse = ((out.student_cls - out.teacher_cls) ** 2).mean(1)
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(value, ce + ce + 3.0 * mse[0], rtol=1e-6)
    assert loss.last['gate_pass'] == 0.5 and math.isclose(loss.last['consistency'], float(mse[0]), rel_tol=1e-6)
    # no sample confident: CE + CE only
    value = loss(None, out, torch.tensor([1, 1]))
    assert value == 2 * F.cross_entropy(logits, torch.tensor([1, 1]))
    assert loss.last['gate_pass'] == 0 and loss.last['consistency'] == 0


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_consistency_loss_with_soft_targets(smoothing):
    # Mixup of classes 0 and 1 (0.7 / 0.3), optionally label-smoothed; the gate sums the mixed classes
    probs = torch.tensor([[0.3, 0.25, 0.25, 0.2], [0.1, 0.1, 0.4, 0.4]])   # 0.55 kept, 0.2 dropped
    logits = probs.log()
    mix = torch.tensor([0.7, 0.3, 0.0, 0.0])
    targets = (mix * (1 - smoothing) + smoothing / 4).expand(2, 4)
    out = _output(logits)
    base = DistillationLoss(SoftTargetCrossEntropy())
    loss = ConsistencyLoss(base)
    value = loss(None, out, targets)
    mse = ((out.student_cls - out.teacher_cls) ** 2).mean(1)
    ce = SoftTargetCrossEntropy()(logits, targets)
    assert torch.allclose(value, 2 * ce + 3.0 * mse[0], rtol=1e-6)
    assert loss.last['gate_pass'] == 0.5


def test_consistency_training_backward_runs():
    model, x = _consistency_model(kind='distilled')
    out = model.train()(x)
    ConsistencyLoss(_CE(), gate=0.0)(x, out, torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 9. Unsupported models and settings
# ---------------------------------------------------------------------------------------------

class _OtherAttention(Attention):
    pass


def _twice():
    return apply_tome(_model(), r=4)


def _custom_attention():
    model = _model()
    model.blocks[1].attn.__class__ = _OtherAttention
    return model


def _checkpointing():
    model = _model()
    model.set_grad_checkpointing()
    return model


@pytest.mark.parametrize('build,match', [
    (lambda: _model(global_pool='avg'), r"class-token pooling \(global_pool=\"token\"\); this model pools with 'avg'"),
    (lambda: _model(global_pool='map'), 'class-token pooling'),
    (lambda: _model(block_fn=ResPostBlock), 'block 0 is a ResPostBlock; token fusion supports timm Block'),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten()),
     'timm VisionTransformer / deitlab DeiT models, not Sequential'),
    (lambda: _model(patch_drop_rate=0.25), 'cannot be combined with patch dropout'),
    (_twice, r'already runs tome; call remove_token_fusion\(model\)'),
    (_custom_attention, 'block 1 uses _OtherAttention; token fusion supports timm Attention'),
    (_checkpointing, 'does not support gradient checkpointing'),
], ids=['avg_pool', 'map_pool', 'res_post_block', 'not_a_vit', 'patch_dropout', 'applied_twice', 'attention_class',
        'grad_checkpointing'])
@pytest.mark.parametrize('method', ['tome', 'mctf'])
def test_unsupported_models_raise(build, match, method):
    model = build()
    cls = type(model)
    with pytest.raises(TokenFusionError, match=match):
        _apply(model, method, 8)
    assert type(model) is cls   # left as it was


def test_bad_settings_raise():
    model = _apply(_model(), 'tome', 4)
    x = _images(model)
    with pytest.raises(TokenFusionError, match='cannot run with an attention mask'):
        model(x, attn_mask=torch.zeros(65, 65))
    for kw, match in ((dict(pooling='avg'), "pooling must be one of .*'attn_size'"),
                      (dict(mode='ahead'), "mode must be one of .*'one_step_ahead'"),
                      (dict(tau_info=-1.0), 'temperatures and r_teacher_max must be >= 0'),
                      (dict(r_teacher_max=-2), 'temperatures and r_teacher_max must be >= 0')):
        with pytest.raises(TokenFusionError, match=match):
            apply_mctf(_model(), **kw)
    with pytest.raises(TokenFusionError, match='MCTF-Fast needs at least 2 blocks, the model has 1'):
        mctf_fast_layers(1)
    with pytest.raises(ValueError, match=r'active layers \[7\] are out of range'):
        _logits(apply_tome(_model(), r=4, layers=[7]), x)
