"""deitlab.tokens on tiny random-weight ViTs: identity at r=0, size/source conservation, batch
independence and determinism, bfloat16, autograd, consistency training and unsupported models."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import Attention, ResPostBlock

# importing deitlab registers the deitlab_* model names with timm
from deitlab.tokens import (ConsistencyLoss, TokenFusionError, apply_mctf, apply_tome, mctf_fast_layers,
                            remove_token_fusion, token_fusion_of)
from deitlab.tokens.mctf import ConsistencyOutput
from deitlab.train.distill import DistillationLoss

from _tokens_helpers import (_apply, _CE, _images, _logits, METHODS, _model, MODELS, _tokens, _tokens_in)


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


def _avg_with_prefix():
    model = _model(global_pool='avg')
    model.pool_include_prefix = True
    return model


def _checkpointing():
    model = _model()
    model.set_grad_checkpointing()
    return model


@pytest.mark.parametrize('build,match', [
    (_avg_with_prefix, 'mean pooling that includes the prefix tokens'),
    (lambda: _model(global_pool='map'), r"class-token or mean pooling \(global_pool=\"token\" or \"avg\"\); "
                                        r"this model pools with 'map'"),
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
