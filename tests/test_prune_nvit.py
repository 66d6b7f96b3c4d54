"""Structural pruning: the NViT loop, timm's ImageNet DeiTs, and bad-input messages."""
import numpy as np
import pytest
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F

from deitlab.models.deit import from_timm
from deitlab.prune import (
    Budget, densify, LatencyTable, MaskedLayerNorm, Masks, NViTConfig, NViTPruner, PruneError, Saliency,
    use_masked_layernorm,
)
from deitlab.prune.groups import check_prunable
from deitlab.prune.nvit import kd_kl
from _prune_helpers import _loader, _logits, _model, _x, ATOL, PICO, SMALL


# ---------------------------------------------------------------------------------------------
# 8.-9. The NViT pruning loop
# ---------------------------------------------------------------------------------------------

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


def test_load_dense_refuses_a_name_without_weights():
    from deitlab.prune import load_dense
    with pytest.raises(PruneError, match='has no released weights and pruning a random model means nothing'):
        load_dense('deitlab_deit_pico_patch4_32')
