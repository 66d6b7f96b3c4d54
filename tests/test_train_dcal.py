"""DCAL's branches (deitlab.train.dcal): PWCA with the image as its own distractor is SA, GLCA with
every patch and the last block's weights is the last block, the rollout's top patches, eval without
PWCA and its MAC count, the uncertainty-weighted loss, distilled DeiT and timm ViT backbones, and
bad input."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from deitlab.bench import count_gmacs
from deitlab.layers.rollout import cls_rollout, top_tokens
from deitlab.models import DeiT  # importing deitlab.models registers the deitlab_* names
from deitlab.train import dcal as dcal_module
from deitlab.train.dcal import DCAL, dcal_inference_gmacs
from _nn_helpers import sharpen_attention

PICO = 'deitlab_deit_pico_patch4_32'
PICO_DIST = 'deitlab_deit_pico_distilled_patch4_32'
BACKBONES = [PICO, PICO_DIST, 'timm_vit']


def _backbone(name=PICO, **kwargs):
    torch.manual_seed(0)
    if name == 'timm_vit':
        return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=4, depth=3,
                                 num_classes=5, **kwargs)
    return timm.create_model(name, num_classes=5, **kwargs)


def _x(batch=3, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', BACKBONES)
@pytest.mark.parametrize('pwca_kv', ['sa', 'pwca'])
def test_pwca_with_the_image_as_its_own_distractor_is_sa(one_thread, name, pwca_kv):
    model = DCAL(_backbone(name), pwca_kv=pwca_kv).train()
    x = _x()
    out = model(x, distractor=torch.arange(3))
    torch.testing.assert_close(out['pwca'], out['sa'], rtol=0, atol=1e-6)
    assert out['distractor'].tolist() == [0, 1, 2]
    # another partner changes the PWCA logits of the images whose partner is another image
    other = model(x, distractor=torch.tensor([1, 0, 2]))
    assert not torch.allclose(other['pwca'][:2], other['sa'][:2], atol=1e-4)
    torch.testing.assert_close(other['pwca'][2], other['sa'][2], rtol=0, atol=1e-6)


@pytest.mark.parametrize('name', BACKBONES)
def test_glca_on_every_patch_with_the_last_blocks_weights_is_the_last_block(one_thread, name):
    backbone = _backbone(name)
    model = DCAL(backbone, ratio=1.0, glca_init='copy').train()
    store = {}
    backbone.blocks[-1].register_forward_hook(lambda m, i, o: store.__setitem__('last', o))
    model.glca_block.register_forward_hook(lambda m, i, o: store.__setitem__('glca', o))
    out = model(_x())
    prefix = backbone.num_prefix_tokens
    n = backbone.patch_embed.num_patches
    expected = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(prefix, prefix + n)])
    assert torch.equal(out['glca_index'], expected.expand(3, -1))   # class token, then the patches in order
    # queries: the class token and the patches (a distilled model's distillation token is a key only)
    torch.testing.assert_close(store['glca'], store['last'][:, expected], rtol=0, atol=1e-6)
    if name != PICO_DIST:
        torch.testing.assert_close(out['glca'], model.glca_head(backbone.norm(store['last'])[:, 0]), rtol=0,
                                   atol=1e-6)


def test_fresh_glca_weights_differ_from_the_last_block():
    backbone = _backbone()
    model = DCAL(backbone)
    assert isinstance(backbone, DeiT)
    last, glca = backbone.blocks[-1], model.glca_block
    assert not torch.equal(last.attn.qkv.weight, glca.attn.qkv.weight)
    assert glca.attn.qkv.weight.data_ptr() != last.attn.qkv.weight.data_ptr()
    copied = DCAL(backbone, glca_init='copy').glca_block
    assert torch.equal(copied.attn.qkv.weight, last.attn.qkv.weight)
    assert copied.attn.qkv.weight.data_ptr() != last.attn.qkv.weight.data_ptr()   # a copy, not shared


@pytest.mark.parametrize('name', [PICO, PICO_DIST])
@pytest.mark.parametrize('fusion', ['mean', 'max'])
def test_glca_queries_are_the_top_rollout_patches_and_never_a_prefix_token(one_thread, name, fusion):
    backbone = sharpen_attention(_backbone(name), 6.)
    model = DCAL(backbone, ratio=0.1, head_fusion=fusion, start_layer=1).train()
    shapes = []
    model.glca_block.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    x = _x()
    idx = model(x)['glca_index']
    prefix, D = backbone.num_prefix_tokens, backbone.embed_dim
    R = math.ceil(0.1 * backbone.patch_embed.num_patches)
    assert idx.shape == (3, R + 1) and shapes == [(3, R + 1, D)]
    assert (idx[:, 0] == 0).all() and (idx[:, 1:] >= prefix).all()
    assert (idx[:, 2:] > idx[:, 1:-1]).all()   # sorted, no repeats
    ref = top_tokens(cls_rollout(backbone.eval(), x, fusion, start_layer=1), 0.1) + prefix
    assert torch.equal(idx[:, 1:], ref.sort(dim=1).values)


def test_without_the_class_token_query_glca_has_r_queries(one_thread):
    model = DCAL(_backbone(), ratio=0.25, glca_cls=False).train()
    shapes = []
    model.glca_block.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    out = model(_x())
    assert shapes == [(3, 16, 64)] and (out['glca_index'] >= 1).all()


def test_eval_runs_no_pwca_and_sums_the_two_probabilities(one_thread, monkeypatch):
    model = DCAL(_backbone()).eval()
    x = _x()
    with torch.no_grad():
        y = model(x)
    model.train()
    calls = []
    real = dcal_module.pair_attention_block
    monkeypatch.setattr(dcal_module, 'pair_attention_block', lambda *a: calls.append(1) or real(*a))
    model(x)
    assert len(calls) == len(model.backbone.blocks)   # training: one PWCA step per block
    calls.clear()
    model.eval()
    with torch.no_grad():
        y2 = model(x)
        features = model.features(x)
    assert calls == [] and torch.equal(y, y2)
    torch.testing.assert_close(y.sum(-1), torch.full((3,), 2.))
    assert features.shape == (3, 128)


@pytest.mark.parametrize('name', [PICO, PICO_DIST])
def test_inference_sa_is_the_backbones_eval_output(one_thread, name):
    backbone = _backbone(name).eval()
    x = _x()
    with torch.no_grad():
        ref = backbone(x)
        out = DCAL(backbone, inference='sa').eval()(x)
    assert torch.equal(out, ref)


def test_inference_gmacs_are_the_backbone_the_rollout_and_one_cross_attention_block(one_thread):
    backbone = _backbone()
    model = DCAL(backbone)
    gmacs = dcal_inference_gmacs(model)
    T, D, H, dq, M, L, C = 65, 64, 2, 32, 256, 4, 5
    Rq = math.ceil(0.1 * 64) + 1   # R patches and the class token
    rollout = L * (T * D * 2 * H * dq + H * T * T * dq) + (L - 1) * T ** 3   # hooks' q/k and q k^T, products
    glca = (Rq * D * H * dq + T * D * 2 * H * dq            # q on the queries, k/v on all tokens
            + 2 * H * Rq * T * dq + Rq * H * dq * D + 2 * Rq * D * M + D * C)   # q k^T, a v, proj, MLP, head
    assert round(gmacs * 1e9) == round(count_gmacs(backbone) * 1e9) + rollout + glca
    assert model.training   # a new module trains; count_gmacs put that back after its eval forward
    assert dcal_inference_gmacs(DCAL(backbone, inference='sa')) == pytest.approx(count_gmacs(backbone), rel=1e-9)


def test_loss_weights_get_gradients_and_the_loss_is_the_uncertainty_weighting(one_thread):
    model = DCAL(_backbone(), uncertainty_init=1.0).train()
    y = torch.tensor([0, 3, 4])
    out = model(_x(), generator=torch.Generator().manual_seed(0))
    loss = model.loss(out, y)
    assert torch.isfinite(loss) and set(model.last_losses) == {'sa', 'glca', 'pwca'}
    expected = sum(0.5 * (math.exp(-1) * F.cross_entropy(out[k], y).item() + 1) for k in ('sa', 'glca', 'pwca'))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    for name, w in model.loss_weights.items():
        assert w.grad is not None and torch.isfinite(w.grad) and w.grad != 0, name
        assert w.grad.item() == pytest.approx(0.5 * (1 - math.exp(-1) * model.last_losses[name].item()), rel=1e-5)
    assert model.glca_head.weight.grad is not None and model.backbone.blocks[0].attn.qkv.weight.grad is not None
    # a seeded generator draws the same partners
    again = model(_x(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again['distractor'], out['distractor'])


def test_one_cross_attention_branch_is_enough(one_thread):
    sa_pwca = DCAL(_backbone(), glca=False, inference='sa').train()
    out = sa_pwca(_x())
    assert set(out) == {'sa', 'pwca', 'distractor'} and set(sa_pwca.loss_weights) == {'sa', 'pwca'}
    assert torch.isfinite(sa_pwca.loss(out, torch.tensor([0, 1, 2])))
    assert sa_pwca.glca_block is None and sa_pwca.eval().features(_x()).shape == (3, 64)
    sa_glca = DCAL(_backbone(), pwca=False).train()
    assert set(sa_glca(_x())) == {'sa', 'glca', 'glca_index'}


def test_distilled_training_averages_the_two_heads(one_thread):
    backbone = _backbone(PICO_DIST)
    backbone.set_distilled_training(True)
    model = DCAL(backbone).train()
    x = _x()
    out = model(x, distractor=torch.arange(3))
    cls_logits, dist_logits = backbone(x)
    torch.testing.assert_close(out['sa'], (cls_logits + dist_logits) / 2, rtol=0, atol=1e-6)
    assert torch.isfinite(model.loss(out, torch.tensor([0, 1, 2])))


def test_timm_vit_trains_and_predicts(one_thread):
    model = DCAL(_backbone('timm_vit'), ratio=0.3)
    out = model.train()(_x())
    model.loss(out, torch.tensor([1, 2, 3])).backward()
    assert all(w.grad is not None for w in model.loss_weights.values())
    with torch.no_grad():
        assert model.eval()(_x()).shape == (3, 5)


def test_a_new_number_of_classes_resets_the_heads():
    model = DCAL(_backbone(PICO_DIST), num_classes=7)
    assert model.backbone.head.out_features == model.backbone.head_dist.out_features == 7
    assert model.glca_head.out_features == 7


@pytest.mark.parametrize('pwca_kv', ['sa', 'pwca'])
def test_detached_distractor_keys_and_values_pass_no_gradient(one_thread, pwca_kv):
    def grads(detach):
        model = DCAL(_backbone(), pwca_kv=pwca_kv, pwca_detach=detach, glca=False, inference='sa').train()
        x = _x(2).requires_grad_()
        out = model(x, distractor=torch.tensor([1, 0]))
        out['pwca'][0].sum().backward()   # image 0's PWCA logits: image 1 enters only as the distractor
        return x.grad
    assert grads(True)[1].abs().max() == 0
    assert grads(False)[1].abs().max() > 0


@pytest.mark.parametrize('kwargs, message', [
    (dict(ratio=0), r'ratio must be a fraction of the patch tokens in \(0, 1\], got 0'),
    (dict(ratio=1.5), r'ratio must be .* got 1.5'),
    (dict(ratio=True), r'ratio must be .* got True'),
    (dict(glca_init='zeros'), r"glca_init must be one of 'fresh', 'copy', got 'zeros'"),
    (dict(head_fusion='min'), r"head_fusion must be one of 'mean', 'max', got 'min'"),
    (dict(pwca_kv='glca'), r"pwca_kv must be one of 'sa', 'pwca', got 'glca'"),
    (dict(inference='glca'), r"inference must be one of 'sa\+glca', 'sa', got 'glca'"),
    (dict(pwca='yes'), r'pwca must be True or False'),
    (dict(pwca=False, glca=False), r'pwca=False and glca=False leave only the backbone'),
    (dict(glca=False), r"inference='sa\+glca' needs the GLCA branch \(glca=True\); use inference='sa'"),
    (dict(start_layer=4), r'DCAL: rollout start layer 4 is out of range: the model has 4 blocks'),
    (dict(uncertainty_init=float('nan')), r'uncertainty_init must be a finite number'),
    (dict(num_classes=0), r'num_classes must be a positive int'),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCAL(_backbone(), **kwargs)


def test_backbones_without_self_attention_or_class_token_are_refused():
    with pytest.raises(ValueError, match=r'PoolFormer has no self-attention blocks'):
        DCAL(timm.create_model('deitlab_poolformer_pico_32', num_classes=2))
    with pytest.raises(ValueError, match=r'SpectFormer has no self-attention in block 0'):
        DCAL(timm.create_model('deitlab_spectformer_pico_patch4_32', num_classes=2))
    with pytest.raises(ValueError, match=r'STViT has its own forward_features'):
        DCAL(timm.create_model('deitlab_stvit_micro_patch4_32', num_classes=2))
    torch.manual_seed(0)
    pooled = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, depth=2, embed_dim=16, num_heads=2,
                               num_classes=3, class_token=False, global_pool='avg')
    with pytest.raises(ValueError, match=r'VisionTransformer has no class token; global-local'):
        DCAL(pooled)
    assert DCAL(pooled, glca=False, inference='sa').branches == ('sa', 'pwca')


def test_bad_distractors_and_outputs_are_named(one_thread):
    model = DCAL(_backbone()).train()
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 3]), torch.tensor([0., 1., 2.])):
        with pytest.raises(ValueError, match=r'distractor must be 3 integer batch indices in 0..2'):
            model(_x(), distractor=bad)
    with pytest.raises(ValueError, match=r'DCAL.loss takes the dict of branch logits'):
        model.loss(model.eval()(_x()), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r'dcal_inference_gmacs counts a DCAL wrapper, not DeiT'):
        dcal_inference_gmacs(model.backbone)
