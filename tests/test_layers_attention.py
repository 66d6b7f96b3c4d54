"""deitlab.layers: the attention steps compose to the modules' own forwards, cross-attention with
the same tokens on both sides is self-attention, and the class-token capture is a distribution."""
import pytest
import torch
from timm.models.vision_transformer import Attention

from deitlab.layers import CrossBlock, WidthAttention, WidthBlock
from deitlab.layers.attention import (attend, attention_output, attention_probs, cross_attention, fused_attention,
                                      head_dims, project, project_cross)
from deitlab.layers.block import block_macs
from deitlab.layers.capture import cls_attention_row


def _x(B=2, N=7, D=24, seed=0):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('fused', [True, False])
def test_cross_attention_on_the_same_tokens_is_self_attention(fused):
    torch.manual_seed(0)
    attn = WidthAttention(24, 3, qk_dim=5, v_dim=9).eval()
    attn.fused_attn = fused
    x = _x()
    torch.testing.assert_close(cross_attention(attn, x, x), attn(x), rtol=1e-5, atol=1e-6)


def test_partial_projections_equal_the_full_one():
    torch.manual_seed(0)
    attn = WidthAttention(24, 2, qk_dim=4, v_dim=6)
    x = _x()
    q, k, v = project(attn, x)
    assert q.shape == (2, 2, 7, 4) and v.shape == (2, 2, 7, 6) and head_dims(attn) == (2, 4, 6)
    q2, k2 = project(attn, x, 'qk')
    k3, v3 = project(attn, x, 'kv')
    for a, b in ((q, q2), (k, k2), (v, project(attn, x, 'v')), (k, k3), (v, v3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    qc, kc, vc = project_cross(attn, x[:, :3], x)
    torch.testing.assert_close(qc, q[:, :, :3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((kc, vc), (k, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="parts must be 'qkv', 'qk', 'kv' or 'v'"):
        project(attn, x, 'q')


@pytest.mark.parametrize('qk_norm', [False, True])
def test_the_steps_compose_to_timm_attention(qk_norm):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    x = _x()
    q, k, v = project(attn, x)
    out = attention_output(attn, attend(attn, q, k, v), x)
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(project(attn, x, 'kv'), (k, v), rtol=1e-5, atol=1e-6)   # k_norm applied


def test_fused_and_explicit_attention_agree_with_a_bias_and_unequal_widths():
    torch.manual_seed(0)
    attn = WidthAttention(24, 3, qk_dim=3, v_dim=8).eval()
    q, k, v = project(attn, _x())
    bias = torch.randn(2, 1, 1, 7)
    probs = attention_probs(attn, q, k, bias)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 7))
    torch.testing.assert_close(fused_attention(q, k, v, bias, 0., attn.scale), probs @ v, rtol=1e-5, atol=1e-6)


def test_class_token_row_is_a_distribution_over_keys():
    torch.manual_seed(0)
    attn = WidthAttention(24, 3, qk_dim=8, v_dim=8)
    row = cls_attention_row(attn, _x())
    assert row.shape == (2, 3, 7) and row.dtype == torch.float32
    torch.testing.assert_close(row.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(row, attn.attention_probs(_x())[:, :, 0])


def test_cross_block_keeps_the_block_names_and_shapes():
    torch.manual_seed(0)
    blk = WidthBlock(24, 2, 6, 6, 40, init_values=1e-5)
    cross = CrossBlock.like(blk)
    assert [n for n, _ in cross.named_parameters()] == [n for n, _ in blk.named_parameters()]
    cross.load_state_dict(blk.state_dict())
    x = _x()
    torch.testing.assert_close(cross.eval()(x, x), blk.eval()(x), rtol=1e-5, atol=1e-6)
    assert cross(x[:, :2], x).shape == (2, 2, 24)


def test_block_macs_counts_the_block_matmuls():
    from torch.utils.flop_counter import FlopCounterMode
    blk = WidthBlock(24, 3, 5, 7, 40).eval()
    for m in blk.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        blk(torch.randn(1, 11, 24))
    assert fc.get_total_flops() // 2 == sum(block_macs(11, 24, 3, 5, 7, 40).values())


def test_width_attention_refuses_empty_heads():
    with pytest.raises(ValueError, match='at least one head and one channel per head'):
        WidthAttention(24, 0, 4, 4)
    with pytest.raises(ValueError, match='the MLP needs at least one hidden unit'):
        WidthBlock(24, 2, 4, 4, 0)
