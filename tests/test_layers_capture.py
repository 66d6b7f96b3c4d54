"""Class-token attention capture (MixPro, TransMix): deitlab.layers.capture."""
import timm
import torch

from deitlab.layers.capture import capture_cls_attention
from deitlab.models import DeiT  # importing deitlab.models registers the deitlab_* names

K = 5


def _explicit_cls_attn(model, x, heads, qk, scale):
    """Hook the last block's norm1, compute q, k by hand and the cls row over patch keys."""
    store = {}
    h = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: store.setdefault('t', o))
    with torch.no_grad():
        out = model(x)
    h.remove()
    t = store['t']
    B, T, _ = t.shape
    attn = model.blocks[-1].attn
    W, b = attn.qkv.weight, attn.qkv.bias
    qkv = t @ W.T + b
    q = qkv[..., :heads * qk].reshape(B, T, heads, qk).transpose(1, 2)
    k = qkv[..., heads * qk:2 * heads * qk].reshape(B, T, heads, qk).transpose(1, 2)
    a = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)  # (B, H, T, T)
    p = model.num_prefix_tokens
    return a[:, :, 0, p:].mean(1), out


def test_capture_timm_vit(tiny_vit):
    model = tiny_vit
    x = torch.randn(2, 3, 16, 16)
    ref, out_ref = _explicit_cls_attn(model, x, 2, 8, 8 ** -0.5)
    with capture_cls_attention(model) as cap, torch.no_grad():
        out = model(x)
    assert torch.equal(out, out_ref)
    assert cap.attn.shape == (2, 16)
    assert torch.allclose(cap.attn, ref, atol=1e-6)
    assert (cap.attn.sum(1) < 1).all()  # the cls -> cls column is excluded, not renormalised
    assert not cap.attn.requires_grad
    # hook removed afterwards
    assert not model.blocks[-1].attn._forward_pre_hooks


def test_capture_deitlab_width_deit():
    torch.manual_seed(0)
    qk = [8, 16, 32, 16]
    model = timm.create_model('deitlab_deit_pico_patch4_32', qk_dim=qk, v_dim=[32, 8, 16, 24],
                              num_classes=K).eval()
    x = torch.randn(2, 3, 32, 32)
    last = model.blocks[-1].attn
    assert isinstance(model, DeiT) and last.qk_dim == 16
    ref, out_ref = _explicit_cls_attn(model, x, last.num_heads, 16, last.scale)
    with capture_cls_attention(model) as cap, torch.no_grad():
        out = model(x)
    assert torch.equal(out, out_ref)
    assert cap.attn.shape == (2, 64)
    assert torch.allclose(cap.attn, ref, atol=1e-6)


def test_capture_distilled_excludes_prefix():
    torch.manual_seed(0)
    model = timm.create_model('deitlab_deit_pico_distilled_patch4_32', num_classes=K).eval()
    x = torch.randn(2, 3, 32, 32)
    ref, _ = _explicit_cls_attn(model, x, 2, 32, 32 ** -0.5)
    with capture_cls_attention(model) as cap, torch.no_grad():
        model(x)
    assert model.num_prefix_tokens == 2 and cap.attn.shape == (2, 64)
    assert torch.allclose(cap.attn, ref, atol=1e-6)
