"""``--mix patchmix``: CutMix aligned to the last stage's token grid, and a loss on every patch token.

ViT-ResNAS's code release (Liao, Karaman, Sze, arXiv 2109.00642) trains with "shifted patch-token
mixup" and an auxiliary per-patch head instead of the standard Mixup / CutMix (our notes; the
release is CC BY-NC and was not read). The method comes from the patch-diversification line of
work, and is documented in two papers:

* C. Gong, D. Wang, M. Li, V. Chandra, Q. Liu, "Vision Transformers with Patch Diversification"
  (arXiv 2104.12753, 2021), the *patch-wise mixing loss*: mix the patches of two images, and make
  every last-layer patch token predict the class of the image it comes from through a shared linear
  classifier g, ``L_mix = 1/N sum_t CE(g(h_t), y_{src(t)})``, added to the class-token loss (whose
  label is mixed by area); the mixed region is a rectangle of whole patches.
* Z. Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers"
  (NeurIPS 2021): MixToken, a CutMix box on the token grid (partner: the batch reversed), the class
  token's label mixed by the box's area, every patch token labelled by its own source image, and
  ``L = CE(z_cls, y~) + beta * 1/N sum_t CE(z_t, y_t)`` with ``beta = 0.5``.

What this module does (per batch, with prob ``prob``; an unmixed batch still gets the patch loss,
every token labelled with its own image)::

    grid    h x w   the LAST stage's token grid (ViT-Res: the patch grid halved S - 1 times)
    cell    (H/h) x (W/w) pixels: the image region one last-stage token stands for
    lambda  ~ Beta(alpha, alpha);  box of round(h sqrt(1-lambda)) x round(w sqrt(1-lambda)) tokens at a
            uniform position wholly inside the grid (cells, in pixels)
    x~_i    = x_i outside the box, x_{pi(i)} inside,  pi(i) = B - 1 - i
    lam_i   = 1 - |box| / (h w)                        (exact: the share of x_i's pixels and tokens)
    y~_i    = lam_i y_i + (1 - lam_i) y_{pi(i)}        (label-smoothed one-hots)
    src(i, t) = pi(i) if token t is in the box else i
    L       = CE(z_cls, y~) + beta * mean_{i,t} CE(z_{i,t}, y_{src(i,t)})     (soft-target CEs)

Why the last stage's grid: a multi-stage ViT-Res halves the grid at each reduction, so a
last-stage token is the merge of 4^(S-1) input patches. A box aligned to the input patches could
cut through a last-stage token and give it two images; aligned to the last stage's cells, every
token of every stage lies inside one cell and its pixels come from one image. (Receptive fields
cross the box edge, as they do for a token's attention in any ViT: the label is the source of the
token's own region, as in both papers.)

Our choices where the sources differ or say nothing: the box is sampled wholly inside the grid
(area exact, no clipping; timm's CutMix box, centre +- half the side rounded down, is always empty
on a 2x2 grid, where this one has 0, 1 or all 4 tokens); the partner is the reversed batch (timm's
and MixToken's; Gong et al. draw a permutation); the per-patch labels are smoothed like the class
label; ``beta`` defaults to Token Labeling's 0.5 (``--patch-loss-weight``); the mixing is in pixel
space, as in Gong et al. and CutMix (MixToken swaps token embeddings after the patch embedding
instead: with a conv stem the two differ near the box edge, where the stem's 3x3 convolutions see
both images). What "shifted" means in the release's name for it is not documented in either paper,
and nothing here shifts the box off the token grid. The patch head is used in training only:
inference is the class token's head (Gong et al.'s losses are training-only; LV-ViT adds
``0.5 * max_t`` of the token logits at inference, which is not done here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mixpro import _beta, smooth_one_hot

__all__ = ['PatchMixTarget', 'patch_token_grid', 'patch_box', 'patch_mix', 'patch_mix_loss']


@dataclass
class PatchMixTarget:
    """The labels of a patch-mixed batch.

    ``y`` (B,) hard labels; ``perm`` (B,) the partner of each example; ``lam_area`` the share of
    x_i's tokens (and pixels); ``token_source`` (B, N) long: the example whose image each
    last-stage token shows; ``y_soft`` (B, K) the class token's area-mixed, smoothed label;
    ``box`` (top, bottom, left, right) in last-stage tokens (empty: unmixed); ``captured`` holds
    the patch logits of this forward (filled inside :meth:`BatchMixer.capture`).
    """
    y: torch.Tensor
    perm: torch.Tensor
    lam_area: float
    token_source: torch.Tensor
    y_soft: torch.Tensor
    box: Tuple[int, int, int, int]
    smoothing: float = 0.0
    captured: Optional[object] = None

    def patch_logits(self) -> torch.Tensor:
        logits = getattr(self.captured, 'logits', None)
        if logits is None:
            raise RuntimeError('a patchmix label needs the patch logits of this forward; run the model inside '
                               'BatchMixer.capture(target)')
        return logits


def patch_token_grid(model: nn.Module, img_size: Tuple[int, int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The last stage's token grid (h, w) of a model with a patch-token head and the pixel cell
    (H/h, W/w) of one token; ``ValueError`` saying why for any other model or an image the grid does
    not divide."""
    if not isinstance(getattr(model, 'patch_head', None), nn.Module) or not hasattr(model, 'capture_patch_logits'):
        raise ValueError(f'--mix patchmix trains an auxiliary head on the last stage\'s patch tokens, and '
                         f'{type(model).__name__} has none: build a ViT-Res with a patch head (--model-kwargs '
                         f'patch_head=true), or use another --mix')
    gh, gw = (int(v) for v in model.patch_grid)
    H, W = (int(v) for v in img_size)
    if H % gh or W % gw:
        raise ValueError(f'--mix patchmix aligns the box to the last stage\'s {gh}x{gw} token grid, which does not '
                         f'divide the {H}x{W} input')
    return (gh, gw), (H // gh, W // gw)


def patch_box(grid: Tuple[int, int], lam: float, generator: Optional[torch.Generator] = None
              ) -> Tuple[Tuple[int, int, int, int], float]:
    """A box of ``round(h sqrt(1 - lam)) x round(w sqrt(1 - lam))`` tokens at a uniform position
    inside the ``h x w`` grid, and its exact ``lam_area = 1 - box / (h w)``."""
    gh, gw = grid
    r = math.sqrt(max(0.0, 1.0 - lam))
    bh, bw = min(gh, round(gh * r)), min(gw, round(gw * r))
    top = int(torch.randint(0, gh - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, gw - bw + 1, (1,), generator=generator))
    return (top, top + bh, left, left + bw), 1.0 - bh * bw / (gh * gw)


def patch_mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: Tuple[int, int], alpha: float = 1.0,
              smoothing: float = 0.1, prob: float = 1.0, generator: Optional[torch.Generator] = None,
              lam: Optional[float] = None) -> Tuple[torch.Tensor, PatchMixTarget]:
    """The patch-mixed batch and its :class:`PatchMixTarget` (module docstring). ``x`` (B, C, H, W)
    with H, W multiples of ``grid``; ``lam`` fixes the Beta draw; with probability ``1 - prob`` the
    batch is left unmixed (empty box)."""
    B, (gh, gw) = x.shape[0], grid
    ch, cw = x.shape[-2] // gh, x.shape[-1] // gw
    mixed = prob >= 1 or float(torch.rand((), generator=generator)) < prob
    if mixed:
        box, lam_area = patch_box(grid, _beta(alpha, generator) if lam is None else lam, generator)
    else:
        box, lam_area = (0, 0, 0, 0), 1.0
    top, bottom, left, right = box
    perm = torch.arange(B - 1, -1, -1, device=x.device)
    inside = torch.zeros(gh, gw, dtype=torch.bool, device=x.device)
    inside[top:bottom, left:right] = True
    if inside.any():
        x = x.clone()
        x[:, :, top * ch:bottom * ch, left * cw:right * cw] = x[perm][:, :, top * ch:bottom * ch, left * cw:right * cw]
    own = torch.arange(B, device=x.device)[:, None].expand(B, gh * gw)
    token_source = torch.where(inside.flatten()[None, :], perm[:, None], own)
    y1 = smooth_one_hot(y, num_classes, smoothing)
    y_soft = lam_area * y1 + (1 - lam_area) * y1[perm]
    return x, PatchMixTarget(y, perm, lam_area, token_source, y_soft, box, smoothing)


def patch_mix_loss(logits: torch.Tensor, patch_logits: torch.Tensor, target: PatchMixTarget,
                   weight: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, L_cls, L_patch)``: ``L = L_cls + weight * L_patch`` with the class token's soft-target CE
    against the area-mixed label and the mean over all (example, token) pairs of the patch head's
    soft-target CE against each token's source label (module docstring)."""
    B, N, K = patch_logits.shape
    if target.token_source.shape != (B, N):
        raise ValueError(f'the patch head gave {N} tokens per image, the batch was mixed on a grid of '
                         f'{target.token_source.shape[1]}')
    cls = torch.sum(-target.y_soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    labels = smooth_one_hot(target.y[target.token_source].reshape(-1), K, target.smoothing)
    patch = torch.sum(-labels * F.log_softmax(patch_logits.float().reshape(-1, K), dim=-1), dim=-1).mean()
    return cls + weight * patch, cls, patch
