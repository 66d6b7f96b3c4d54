"""``glyphs-fine``: fine-grained glyphs, one class per (letter, font), generated from a seed.

Spec: ``glyphs-fine[:train=1920,val=1280,size=32,seed=0,letters=8,fonts=bundled]``. A class is one
of the first ``letters`` letters of :data:`FINE_LETTERS` (an order that puts look-alikes first:
upright strokes ``Η Ν Π Μ Ε Γ``, then the triangles ``Α Λ Δ``, ...) written in one of the usable
fonts of :func:`.glyphs.find_fonts` (``bundled``: matplotlib's 16 DejaVu and STIX faces), so there
are ``letters x fonts`` classes (8 x 16 = 128 by default), named ``'<letter>/<font name>'``, e.g.
``'alpha/DejaVu Sans Bold'``, letter-major: class ``i * num_fonts + j`` is letter ``i`` in font
``j``. ``train`` and ``val`` are totals, spread evenly over the classes (counts differ by at most
one when they do not divide) and each must be at least the number of classes: few images per
class, as in fine-grained benchmarks.

An image is made as in ``glyphs`` (:func:`.glyphs.compose_glyphs`: the same scale, aspect,
rotation and shift of :func:`.glyphs.random_poses`, fragments of neighbouring letters in the same
font, the same ink, papyrus, blur and noise), with two exceptions, because here they would erase
the class: the random shear is at most 0.05 (not 0.15; DejaVu Sans Oblique *is* DejaVu Sans sheared
by about 0.2) and the stroke weight varies between 0.85 and 1.2 around the font's own (not from
eroded to twice dilated; Bold and Book differ by about one dilation). So what tells two classes of
one letter apart is the font's local shape: serifs, stroke contrast and weight, terminals, slant.
RGB, horizontal flip off by default (a mirrored letter is not a letter). Each split has its own
generator seeded from ``(seed, split)`` (other streams than ``glyphs``'), so equal options give
bitwise-equal tensors.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from PIL import ImageFont

from .base import DataError
from .glyphs import (GLYPH_CLASSES, _uniform, compose_glyphs, derive_seed, find_fonts, glyph_atlas,
                     random_poses)

__all__ = ['FINE_LETTERS', 'FINE_DEFAULTS', 'font_name', 'fine_classes', 'check_fine_options',
           'generate_fine_glyphs', 'cached_fine_glyphs']

FINE_LETTERS = (
    'eta', 'nu', 'pi', 'mu', 'epsilon', 'gamma', 'alpha', 'lambda', 'delta', 'kappa', 'chi', 'xi',
    'zeta', 'tau', 'iota', 'upsilon', 'omicron', 'theta', 'phi', 'omega', 'rho', 'beta', 'sigma', 'psi',
)
FINE_DEFAULTS: Dict[str, Union[int, str]] = {'train': 1920, 'val': 1280, 'size': 32, 'seed': 0, 'letters': 8,
                                             'fonts': 'bundled'}
FINE_MINIMUM = {'train': 1, 'val': 1, 'size': 8, 'letters': 2}
MAX_SHEAR = 0.05
WEIGHT_RANGE = (0.85, 1.2)
_CHUNK = 2048
_SALT = 0xF1E5


@functools.lru_cache(maxsize=None)
def font_name(path: str) -> str:
    """``'DejaVu Sans Bold'``: family and style from the font file, without ``Book``/``Regular``."""
    try:
        family, style = ImageFont.truetype(path, 10).getname()
    except Exception:
        return Path(path).stem
    family, style = family or Path(path).stem, style or ''
    return family if style in ('', 'Book', 'Regular', 'Roman', 'Normal') else f'{family} {style}'


@functools.lru_cache(maxsize=8)
def _fonts_and_names(fonts: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    paths = find_fonts(fonts)
    names = [font_name(p) for p in paths]
    # two files with one name (system copies of a family): tell them apart by file name
    names = [n if names.count(n) == 1 else f'{n} ({Path(p).stem})' for n, p in zip(names, paths)]
    return paths, tuple(names)


def fine_classes(letters: int = 8, fonts: str = 'bundled') -> Tuple[str, ...]:
    """Class names ``'<letter>/<font name>'``, letter-major (class ``i * num_fonts + j``)."""
    _, names = _fonts_and_names(fonts)
    return tuple(f'{letter}/{name}' for letter in FINE_LETTERS[:letters] for name in names)


def check_fine_options(opts: Dict[str, Union[int, str]]) -> Tuple[str, ...]:
    """Check the options together; return the class names."""
    if not 2 <= int(opts['letters']) <= len(FINE_LETTERS):
        raise DataError(f'glyphs-fine: option letters must be in 2..{len(FINE_LETTERS)}, got {opts["letters"]}')
    classes = fine_classes(int(opts['letters']), str(opts['fonts']))
    for split in ('train', 'val'):
        if int(opts[split]) < len(classes):
            raise DataError(f'glyphs-fine: option {split}={opts[split]} gives some of the {len(classes)} classes '
                            f'({opts["letters"]} letters x {len(classes) // int(opts["letters"])} fonts) no image; '
                            f'use {split} >= {len(classes)}')
    return classes


def generate_fine_glyphs(n: int, size: int = 32, seed: int = 0, split: str = 'train', letters: int = 8,
                         fonts: str = 'bundled') -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` class-balanced images: uint8 ``(n, 3, size, size)`` and long labels ``(n,)``."""
    paths, _ = _fonts_and_names(fonts)
    atlas = glyph_atlas(paths, max(64, 2 * size))
    letter_ids = torch.tensor([GLYPH_CLASSES.index(c) for c in FINE_LETTERS[:letters]])
    g = torch.Generator().manual_seed(derive_seed(seed, {'train': 1, 'val': 2}[split], _SALT))
    labels = (torch.arange(n) % (letters * len(paths)))[torch.randperm(n, generator=g)]
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        lab = labels[start:start + _CHUNK]
        b = len(lab)
        font, letter = lab % len(paths), letter_ids[lab // len(paths)]
        weight = _uniform(b, *WEIGHT_RANGE, g)
        poses = random_poses(b, g, max_shear=MAX_SHEAR)
        images[start:start + b] = compose_glyphs(atlas, font, letter, weight, poses, size, g)
    return images, labels


@functools.lru_cache(maxsize=4)
def cached_fine_glyphs(n: int, size: int, seed: int, split: str, letters: int,
                       fonts: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`generate_fine_glyphs`, remembered in-process (the tensors are shared: do not modify them)."""
    return generate_fine_glyphs(n, size, seed, split, letters, fonts)
