"""Training-time defences against unlearnable data (``deitlab train --defence SPEC``).

The cheap ones among those the CUDA paper tests (Sadasivan et al., CVPR 2023, Sec. 5); each acts
on a training batch before mixing, in pixel space ``x in [0, 1]`` (the batch is normalised, so
``x = x_n std + mean``):

``blur[:p=0.3,k=3]``
    random-blur augmentation: every image is convolved (depthwise) with a fresh random ``k x k``
    filter, entries ``U(0, p)`` and one random entry 1, and divided by its maximum -- CUDA's own
    operation with a new filter per image and step (the paper's p_b' = 0.1 and 0.3).
``noise[:std=0.25]``
    Gaussian data augmentation ``clip(x + N(0, std^2), 0, 1)``, the training side of randomized
    smoothing (Cohen et al., ICML 2019).
``adv[:eps=4,steps=3,alpha=...]``
    PGD adversarial training (Madry et al., ICLR 2018) in L-infinity, ``eps`` in 1/255 units,
    ``steps`` steps of size ``alpha`` (default ``2.5 eps / steps``) from a random start, maximising
    cross-entropy on the true labels with the model in eval mode; the model then trains on the
    perturbed batch. The paper uses 10 steps; fewer keep it affordable on a CPU.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DEFENCES', 'parse_defence', 'build_defence', 'random_blur', 'pgd_linf']

DEFENCES: Dict[str, Dict[str, float]] = {
    'none': {},
    'blur': {'p': 0.3, 'k': 3},
    'noise': {'std': 0.25},
    'adv': {'eps': 4.0, 'steps': 3, 'alpha': 0.0},
}


def parse_defence(spec: str) -> tuple:
    """``'adv:eps=8,steps=5'`` -> ``('adv', {'eps': 8.0, 'steps': 5, 'alpha': 0.0})``; ValueError with
    the reason for an unknown name or option."""
    name, _, arg = (spec or 'none').strip().partition(':')
    name = name.strip().lower()
    if name not in DEFENCES:
        raise ValueError(f"unknown defence {name!r}; choose one of {', '.join(DEFENCES)} "
                         f"(e.g. blur:p=0.3, noise:std=0.25, adv:eps=4,steps=3)")
    opts = dict(DEFENCES[name])
    for item in filter(None, (s.strip() for s in arg.split(','))):
        key, eq, value = (s.strip() for s in item.partition('='))
        if key not in opts or not eq:
            raise ValueError(f"defence {name}: unknown option {item!r}; options: "
                             f"{', '.join(f'{k}={v}' for k, v in DEFENCES[name].items()) or 'none'}")
        try:
            opts[key] = type(DEFENCES[name][key])(float(value))
        except ValueError:
            raise ValueError(f'defence {name}: {key} must be a number, got {value!r}') from None
    if name == 'blur' and not (opts['k'] >= 1 and opts['k'] % 2 == 1 and 0 <= opts['p'] < 1):
        raise ValueError(f"defence blur: k must be odd and >= 1 and p in [0, 1), got k={opts['k']}, p={opts['p']}")
    if name == 'noise' and opts['std'] <= 0:
        raise ValueError(f"defence noise: std must be > 0, got {opts['std']}")
    if name == 'adv' and not (opts['eps'] > 0 and opts['steps'] >= 1 and opts['alpha'] >= 0):
        raise ValueError(f'defence adv: needs eps > 0, steps >= 1 and alpha >= 0, got {opts}')
    return name, opts


def random_blur(x: torch.Tensor, p: float = 0.3, k: int = 3, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """A fresh CUDA-style filter per image (same filter on every channel), max-normalised; ``x`` in
    [0, 1], shape (B, C, H, W)."""
    B, C, H, W = x.shape
    w = torch.rand(B, k * k, generator=generator) * p
    w[torch.arange(B), torch.randint(0, k * k, (B,), generator=generator)] = 1.0
    w = w.view(B, 1, k, k).repeat_interleave(C, dim=0).to(x.device, torch.float32)
    out = F.conv2d(x.float().reshape(1, B * C, H, W), w, padding=k // 2, groups=B * C).view(B, C, H, W)
    peak = out.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 0, out / peak.clamp_min(1e-12), 0.0).clamp(0, 1).to(x.dtype)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float,
             lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """L-infinity PGD from a random start on a normalised batch ``x``.

    ``eps`` and ``alpha`` are in pixel units; ``scale`` (1, C, 1, 1) is ``1 / std`` (pixel ->
    normalised), ``lo``/``hi`` the normalised images of pixel values 0 and 1. Only the input gets
    gradients; the model's parameter gradients are untouched.
    """
    was_training = model.training
    model.eval()
    e = eps * scale
    delta = (torch.rand_like(x) * 2 - 1) * e
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            out = model(torch.max(torch.min(x + delta, hi), lo))
            if isinstance(out, (tuple, list)):
                out = out[0]
            grad, = torch.autograd.grad(F.cross_entropy(out.float(), y), delta)
            delta = torch.max(torch.min(delta.detach() + alpha * scale * grad.sign(), e), -e)
    finally:
        model.train(was_training)
    return torch.max(torch.min(x + delta, hi), lo).detach()


def build_defence(spec: str, mean: Sequence[float], std: Sequence[float]
                  ) -> Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """A ``defence(model, x, y) -> x`` for normalised batches, or None for ``'none'``."""
    name, o = parse_defence(spec)
    if name == 'none':
        return None
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_pixels(x):
        return x * s.to(x.device) + m.to(x.device)

    def to_model(px):
        return ((px - m.to(px.device)) / s.to(px.device)).to(px.dtype)

    if name == 'blur':
        return lambda model, x, y: to_model(random_blur(to_pixels(x), o['p'], int(o['k'])))
    if name == 'noise':
        return lambda model, x, y: to_model((to_pixels(x) + o['std'] * torch.randn_like(x)).clamp(0, 1))
    eps, steps = o['eps'] / 255, int(o['steps'])
    alpha = o['alpha'] / 255 if o['alpha'] else 2.5 * eps / steps

    def adv(model, x, y):
        dev = x.device
        return pgd_linf(model, x, y, eps, steps, alpha, to_model(torch.zeros_like(m)).to(dev),
                        to_model(torch.ones_like(m)).to(dev), (1 / s).to(dev))
    return adv
