"""What input a model takes, read from the model itself (used by the closed-form MAC counts of every
family here and by the counters and timers in :mod:`deitlab.bench`)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch.nn as nn

__all__ = ['InputSize', 'resolve_input_size']

InputSize = Tuple[int, int, int]


def _as_size(input_size) -> InputSize:
    if isinstance(input_size, int):
        raise ValueError(f'input_size must be (channels, height, width), got the int {input_size}')
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f'input_size must be three positive ints (channels, height, width), got {input_size!r}')
    return size  # type: ignore[return-value]


def _first_conv_channels(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('first_conv')
    if isinstance(name, str):
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            return None
        return getattr(conv, 'in_channels', None)
    return None


def resolve_input_size(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> InputSize:
    """The (C, H, W) input a model takes.

    An explicit ``input_size`` wins. Otherwise the model's own patch embedding decides
    (``patch_embed.img_size`` and ``patch_embed.in_chans``, else the input channels of
    ``patch_embed.proj``), because
    ``pretrained_cfg['input_size']`` is the registered default and goes stale when a model is
    built with other ``img_size`` / ``in_chans``. Models without a patch embedding use
    ``pretrained_cfg['input_size']`` with the channels of ``pretrained_cfg['first_conv']``.
    """
    if input_size is not None:
        return _as_size(input_size)
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    cfg_size = cfg.get('input_size')
    pe = getattr(model, 'patch_embed', None)
    if pe is not None:
        img = getattr(pe, 'img_size', None)
        proj = getattr(pe, 'proj', None)   # a stem with convolutions before ``proj`` names its input: in_chans
        chans = getattr(pe, 'in_chans', None) or getattr(proj, 'in_channels', None)
        if chans is None and cfg_size is not None:
            chans = cfg_size[0]
        if img is not None and chans is not None:
            if isinstance(img, int):
                img = (img, img)
            return _as_size((chans, img[0], img[1]))
    if cfg_size is not None:
        chans = _first_conv_channels(model) or cfg_size[0]
        return _as_size((chans, cfg_size[1], cfg_size[2]))
    raise ValueError(f'cannot tell the input size of {type(model).__name__}: it has no patch_embed.img_size '
                     f'and no pretrained_cfg["input_size"]; pass input_size=(C, H, W)')
