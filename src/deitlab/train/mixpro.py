"""MixPro (MaskMix + Progressive Attention Labelling) and TransMix label re-weighting.

References
----------
* Q. Zhao, Y. Huang, W. Hu, F. Dai, H. Zhang, "MixPro: Data Augmentation with MaskMix and
  Progressive Attention Labeling for Vision Transformer", ICLR 2023 (official code:
  github.com/fistyee/MixPro, MIT).
* J.-N. Chen, S. Sun, J. He, P. Torr, A. Yuille, S. Bai, "TransMix: Attend to Mix for Vision
  Transformers", CVPR 2022.

MaskMix (image space)
    The image is cut into a grid of ``ceil(H/P_m) x ceil(W/P_m)`` cells (``n`` cells) of side
    ``P_m = k P``, a multiple of the model's patch size ``P``, so every model token lies wholly in
    one cell. One ``lambda ~ Beta(alpha_m, alpha_m)`` is drawn per batch, ``c = ceil(n lambda)``
    cells are kept, and every sample draws its own random set of ``c`` cells::

        M_i in {0,1}^{H x W},       x~_i = M_i * x_i + (1 - M_i) * x_{pi(i)},
        lambda_area,i = mean(M_i),  y~_i = lambda_area,i y_i + (1 - lambda_area,i) y_{pi(i)},

    with ``y`` the label-smoothed one-hot (timm: off = eps/K, on = 1 - eps + eps/K) and ``pi`` a
    random permutation of the batch. ``lambda_area,i`` is the fraction of x_i's pixels kept (and,
    since each token lies in one cell, of its tokens). It equals the paper's ``c / n`` when the
    mask size divides the image; when it does not (28 px with 8 px cells: the last row and column of
    cells are 4 px wide) it depends on which cells a sample drew, and ``c / n`` would be wrong.

Progressive Attention Labelling (PAL)
    With ``a_i in R^N`` the class token's attention to the N patch tokens in the last block
    (softmax over all keys, averaged over heads, restricted to the patch columns, detached) and
    ``m_i in {0,1}^N`` the MaskMix mask pooled to tokens::

        lambda_attn = sum_t m_t a_t / sum_t a_t,
        alpha       = cos(y~, softmax(z))                      (per sample),
        lambda      = alpha lambda_attn + (1 - alpha) lambda_area,
        L           = mean_i [lambda_i CE(z_i, y_i) + (1 - lambda_i) CE(z_i, y_{pi(i)})].

TransMix
    The same ``lambda_attn`` with the CutMix box as the (fractional) token mask; a Mixup batch has
    no spatial mask and keeps the area ``lambda``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import one_hot

__all__ = [
    'MixInfo', 'smooth_one_hot', 'mask_mix', 'cutmix_token_mask', 'attention_lambda', 'pal_lambda', 'mixed_ce',
]

Size2 = Union[int, Sequence[int]]


def _pair(v: Size2) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(s) for s in v)
    if len(v) != 2:
        raise ValueError(f'expected an int or a pair of ints, got {v}')
    return v


@dataclass
class MixInfo:
    """What a mixed batch was made of.

    ``perm`` (B,) long: sample i is mixed with ``perm[i]``; ``lam_area`` (B,): the label weight
    of x_i, the fraction of its pixels kept; ``lam_pixel`` (B,): the same pixel fraction, measured on
    ``pixel_mask`` (for CutMix / TransMix callers it may differ from an area label); ``token_mask`` (B, N)
    float: the fraction of each token's pixels taken from x_i (0/1 for MaskMix); ``pixel_mask``
    (B, 1, H, W); ``cells`` the number of kept cells ``c`` out of ``num_cells`` (n).
    """
    perm: torch.Tensor
    lam_area: torch.Tensor
    lam_pixel: torch.Tensor
    token_mask: torch.Tensor
    pixel_mask: torch.Tensor
    cells: int
    num_cells: int


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    """timm's smoothed one-hot: ``off = eps / K``, ``on = 1 - eps + eps / K`` (rows sum to 1)."""
    off = smoothing / num_classes
    return one_hot(y.long(), num_classes, on_value=1. - smoothing + off, off_value=off).float()


def _beta(alpha: float, generator: Optional[torch.Generator]) -> float:
    """One draw of Beta(alpha, alpha), reproducible from a torch generator."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mask_mix(
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        mask_size: Size2,
        patch_size: Size2,
        alpha: float = 1.0,
        smoothing: float = 0.1,
        generator: Optional[torch.Generator] = None,
        lam: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, MixInfo]:
    """MixPro's MaskMix: per-sample random patch-aligned cell masks (see the module docstring).

    Args:
        x: images (B, C, H, W); H and W must be multiples of ``patch_size``.
        y: integer labels (B,).
        num_classes: K.
        mask_size: cell side ``P_m``, a multiple of ``patch_size``.
        patch_size: the model's patch size ``P``.
        alpha: ``lambda ~ Beta(alpha, alpha)`` (one draw per batch), unless ``lam`` is given.
        smoothing: label smoothing ``eps`` of the soft targets.
        generator: torch generator for every random draw (lambda, permutation, cells).

    Returns ``(x_mixed, y_soft, info)``: ``x_mixed = M x + (1 - M) x[perm]``,
    ``y_soft = lam_area smooth(y) + (1 - lam_area) smooth(y[perm])``, and a :class:`MixInfo`.
    """
    if x.dim() != 4:
        raise ValueError(f'mask_mix expects images (B, C, H, W), got shape {tuple(x.shape)}')
    B, _, H, W = x.shape
    mh, mw = _pair(mask_size)
    ph, pw = _pair(patch_size)
    if mh % ph or mw % pw:
        raise ValueError(f'mask size {(mh, mw)} must be a multiple of the patch size {(ph, pw)} so that every '
                         f'token lies in one mask cell')
    if H % ph or W % pw:
        raise ValueError(f'image size {(H, W)} is not divisible by the patch size {(ph, pw)}')
    gh, gw = math.ceil(H / mh), math.ceil(W / mw)
    n = gh * gw
    if lam is None:
        lam = _beta(alpha, generator)
    c = min(max(int(math.ceil(n * float(lam))), 0), n)
    dev = x.device
    perm = torch.randperm(B, generator=generator).to(dev)
    noise = torch.rand(B, n, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # a random permutation of 0..n-1 per sample
    cells = (rank < c).float().view(B, gh, gw).to(dev)
    th, tw = H // ph, W // pw
    tok = cells.repeat_interleave(mh // ph, dim=1).repeat_interleave(mw // pw, dim=2)[:, :th, :tw]
    pix = tok.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2).unsqueeze(1)  # (B, 1, H, W)
    m = pix.to(x.dtype)
    x_mixed = m * x + (1 - m) * x[perm]
    # the exact share of x_i in every image: c / n only when the mask size divides the image sides
    lam_area = pix.flatten(1).mean(1).float()
    y1 = smooth_one_hot(y, num_classes, smoothing)
    y_soft = lam_area[:, None] * y1 + (1 - lam_area[:, None]) * y1[perm]
    info = MixInfo(perm=perm, lam_area=lam_area, lam_pixel=lam_area.clone(), token_mask=tok.flatten(1),
                   pixel_mask=pix, cells=c, num_cells=n)
    return x_mixed, y_soft, info


def cutmix_token_mask(bbox: Sequence[int], img_size: Size2, patch_size: Size2, batch_size: int = 1,
                      device=None) -> torch.Tensor:
    """TransMix token mask (B, N) of a CutMix box: each token's fraction of pixels from x_i.

    ``bbox = (yl, yh, xl, xh)`` is timm's ``cutmix_bbox_and_lam`` box, whose pixels timm's
    ``Mixup`` takes from the other sample (``x.flip(0)``); the mask is 1 outside the box.
    """
    H, W = _pair(img_size)
    ph, pw = _pair(patch_size)
    if H % ph or W % pw:
        raise ValueError(f'image size {(H, W)} is not divisible by the patch size {(ph, pw)}')
    yl, yh, xl, xh = (int(v) for v in bbox)
    m = torch.ones(1, 1, H, W, device=device)
    m[..., yl:yh, xl:xh] = 0
    tok = F.avg_pool2d(m, (ph, pw)).flatten(1)
    return tok.expand(batch_size, -1).clone()


def attention_lambda(token_mask: torch.Tensor, attn: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``lambda_attn = sum_t m_t a_t / sum_t a_t`` per sample (TransMix Eq. 6; MixPro PAL).

    ``token_mask`` (B, N): share of each token from x_i; ``attn`` (B, N): class-token attention to
    the patch tokens (not renormalised; the division does it).
    """
    if token_mask.shape != attn.shape:
        raise ValueError(f'token mask {tuple(token_mask.shape)} and attention {tuple(attn.shape)} differ in shape; '
                         f'the attention must cover the patch tokens only')
    attn = attn.detach().to(token_mask.dtype)
    return (token_mask * attn).sum(1) / attn.sum(1).clamp_min(eps)


def pal_lambda(lam_attn: torch.Tensor, lam_area: torch.Tensor, logits: torch.Tensor, y_soft: torch.Tensor,
               detach_alpha: bool = False) -> torch.Tensor:
    """MixPro's progressive label weight ``lambda = alpha lambda_attn + (1 - alpha) lambda_area``
    with ``alpha = cos(y_soft, softmax(logits))`` per sample.

    The official code does not detach alpha (gradients flow through it); ``detach_alpha=True``
    treats it as a constant. The result lies in [0, 1] because alpha >= 0 for non-negative vectors.
    """
    p = logits.softmax(dim=-1)
    alpha = F.cosine_similarity(y_soft.to(p.dtype), p, dim=-1)
    if detach_alpha:
        alpha = alpha.detach()
    return alpha * lam_attn.to(p.dtype) + (1 - alpha) * lam_area.to(p.dtype)


def mixed_ce(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: Union[torch.Tensor, float],
             smoothing: float = 0.0) -> torch.Tensor:
    """``mean_i [lam_i CE(z_i, y_i) + (1 - lam_i) CE(z_i, y_perm(i))]`` (hard labels by default;
    ``smoothing`` applies timm-style label smoothing to both terms)."""
    lam = torch.as_tensor(lam, dtype=logits.dtype, device=logits.device).expand(logits.shape[0])
    ce_a = F.cross_entropy(logits, y, reduction='none', label_smoothing=smoothing)
    ce_b = F.cross_entropy(logits, y[perm], reduction='none', label_smoothing=smoothing)
    return (lam * ce_a + (1 - lam) * ce_b).mean()
