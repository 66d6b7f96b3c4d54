"""DeiT distillation losses (Touvron et al. 2021, Sec. 3).

With student logits ``Z_s``, teacher logits ``Z_t``, softmax ``psi``, true (possibly mixed and
smoothed) label ``y`` and the base loss ``L_base``:

* soft:  ``L = (1 - a) L_base(Z_s, y) + a tau^2 KL(psi(Z_t / tau) || psi(Z_s / tau))``
* hard:  ``L = (1 - a) L_base(Z_s, y) + a CE(Z_s, y_t)``, with ``y_t = argmax Z_t``

For a distilled student (class and distillation tokens) the class head takes the label term and
the distillation head the teacher term. The teacher sees the same augmented, mixed batch as the
student. DeiT's code divides the KL sum by ``numel`` (batch x classes); ``kd_norm='batch'`` divides
by the batch size instead (the usual ``batchmean``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def adapt_input(x: torch.Tensor, in_chans: int, img_size) -> torch.Tensor:
    """Resize a batch and convert its channels for a model with another input shape (teachers)."""
    size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
    if x.shape[1] != in_chans:
        if in_chans == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1)
        else:
            raise ValueError(f'cannot convert {x.shape[1]}-channel input to {in_chans} channels')
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
    return x


class DistillationLoss(nn.Module):
    """Base loss plus DeiT's soft or hard distillation from a frozen teacher.

    Args:
        base: the label loss (cross-entropy with smoothing, or soft-target CE under Mixup).
        teacher: frozen teacher in eval mode, or None for no distillation.
        kind: 'none', 'soft' or 'hard'.
        alpha: weight of the teacher term.
        tau: temperature of the soft term.
        kd_norm: 'numel' (DeiT's code) or 'batch'.
    """

    def __init__(self, base: nn.Module, teacher: Optional[nn.Module] = None, kind: str = 'none',
                 alpha: float = 0.5, tau: float = 1.0, kd_norm: str = 'numel'):
        super().__init__()
        if kind not in ('none', 'soft', 'hard'):
            raise ValueError(f"distillation kind must be none, soft or hard, got {kind!r}")
        if kind != 'none' and teacher is None:
            raise ValueError(f'{kind} distillation needs a teacher model')
        self.base = base
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau
        self.kd_norm = kd_norm
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            from ..bench import resolve_input_size
            try:
                chans, h, w = resolve_input_size(teacher)
                self.teacher_in = (chans, (h, w))
            except ValueError:  # input shape unknown: the teacher gets the student's batch as is
                self.teacher_in = None

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = inputs if self.teacher_in is None else adapt_input(inputs, *self.teacher_in)
            return self.teacher(x).float()

    def kd_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.kind == 'soft':
            t = self.tau
            kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                          reduction='sum', log_target=True)
            denom = student.numel() if self.kd_norm == 'numel' else student.shape[0]
            return kl * (t * t) / denom
        return F.cross_entropy(student, teacher.argmax(dim=1))

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            out_cls, out_dist = outputs
        else:
            out_cls = out_dist = outputs
        if self.kind == 'none':
            if out_dist is out_cls:
                return self.base(out_cls, targets)
            return 0.5 * (self.base(out_cls, targets) + self.base(out_dist, targets))
        base = self.base(out_cls, targets)
        kd = self.kd_term(out_dist.float(), self.teacher_logits(inputs))
        return (1 - self.alpha) * base + self.alpha * kd
