"""``glyphs-reid``: re-identification of writers of glyphs, generated from a seed.

Spec: ``glyphs-reid[:ids=100,test_ids=50,per_id=16,views=4,val_per_id=4,size=32,seed=0]``.

A *writer* (an identity) has a persistent hand, drawn from its own generator seeded from
``(seed, writer)`` (:func:`writer_hands`), so writer 7's hand is the same whatever the other
options: a font (one of the bundled ones of :func:`.glyphs.find_fonts`), a stroke weight, a slant
(shear), an aspect and a size, an ink colour and opacity, the :data:`LETTERS_PER_WRITER` letters it
writes, the tone of its papyrus, and a damage pattern: two to :data:`MAX_SPOTS` fixed faded spots
(ink fades, papyrus is bleached) at the same place in all its images. Each image is one of the
writer's letters with small jitter of pose, weight, ink and papyrus tone, on a papyrus texture of
its own (:func:`.glyphs.papyrus_texture`), with fragments of neighbouring letters in the same hand,
and blur and noise as in ``glyphs``.

Each image also has a *view* ``0 .. views - 1``, the role of a camera in person re-ID: a papyrus
batch under one lighting, drawn once per view from ``(seed, view)`` (:func:`view_styles`): its fibre
thickness, brightness and colour cast, and a brightness gradient. A writer's images go round the
views (image ``k`` of writer ``w`` is in view ``(k + w) % views``).

Splits (``build_dataset('glyphs-reid', split)``):

* ``train``: ``per_id`` images of each of the first ``ids`` writers, labels ``0 .. ids - 1``
  (classification and triplet training); ``num_classes`` is ``ids``.
* ``val``: ``val_per_id`` other images of the same writers: held-out classification accuracy
  (the trainer's top-1 is meaningful on it).
* ``query`` and ``gallery``: ``test_ids`` other writers (``ids .. ids + test_ids - 1``, disjoint
  from the training ones), ``per_id`` images each: the first image of each view is a query (one per
  view), the rest are the gallery. Items are ``(image, identity, view)``; ``.identities`` and
  ``.views`` are LongTensors (``.targets`` indexes the test writers, ``.classes`` names them). Under
  the Market-1501 protocol a gallery image of the query's writer *and* view is left out of its
  ranking; ``per_id >= views + 2`` guarantees every query a match in another view.

All splits are RGB, horizontal flip off by default (mirrored writing is not the writer's hand), and
bitwise reproducible: per-image randomness comes from one generator per image set (train, val,
test) seeded from ``(seed, set)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import torch

from .base import DataError
from .glyphs import (GREEK_CAPITALS, _uniform, derive_seed, find_fonts, finish_patches, glyph_atlas, glyph_masks,
                     ink_on_texture, neighbour_masks, papyrus_texture, papyrus_tones, random_poses)

__all__ = ['REID_DEFAULTS', 'REID_SPLITS', 'LETTERS_PER_WRITER', 'MAX_SPOTS', 'WriterHands', 'ViewStyles',
           'writer_name', 'writer_hands', 'view_styles', 'damage_maps', 'check_reid_options', 'generate_reid',
           'cached_reid', 'reid_split']

REID_DEFAULTS: Dict[str, Union[int, str]] = {'ids': 100, 'test_ids': 50, 'per_id': 16, 'views': 4, 'val_per_id': 4,
                                             'size': 32, 'seed': 0}
REID_MINIMUM = {'ids': 2, 'test_ids': 2, 'per_id': 1, 'views': 2, 'val_per_id': 1, 'size': 8}
REID_SPLITS = ('train', 'val', 'query', 'gallery')
LETTERS_PER_WRITER = 6
MAX_SPOTS = 4
_CHUNK = 1024
_HAND, _VIEW, _IMAGES = 0x4A4D, 0x7E3D, 0x1A6E
_SETS = {'train': 1, 'val': 2, 'test': 3}


def writer_name(identity: int) -> str:
    return f'writer-{identity:04d}'


@dataclass(frozen=True)
class WriterHands:
    """The hands of some writers, one row each (tensors of length n).

    ``font`` (long, index into the fonts), ``weight`` (stroke weight, 1 = regular), ``slant``
    (shear), ``aspect``, ``scale``, ``ink`` ``(n, 3)`` RGB, ``opacity``, ``letters``
    ``(n, LETTERS_PER_WRITER)`` (long, indices into the Greek capitals), ``paper`` ``(n, 3)`` (papyrus
    tone, see :func:`.glyphs.papyrus_tones`) and ``spots``
    ``(n, MAX_SPOTS, 4)``: centre x, y in ``[-1, 1]`` image coordinates, radius, strength (0 = no spot).
    """

    font: torch.Tensor
    weight: torch.Tensor
    slant: torch.Tensor
    aspect: torch.Tensor
    scale: torch.Tensor
    ink: torch.Tensor
    opacity: torch.Tensor
    letters: torch.Tensor
    paper: torch.Tensor
    spots: torch.Tensor


def writer_hands(identities: Sequence[int], seed: int, num_fonts: int) -> WriterHands:
    """The hands of ``identities``, each drawn from its own generator seeded from ``(seed, identity)``."""
    rows = []
    for identity in identities:
        g = torch.Generator().manual_seed(derive_seed(seed, int(identity), _HAND))
        font = torch.randint(num_fonts, (1,), generator=g)
        weight, slant = _uniform(1, 0.4, 2.0, g), _uniform(1, -0.3, 0.3, g)
        aspect, scale = torch.exp(_uniform(1, -0.2, 0.2, g)), _uniform(1, 0.85, 1.15, g)
        ink = torch.tensor([0.13, 0.09, 0.06]) * _uniform(1, 0.4, 1.4, g) + _uniform(3, -0.06, 0.06, g)
        opacity = _uniform(1, 0.6, 0.95, g)
        letters = torch.randperm(len(GREEK_CAPITALS), generator=g)[:LETTERS_PER_WRITER]
        paper = papyrus_tones(1, g)
        count = int(torch.randint(2, MAX_SPOTS + 1, (1,), generator=g))
        u = torch.rand(MAX_SPOTS, 4, generator=g)
        spots = torch.stack([u[:, 0] * 1.4 - 0.7, u[:, 1] * 1.4 - 0.7, 0.12 + 0.18 * u[:, 2],
                             (0.5 + 0.4 * u[:, 3]) * (torch.arange(MAX_SPOTS) < count)], 1)
        rows.append((font, weight, slant, aspect, scale, ink.clamp(0, 0.45).view(1, 3), opacity,
                     letters.view(1, -1), paper, spots.unsqueeze(0)))
    return WriterHands(*(torch.cat(col) for col in zip(*rows)))


@dataclass(frozen=True)
class ViewStyles:
    """The views (papyrus batch and lighting): ``fibre`` (fibre thickness factor), ``gain`` ``(V, 3)``
    (brightness and colour cast) and ``gradient`` ``(V, 2)`` (brightness slope along x and y)."""

    fibre: torch.Tensor
    gain: torch.Tensor
    gradient: torch.Tensor


def view_styles(views: int, seed: int) -> ViewStyles:
    """The styles of views ``0 .. views - 1``, each from its own generator seeded from ``(seed, view)``."""
    rows = []
    for v in range(views):
        g = torch.Generator().manual_seed(derive_seed(seed, v, _VIEW))
        fibre = _uniform(1, 0.7, 1.7, g)
        gain = _uniform(1, 0.78, 1.15, g) * (1 + _uniform(3, -0.07, 0.07, g))
        angle, slope = _uniform(1, 0, 2 * math.pi, g), _uniform(1, 0.0, 0.22, g)
        rows.append((fibre, gain.view(1, 3), torch.stack([torch.cos(angle), torch.sin(angle)], 1) * slope))
    return ViewStyles(*(torch.cat(col) for col in zip(*rows)))


def _pixel_coords(size: int) -> torch.Tensor:
    return (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1


def damage_maps(spots: torch.Tensor, size: int) -> torch.Tensor:
    """Ink remaining ``(n, 1, size, size)`` in ``(0, 1]`` under faded spots ``(n, K, 4)`` (see :class:`WriterHands`)."""
    c = _pixel_coords(size)
    x, y, r, s = (spots[..., k].unsqueeze(-1).unsqueeze(-1) for k in range(4))
    d2 = (c.view(1, 1, 1, -1) - x) ** 2 + (c.view(1, 1, -1, 1) - y) ** 2
    return torch.prod(1 - s * torch.exp(-d2 / r ** 2), dim=1, keepdim=True)


def _render(hands: WriterHands, who: torch.Tensor, view: torch.Tensor, styles: ViewStyles, atlas: torch.Tensor,
            size: int, g: torch.Generator) -> torch.Tensor:
    """Images of writers ``who`` (rows of ``hands``) in views ``view``: uint8 ``(b, 3, size, size)``."""
    b, fibre = len(who), max(1.0, size / 32)
    letter = hands.letters[who, torch.randint(LETTERS_PER_WRITER, (b,), generator=g)]
    weight = hands.weight[who] + _uniform(b, -0.15, 0.15, g)
    poses = random_poses(b, g, scale=(0.93, 1.07), max_rot_deg=3., max_shear=0.04, max_shift=0.06)
    a, sl = hands.aspect[who], hands.slant[who]
    hand = torch.stack([torch.stack([a, sl / a], 1), torch.stack([torch.zeros(b), 1 / a], 1)], 1)
    poses = torch.cat([poses[:, :, :2] @ (hand * hands.scale[who].view(b, 1, 1)), poses[:, :, 2:]], 2)
    font = hands.font[who]
    mask = glyph_masks(atlas, font, letter, weight, poses, size)
    mask = torch.maximum(mask, neighbour_masks(atlas, font, weight, poses, size, g, 0.3, 0, (1.1, 1.45)))
    mask = torch.maximum(mask, neighbour_masks(atlas, font, weight, poses, size, g, 0.1, 1, (1.2, 1.5)))
    tex = torch.empty(b, 3, size, size)
    for v in range(len(styles.fibre)):  # each view its own papyrus batch
        idx = (view == v).nonzero().squeeze(1)
        if len(idx):
            tone = hands.paper[who[idx]] + torch.randn(len(idx), 3, generator=g) * 0.012
            tex[idx] = papyrus_texture(len(idx), size, size, g, fibre_px=fibre * float(styles.fibre[v]), tone=tone)
    fade = damage_maps(hands.spots[who], size)
    tex = (tex + 0.1 * (1 - fade)).clamp_(0, 1)  # the spots bleach the papyrus too
    ink = hands.ink[who] * _uniform(b, 0.85, 1.15, g).view(b, 1)
    img = ink_on_texture(tex, mask * fade * hands.opacity[who].view(b, 1, 1, 1), g, opacity=(0.85, 1.0),
                         fibre_px=fibre, ink=ink)
    c = _pixel_coords(size)
    grad = styles.gradient[view]
    light = 1 + grad[:, 0].view(b, 1, 1) * c.view(1, 1, -1) + grad[:, 1].view(b, 1, 1) * c.view(1, -1, 1)
    img = (img * styles.gain[view].view(b, 3, 1, 1) * light.unsqueeze(1)).clamp_(0, 1)
    return finish_patches(img, g).mul_(255).round_().to(torch.uint8)


def check_reid_options(opts: Dict[str, Union[int, str]]) -> None:
    """Check the options together (each one's minimum is checked by the spec parser)."""
    per_id, views = int(opts['per_id']), int(opts['views'])
    if per_id < views + 2:
        raise DataError(f'glyphs-reid: per_id={per_id} is too small for views={views}: each test writer needs one '
                        f'query per view and gallery images in at least two views; use per_id >= {views + 2}')


def generate_reid(images_of: str, ids: int, test_ids: int, per_id: int, views: int, val_per_id: int,
                  size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image set: ``'train'`` (``per_id`` images of writers ``0 .. ids - 1``), ``'val'``
    (``val_per_id`` of the same) or ``'test'`` (``per_id`` of writers ``ids .. ids + test_ids - 1``).

    Returns uint8 images ``(n, 3, size, size)``, writer ids, views and the index ``k`` of each
    image within its writer (long ``(n,)`` each), writer-major.
    """
    first, count, per = {'train': (0, ids, per_id), 'val': (0, ids, val_per_id),
                         'test': (ids, test_ids, per_id)}[images_of]
    fonts = find_fonts('bundled')
    atlas = glyph_atlas(fonts, max(64, 2 * size))
    hands = writer_hands(range(first, first + count), seed, len(fonts))
    styles = view_styles(views, seed)
    local = torch.arange(count).repeat_interleave(per)
    k = torch.arange(per).repeat(count)
    view = (k + local + first) % views
    g = torch.Generator().manual_seed(derive_seed(seed, _SETS[images_of], _IMAGES))
    images = torch.empty(len(local), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(local), _CHUNK):
        sl = slice(start, start + _CHUNK)
        images[sl] = _render(hands, local[sl], view[sl], styles, atlas, size, g)
    return images, local + first, view, k


@functools.lru_cache(maxsize=4)
def cached_reid(images_of: str, ids: int, test_ids: int, per_id: int, views: int, val_per_id: int, size: int,
                seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`generate_reid`, remembered in-process (the tensors are shared: do not modify them)."""
    return generate_reid(images_of, ids, test_ids, per_id, views, val_per_id, size, seed)


def reid_split(split: str, opts: Dict[str, Union[int, str]]):
    """``(images, targets, classes, identities, views)`` of one split (see the module docstring)."""
    ids, test_ids = int(opts['ids']), int(opts['test_ids'])
    args = (ids, test_ids, int(opts['per_id']), int(opts['views']), int(opts['val_per_id']), int(opts['size']),
            int(opts['seed']))
    if split in ('train', 'val'):
        images, identities, views, _ = cached_reid(split, *args)
        return images, identities, tuple(map(writer_name, range(ids))), identities, views
    images, identities, views, k = cached_reid('test', *args)
    keep = (k < int(opts['views'])) if split == 'query' else (k >= int(opts['views']))
    classes = tuple(map(writer_name, range(ids, ids + test_ids)))
    return images[keep], identities[keep] - ids, classes, identities[keep], views[keep]
