"""``--mix``: how each training batch is mixed and which label it gets.

========================  =====================================================================
``none``                  no mixing; cross-entropy with label smoothing
``mixup``, ``cutmix``     timm's Mixup or CutMix alone (Zhang et al. 2018; Yun et al. 2019)
``mixup-cutmix``          the DeiT recipe: timm's Mixup / CutMix, switching per batch (default)
``transmix``              Mixup / CutMix; a CutMix batch's label follows the class token's
                          attention (TransMix, Chen et al., CVPR 2022)
``maskmix``               MaskMix with probability ``maskmix_prob`` per batch, otherwise Mixup /
                          CutMix; area labels (MixPro's released DeiT-T/S configuration)
``mixpro``                ``maskmix`` with Progressive Attention Labelling on MaskMix batches
                          (MixPro, Zhao et al., ICLR 2023)
``patchmix``              CutMix aligned to the last stage's token grid, replacing Mixup /
                          CutMix, and a loss on every patch token through the model's patch
                          head (ViT-ResNAS's release; :mod:`deitlab.train.patchmix`)
========================  =====================================================================

Labels, with ``y_i`` the label-smoothed one-hot, ``pi`` the pairing, ``lambda_area`` the share of
x_i's pixels and ``lambda_attn = sum_t m_t a_t / sum_t a_t`` (class-token attention ``a`` of the
last block over the token mask ``m``; :mod:`deitlab.train.mixpro`):

* Mixup, CutMix, MaskMix: soft-target CE against ``lambda_area y_i + (1 - lambda_area) y_pi(i)``.
* TransMix (CutMix batches): the same with ``lambda = w lambda_area + (1 - w) lambda_attn``;
  ``w = transmix_area_weight`` is 0.5 in the released code (``(lam0 + lam1) / 2``) and 0 in the
  paper's Eq. 7. Mixup batches keep the area label.
* patchmix: soft-target CE of the class token against the area label plus ``patch_loss_weight``
  (0.5) times the mean soft-target CE of every last-stage patch token against the label of the
  image its region came from.
* MixPro (MaskMix batches): ``alpha = cos(y~, softmax(z))``,
  ``lambda = alpha lambda_attn + (1 - alpha) lambda_area`` and the hard-label loss
  ``lambda CE(z, y_i) + (1 - lambda) CE(z, y_pi(i))`` with no smoothing, as released. Its other
  batches get Mixup / CutMix with area labels (the release does not apply TransMix there).

The paper's probabilities are the defaults: Mixup alpha 0.8, CutMix alpha 1.0, switch to CutMix
0.5 (0.8 for TransMix, its released DeiT config), MaskMix probability 0.5 with
``lambda ~ Beta(1, 1)``. The MaskMix cell defaults to the multiple of the patch size closest to a
quarter of the image side (4 x 4 cells, as the released DeiT configs: 56-pixel cells at 224).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam
from timm.loss import SoftTargetCrossEntropy

from ..registry import MIX_MODES as MIX_REGISTRY
from ..layers.capture import CapturedAttention, capture_cls_attention, find_cls_attention
from .mixpro import attention_lambda, cutmix_token_mask, mask_mix, mixed_ce, pal_lambda, smooth_one_hot
from .patchmix import PatchMixTarget, patch_mix, patch_mix_loss, patch_token_grid

__all__ = ['MIX_MODES', 'ATTENTION_MODES', 'MixTarget', 'PatchMixTarget', 'BatchMixer', 'MixLoss',
           'default_mask_size']

MIX_MODES = MIX_REGISTRY.names()
ATTENTION_MODES = MIX_REGISTRY.names(attention=True)
MASK_MODES = MIX_REGISTRY.names(maskmix=True)
PATCH_MODES = MIX_REGISTRY.names(patch=True)


def default_mask_size(img_size: int, patch_size: int) -> int:
    """The multiple of ``patch_size`` closest to ``img_size / 4`` (at least one patch)."""
    return patch_size * max(1, round(img_size / (4 * patch_size)))


def model_patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """A plain ViT's patch size (``patch_embed.patch_size``), or None."""
    ps = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if ps is None:
        return None
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


@dataclass
class MixTarget:
    """The label of a batch whose weights depend on the model's attention (TransMix, PAL).

    ``kind`` is 'transmix' or 'pal'; ``y`` (B,) hard labels; ``perm`` (B,) the partner of each
    sample; ``lam_area`` (B,) the weight of ``y`` by area; ``token_mask`` (B, N) each token's share
    from x_i; ``y_soft`` (B, K) the area-mixed label smoothed by ``smoothing``; ``captured`` is filled during the
    forward by :meth:`BatchMixer.capture`.
    """
    kind: str
    y: torch.Tensor
    perm: torch.Tensor
    lam_area: torch.Tensor
    token_mask: torch.Tensor
    y_soft: torch.Tensor
    smoothing: float = 0.0
    captured: Optional[CapturedAttention] = None

    def attention(self) -> torch.Tensor:
        if self.captured is None or self.captured.attn is None:
            raise RuntimeError(f'a {self.kind} label needs the class-token attention of this forward; run the model '
                               f'inside BatchMixer.capture(target)')
        return self.captured.attn


class _BoxMixup(Mixup):
    """timm's batch-mode Mixup / CutMix that also remembers the CutMix box and its (corrected)
    lambda, for TransMix. timm pairs every sample with ``x.flip(0)``."""

    box = None
    lam = 1.0

    def _mix_batch(self, x):
        self.box = None
        lam, use_cutmix = self._params_per_batch()
        if lam != 1. and use_cutmix:
            self.box, lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=self.cutmix_minmax,
                                                correct_lam=self.correct_lam)
            yl, yh, xl, xh = self.box
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        elif lam != 1.:
            x.mul_(lam).add_(x.flip(0).mul_(1. - lam))
        self.lam = lam
        return lam


class BatchMixer:
    """Mixes a batch per the ``--mix`` mode and says which label it gets (see the module doc).

    ``model`` is the bare module (not the DDP wrapper); ``img_size`` (H, W) the training input.
    Raises ValueError with the reason when the mode cannot work with the model.
    """

    def __init__(self, mode: str, model: nn.Module, num_classes: int, img_size: Tuple[int, int], *,
                 smoothing: float = 0.1, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, mixup_prob: float = 1.0,
                 switch_prob: Optional[float] = None, maskmix_prob: float = 0.5, maskmix_alpha: float = 1.0,
                 mask_size: Optional[int] = None, transmix_area_weight: float = 0.5, pal_detach_alpha: bool = False):
        entry = MIX_REGISTRY.get(mode)
        if mode == 'mixup' and mixup_alpha <= 0:
            raise ValueError('--mix mixup needs --mixup > 0 (the Beta alpha)')
        if mode in ('cutmix', 'transmix', *PATCH_MODES) and cutmix_alpha <= 0:
            raise ValueError(f'--mix {mode} needs --cutmix > 0 (the Beta alpha)')
        if mode in MASK_MODES and not (0 < maskmix_prob <= 1 and maskmix_alpha > 0):
            raise ValueError(f'--mix {mode} needs 0 < --maskmix-prob <= 1 and --maskmix-alpha > 0')
        if not 0 <= transmix_area_weight <= 1:
            raise ValueError(f'transmix_area_weight must be in [0, 1], got {transmix_area_weight}')
        self.mode, self.model, self.num_classes = mode, model, num_classes
        self.img_size = tuple(img_size)
        self.smoothing, self.maskmix_prob, self.maskmix_alpha = smoothing, maskmix_prob, maskmix_alpha
        self.transmix_area_weight, self.pal_detach_alpha = transmix_area_weight, pal_detach_alpha
        self.patch_size = model_patch_size(model)
        self.patch_grid = self.patch_cell = None
        if mode in PATCH_MODES:
            self.patch_grid, self.patch_cell = patch_token_grid(model, self.img_size)   # the error, up front
            self.cutmix_alpha, self.mixup_prob = cutmix_alpha, mixup_prob
        if mode in ATTENTION_MODES:
            try:
                find_cls_attention(model)  # the error, up front
            except ValueError as e:
                raise ValueError(f'{e}, so TransMix/MixPro attention labels are undefined '
                                 f'(use --mix maskmix, mixup-cutmix, mixup or cutmix)') from None
            if self.patch_size is None:
                raise ValueError(f'--mix {mode} needs a ViT with a patch embedding (patch_embed.patch_size)')
        self.mask_size = None
        self.mask_patch = self.patch_size
        if mode in MASK_MODES:
            if self.patch_size is None:
                if mask_size is None:
                    raise ValueError(f'--mix {mode}: {type(model).__name__} has no patch embedding '
                                     f'(patch_embed.patch_size) to align the mask cells to; give --mask-size')
                self.mask_patch = (1, 1)  # a conv stem: cells of any size
            ph, pw = self.mask_patch
            if mask_size is None:
                mask_size = default_mask_size(min(self.img_size), ph)
            if mask_size % ph or mask_size % pw:
                raise ValueError(f'mask size {mask_size} must be a multiple of the patch size {self.mask_patch} so '
                                 f'that every token comes from one image')
            self.mask_size = int(mask_size)
        if switch_prob is None:
            switch_prob = 0.8 if mode == 'transmix' else 0.5
        mix_a = mixup_alpha if entry['mixup'] else 0.0
        cut_a = cutmix_alpha if entry['cutmix'] else 0.0
        self.mixup = None
        self.off_reason = ('mixup-prob is 0' if mixup_prob <= 0 else
                           'mixup and cutmix are 0' if mix_a <= 0 and cut_a <= 0 else None)
        if mode != 'none' and mode not in PATCH_MODES and mixup_prob > 0 and (mix_a > 0 or cut_a > 0):
            cls = _BoxMixup if mode == 'transmix' else Mixup
            self.mixup = cls(mixup_alpha=mix_a, cutmix_alpha=cut_a, prob=mixup_prob, switch_prob=switch_prob,
                             label_smoothing=smoothing, num_classes=num_classes)
        self.stats = {}

    @property
    def active(self) -> bool:
        """Whether batches are mixed at all (then every target is soft or a :class:`MixTarget`)."""
        return self.mixup is not None or self.mode in MASK_MODES or self.mode in PATCH_MODES

    def describe(self) -> str:
        """What is applied, e.g. ``'none (mixup and cutmix are 0)'`` for ``--mix mixup-cutmix --mixup 0
        --cutmix 0``, or ``'mixup-cutmix, Mixup 0.8 / CutMix 1.0 switch 0.5'``."""
        if not self.active:
            return 'none' if self.mode == 'none' else f'none ({self.off_reason})'
        if self.mode in PATCH_MODES:
            (gh, gw), (ch, cw) = self.patch_grid, self.patch_cell
            return (f'{self.mode}, CutMix {self.cutmix_alpha} on the {gh}x{gw} last-stage token grid ({ch}x{cw} px '
                    f'cells) on {self.mixup_prob:g} of the batches, a loss on every patch token')
        parts = [self.mode]
        if self.mode in MASK_MODES:
            parts.append(f'MaskMix p={self.maskmix_prob} cells of {self.mask_size}px')
        m = self.mixup
        if m is None:
            parts.append(f'other batches unmixed ({self.off_reason})')
        elif m.mixup_alpha > 0 and m.cutmix_alpha > 0:
            parts.append(f'Mixup {m.mixup_alpha} / CutMix {m.cutmix_alpha} switch {m.switch_prob}')
        else:
            both = self.mode not in ('mixup', 'cutmix')   # the other one was asked for but is 0
            parts.append(f'Mixup {m.mixup_alpha} only' + (' (cutmix is 0)' if both else '') if m.mixup_alpha > 0
                         else f'CutMix {m.cutmix_alpha} only' + (' (mixup is 0)' if both else ''))
        return ', '.join(parts)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Union[torch.Tensor, MixTarget]]:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f'batch of size {tuple(x.shape[-2:])}, mixer built for {self.img_size}')
        if self.mode in PATCH_MODES:
            return patch_mix(x, y, self.num_classes, self.patch_grid, alpha=self.cutmix_alpha, smoothing=self.smoothing,
                             prob=self.mixup_prob)
        if self.mode in MASK_MODES and float(torch.rand(())) < self.maskmix_prob:
            return self._mask_mix(x, y)
        if self.mixup is None:
            return x, (smooth_one_hot(y, self.num_classes, self.smoothing) if self.active else y)
        x, soft = self.mixup(x, y)
        box = getattr(self.mixup, 'box', None)
        if box is None:
            return x, soft
        B = x.shape[0]
        perm = torch.arange(B - 1, -1, -1, device=x.device)
        tok = cutmix_token_mask(box, self.img_size, self.patch_size, B, device=x.device)
        lam_area = torch.full((B,), float(self.mixup.lam), device=x.device)
        return x, MixTarget('transmix', y, perm, lam_area, tok, soft, self.smoothing)

    def _mask_mix(self, x, y):
        xm, y_soft, info = mask_mix(x, y, self.num_classes, self.mask_size, self.mask_patch, alpha=self.maskmix_alpha,
                                    smoothing=self.smoothing)
        if self.mode == 'maskmix':
            return xm, y_soft
        return xm, MixTarget('pal', y, info.perm, info.lam_area, info.token_mask, y_soft, self.smoothing)

    def capture(self, target) -> contextlib.AbstractContextManager:
        """Around the forward (and loss) of a batch: records the attention a :class:`MixTarget` needs,
        or the patch logits a :class:`PatchMixTarget` needs."""
        if isinstance(target, PatchMixTarget):
            return self._capture_patches(target)
        if not isinstance(target, MixTarget):
            return contextlib.nullcontext()
        return self._capture(target)

    @contextlib.contextmanager
    def _capture_patches(self, target: PatchMixTarget):
        with self.model.capture_patch_logits() as got:
            target.captured = got
            yield got

    @contextlib.contextmanager
    def _capture(self, target: MixTarget):
        with capture_cls_attention(self.model) as cap:
            target.captured = cap
            yield cap


class MixLoss(nn.Module):
    """The label loss for :class:`BatchMixer` targets: soft-target CE for soft labels, TransMix's
    attention-weighted soft label, MixPro's PAL hard-label loss, or patchmix's class-token plus
    ``patch_loss_weight`` times patch-token loss (see the module doc).

    Keeps running means of PAL's ``alpha`` and ``lambda``, TransMix's ``lambda_attn`` and
    patchmix's two losses (:meth:`pop_stats`) so a run can log how far the labels moved from the
    area weights.
    """

    def __init__(self, transmix_area_weight: float = 0.5, pal_detach_alpha: bool = False,
                 patch_loss_weight: float = 0.5):
        super().__init__()
        if patch_loss_weight < 0:
            raise ValueError(f'patch_loss_weight must be >= 0, got {patch_loss_weight}')
        self.soft_ce = SoftTargetCrossEntropy()
        self.w = transmix_area_weight
        self.detach_alpha = pal_detach_alpha
        self.patch_weight = patch_loss_weight
        self._sums = {}

    def _note(self, key: str, v: torch.Tensor) -> None:
        s, n = self._sums.get(key, (0.0, 0))
        self._sums[key] = (s + float(v.detach().float().sum()), n + v.numel())

    def pop_stats(self) -> dict:
        out = {k: s / max(n, 1) for k, (s, n) in self._sums.items()}
        self._sums = {}
        return out

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        if isinstance(target, PatchMixTarget):
            loss, cls, patch = patch_mix_loss(logits, target.patch_logits(), target, self.patch_weight)
            self._note('patchmix_cls_loss', cls)
            self._note('patchmix_patch_loss', patch)
            return loss
        if not isinstance(target, MixTarget):
            return self.soft_ce(logits, target)
        lam_attn = attention_lambda(target.token_mask, target.attention())
        if target.kind == 'transmix':
            lam = self.w * target.lam_area + (1 - self.w) * lam_attn
            self._note('transmix_lam_attn', lam_attn)
            y1 = smooth_one_hot(target.y, logits.shape[-1], target.smoothing)
            soft = lam[:, None] * y1 + (1 - lam[:, None]) * y1[target.perm]
            return self.soft_ce(logits, soft)
        lam = pal_lambda(lam_attn, target.lam_area, logits.float(), target.y_soft, detach_alpha=self.detach_alpha)
        with torch.no_grad():
            p = logits.float().softmax(-1)
            self._note('pal_alpha', F.cosine_similarity(target.y_soft.to(p.dtype), p, dim=-1))
            self._note('pal_lambda_shift', (lam - target.lam_area).abs())
        return mixed_ce(logits.float(), target.y, target.perm, lam)
