"""Structural pruning: saliency criteria (NViT group Fisher, magnitude, Taylor, per-sample Fisher)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deitlab.prune import Masks, per_sample_sq_grads, PruneError, reduce_units, Saliency, use_masked_layernorm
from _prune_helpers import _criteria, _flat, _model, _remove_some, _set_grads, _unit, _x, BLOCK_KINDS


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


def _window_scores(model, criterion: str, batches: int):
    """Hand-set gradients for ``batches`` batches, accumulated into one window: (grads, scores)."""
    sal = Saliency(criterion, momentum=0, divisors=None)
    grads = []
    for s in range(batches):
        grads.append(_set_grads(model, seed=s))
        sal.accumulate(model)
    return grads, sal.event(model)


def _unit_slices(model, params, grads):
    """For each unit of NVIT_UNITS: (unit, its criteria weights w, the per-batch gradients there)."""
    for unit in NVIT_UNITS:
        sel = _criteria(model, *unit)
        yield unit, _flat(params, sel), torch.stack([_flat(g, sel) for g in grads])


def test_nvit_score_is_w_fisher_w_over_the_criteria_slices():
    model = _model()
    params = dict(model.named_parameters())
    grads, scores = _window_scores(model, 'nvit', batches=5)
    for (kind, block, i), w, G in _unit_slices(model, params, grads):   # G: batches x |S|
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
    grads, scores = _window_scores(model, 'taylor', batches=3)
    for (kind, block, i), w, G in _unit_slices(model, params, grads):
        expected = np.mean([float((w * g).abs().sum()) for g in G])
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
