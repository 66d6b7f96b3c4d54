"""Per-item transforms: fast tensor ops for ``'none'`` / ``'light'``, timm's recipe for ``'deit'``.

* ``'none'``: resize to ``img_size`` if needed (bilinear, antialiased), normalise.
* ``'light'``: as ``'none'``, then a random crop from the image zero-padded by 4 px at the
  dataset's native resolution (scaled with ``img_size``), and a horizontal flip with
  probability ``hflip``. Done on uint8 tensors, no PIL.
* ``'deit'``: :func:`timm.data.create_transform` with the DeiT training settings
  (RandAugment ``rand-m9-mstd0.5-inc1``, bicubic random-resized crop, colour jitter 0.3, random
  erasing 0.25 in pixel mode) on PIL images.

All randomness is drawn from torch's RNG, so DataLoader worker seeding and ``torch.manual_seed``
make it reproducible. timm's PIL transforms draw from Python's ``random`` and NumPy's global RNG;
for each item those are seeded from torch's RNG and restored afterwards.
"""
from __future__ import annotations

import functools
import random
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .base import DataError

__all__ = ['AUGS', 'channel_stats', 'convert_channels', 'resize_images', 'TensorTransform', 'DeitTransform',
           'build_tensor_transform', 'build_pil_transform', 'resize_center_crop']

AUGS = ('none', 'light', 'deit')
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert('L')


def check_aug(aug: str) -> str:
    if aug not in AUGS:
        raise DataError(f'unknown aug {aug!r}; allowed: {", ".join(map(repr, AUGS))}')
    return aug


def channel_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> Tuple[Tuple[float, ...], ...]:
    """The first ``in_chans`` entries of ``mean`` / ``std`` (a single value is repeated)."""
    if in_chans not in (1, 3):
        raise DataError(f'in_chans must be 1 or 3, got {in_chans}')
    out = []
    for name, v in (('mean', mean), ('std', std)):
        v = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
        if len(v) == 1:
            v = v * in_chans
        if len(v) < in_chans:
            raise DataError(f'{name} has {len(v)} entries, need at least in_chans={in_chans}')
        out.append(v[:in_chans])
    if any(s <= 0 for s in out[1]):
        raise DataError(f'std must be positive, got {out[1]}')
    return out[0], out[1]


def convert_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` with C in {1, 3} -> ``in_chans`` channels (gray replicated / luminance).

    Returns a view (no copy) when no conversion or a replication is needed.
    """
    c = images.shape[1]
    if c == in_chans:
        return images
    if c == 1 and in_chans == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and in_chans == 1:
        out = torch.empty(images.shape[0], 1, *images.shape[2:], dtype=torch.uint8)
        w = torch.tensor(LUMA).view(1, 3, 1, 1)
        for s in range(0, len(images), 4096):  # bounded memory
            out[s:s + 4096] = (images[s:s + 4096].float() * w).sum(1, keepdim=True).round_().clamp_(0, 255)
        return out
    raise DataError(f'cannot convert {c}-channel images to in_chans={in_chans}')


def resize_images(images: torch.Tensor, size: int, max_bytes: int = 1 << 30) -> Optional[torch.Tensor]:
    """Resize uint8 ``(N, C, H, W)`` to ``size`` once, in batches (bilinear, antialiased).

    Returns None when the result would exceed ``max_bytes``; items are then resized one by one.
    """
    n, c = images.shape[:2]
    if n * c * size * size > max_bytes:
        return None
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for s in range(0, n, 4096):
        x = images[s:s + 4096].float()
        out[s:s + 4096] = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True,
                                        align_corners=False).round_().clamp_(0, 255)
    return out


class TensorTransform:
    """``'none'`` / ``'light'`` on one uint8 ``(C, H, W)`` tensor -> normalised float ``(C, S, S)``.

    Args:
        img_size: Output side ``S``.
        mean, std: Per-channel statistics (length ``C``) in [0, 1] pixel units.
        train: Apply the ``'light'`` random crop and flip.
        pad: Zero padding of the random crop, in output pixels.
        hflip: Flip probability.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], *,
                 train: bool = False, pad: int = 4, hflip: float = 0.5):
        self.img_size = int(img_size)
        self.train, self.pad, self.hflip = bool(train), int(pad), float(hflip)
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.bias = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        h, w = img.shape[-2:]
        if (h, w) != (s, s):
            img = F.interpolate(img.unsqueeze(0).float(), size=(s, s), mode='bilinear', antialias=True,
                                align_corners=False).squeeze(0)
        if self.train:
            ry, rx, rf = torch.rand(3).tolist()
            p = self.pad
            dy, dx = int(ry * (2 * p + 1)) - p, int(rx * (2 * p + 1)) - p
            if dy or dx:  # out[y, x] = img[y + dy, x + dx], zero outside (negative pad = crop)
                img = F.pad(img, (-dx, dx, -dy, dy))
            if rf < self.hflip:
                img = img.flip(-1)
        return torch.addcmul(self.bias, img.float(), self.scale)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(img_size={self.img_size}, train={self.train}, pad={self.pad}, '
                f'hflip={self.hflip})')


class _TorchSeededPythonRNG:
    """Seed Python's ``random`` and NumPy's global RNG from torch's RNG; restore them on exit."""

    def __enter__(self):
        self.py, self.np = random.getstate(), np.random.get_state()
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
        random.seed(seed)
        np.random.seed(seed)

    def __exit__(self, *exc):
        random.setstate(self.py)
        np.random.set_state(self.np)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    # timm asks for 0 bits at the top RandAugment magnitudes; Pillow >= 12 rejects bits < 1,
    # older Pillow returned a black image, which this keeps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(tf) -> None:
    """Route timm's RandAugment posterize ops in ``tf`` through :func:`_posterize`."""
    from timm.data import auto_augment
    for t in getattr(tf, 'transforms', ()):
        for op in getattr(t, 'ops', ()):
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize


class DeitTransform:
    """timm's DeiT training transform on a PIL image -> normalised float ``(in_chans, S, S)``.

    The image is handled in RGB; with ``in_chans=1`` the normalised output is reduced to luminance
    (the single mean/std is used for all three channels, so the reduction commutes with it).
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], *, in_chans: int = 3,
                 hflip: float = 0.5):
        from timm.data import create_transform
        self.in_chans = in_chans
        m3 = tuple(mean) if in_chans == 3 else tuple(mean) * 3
        s3 = tuple(std) if in_chans == 3 else tuple(std) * 3
        self.tf = create_transform(img_size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
                                   interpolation='bicubic', re_prob=0.25, re_mode='pixel',
                                   color_jitter=0.3, hflip=hflip, mean=m3, std=s3)
        _patch_posterize(self.tf)
        self.luma = torch.tensor(LUMA).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != 'RGB':
            img = img.convert('RGB')
        with _TorchSeededPythonRNG():
            x = self.tf(img)
        return (x * self.luma).sum(0, keepdim=True) if self.in_chans == 1 else x

    def __repr__(self) -> str:
        return f'{type(self).__name__}(in_chans={self.in_chans}, {self.tf})'


def tensor_to_pil(img: torch.Tensor) -> Image.Image:
    """uint8 ``(C, H, W)`` tensor, C in {1, 3} -> PIL image ('L' or 'RGB')."""
    a = img.numpy()
    if a.shape[0] == 1:
        return Image.fromarray(a[0], 'L')
    return Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), 'RGB')


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL 'L' or 'RGB' image -> uint8 ``(C, H, W)`` tensor."""
    a = np.array(img)  # a writable copy
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and crop the centre ``size`` x ``size``."""
    w, h = img.size
    if (w, h) != (size, size):
        k = size / min(w, h)
        nw, nh = max(size, round(w * k)), max(size, round(h * k))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def build_tensor_transform(aug: str, *, img_size: int, native_size: int, in_chans: int,
                           mean: Sequence[float], std: Sequence[float], hflip: float
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Transform for datasets held as uint8 tensors (already ``in_chans`` channels)."""
    check_aug(aug)
    if aug == 'deit':
        tf = DeitTransform(img_size, mean, std, in_chans=in_chans, hflip=hflip)
        return _Compose(tensor_to_pil, tf)
    pad = max(1, round(4 * img_size / native_size))
    return TensorTransform(img_size, mean, std, train=aug == 'light', pad=pad, hflip=hflip)


def build_pil_transform(aug: str, *, img_size: int, in_chans: int, mean: Sequence[float],
                        std: Sequence[float], hflip: float, pad_ref_size: int = 32
                        ) -> Callable[[Image.Image], torch.Tensor]:
    """Transform for datasets read as PIL images (already converted to 'L' or 'RGB').

    For ``'none'`` / ``'light'`` the image is resized (shorter side) and centre-cropped to
    ``img_size``, then handled as a tensor; the crop padding is 4 px per ``pad_ref_size`` px.
    """
    check_aug(aug)
    if aug == 'deit':
        return DeitTransform(img_size, mean, std, in_chans=in_chans, hflip=hflip)
    pad = max(1, round(4 * img_size / pad_ref_size))
    tt = TensorTransform(img_size, mean, std, train=aug == 'light', pad=pad, hflip=hflip)
    return _Compose(functools.partial(resize_center_crop, size=img_size), pil_to_tensor, tt)


class _Compose:
    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, x):
        for f in self.fns:
            x = f(x)
        return x

    def __repr__(self) -> str:
        return f'Compose({", ".join(repr(f) for f in self.fns)})'
