"""The patch stems of ViT-Res: what turns an image into stage 1's patch tokens.

ViT-ResNAS (Liao, Karaman, Sze, "Searching for Efficient Multi-Stage Vision Transformers", arXiv
2109.00642) describes the plain ViT patch embedding; its code release trains with a small
convolutional stem instead. Both are here, chosen by ``ViTRes(stem=...)``:

``'linear'``  timm's ``PatchEmbed``: ``Conv2d(c, C_1, kernel=p, stride=p)`` on the image, i.e. one
              linear map per non-overlapping p x p patch (ViT, DeiT).

``'conv'``    :class:`ConvStem`, for an even patch size p (written from the description of the
              release in our notes, not from its code)::

                  y   = ReLU(BN(Conv3x3_s2(x)))                       c   -> W, H/2 x W/2
                  y   = y + ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(y))))))  W   -> W   (residual pair)
                  out = Conv_{p/2 x p/2, stride p/2}(y)               W   -> C_1, H/p x W/p

              The stride-2 convolution and the (p/2)-strided projection make a total stride of p,
              so the token grid is the linear stem's (the release's 7x7 stride-7 projection after the
              stride-2 convolution is p = 14 at 224 px; p = 4 at 32 px gives a 2x2 stride-2
              projection). The convolutions before the projection have no bias (BatchNorm follows);
              the projection has one, as the linear stem's.

The hidden width ``W`` (``stem_width``, default 32) is one fixed number, not a fraction of C_1:

* in a search space the stage-1 width is a gene, and the supernet shares one stem among all its
  sub-networks: a hidden width tied to C_1 would make every sub-network's stem a different
  network, with BatchNorm statistics that no slice of the supernet's could give. With a fixed W
  only the projection's output channels depend on C_1, and they are sliced and masked exactly like
  the linear stem's (the hidden channels are never masked: per-example channel masks would put
  zeros into the BatchNorm batch statistics);
* the stem runs at half the input resolution, so its cost grows with W^2 at H/2 x W/2 (closed
  form below): W = C_1 / 2 would cost about 2.3G MACs at 224 px for a 192-wide stage 1, more than
  the whole of ViT-ResNAS-Tiny; W = 32 costs about 0.32G there and 5.5M at 32 px (C_1 = 64). 32 is
  also the first width of the usual light CNN stems (MobileNet, EfficientNet).

:func:`stem_macs` is the closed form of both: convolutions and the projection; BatchNorm (which
folds into the preceding convolution at inference), ReLU and the residual add are free, which is
what ``count_gmacs`` counts (``FlopCounterMode`` counts convolutions and matmuls only).
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, to_2tuple

from ..registry import VITRES_STEMS

__all__ = ['STEMS', 'DEFAULT_STEM_WIDTH', 'ConvStem', 'build_stem', 'check_stem', 'stem_macs']

STEMS = VITRES_STEMS.names()   # ('linear', 'conv')
DEFAULT_STEM_WIDTH = 32   # the conv stem's hidden width (module docstring)
IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return tuple(int(a) for a in to_2tuple(v))


def _check_conv_shape(img: Tuple[int, int], patch: Tuple[int, int]) -> None:
    if patch[0] % 2 or patch[1] % 2 or min(patch) < 2:
        raise ValueError(f'the conv stem needs an even patch size (a stride-2 convolution, then a projection with '
                         f'kernel = stride = patch / 2), got patch_size {patch[0]}x{patch[1]}; use an even patch '
                         f'size or stem=\'linear\'')
    if img[0] % patch[0] or img[1] % patch[1]:
        raise ValueError(f'the conv stem needs img_size divisible by patch_size, got {img[0]}x{img[1]} and '
                         f'{patch[0]}x{patch[1]}')


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvStem(nn.Module):
    """The convolutional patch stem (see the module docstring): ``(B, c, H, W) -> (B, H/p * W/p, C_1)``.

    Has ``img_size``, ``patch_size``, ``grid_size``, ``num_patches`` and ``in_chans`` as timm's
    ``PatchEmbed``; ``proj`` is the final projection (its ``in_channels`` is the hidden width, not
    the image's channels: read ``in_chans``).
    """

    def __init__(self, img_size: IntPair, patch_size: IntPair, in_chans: int, embed_dim: int,
                 width: int = DEFAULT_STEM_WIDTH):
        super().__init__()
        img, patch = _pair(img_size), _pair(patch_size)
        _check_conv_shape(img, patch)
        if int(width) < 1:
            raise ValueError(f'stem_width must be positive, got {width}')
        self.img_size, self.patch_size = img, patch
        self.grid_size = (img[0] // patch[0], img[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans, self.width = int(in_chans), int(width)
        self.conv1 = _conv_bn_relu(self.in_chans, self.width, stride=2)
        self.conv2 = _conv_bn_relu(self.width, self.width, stride=1)
        self.conv3 = _conv_bn_relu(self.width, self.width, stride=1)
        k = (patch[0] // 2, patch[1] // 2)
        self.proj = nn.Conv2d(self.width, int(embed_dim), kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size or x.shape[1] != self.in_chans:
            raise ValueError(f'the conv stem takes ({self.in_chans}, {self.img_size[0]}, {self.img_size[1]}) images, '
                             f'got {tuple(x.shape[1:])}')
        y = self.conv1(x)
        y = y + self.conv3(self.conv2(y))
        return self.proj(y).flatten(2).transpose(1, 2)


def check_stem(stem: str) -> str:
    """``stem`` if it is one of :data:`STEMS`, else ``ValueError`` describing them."""
    if stem in VITRES_STEMS:
        return stem
    raise ValueError(f'unknown ViT-Res stem {stem!r}; supported: '
                     + '; '.join(f'{e.name} ({e.help})' for e in VITRES_STEMS))


def build_stem(stem: str, img_size: IntPair, patch_size: IntPair, in_chans: int, embed_dim: int,
               stem_width: int = DEFAULT_STEM_WIDTH) -> nn.Module:
    """The patch stem ``stem`` (one of :data:`STEMS`); ``stem_width`` is the conv stem's hidden width."""
    if check_stem(stem) == 'linear':
        return PatchEmbed(_pair(img_size), _pair(patch_size), in_chans, embed_dim)
    return ConvStem(img_size, patch_size, in_chans, embed_dim, stem_width)


def stem_macs(stem: str, img_size: IntPair, patch_size: IntPair, in_chans: int, embed_dim: int,
              stem_width: int = DEFAULT_STEM_WIDTH) -> int:
    """Multiply-accumulates per image of the stem (module docstring), with ``c`` input channels,
    an H x W image, patch p x p, hidden width W and stage-1 width C_1::

        linear   (H/p)(W/p) * c p p * C_1
        conv     (H/2)(W/2) * (9 c W + 2 * 9 W W)  +  (H/p)(W/p) * W (p/2)(p/2) * C_1
    """
    (h, w), (ph, pw) = _pair(img_size), _pair(patch_size)
    grid = (h // ph) * (w // pw)
    if check_stem(stem) == 'linear':
        return grid * in_chans * ph * pw * embed_dim
    _check_conv_shape((h, w), (ph, pw))
    W = int(stem_width)
    return (h // 2) * (w // 2) * (9 * in_chans * W + 2 * 9 * W * W) + grid * W * (ph // 2) * (pw // 2) * embed_dim
