"""Structural pruning: unit groups and masks, densify, masked LayerNorm, run-directory round trip, rounding."""
import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import deitlab.rundir
from deitlab.prune import densify, MaskedLayerNorm, Masks, PruneError, rounded_masks, use_masked_layernorm
from _prune_helpers import _capture, _logits, _model, _qkv_rows, _remove_some, _x, _zeroed, ATOL, BLOCK_KINDS


# ---------------------------------------------------------------------------------------------
# 1. Group completeness: one unit off silences exactly that channel / head / neuron
# ---------------------------------------------------------------------------------------------

UNITS = [('emb', None, 5), ('head', 0, 1), ('head', 1, 3), ('qk', 0, 2), ('qk', 1, 7), ('v', 0, 4), ('v', 1, 0),
         ('mlp', 0, 10), ('mlp', 1, 63)]


@pytest.mark.parametrize('distilled', [False, True], ids=['plain', 'distilled'])
@pytest.mark.parametrize('kind,block,i', UNITS)
def test_one_unit_zeroes_exactly_its_coupled_slices(kind, block, i, distilled):
    model = _model(distilled)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = Masks(model)
    masks.layer(kind, block)[i] = False
    masks.apply(model)
    zeroed = _zeroed(model, kind, block, i)
    for n, p in model.named_parameters():
        expected = torch.where(zeroed[n], torch.zeros_like(p), before[n])
        assert torch.equal(p.detach(), expected), f'{n}: wrong elements zeroed for {kind} unit {i} of block {block}'
        if zeroed[n].any():
            assert before[n][zeroed[n]].abs().min() > 0   # the test would see a missing zeroing
    assert sum(int(m.sum()) for m in zeroed.values()) > 0
    kept = masks.kept()
    widths = dict(model.block_widths, embed_dim=model.embed_dim)
    key = {'emb': 'embed_dim', 'head': 'num_heads', 'qk': 'qk_dim', 'v': 'v_dim', 'mlp': 'mlp_hidden'}[kind]
    if kind == 'emb':
        assert kept['embed_dim'] == widths['embed_dim'] - 1
    else:
        assert kept[key][block] == widths[key][block] - 1
        assert kept[key][1 - block] == widths[key][1 - block]


def test_emb_unit_silences_the_residual_channel_everywhere():
    c = 7
    for distilled in (False, True):
        model = _model(distilled)
        masks = Masks(model)
        masks.emb[c] = False
        masks.apply(model)
        outs = []
        handles = [_capture(model.patch_embed, outs)] + [_capture(b, outs) for b in model.blocks]
        handles.append(_capture(model.norm, outs))
        handles += [_capture(b.norm1, outs) for b in model.blocks]
        _logits(model, _x())
        for h in handles:
            h.remove()
        assert len(outs) == 2 + 2 * len(model.blocks)
        for t in outs:
            assert torch.equal(t[..., c], torch.zeros_like(t[..., c]))
            others = torch.cat([t[..., :c], t[..., c + 1:]], -1)
            assert (others != 0).float().mean() > 0.99


def _attn_io(model, b, x):
    """(qkv output, proj input, fc1 output, fc2 input) of block b."""
    qkv, proj_in, fc1, fc2_in = [], [], [], []
    blk = model.blocks[b]
    hs = [_capture(blk.attn.qkv, qkv), _capture(blk.attn.proj, proj_in, pre=True), _capture(blk.mlp.fc1, fc1),
          _capture(blk.mlp.fc2, fc2_in, pre=True)]
    _logits(model, x)
    for h in hs:
        h.remove()
    return qkv[0], proj_in[0], fc1[0], fc2_in[0]


@pytest.mark.parametrize('kind,i', [('head', 2), ('qk', 3), ('v', 5), ('mlp', 17)])
def test_block_unit_silences_its_activations_and_nothing_else(kind, i):
    b = 0   # block 0 sees the same input with and without the unit: the rest must be unchanged
    model = _model()
    x = _x()
    ref = _attn_io(model, b, x)
    masks = Masks(model)
    masks.layer(kind, b)[i] = False
    masks.apply(model)
    qkv, proj_in, fc1, fc2_in = _attn_io(model, b, x)
    attn = model.blocks[b].attn
    H, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    zero_cols = {'qkv': [], 'proj_in': [], 'fc1': [], 'fc2_in': []}
    if kind in ('head', 'qk', 'v'):
        q, k, v = _qkv_rows(attn, kind, i)
        zero_cols['qkv'] = q + k + v
    if kind == 'head':
        zero_cols['proj_in'] = list(range(i * dv, (i + 1) * dv))
    if kind == 'v':
        zero_cols['proj_in'] = [h * dv + i for h in range(H)]
    if kind == 'mlp':
        zero_cols['fc1'] = zero_cols['fc2_in'] = [i]
    for name, now, old in (('qkv', qkv, ref[0]), ('proj_in', proj_in, ref[1]), ('fc1', fc1, ref[2]),
                           ('fc2_in', fc2_in, ref[3])):
        cols = zero_cols[name]
        keep = [c for c in range(now.shape[-1]) if c not in cols]
        if cols:
            assert torch.equal(now[..., cols], torch.zeros_like(now[..., cols])), name
            assert old[..., cols].abs().min() > 0
        if kind == 'qk' and name in ('proj_in',):
            continue    # every head's scores change when a qk index goes (that is the point)
        if kind in ('head', 'qk', 'v') and name in ('fc1', 'fc2_in'):
            continue    # the attention output feeds the MLP
        assert torch.allclose(now[..., keep], old[..., keep], atol=1e-6), f'{name} changed outside the unit'
    if kind == 'qk':
        # q.k of every head no longer depends on index i: Q and K columns i are zero in every head
        qs, ks = qkv[..., :H * dq].unflatten(-1, (H, dq)), qkv[..., H * dq:2 * H * dq].unflatten(-1, (H, dq))
        assert torch.equal(qs[..., i], torch.zeros_like(qs[..., i]))
        assert torch.equal(ks[..., i], torch.zeros_like(ks[..., i]))
        # and the kept per-head q.k scores equal those of the other indices alone
        other = [j for j in range(dq) if j != i]
        scores = qs @ ks.transpose(-1, -2)
        assert torch.allclose(scores, qs[..., other] @ ks[..., other].transpose(-1, -2), atol=1e-6)


def test_apply_with_optimizer_zeroes_grads_and_adam_state():
    model = _model()
    model.train()
    masks = Masks(model)
    _remove_some(masks, ('emb', 'head', 'qk', 'v', 'mlp'), seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    x, y = _x(4), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    opt.step()                       # the Adam state exists and is non-zero
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pm = masks.param_masks(model)
    assert any(bool((p.grad[pm[n] == 0] != 0).any()) for n, p in model.named_parameters() if n in pm)
    masks.apply(model, opt)
    checked = 0
    for n, p in model.named_parameters():
        if n not in pm or bool(pm[n].all()):
            continue
        dead = pm[n] == 0
        st = opt.state[p]
        for t in (p.detach(), p.grad, st['exp_avg'], st['exp_avg_sq']):
            assert torch.equal(t[dead], torch.zeros_like(t[dead])), n
        assert p.grad[~dead].abs().sum() > 0
        checked += 1
    assert checked >= 10
    opt.step()                       # AdamW with weight decay keeps removed slices at zero
    for n, p in model.named_parameters():
        if n in pm:
            dead = pm[n] == 0
            assert torch.equal(p.detach()[dead], torch.zeros_like(p.detach()[dead])), n
            assert torch.equal(opt.state[p]['exp_avg'][dead], torch.zeros_like(p.detach()[dead])), n


def test_masks_state_dict_round_trip():
    model = _model()
    masks = Masks(model)
    _remove_some(masks, ('emb', 'head', 'qk', 'v', 'mlp'), seed=3)
    other = Masks(model)
    other.load_state_dict(masks.state_dict())
    assert other.kept() == masks.kept()
    for kind, b in masks.layers():
        assert torch.equal(other.layer(kind, b), masks.layer(kind, b))


# ---------------------------------------------------------------------------------------------
# 2. The masked model computes what the densified model computes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('distilled', [False, True], ids=['plain', 'distilled'])
@pytest.mark.parametrize('kinds', [('head',), ('qk',), ('v',), ('mlp',), BLOCK_KINDS], ids=lambda k: '+'.join(k))
def test_densify_equals_masked_model(kinds, distilled):
    model = _model(distilled)
    dense_scale = list(model.block_widths['attn_scale'])
    masks = Masks(model)
    _remove_some(masks, kinds)
    masks.apply(model)
    compact = densify(model, masks)
    assert type(compact) is type(model)
    assert dict(compact.block_widths, embed_dim=compact.embed_dim) == dict(masks.kept(), attn_scale=dense_scale)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    x = _x(3)
    a, b = _logits(model, x), _logits(compact, x)
    assert a.abs().max() > 1e-2
    assert torch.allclose(a, b, atol=ATOL), float((a - b).abs().max())


def test_densify_keeps_the_dense_attention_scale_after_qk_pruning():
    model = _model()
    masks = Masks(model)
    masks.block['qk'][0][:4] = False
    masks.block['qk'][1][1:] = False
    masks.apply(model)
    compact = densify(model, masks)
    assert compact.block_widths['qk_dim'] == [4, 1]
    assert compact.block_widths['attn_scale'] == model.block_widths['attn_scale'] == [8 ** -0.5] * 2
    assert [b.attn.scale for b in compact.blocks] == [8 ** -0.5] * 2


@pytest.mark.parametrize('distilled', [False, True], ids=['plain', 'distilled'])
@pytest.mark.parametrize('kinds', [('emb',), ('emb',) + BLOCK_KINDS], ids=['emb', 'all'])
def test_densify_emb_matches_with_masked_layernorm(kinds, distilled):
    model = _model(distilled)
    use_masked_layernorm(model, True)
    assert isinstance(model.blocks[0].norm1, MaskedLayerNorm) and isinstance(model.norm, MaskedLayerNorm)
    x = _x(3)
    masks = Masks(model)
    _remove_some(masks, kinds, seed=2)
    masks.apply(model)
    assert int(model.norm.active.sum()) == masks.kept()['embed_dim'] < model.embed_dim
    compact = densify(model, masks)
    assert compact.embed_dim == masks.kept()['embed_dim']
    assert not any(isinstance(m, MaskedLayerNorm) for m in compact.modules())
    a, b = _logits(model, x), _logits(compact, x)
    assert torch.allclose(a, b, atol=ATOL), float((a - b).abs().max())


def test_masked_layernorm_with_all_channels_is_layernorm():
    model = _model()
    x = _x()
    ref = _logits(model, x)
    weight = model.blocks[1].norm2.weight
    n_params = len(list(model.parameters()))
    use_masked_layernorm(model, True)
    norm = model.blocks[1].norm2
    assert isinstance(norm, MaskedLayerNorm) and norm.weight is weight   # parameters shared, not copied
    assert len(list(model.parameters())) == n_params
    assert torch.equal(_logits(model, x), ref)
    use_masked_layernorm(model, True)                                      # idempotent
    assert model.blocks[1].norm2 is norm and not isinstance(norm.original, MaskedLayerNorm)


def test_use_masked_layernorm_switches_back():
    model = _model()
    x = _x()
    ref = _logits(model, x)
    use_masked_layernorm(model, True)
    use_masked_layernorm(model, False)
    assert not any(isinstance(m, MaskedLayerNorm) for m in model.modules())
    assert torch.equal(_logits(model, x), ref)


@pytest.mark.parametrize('variant', [dict(init_values=0.1), dict(class_token=False, global_pool='avg', fc_norm=False),
                                     dict(no_embed_class=True)], ids=['layerscale', 'no-cls-token', 'no-embed-class'])
def test_densify_other_deit_layouts(variant):
    model = _model(**variant)
    use_masked_layernorm(model, True)
    masks = Masks(model)
    _remove_some(masks, ('emb',) + BLOCK_KINDS, seed=5)
    masks.apply(model)
    if 'init_values' in variant:
        gamma = model.blocks[1].ls2.gamma
        assert torch.equal(gamma[~masks.emb], torch.zeros_like(gamma[~masks.emb])) and bool(gamma[masks.emb].all())
    compact = densify(model, masks)
    x = _x(2)
    assert torch.allclose(_logits(model, x), _logits(compact, x), atol=ATOL)


def test_register_tokens_are_rejected():
    model = _model(reg_tokens=2)
    use_masked_layernorm(model, True)
    with pytest.raises(PruneError, match='register tokens are not supported'):
        Masks(model)


def test_densify_emb_with_plain_layernorm_differs():
    """Documented: with plain LayerNorm a zeroed channel still counts in the statistics."""
    model = _model()
    masks = Masks(model)
    _remove_some(masks, ('emb',), seed=2)
    masks.apply(model)
    compact = densify(model, masks)
    x = _x(3)
    assert float((_logits(model, x) - _logits(compact, x)).abs().max()) > 1e-4


# ---------------------------------------------------------------------------------------------
# 3. The densified model saves as a run directory that rebuilds it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('distilled', [False, True], ids=['plain', 'distilled'])
def test_densified_run_dir_round_trip(tmp_path, distilled):
    model = _model(distilled)
    use_masked_layernorm(model, True)
    masks = Masks(model)
    _remove_some(masks, ('emb',) + BLOCK_KINDS, seed=4)
    masks.apply(model)
    compact = densify(model, masks).eval()
    out = deitlab.rundir.save_run_dir(compact, tmp_path / 'pruned')
    cfg = json.loads((out / 'config.json').read_text())
    args = cfg['model_args']
    kept = masks.kept()
    for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden'):
        assert args[k] == kept[k] == compact.block_widths[k]
    assert args['embed_dim'] == kept['embed_dim']
    assert args['attn_scale'] == pytest.approx(model.block_widths['attn_scale'])
    x = _x(2)
    ref = _logits(compact, x)
    via_timm = timm.create_model('local-dir:' + str(out), pretrained=True)
    via_create = deitlab.rundir.create(out)
    for m in (via_timm, via_create):
        assert type(m) is type(compact)
        assert m.block_widths == compact.block_widths
        assert torch.equal(_logits(m, x), ref)


# ---------------------------------------------------------------------------------------------
# 12. Rounded masks
# ---------------------------------------------------------------------------------------------

def test_rounded_masks_round_up_to_multiples_and_keep_the_function():
    model = _model(embed_dim=32, num_heads=3, qk_dim=20, v_dim=12, mlp_hidden=40)
    masks = Masks(model)
    masks.block['head'][0][1] = False
    masks.block['qk'][0][:7] = False          # 13 -> 16
    masks.block['qk'][1][:1] = False          # 19 -> 20 (capped at dense)
    masks.block['v'][0][:11] = False          # 1 -> 8
    masks.block['v'][1][:4] = False           # 8 stays
    masks.block['mlp'][0][5:30] = False       # 15 -> 16
    masks.block['mlp'][1][::2] = False        # 20 -> 24
    masks.apply(model)
    before = copy.deepcopy(masks.state_dict())
    r = rounded_masks(masks, 8)
    assert all(torch.equal(v, masks.state_dict()[k]) for k, v in before.items())   # input unchanged
    kept = r.kept()
    assert kept['qk_dim'] == [16, 20] and kept['v_dim'] == [8, 8] and kept['mlp_hidden'] == [16, 24]
    assert kept['num_heads'] == masks.kept()['num_heads'] == [2, 3]
    dense = model.block_widths
    for k in ('qk_dim', 'v_dim', 'mlp_hidden'):
        for got, full in zip(kept[k], dense[k]):
            assert got % 8 == 0 or got == full
    for kind, b in masks.layers():
        assert bool((r.layer(kind, b) | ~masks.layer(kind, b)).all())   # only switches units on
    x = _x(3)
    ref = _logits(model, x)
    compact = densify(model, r)
    assert compact.block_widths['qk_dim'] == [16, 20]
    assert torch.allclose(_logits(compact, x), ref, atol=ATOL)
    # with scores, the highest-scoring removed units come back first
    scores = {'mlp': [torch.arange(40, dtype=torch.float), torch.zeros(40)]}
    rs = rounded_masks(masks, dict(mlp=8), scores)
    back = (rs.block['mlp'][0] & ~masks.block['mlp'][0]).nonzero().flatten().tolist()
    assert back == [29]
    assert rs.kept()['qk_dim'] == masks.kept()['qk_dim']          # only mlp was rounded
    assert torch.allclose(_logits(densify(model, rs), x), ref, atol=ATOL)
    assert rounded_masks(masks, None).kept() == masks.kept()
