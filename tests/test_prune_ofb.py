"""OFB's search space, bi-mask and losses (prune/ofb.py): the exact properties of the paper's
construction on tiny DeiTs."""
import math

import pytest
import torch

from deitlab.bench import count_gmacs
from deitlab.prune import PruneError
from deitlab.prune.compact import densify
from deitlab.prune.ofb import (FLOPS_WEIGHT, OFBSearch, candidate_widths, check_target, lambda_at, onehot_loss,
                               smallest_fraction)
from _prune_helpers import ATOL, _logits, _model, _x


def test_candidate_widths_follow_the_paper_and_our_head_grid():
    assert candidate_widths('emb', 96) == list(range(48, 97, 3))           # 17 candidates, step min(96 // 32, 12)
    assert len(candidate_widths('emb', 384)) == 17 and len(candidate_widths('emb', 768)) == 33
    assert candidate_widths('head', 3) == [1, 2, 3] and candidate_widths('head', 3, 'paper') == [2, 3]
    assert candidate_widths('head', 6, 'paper') == [2, 4, 6] and candidate_widths('head', 1, 'paper') == [1]
    assert candidate_widths('qk', 32) == [8, 12, 16, 20, 24, 28, 32]
    assert candidate_widths('mlp', 384) == [96, 144, 192, 240, 288, 336, 384]
    assert candidate_widths('v', 2) == [1, 2]
    with pytest.raises(PruneError, match='grid must be one of ours, paper'):
        candidate_widths('qk', 8, 'fine')


def test_lambda_falls_linearly_over_the_warm_up():
    assert lambda_at(0) == pytest.approx(0.99) and lambda_at(1) == pytest.approx(0.1)
    assert lambda_at(0.5) == pytest.approx(0.545) and lambda_at(7) == pytest.approx(0.1)


def _search(model, seed=0, **kw):
    s = OFBSearch(model, seed=seed, **kw)
    s.install(model)
    return s


@pytest.mark.parametrize('distilled', [False, True])
def test_masks_at_one_leave_the_dense_model_unchanged(distilled):
    """lambda = 1 and every score at +inf (sigmoid 1), or lambda = 0 and only the full width left:
    every mask is exactly 1 and the logits are the dense model's. A hook on the wrong tensor, or a
    mask that is not all ones there, changes them."""
    model = _model(distilled=distilled)
    x = _x()
    dense = _logits(model, x)
    s = _search(model)
    with torch.no_grad():
        for m in s.modules_list():
            m.score.fill_(60.0)
    s.lam = 1.0
    assert torch.allclose(_logits(model, x), dense, atol=ATOL)
    s.lam = 0.0
    for m in s.modules_list():
        m.active.zero_()
        m.active[-1] = True
    assert torch.allclose(_logits(model, x), dense, atol=ATOL)
    # a mask below one changes the function, so the hooks act
    s.lam = 0.5
    with torch.no_grad():
        for m in s.modules_list():
            m.score.zero_()         # sigmoid 0.5: every mask 0.75
    assert not torch.allclose(_logits(model, x), dense, atol=1e-3)
    s.remove()
    assert torch.equal(_logits(model, x), dense)


def _choose_randomly(s: OFBSearch, seed: int) -> None:
    """Leave one random candidate active per module (the end of a search)."""
    g = torch.Generator().manual_seed(seed)
    for m in s.modules_list():
        j = int(torch.randint(len(m.widths), (1,), generator=g))
        m.active.zero_()
        m.active[j] = True
        with torch.no_grad():
            m.score.copy_(torch.randn(m.n, generator=g))


@pytest.mark.parametrize('layer_scale', [False, True])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_flops_formula_equals_the_counted_gmacs_of_the_densified_model(seed, layer_scale):
    """At a one-hot choice the expected widths are the chosen ones and the closed-form MACs in the
    FLOPs loss equal ``count_gmacs`` of the densified model exactly, with and without LayerScale."""
    model = _model(**(dict(init_values=1e-5) if layer_scale else {}))
    s = OFBSearch(model, seed=seed)
    _choose_randomly(s, seed)
    widths = s.chosen_widths()
    with torch.no_grad():
        expected = s.expected_widths()
    assert {k: (float(v) if k == 'embed_dim' else [float(t) for t in v]) for k, v in expected.items()} \
        == {k: (float(v) if k == 'embed_dim' else [float(t) for t in v]) for k, v in widths.items()}
    compact = densify(model, s.keep_masks(model))
    assert compact.embed_dim == widths['embed_dim'] and compact.block_widths['qk_dim'] == widths['qk_dim']
    assert float(s.macs().detach()) == count_gmacs(compact) * 1e9
    # and it is differentiable in alpha away from a one-hot choice
    for m in s.modules_list():
        m.active.fill_(True)
    loss = s.losses(0.5)['flops']
    loss.backward()
    assert all(m.alpha.grad is not None and torch.isfinite(m.alpha.grad).all() for m in s.modules_list())
    assert any(m.alpha.grad.abs().sum() > 0 for m in s.modules_list())


def test_adaptive_onehot_loss_orders_uniform_mixed_onehot_and_pulls_to_onehot():
    n = 5
    uniform = torch.full((n,), 1 / n)
    mixed = torch.softmax(torch.tensor([0.3, 1.2, 0.1, 0.8, 0.0]), 0)
    onehot = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    lu, lm, lo = onehot_loss(uniform), onehot_loss(mixed), onehot_loss(onehot)
    assert lu > 1e10 and math.isfinite(float(lm)) and abs(float(lm)) < 1e3 and lo < -1e10
    assert lu > lm > lo
    assert float(onehot_loss(torch.tensor([1.0]))) == 0.0
    # gradient descent on alpha makes the distribution more one-hot
    alpha = torch.tensor([0.3, 1.2, 0.1, 0.8, 0.0], requires_grad=True)
    before = torch.softmax(alpha, 0).max().item()
    for _ in range(20):
        loss = onehot_loss(torch.softmax(alpha, 0))
        g, = torch.autograd.grad(loss, alpha)
        with torch.no_grad():
            alpha -= 0.05 * g / g.norm()
    assert torch.softmax(alpha, 0).max().item() > before + 0.05
    assert int(torch.softmax(alpha, 0).argmax()) == 1


def test_elimination_drops_improbable_candidates_and_never_the_last():
    model = _model()
    s = OFBSearch(model)
    m = s.module('qk', 0)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.0, 5.0, -5.0][:len(m.widths)] + [-9.0] * (len(m.widths) - 3)))
    dropped = m.eliminate()
    p = m.probs().detach()
    assert dropped and int(m.active.sum()) == 1 and bool(m.active[1]) and p[1] == pytest.approx(1.0)
    assert m.eliminate() == [] and not m.searching()
    # even when every probability is at the threshold the most probable candidate stays
    e = s.module('emb')
    with torch.no_grad():
        e.alpha.fill_(0.0)
    assert e.eliminate(threshold=1.0) and int(e.active.sum()) == 1
    # eliminated candidates get probability 0 and no gradient from the one-hot loss
    assert (s.module('emb').probs()[~e.active] == 0).all()


def test_sparsity_mask_is_the_probability_of_keeping_each_unit():
    """A unit of rank i by score gets sum_j p_j [i < r_j]: 1 for the units every candidate keeps,
    decreasing with rank, 0 for none; the units' order is the scores' order."""
    model = _model()
    s = OFBSearch(model)
    m = s.module('mlp', 1)
    s_mask = m.sparsity_mask().detach()
    order = m.order()
    by_rank = s_mask[order]
    assert torch.all(by_rank[:-1] >= by_rank[1:] - 1e-7)
    assert by_rank[:int(m.widths[0])].allclose(torch.ones(int(m.widths[0])))
    p = m.probs().detach()
    i = int(m.widths[2])           # the first unit only candidates 3.. keep
    assert by_rank[i] == pytest.approx(float(p[3:].sum()))
    assert float(m.expected_width().detach()) == pytest.approx(float((p * m.widths).sum()))


@pytest.mark.parametrize('seed, kind', [(0, 'deit'), (1, 'deit'), (2, 'distilled'), (3, 'layerscale')])
def test_folded_and_densified_models_compute_what_the_masked_search_computed(seed, kind):
    """At the end of a search (one candidate left per module, lambda at 0.1) the masked model with
    the final masks, the model with the masks folded into its weights, and the densified model at
    the chosen widths give the same logits (1e-5): a DeiT, a distilled DeiT (its distillation token
    scaled with the class token) and one with LayerScale."""
    model = _model(seed=seed, **{'deit': {}, 'distilled': dict(distilled=True),
                                 'layerscale': dict(init_values=1e-5)}[kind])
    x = _x(seed=seed)
    s = _search(model, seed=seed)
    _choose_randomly(s, seed)
    s.lam = 0.1
    s.finish(model)
    masked = _logits(model, x)
    masks = s.fold(model)
    folded = _logits(model, x)
    assert torch.allclose(folded, masked, atol=ATOL)
    compact = densify(model, masks)
    assert compact.embed_dim == s.chosen_widths()['embed_dim']
    assert torch.allclose(_logits(compact, x), masked, atol=ATOL)


def test_targets_outside_the_search_space_are_refused():
    model = _model()
    s = OFBSearch(model)
    lo = smallest_fraction(s)
    assert 0 < lo < 0.5
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(PruneError, match='strictly between 0 and 1'):
            check_target(s, bad)
    with pytest.raises(PruneError, match='below the smallest network'):
        check_target(s, lo * 0.9)
    check_target(s, min(0.99, lo * 1.5))


def test_only_deit_family_models_are_searched():
    import timm
    pool = timm.create_model('deitlab_poolformer_pico_32', num_classes=5)
    with pytest.raises(PruneError, match='OFB searches the widths of DeiT-family models; this is a PoolFormer'):
        OFBSearch(pool)


def test_pmim_masks_a_growing_share_of_patches_and_scores_only_those():
    """PMIM: the kept share falls 0.95 -> 0.75 over the warm-up; a forward replaces exactly that
    share of each image's patch tokens by the mask token; the loss reads the masked patches only,
    against locally normalised pixels; without masking it is 0."""
    from deitlab.prune.ofb_pmim import PMIM
    model = _model()
    pmim = PMIM(model, seed=0)
    assert pmim.keep_at(0) == pytest.approx(0.95) and pmim.keep_at(1) == pytest.approx(0.75)
    assert pmim.keep_at(0.5) == pytest.approx(0.85)
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__('raw', o.detach().clone()))
    pmim.install(model)
    got = {}
    model.pos_drop.register_forward_pre_hook(lambda m, i: got.__setitem__('tokens', i[0].detach().clone()))
    x = _x(batch=3)
    pmim.keep = 0.5
    with torch.no_grad():
        model(x)
    N = pmim.num_patches
    mask = pmim._mask
    assert mask.shape == (3, N) and (mask.sum(1) == round(0.5 * N)).all()
    # the patch tokens reaching the position embedding: the mask token where masked, the patch elsewhere
    tokens = got['tokens'][:, pmim.prefix:] - model.pos_embed[:, pmim.prefix:]
    assert torch.allclose(tokens[mask], pmim.mask_token.detach().expand(int(mask.sum()), -1), atol=1e-6)
    assert torch.allclose(tokens[~mask], seen['raw'][~mask], atol=1e-6)
    t = pmim.targets(x)
    assert torch.allclose(t.mean(-1), torch.zeros(3, N), atol=1e-5)
    base = float(pmim.loss(x).detach())
    # pixels of a patch that was not masked do not move the loss; those of a masked one do
    ph, pw = pmim.patch
    gw = x.shape[-1] // pw
    b, unmasked = 0, int((~mask[0]).nonzero()[0])
    masked = int(mask[0].nonzero()[0])
    for idx, moves in ((unmasked, False), (masked, True)):
        x2 = x.clone()
        r, c = divmod(idx, gw)
        x2[b, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = torch.randn(x.shape[1], ph, pw)
        assert (abs(float(pmim.loss(x2).detach()) - base) > 1e-6) == moves
    pmim.keep = 1.0
    with torch.no_grad():
        model(x)
    assert float(pmim.loss(x).detach()) == 0.0
    pmim.remove()
    assert not pmim._handles


def test_pmim_term_is_rescaled_to_the_task_loss():
    from deitlab.prune.config import OFBConfig
    from deitlab.prune.ofb_pmim import PMIM
    from deitlab.prune.ofb_search import OFBHooks
    model = _model()
    dense = _model()
    s = OFBSearch(model)
    s.install(model)
    pmim = PMIM(model)
    pmim.install(model)
    pmim.keep = 0.7
    hooks = OFBHooks(s, dense, OFBConfig('m', 'd', 'o', target_gmacs=0.5), steps=10, steps_per_epoch=10, pmim=pmim)
    x, y = _x(batch=4), torch.tensor([0, 1, 2, 3])
    out = hooks.forward(model, x, y)
    hooks.loss(x, out, y)
    assert hooks.last['pmim'] == pytest.approx(hooks.last['task'], rel=1e-5) and hooks.last['task'] > 0


def test_shrinking_mid_search_keeps_the_function_and_reindexes_the_optimizer():
    """Eliminating a module's largest candidates leaves units no candidate keeps (mask 0); shrinking
    cuts them out physically. The logits at that step stay the same (1e-5), the optimizer points at
    the new parameters with Adam's moments of the kept elements, and training goes on."""
    from deitlab.prune.config import OFBConfig
    from deitlab.prune.ofb_pmim import PMIM
    from deitlab.prune.ofb_search import search_optimizer
    model = _model()
    x, y = _x(batch=4), torch.tensor([0, 1, 2, 3])
    s = _search(model, seed=3)
    pmim = PMIM(model)
    pmim.install(model)
    opt = search_optimizer(model, s, OFBConfig('m', 'd', 'o'), pmim)
    s.lam = 0.4
    loss = torch.nn.functional.cross_entropy(model(x), y) + sum(s.losses(0.5).values()) + pmim.loss(x)
    loss.backward()
    opt.step()
    opt.zero_grad()
    fc1 = model.blocks[1].mlp.fc1.weight
    old_avg = opt.state[fc1]['exp_avg'].clone()
    for kind, block, drop in (('emb', None, 2), ('mlp', 1, 3), ('qk', 0, 1), ('head', 1, 1), ('v', 1, 1)):
        m = s.module(kind, block)
        m.active[-drop:] = False
    keep_mlp1, keep_emb = s.module('mlp', 1).inside(), s.module('emb').inside()
    pmim.keep = 1.0       # no random masking: the same forward before and after
    model.eval()
    with torch.no_grad():
        before = model(x)
    new = s.shrink(model, opt, pmim)
    assert new is not model
    assert new.embed_dim == int(s.module('emb').widths.max()) < model.embed_dim
    assert new.block_widths['mlp_hidden'][1] == int(keep_mlp1.sum()) and new.block_widths['qk_dim'][0] < 8
    with torch.no_grad():
        after = new(x)
    assert torch.allclose(after, before, atol=ATOL)
    ids = {id(p) for p in new.parameters()} | {id(p) for p in s.parameters()} | {id(p) for p in pmim.parameters()}
    for group in opt.param_groups:
        for p in group['params']:
            assert id(p) in ids
            st = opt.state.get(p)
            if st:
                assert st['exp_avg'].shape == p.shape and st['exp_avg_sq'].shape == p.shape
    new_fc1 = new.blocks[1].mlp.fc1.weight
    assert torch.equal(opt.state[new_fc1]['exp_avg'], old_avg[keep_mlp1][:, keep_emb])
    # training goes on with the narrower model
    new.train()
    pmim.keep = 0.8
    loss = torch.nn.functional.cross_entropy(new(x), y) + sum(s.losses(0.5).values()) + pmim.loss(x)
    loss.backward()
    opt.step()


def test_budget_weight_grows_off_the_target_and_falls_back_to_the_papers_on_it():
    model = _model()
    s = OFBSearch(model)
    start = float(s.fraction())
    assert s.budget_weight == FLOPS_WEIGHT
    for _ in range(10):
        s.adapt_budget(start - 0.1, rate=0.5)        # over the target: the weight grows e^0.5 a step
    assert s.budget_weight == pytest.approx(FLOPS_WEIGHT * math.exp(5.0))
    over = s.losses(start - 0.1)['flops']
    assert float(over) == pytest.approx(s.budget_weight * 0.1 ** 2, rel=1e-4)
    s.adapt_budget(start + 0.1, rate=0.5)            # under it: the two-sided term still grows
    assert s.budget_weight == pytest.approx(FLOPS_WEIGHT * math.exp(5.5))
    for _ in range(4):
        s.adapt_budget(start * 1.01, rate=0.5)       # within 2% of it: back down, never below the paper's 5
    assert s.budget_weight == pytest.approx(FLOPS_WEIGHT * math.exp(3.5))
    for _ in range(20):
        s.adapt_budget(start, rate=0.5)
    assert s.budget_weight == FLOPS_WEIGHT
    # the weight is part of the search state a resumed search restores
    s.budget_weight = 123.0
    fresh = OFBSearch(_model())
    fresh.restore(s.search_state())
    assert fresh.budget_weight == 123.0
