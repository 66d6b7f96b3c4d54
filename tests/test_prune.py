"""Tests for structural pruning (deitlab.prune): unit groups and masks, densify, saliency,
latency table, ranking, the NViT pruning loop and its bad-input messages."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
import deitlab.rundir
from deitlab.models.deit import from_timm
from deitlab.prune import (
    Budget, LatencyTable, Masks, MaskedLayerNorm, NViTConfig, NViTPruner, PruneError, Saliency,
    build_latency_table, default_grid, densify, per_sample_sq_grads, rank_groups, reduce_units, rounded_masks,
    use_masked_layernorm,
)
from deitlab.prune.groups import check_prunable
from deitlab.prune.latency import AXES, FORMAT
from deitlab.prune.nvit import kd_kl
from deitlab.prune.ranking import remove_group

PICO = 'deitlab_deit_pico_patch4_32'
PICO_DIST = 'deitlab_deit_pico_distilled_patch4_32'
# A smaller pico: E=32, 2 blocks, 4 heads, qk 8 != v 6 per head, MLP 64 (forward in ~1 ms).
SMALL = dict(num_classes=5, embed_dim=32, depth=2, num_heads=4, qk_dim=8, v_dim=6, mlp_hidden=64)
BLOCK_KINDS = ('head', 'qk', 'v', 'mlp')
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter, so that zero-initialised biases / heads are not trivially 0."""
    g = torch.Generator().manual_seed(seed + 1000)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _model(distilled: bool = False, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(PICO_DIST if distilled else PICO, **{**SMALL, **kw})
    return _perturb(model, seed).eval()


def _x(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _remove_some(masks: Masks, kinds, seed: int = 0) -> None:
    """Switch off about a third of the units of every layer of the given kinds (at least one stays)."""
    g = torch.Generator().manual_seed(seed)
    for kind, b in masks.layers():
        if kind in kinds:
            m = masks.layer(kind, b)
            n = m.numel()
            m[torch.randperm(n, generator=g)[:max(1, n // 3)]] = False


def _empty(model):
    return {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def _qkv_rows(attn, kind: str, i: int):
    """Row indices of qkv (layout [Q (H*dq), K (H*dq), V (H*dv)], heads contiguous) of a unit."""
    H, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    if kind == 'head':
        q = list(range(i * dq, (i + 1) * dq))
        return q, [H * dq + r for r in q], [2 * H * dq + r for r in range(i * dv, (i + 1) * dv)]
    if kind == 'qk':
        q = [h * dq + i for h in range(H)]
        return q, [H * dq + r for r in q], []
    if kind == 'v':
        return [], [], [2 * H * dq + h * dv + i for h in range(H)]
    raise AssertionError(kind)


def _zeroed(model, kind: str, block, i: int) -> dict:
    """Written out by hand: the parameter elements one unit couples (True = zeroed with it)."""
    z = _empty(model)
    if kind == 'emb':
        z['patch_embed.proj.weight'][i] = True
        z['patch_embed.proj.bias'][i] = True
        for n in ('cls_token', 'dist_token', 'pos_embed'):
            if n in z:
                z[n][..., i] = True
        for b in range(len(model.blocks)):
            p = f'blocks.{b}.'
            for n in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'attn.proj.weight',
                      'attn.proj.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'):
                z[p + n][i] = True
            z[p + 'attn.qkv.weight'][:, i] = True
            z[p + 'mlp.fc1.weight'][:, i] = True
        z['norm.weight'][i] = True
        z['norm.bias'][i] = True
        for n in ('head.weight', 'head_dist.weight'):
            if n in z:
                z[n][:, i] = True
        return z
    p = f'blocks.{block}.'
    attn = model.blocks[block].attn
    if kind == 'mlp':
        z[p + 'mlp.fc1.weight'][i] = True
        z[p + 'mlp.fc1.bias'][i] = True
        z[p + 'mlp.fc2.weight'][:, i] = True
        return z
    q, k, v = _qkv_rows(attn, kind, i)
    rows = q + k + v
    z[p + 'attn.qkv.weight'][rows] = True
    z[p + 'attn.qkv.bias'][rows] = True
    dv = attn.v_dim
    if kind == 'head':
        z[p + 'attn.proj.weight'][:, i * dv:(i + 1) * dv] = True
    elif kind == 'v':
        z[p + 'attn.proj.weight'][:, [h * dv + i for h in range(attn.num_heads)]] = True
    return z


def _criteria(model, kind: str, block, i: int) -> dict:
    """Written out by hand: the parameter elements whose w*g add up to a unit's saliency."""
    z = _empty(model)
    if kind == 'emb':
        z['patch_embed.proj.weight'][i] = True
        z['patch_embed.proj.bias'][i] = True
        for b in range(len(model.blocks)):
            p = f'blocks.{b}.'
            z[p + 'attn.qkv.weight'][:, i] = True
            z[p + 'mlp.fc1.weight'][:, i] = True
            for n in ('attn.proj.weight', 'attn.proj.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'):
                z[p + n][i] = True
        return z
    p = f'blocks.{block}.'
    if kind == 'mlp':
        z[p + 'mlp.fc1.weight'][i] = True
        z[p + 'mlp.fc1.bias'][i] = True
        return z
    q, k, v = _qkv_rows(model.blocks[block].attn, kind, i)
    rows = q + k + v if kind == 'head' else q + v   # qk counts its Q rows only, v its V rows
    z[p + 'attn.qkv.weight'][rows] = True
    z[p + 'attn.qkv.bias'][rows] = True
    return z


def _flat(tensors: dict, sel: dict) -> torch.Tensor:
    """The selected elements of every parameter, concatenated in a fixed order (float64)."""
    return torch.cat([tensors[n].detach()[m].double() for n, m in sorted(sel.items()) if m.any()])


def _unit(scores: dict, kind: str, block, i: int) -> float:
    return float(scores[kind][i] if kind == 'emb' else scores[kind][block][i])


def _set_grads(model: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g)
        grads[n] = p.grad.clone()
    return grads


def _capture(module: nn.Module, store: list, pre: bool = False):
    if pre:
        return module.register_forward_pre_hook(lambda m, inp: store.append(inp[0].detach().clone()))
    return module.register_forward_hook(lambda m, inp, out: store.append(out.detach().clone()))


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
# 4.-5. Saliency
# ---------------------------------------------------------------------------------------------

def _zero_grads(model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_nvit_sums_coupled_parts_before_squaring():
    """emb channel c gets +1 from the patch embedding and -1 from a qkv in-column: NViT's score
    cancels to 0, the element-wise Taylor score does not."""
    model = _model()
    c, d = 3, 4
    with torch.no_grad():
        model.patch_embed.proj.weight[c, 0, 0, 0] = 2.0
        model.blocks[0].attn.qkv.weight[0, c] = 4.0
        model.blocks[1].mlp.fc1.weight[5, d] = 3.0
    _zero_grads(model)
    model.patch_embed.proj.weight.grad[c, 0, 0, 0] = 0.5      # w*g = +1
    model.blocks[0].attn.qkv.weight.grad[0, c] = -0.25        # w*g = -1
    model.blocks[1].mlp.fc1.weight.grad[5, d] = 0.5           # w*g = 1.5, alone in channel d
    sums = reduce_units(model, lambda n, p: p * p.grad)
    assert float(sums['emb'][c]) == 0.0
    assert float(sums['emb'][d]) == 1.5
    assert float(sums['head'][0][0]) == -1.0 and float(sums['qk'][0][0]) == -1.0
    assert float(sums['mlp'][1][5]) == 1.5
    nvit = Saliency('nvit', momentum=0, divisors=None, depth=len(model.blocks))
    taylor = Saliency('taylor', momentum=0, divisors=None)
    nvit.accumulate(model)
    taylor.accumulate(model)
    s_nvit, s_taylor = nvit.event(model), taylor.event(model)
    assert float(s_nvit['emb'][c]) == 0.0
    assert float(s_taylor['emb'][c]) == 2.0
    assert float(s_nvit['emb'][d]) == 2.25 and float(s_taylor['emb'][d]) == 1.5
    # every other unit saw no gradient
    assert float(s_nvit['emb'].abs().sum()) == 2.25
    assert float(s_nvit['mlp'][0].abs().sum()) == 0.0


NVIT_UNITS = [('head', 0, 1), ('head', 1, 3), ('qk', 1, 5), ('v', 0, 2), ('mlp', 0, 7), ('mlp', 1, 40),
              ('emb', None, 11)]


def test_nvit_score_is_w_fisher_w_over_the_criteria_slices():
    model = _model()
    params = dict(model.named_parameters())
    sal = Saliency('nvit', momentum=0, divisors=None)
    grads = []
    for s in range(5):
        grads.append(_set_grads(model, seed=s))
        sal.accumulate(model)
    scores = sal.event(model)
    for kind, block, i in NVIT_UNITS:
        sel = _criteria(model, kind, block, i)
        w = _flat(params, sel)
        G = torch.stack([_flat(g, sel) for g in grads])         # batches x |S|
        fisher = G.T @ G / len(grads)                           # empirical Fisher on the slices
        expected = float(w @ fisher @ w)
        assert expected == pytest.approx(float(((G * w).sum(1) ** 2).mean()), rel=1e-9)
        assert _unit(scores, kind, block, i) == pytest.approx(expected, rel=1e-4), (kind, block, i)


def test_nvit_divisors_scale_before_squaring():
    model = _model()
    _set_grads(model, seed=0)
    plain = Saliency('nvit', momentum=0, divisors=None)
    nvit = Saliency('nvit', momentum=0, divisors='nvit', depth=2)
    plain.accumulate(model)
    nvit.accumulate(model)
    a, b = plain.event(model), nvit.event(model)
    for kind, div in (('emb', 2.0), ('head', 12.0), ('qk', 2.0), ('v', 2.0), ('mlp', 1.0)):
        x = a[kind] if kind == 'emb' else a[kind][1]
        y = b[kind] if kind == 'emb' else b[kind][1]
        assert torch.allclose(y, x / div ** 2, rtol=1e-5)


def test_saliency_ema_across_events():
    model = _model()
    m = 0.7
    ema = Saliency('nvit', momentum=m, divisors=None)
    first = Saliency('nvit', momentum=0, divisors=None)
    second = Saliency('nvit', momentum=0, divisors=None)
    for s in range(3):
        _set_grads(model, seed=s)
        ema.accumulate(model)
        first.accumulate(model)
    s1 = ema.event(model)
    s1 = {k: (v.clone() if torch.is_tensor(v) else [t.clone() for t in v]) for k, v in s1.items()}
    assert torch.equal(s1['emb'], first.event(model)['emb'])
    with pytest.raises(PruneError, match='no batches yet'):
        Saliency('nvit', momentum=0, divisors=None).event(model)
    for s in range(10, 12):
        _set_grads(model, seed=s)
        ema.accumulate(model)
        second.accumulate(model)
    s2, mean2 = ema.event(model), second.event(model)
    assert torch.allclose(s2['emb'], m * s1['emb'] + (1 - m) * mean2['emb'], rtol=1e-6)
    for kind in BLOCK_KINDS:
        for b in range(2):
            assert torch.allclose(s2[kind][b], m * s1[kind][b] + (1 - m) * mean2[kind][b], rtol=1e-6)
    assert not torch.allclose(s2['emb'], mean2['emb'])


def test_magnitude_is_sum_of_squared_weights_over_criteria_slices():
    model = _model()
    params = dict(model.named_parameters())
    scores = Saliency('magnitude', momentum=0, divisors=None).event(model)
    for kind, block, i in NVIT_UNITS + [('qk', 0, 0), ('v', 1, 5)]:
        expected = float((_flat(params, _criteria(model, kind, block, i)) ** 2).sum())
        assert _unit(scores, kind, block, i) == pytest.approx(expected, rel=1e-5), (kind, block, i)


def test_taylor_is_mean_of_elementwise_abs_w_times_g():
    model = _model()
    params = dict(model.named_parameters())
    sal = Saliency('taylor', momentum=0, divisors=None)
    grads = []
    for s in range(3):
        grads.append(_set_grads(model, seed=s))
        sal.accumulate(model)
    scores = sal.event(model)
    for kind, block, i in NVIT_UNITS:
        sel = _criteria(model, kind, block, i)
        w = _flat(params, sel)
        expected = np.mean([float((w * _flat(g, sel)).abs().sum()) for g in grads])
        assert _unit(scores, kind, block, i) == pytest.approx(expected, rel=1e-4)


def _ce(out, y):
    return F.cross_entropy(out, y)


def _loop_sq_grads(model, x, y) -> dict:
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        _ce(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return total


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4, name: str = ''):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rel * scale + 1e-12, name


@pytest.mark.filterwarnings('ignore:There is a performance drop')
def test_per_sample_sq_grads_equal_a_loop_of_single_sample_backwards():
    model = _model()
    x, y = _x(5, seed=3), torch.tensor([0, 4, 2, 2, 1])
    fast = per_sample_sq_grads(model, _ce, x, y, chunk=2)
    slow = _loop_sq_grads(model, x, y)
    assert set(fast) == set(slow)
    for n in slow:
        assert fast[n].shape == slow[n].shape
        _assert_close_rel(fast[n], slow[n], name=n)
    assert float(slow['blocks.0.attn.qkv.weight'].abs().max()) > 0


@pytest.mark.filterwarnings('ignore:There is a performance drop')
def test_per_sample_sq_grads_with_masked_layernorm_and_removed_units():
    model = _model()
    use_masked_layernorm(model, True)
    masks = Masks(model)
    _remove_some(masks, ('emb', 'head', 'mlp'), seed=6)
    masks.apply(model)
    x, y = _x(3, seed=4), torch.tensor([1, 3, 0])
    fast = per_sample_sq_grads(model, _ce, x, y)
    slow = _loop_sq_grads(model, x, y)
    for n in slow:
        _assert_close_rel(fast[n], slow[n], name=n)
    pm = masks.param_masks(model)
    # removed slices get no gradient at all: the masked model does not depend on them
    for n, m in pm.items():
        dead = m == 0
        assert torch.equal(fast[n][dead], torch.zeros_like(fast[n][dead])), n


@pytest.mark.filterwarnings('ignore:There is a performance drop')
def test_fisher_saliency_averages_over_all_samples_of_the_window():
    model = _model()
    params = dict(model.named_parameters())
    x, y = _x(8, seed=5), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    sq1 = per_sample_sq_grads(model, _ce, x[:3], y[:3])
    sq2 = per_sample_sq_grads(model, _ce, x[3:], y[3:])
    sal = Saliency('fisher', momentum=0, divisors=None)
    with pytest.raises(PruneError, match='no per-sample gradients'):
        Saliency('fisher', momentum=0, divisors=None).event(model)
    sal.accumulate_sq_grads(sq1, 3)
    sal.accumulate_sq_grads(sq2, 5)
    assert sal.samples == 8
    scores = sal.event(model)
    mean_sq = {n: (sq1[n] + sq2[n]) / 8 for n in sq1}
    last_only = {n: sq2[n] / 5 for n in sq2}
    for kind, block, i in NVIT_UNITS:
        sel = _criteria(model, kind, block, i)
        w2 = _flat(params, sel) ** 2
        expected = float((w2 * _flat(mean_sq, sel)).sum())
        wrong = float((w2 * _flat(last_only, sel)).sum())
        assert _unit(scores, kind, block, i) == pytest.approx(expected, rel=1e-4)
        assert abs(wrong - expected) > 1e-3 * expected
    assert sal.samples == 0 and sal.sq_grads is None   # the window starts again


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


# ---------------------------------------------------------------------------------------------
# 8.-9. The NViT pruning loop
# ---------------------------------------------------------------------------------------------

def _loader(n: int = 16, batch: int = 8, classes: int = 5, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=False)


def _cfg(**kw) -> NViTConfig:
    args = dict(model='x', data='x', out='x', target_gmacs=0.8, interval=2, groups_per_event=4, lam=0,
                progress=False, val_batches=0)
    args.update(kw)
    return NViTConfig(**args)


def _record_events(pruner) -> list:
    events = []
    original = pruner.event

    def event():
        removed = original()
        events.append(removed)
        return removed
    pruner.event = event
    return events


def test_nvit_loop_stops_as_soon_as_the_target_is_crossed():
    torch.manual_seed(0)
    model = _model()
    pruner = NViTPruner(model, _cfg(group_sizes=dict(mlp=4)), lut=None, device=torch.device('cpu'))
    events = _record_events(pruner)
    first_kl = []
    original_loss = pruner._loss

    def loss(out, teacher_out, y, extra_loss=None, x=None):
        if not first_kl:
            first_kl.append(float(kd_kl(out.detach(), teacher_out, pruner.cfg.kl_tau)))
        return original_loss(out, teacher_out, y, extra_loss, x)
    pruner._loss = loss
    masks = pruner.run(_loader())
    assert masks is pruner.masks
    assert first_kl == [0.0]                         # student == dense before the first event
    assert pruner.budget.reached(pruner.widths())
    assert len(pruner.log) >= 2 and pruner.log[-1]['gmacs'] <= 0.8 < pruner.log[-2]['gmacs']
    assert pruner.steps == pruner.events * 2         # no training step after the target was met
    removed = [g for e in events for g in e]
    assert removed and len(events) == pruner.events
    assert all(len(e) <= 4 for e in events) and all(events)
    # one group before the end the target was not met
    last = removed[-1]
    masks.layer(last.kind, last.block)[last.units] = True
    assert not pruner.budget.reached(pruner.widths())
    assert pruner.budget.relative(pruner.widths())['gmacs'] > 0.8
    masks.layer(last.kind, last.block)[last.units] = False
    # the masked model (MaskedLayerNorm) equals its densified form
    compact = pruner.densified()
    x = _x(2)
    assert torch.allclose(_logits(pruner.model, x), _logits(compact, x), atol=ATOL)
    assert dict(compact.block_widths, embed_dim=compact.embed_dim) == dict(
        pruner.widths(), attn_scale=pruner.dense.block_widths['attn_scale'])


def test_nvit_loop_on_a_distilled_model_with_a_params_target():
    model = _model(distilled=True)
    pruner = NViTPruner(model, _cfg(target_gmacs=None, target_params=0.85, group_sizes=dict(mlp=8)), lut=None,
                        device=torch.device('cpu'))
    pruner.run(_loader())
    assert pruner.estimate()['params'] <= 0.85
    compact = pruner.densified()
    x = _x(2)
    assert torch.allclose(_logits(pruner.model, x), _logits(compact, x), atol=ATOL)


def test_nvit_prune_steps_schedule_falls_linearly_to_the_target():
    model = _model()
    pruner = NViTPruner(model, _cfg(target_gmacs=0.7, prune_steps=6, group_sizes=dict(mlp=2)), lut=None,
                        device=torch.device('cpu'))
    goals = []
    original = pruner.event

    def event():
        goals.append(pruner.event_goal())
        return original()
    pruner.event = event
    pruner.run(_loader())
    assert goals == pytest.approx([0.9, 0.8, 0.7])
    assert pruner.steps == 6
    for goal, row in zip(goals, pruner.log):
        assert row['gmacs'] <= goal + 1e-12
    assert pruner.log[0]['gmacs'] > 0.8           # the first event did not jump to the target
    with pytest.raises(PruneError, match=r'prune_steps \(1\) must be at least one interval \(2\)'):
        _cfg(prune_steps=1).validate()


def test_nvit_with_a_table_that_fixes_the_head_axis():
    model = _model()
    lut = LatencyTable(dict(emb=[8, 32], heads=[4], qk=[8], v=[6], mlp=[1, 64]),
                       np.fromfunction(lambda e, h, q, v, m: 1 + e + 4 * m, (2, 1, 1, 1, 2)), [8, 32], [1.0, 2.0])
    pruner = NViTPruner(model, _cfg(target_gmacs=None, target_latency=0.9, lam=1.0, prune_types=('emb', 'mlp'),
                                    group_sizes=dict(mlp=8)), lut=lut, device=torch.device('cpu'))
    pruner.run(_loader())
    assert pruner.estimate()['latency'] <= 0.9


def test_nvit_unreachable_target_raises():
    model = _model()
    pruner = NViTPruner(model, _cfg(target_gmacs=0.05, max_prune_steps=3), lut=None, device=torch.device('cpu'))
    with pytest.raises(PruneError, match=r'the gmacs target 0.05 was not reached within 3 steps'):
        pruner.run(_loader())
    assert pruner.steps == 3


def test_kd_kl_of_identical_logits_is_zero_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    assert float(kd_kl(a, a.clone(), 3.0)) == 0.0
    tau = 3.0
    p_t, log_s = F.softmax(b / tau, -1), F.log_softmax(a / tau, -1)
    expected = tau * tau * float((p_t * (p_t.log() - log_s)).sum(-1).mean())   # T^2 KL(teacher || student)
    assert float(kd_kl(a, b, tau)) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_nvit_run_keeps_removed_weights_and_adam_moments_at_zero(monkeypatch):
    model = _model()
    pruner = NViTPruner(model, _cfg(lr=1e-3, weight_decay=0.05, group_sizes=dict(mlp=4), criterion='taylor'),
                        lut=None, device=torch.device('cpu'))
    assert isinstance(pruner.model.norm, MaskedLayerNorm)
    x = _x(2)
    assert float(kd_kl(_logits(pruner.model, x), _logits(pruner.dense, x), 3.0)) == 0.0
    checks = []
    original = timm.optim.create_optimizer_v2

    def create(*args, **kwargs):
        opt = original(*args, **kwargs)
        assert isinstance(opt, torch.optim.AdamW) and kwargs['weight_decay'] == 0.05
        step = opt.step

        def checked_step(*a, **k):
            out = step(*a, **k)
            # checked right after the update, before the loop re-applies the masks
            pm = pruner.masks.param_masks(pruner.model)
            dead_total = 0
            for n, p in pruner.model.named_parameters():
                dead = pm[n] == 0 if n in pm else None
                if dead is None or not dead.any():
                    continue
                st = opt.state[p]
                for t in (p.detach(), st['exp_avg'], st['exp_avg_sq']):
                    assert torch.equal(t[dead], torch.zeros_like(t[dead])), n
                dead_total += int(dead.sum())
            checks.append(dead_total)
            return out
        opt.step = checked_step
        return opt
    monkeypatch.setattr(timm.optim, 'create_optimizer_v2', create)
    pruner.run(_loader())
    assert len(checks) == pruner.steps and checks[0] == 0 and checks[-1] > 0
    # the kept weights trained, the removed ones are zero
    pm = pruner.masks.param_masks(pruner.model)
    dense = dict(pruner.dense.named_parameters())
    w = pruner.model.blocks[0].mlp.fc1.weight
    kept = pm['blocks.0.mlp.fc1.weight'] == 1
    assert not torch.equal(w.detach()[kept], dense['blocks.0.mlp.fc1.weight'][kept])
    for n, p in pruner.model.named_parameters():
        if n in pm:
            assert torch.equal(p.detach()[pm[n] == 0], torch.zeros_like(p.detach()[pm[n] == 0])), n


@pytest.mark.filterwarnings('ignore:There is a performance drop')
@pytest.mark.parametrize('criterion', ['magnitude', 'fisher'])
def test_nvit_runs_with_other_criteria(criterion):
    model = _model()
    pruner = NViTPruner(model, _cfg(criterion=criterion, fisher_samples=2, group_sizes=dict(mlp=8)), lut=None,
                        device=torch.device('cpu'))
    pruner.run(_loader())
    assert pruner.done()


def test_nvit_with_latency_table_and_lam():
    model = _model()
    lut = LatencyTable(dict(emb=[8, 32], heads=[1, 4], qk=[1, 8], v=[1, 6], mlp=[1, 64]),
                       np.fromfunction(lambda e, h, q, v, m: 1 + e + h + q + v + 4 * m, (2,) * 5), [8, 32], [1.0, 2.0])
    pruner = NViTPruner(model, _cfg(target_gmacs=None, target_latency=0.85, lam=1.0, group_sizes=dict(mlp=8)),
                        lut=lut, device=torch.device('cpu'))
    pruner.run(_loader())
    assert pruner.estimate()['latency'] <= 0.85
    assert 'latency_ms' in pruner.log[-1]


# ---------------------------------------------------------------------------------------------
# 10. timm's ImageNet DeiTs
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _perturb_small_params(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.ndim == 1 or 'token' in n or 'head' in n:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _timm_round_trip(name):
    torch.manual_seed(0)
    model = from_timm(timm.create_model(name, pretrained=False).eval())
    _perturb_small_params(model)
    use_masked_layernorm(model, True)
    masks = Masks(model)
    masks.emb[100] = False
    masks.block['head'][0][1] = False
    masks.block['qk'][1][5] = False
    masks.block['v'][2][7] = False
    masks.block['mlp'][3][42] = False
    masks.apply(model)
    compact = densify(model, masks)
    w = compact.block_widths
    assert compact.embed_dim == model.embed_dim - 1
    assert w['num_heads'][0] == model.block_widths['num_heads'][0] - 1
    assert w['qk_dim'][1] == w['v_dim'][2] == 63 and w['mlp_hidden'][3] == model.block_widths['mlp_hidden'][3] - 1
    x = _x(1, size=224)
    a, b = _logits(model, x), _logits(compact, x)
    assert torch.allclose(a, b, atol=ATOL), float((a - b).abs().max())


@pytest.mark.slow
def test_prune_timm_deit_base():
    _timm_round_trip('deit_base_patch16_224')


def test_prune_timm_deit_tiny_distilled():
    _timm_round_trip('deit_tiny_distilled_patch16_224')


# ---------------------------------------------------------------------------------------------
# 11. Bad input
# ---------------------------------------------------------------------------------------------

def test_budget_needs_exactly_one_target_in_range():
    model = _model()
    with pytest.raises(PruneError, match="give exactly one pruning target .* got none"):
        Budget(model)
    with pytest.raises(PruneError, match=r"exactly one pruning target .* got \['gmacs', 'params'\]"):
        Budget(model, gmacs=0.5, params=0.5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(PruneError, match=r'the gmacs target is a fraction of the dense model in \(0, 1\]'):
            Budget(model, gmacs=bad)
    with pytest.raises(PruneError, match='a latency target needs a latency table'):
        Budget(model, latency=0.5)
    b = Budget(model, params=1.0)
    dense = dict(model.block_widths, embed_dim=model.embed_dim)
    assert b.relative(dense) == dict(gmacs=1.0, params=1.0)
    assert b.reached(dense)
    assert b.absolute(dense)['params'] == sum(p.numel() for p in model.parameters())


def test_unknown_criterion_and_bad_saliency_settings():
    with pytest.raises(PruneError, match="unknown saliency criterion 'hessian'; choose one of nvit, taylor"):
        Saliency('hessian')
    with pytest.raises(PruneError, match=r'saliency momentum must be in \[0, 1\), got 1.0'):
        Saliency('nvit', momentum=1.0, divisors=None)
    with pytest.raises(PruneError, match="divisors='nvit' needs the model depth"):
        Saliency('nvit', divisors='nvit')
    with pytest.raises(PruneError, match="unknown saliency criterion 'obd'"):
        NViTPruner(_model(), _cfg(criterion='obd'), lut=None, device=torch.device('cpu'))


def test_check_prunable_rejects_other_modules():
    with pytest.raises(PruneError, match=r'works on deitlab DeiT models, not Linear; convert .*from_timm'):
        check_prunable(nn.Linear(3, 3))
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1)
    with pytest.raises(PruneError, match='from_timm'):
        Masks(vit)
    with pytest.raises(PruneError, match='from_timm'):
        densify(vit, None)
    with pytest.raises(PruneError, match='models with fc_norm are not supported by the pruner'):
        check_prunable(timm.create_model(PICO, **SMALL, global_pool='avg'))
    no_bias = timm.create_model(PICO, **SMALL, qkv_bias=False)
    with pytest.raises(PruneError, match='block 0: qkv without bias is not supported'):
        check_prunable(no_bias)


@pytest.mark.parametrize('field,value,message', [
    ('interval', 0, 'interval must be >= 1, got 0'),
    ('groups_per_event', 0, 'groups_per_event must be >= 1'),
    ('lam', -1.0, 'the latency penalty lam must be >= 0'),
    ('prune_types', ('emb', 'layer'), 'prune_types must be a non-empty subset'),
    ('group_sizes', {'heads': 2}, r"group_sizes has unknown unit types \['heads'\]"),
    ('teacher', 'x', 'an extra teacher needs --distill hard|soft'),
])
def test_nvit_config_validate(field, value, message):
    with pytest.raises(PruneError, match=message):
        _cfg(**{field: value}).validate()
    with pytest.raises(PruneError, match=message):
        NViTPruner(_model(), _cfg(**{field: value}), lut=None, device=torch.device('cpu'))


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
