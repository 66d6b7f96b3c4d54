"""MixPro (MaskMix + PAL) and TransMix helpers: deitlab.train.mixpro."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import deitlab.models  # noqa: F401  (registers the deitlab_* names)
from deitlab.layers.capture import capture_cls_attention
from deitlab.train.mixpro import attention_lambda, cutmix_token_mask, mask_mix, mixed_ce, pal_lambda, smooth_one_hot

K = 5


def _batch(B=6, H=32, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    return x, y


@pytest.mark.parametrize('H,W,mask,patch', [(32, 32, 8, 4), (32, 24, 16, 4), (28, 28, 8, 4), (32, 32, 4, 4)])
def test_every_token_from_exactly_one_source(H, W, mask, patch):
    x, y = _batch(H=H, W=W)
    g = torch.Generator().manual_seed(1)
    xm, _, info = mask_mix(x, y, K, mask, patch, generator=g, lam=0.4)
    B = x.shape[0]
    th, tw = H // patch, W // patch
    assert info.token_mask.shape == (B, th * tw)
    xj = x[info.perm]
    def tokens(t):  # (B, C, H, W) -> (B, N, C*P*P) in timm's row-major token order
        return F.unfold(t, patch, stride=patch).transpose(1, 2)
    ti, tj, tm = tokens(x), tokens(xj), tokens(xm)
    from_i = (tm == ti).all(-1)
    from_j = (tm == tj).all(-1)
    fixed = info.perm == torch.arange(B)
    assert (from_i | from_j).all()
    assert not (from_i & from_j)[~fixed].any()  # distinct random content: never both
    tm_bool = info.token_mask.bool()
    assert torch.equal(from_i[~fixed], tm_bool[~fixed])
    # pixel mask agrees with the token mask
    assert torch.equal(F.avg_pool2d(info.pixel_mask, patch).flatten(1), info.token_mask)
    # masks differ between samples (each sample has its own cells)
    assert len({tuple(r.tolist()) for r in info.token_mask}) > 1


@pytest.mark.parametrize('lam', [0.0, 0.01, 0.3, 0.5, 0.77, 1.0])
def test_area_lambda_is_mask_fraction(lam):
    x, y = _batch()
    xm, ys, info = mask_mix(x, y, K, 8, 4, generator=torch.Generator().manual_seed(3), lam=lam)
    n = 16
    assert info.num_cells == n and info.cells == math.ceil(n * lam)
    assert torch.allclose(info.lam_area, torch.full((6,), info.cells / n))
    assert torch.allclose(info.pixel_mask.flatten(1).mean(1), info.lam_area)
    assert torch.allclose(info.token_mask.mean(1), info.lam_area)
    assert torch.allclose(info.lam_pixel, info.lam_area)
    # soft label: lam_area smooth(y_i) + (1 - lam_area) smooth(y_j), rows sum to 1
    y1 = smooth_one_hot(y, K, 0.1)
    assert torch.allclose(ys, info.lam_area[:, None] * y1 + (1 - info.lam_area[:, None]) * y1[info.perm])
    assert torch.allclose(ys.sum(1), torch.ones(6))
    assert torch.allclose(y1.max(1).values, torch.full((6,), 1 - 0.1 + 0.1 / K))


@pytest.mark.parametrize('H,W,mask,patch', [(28, 28, 8, 4), (28, 28, 12, 4), (32, 24, 16, 4), (30, 30, 12, 6),
                                           (28, 20, 8, 2), (32, 32, 8, 4)])
@pytest.mark.parametrize('lam', [0.1, 0.5, 0.77])
def test_label_weight_is_the_pixel_and_token_share(H, W, mask, patch, lam):
    """The label weight of x_i equals the share of the mixed image's pixels (and tokens) that are
    x_i's, read off the mixed image itself, for every image. Catches a label of ``c / n`` cells
    when the mask size does not divide the image (at 28 px with 8 px cells the last row and column
    are 4 px: mean error 0.029, up to 0.15), and a label taken from the mask instead of the image."""
    x, y = _batch(H=H, W=W)
    xm, ys, info = mask_mix(x, y, K, mask, patch, generator=torch.Generator().manual_seed(7), lam=lam)
    moved = info.perm != torch.arange(x.shape[0])
    assert moved.any()
    share = (xm == x).all(1).flatten(1).float().mean(1)          # pixels of x_i in the output
    assert torch.allclose(info.lam_area[moved], share[moved], atol=1e-6)
    tok_share = (F.unfold(xm, patch, stride=patch) == F.unfold(x, patch, stride=patch)).all(1).float().mean(1)
    assert torch.allclose(info.lam_area[moved], tok_share[moved], atol=1e-6)
    y1 = smooth_one_hot(y, K, 0.1)
    assert torch.allclose(ys[moved], (share[:, None] * y1 + (1 - share[:, None]) * y1[info.perm])[moved], atol=1e-6)


def test_beta_draw_lambda():
    x, y = _batch()
    _, _, info = mask_mix(x, y, K, 8, 4, alpha=1.0, generator=torch.Generator().manual_seed(5))
    assert 0 <= info.cells <= 16 and info.lam_area[0].item() == info.cells / 16


def test_uniform_attention_and_pal_limits():
    x, y = _batch()
    _, ys, info = mask_mix(x, y, K, 8, 4, generator=torch.Generator().manual_seed(2), lam=0.35)
    B, N = info.token_mask.shape
    uniform = torch.full((B, N), 0.7 / N)  # no renormalisation needed
    lam_attn = attention_lambda(info.token_mask, uniform)
    assert torch.allclose(lam_attn, info.lam_area)
    attn = torch.rand(B, N, generator=torch.Generator().manual_seed(4))
    lam_attn = attention_lambda(info.token_mask, attn)
    assert ((lam_attn >= 0) & (lam_attn <= 1)).all()
    # alpha = cos(y_soft, softmax(z)): orthogonal prediction -> alpha = 0 -> lambda_area
    big = 1e4
    logits = torch.zeros(B, K + 1)
    logits[:, K] = big  # all probability on a class absent from y_soft
    ys_pad = F.pad(ys, (0, 1))
    assert torch.allclose(pal_lambda(lam_attn, info.lam_area, logits, ys_pad), info.lam_area)
    # prediction parallel to y_soft -> alpha = 1 -> lambda_attn
    logits = ys.log()
    assert torch.allclose(pal_lambda(lam_attn, info.lam_area, logits, ys), lam_attn, atol=1e-5)
    lam = pal_lambda(lam_attn, info.lam_area, torch.randn(B, K), ys)
    assert ((lam >= 0) & (lam <= 1)).all()


def test_pal_alpha_gradient_flag():
    ys = torch.softmax(torch.randn(3, K), -1)
    lam_attn, lam_area = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.5, 0.5, 0.5])
    z = torch.randn(3, K, requires_grad=True)
    pal_lambda(lam_attn, lam_area, z, ys).sum().backward()
    assert z.grad.abs().sum() > 0
    z2 = z.detach().clone().requires_grad_()
    assert not pal_lambda(lam_attn, lam_area, z2, ys, detach_alpha=True).requires_grad


def test_cutmix_token_mask():
    tok = cutmix_token_mask((2, 10, 0, 4), 16, 4, batch_size=2)
    assert tok.shape == (2, 16)
    grid = tok[0].view(4, 4)
    # rows 0: pixels 0-3 (2 rows in box: 2..3) -> token (0,0) half from x_j
    assert grid[0, 0].item() == pytest.approx(0.5)
    assert grid[1, 0].item() == 0 and grid[2, 0].item() == pytest.approx(0.5) and grid[3, 0].item() == 1
    assert (grid[:, 1:] == 1).all()
    # area of the box = 1 - mean token mask
    assert tok.mean().item() == pytest.approx(1 - 8 * 4 / 256)


def test_end_to_end_mixpro_loss_backward():
    torch.manual_seed(0)
    model = timm.create_model('deitlab_deit_pico_patch4_32', num_classes=K)
    x, y = _batch(B=4)
    xm, ys, info = mask_mix(x, y, K, 8, 4, generator=torch.Generator().manual_seed(0))
    with capture_cls_attention(model) as cap:
        logits = model(xm)
    lam = pal_lambda(attention_lambda(info.token_mask, cap.attn), info.lam_area, logits, ys)
    loss = mixed_ce(logits, y, info.perm, lam)
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad is not None


def test_deterministic_with_generator():
    x, y = _batch()
    outs = [mask_mix(x, y, K, 8, 4, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    a, b, c = outs
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2].perm, b[2].perm) and torch.equal(a[2].token_mask, b[2].token_mask)
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[2].token_mask, c[2].token_mask))


def test_bad_inputs():
    x, y = _batch()
    with pytest.raises(ValueError, match='must be a multiple of the patch size'):
        mask_mix(x, y, K, 6, 4)
    x30, _ = _batch(H=30, W=30)
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        mask_mix(x30, y, K, 8, 4)
    with pytest.raises(ValueError, match='PoolFormer has no class-token attention'):
        with capture_cls_attention(timm.create_model('deitlab_poolformer_pico_32')):
            pass
    with pytest.raises(ValueError, match='SpectFormer has no class-token attention: it has no class token'):
        with capture_cls_attention(timm.create_model('deitlab_spectformer_pico_patch4_32')):
            pass
    spect_cls = timm.create_model('deitlab_spectformer_pico_patch4_32', class_token=True, mixers='aass')
    with pytest.raises(ValueError, match='SpectralBlock is not a self-attention block'):
        with capture_cls_attention(spect_cls):
            pass
    with pytest.raises(ValueError, match='differ in shape'):
        attention_lambda(torch.ones(2, 16), torch.ones(2, 17))


def test_mixed_ce_lambda_one_is_plain_ce():
    z = torch.randn(6, K)
    y = torch.randint(0, K, (6,))
    perm = torch.randperm(6)
    assert torch.allclose(mixed_ce(z, y, perm, torch.ones(6)), F.cross_entropy(z, y))
    assert torch.allclose(mixed_ce(z, y, perm, 0.0), F.cross_entropy(z, y[perm]))
    lam = torch.rand(6)
    ref = (lam * F.cross_entropy(z, y, reduction='none') + (1 - lam) * F.cross_entropy(z, y[perm], reduction='none'))
    assert torch.allclose(mixed_ce(z, y, perm, lam), ref.mean())


def test_hand_built_last_block_uniform_attention_gives_area_label(tiny_vit):
    """A model whose last block attends uniformly by construction (zero q/k weights and biases),
    while the first block does not: the captured attention is exactly 1/T per patch, so
    lambda_attn equals the area weight and PAL's lambda equals it for any alpha."""
    model = tiny_vit
    last = model.blocks[-1].attn
    D = last.qkv.in_features
    with torch.no_grad():
        last.qkv.weight[:2 * D].zero_()
        last.qkv.bias[:2 * D].zero_()
        model.blocks[0].attn.qkv.weight[:2 * D].mul_(30)  # a sharp first block
    x, y = _batch(B=4, H=16, W=16)
    xm, ys, info = mask_mix(x, y % 3, 3, 8, 4, generator=torch.Generator().manual_seed(2), lam=0.5)
    with capture_cls_attention(model) as cap, torch.no_grad():
        logits = model(xm)
    T = 17
    assert torch.allclose(cap.attn, torch.full((4, 16), 1 / T))
    lam_attn = attention_lambda(info.token_mask, cap.attn)
    assert torch.allclose(lam_attn, info.lam_area)
    assert torch.allclose(pal_lambda(lam_attn, info.lam_area, logits, ys), info.lam_area)
    # the first block's class-token attention is not uniform: it is not what was captured
    store = {}
    h = model.blocks[0].attn.register_forward_hook(lambda m, i, o: store.setdefault('in', i[0]))
    with torch.no_grad():
        model(xm)
    h.remove()
    a0 = model.blocks[0].attn
    qkv = a0.qkv(store['in']).reshape(4, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
    row = ((qkv[0][:, :, :1] * a0.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)[:, :, 0, 1:].mean(1)
    assert (row - 1 / T).abs().max() > 1e-3
