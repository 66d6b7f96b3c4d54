"""Synthetic papyrus pages with every glyph boxed and labelled: ``deitlab papyri synth``.

The ICDAR 2023 competition on detection and recognition of Greek letters on papyri (the data of
Turnbull & Mannix, "Detecting and recognizing characters in Greek papyri with YOLOv8, DeiT and
SimCLR", IJDAR 2024) cannot be downloaded here, and no package ships papyri. These pages stand in
for it: written in the competition's annotation schema (:mod:`.coco`, competition category ids),
they run through the same readers, detectors and metric as the real pages.

A page, made from ``(seed, page index)`` alone (:func:`make_page`), from the glyph building blocks
of :mod:`deitlab.data.glyphs`:

* **Papyrus**: light-brown base with crossed fibres and blotches (:func:`~deitlab.data.glyphs.papyrus_texture`).
* **Hands**: 1..``hands`` per page, each writing a run of lines, each a font, size, stroke weight,
  slant, aspect, letter spacing and ink colour. Each line has its own size, a sloping, wobbling
  baseline and a start; its letters are drawn from Greek unigram frequencies
  (:data:`.alphabet.FREQUENCIES`) and written in *scriptio continua* (no spaces), each with a
  little jitter of size, aspect, slant, rotation, weight and height. The spacing lets neighbours
  touch or overlap slightly, as in ligatures. A font lacking the lunate sigma draws its fallback
  (:func:`.alphabet.font_code_points`); the label is the letter.
* **Damage**: a torn outline and holes from thresholded smooth noise, filled with a dark mount
  colour (the papyrus next to them darkened), and abraded patches where the ink is rubbed away but
  the papyrus remains. The ink fades in low-frequency patches (:func:`~deitlab.data.glyphs.ink_on_texture`).
* Then a slight blur and pixel noise (:func:`~deitlab.data.glyphs.finish_patches`).

**Boxes and BaseType.** A glyph's box is the tight box of its ink *as drawn* (after its pose, before
damage): the pixels where the glyph's own coverage is at least :data:`INK_LEVEL`, in pixel edges
(``[x, y, w, h]`` with ``x + w`` one past the last ink column). Damage does not shrink the box: an
editor boxes the letter that is read, and the BaseType tells how much of it is left. That is the
fraction of the glyph's ink (coverage-weighted) outside holes, torn-away parts and abrasion:
``bt1`` >= 0.9, ``bt2`` >= 0.5, else ``bt3`` (:func:`base_type`). A glyph with less than
:data:`MIN_SURVIVING` of its ink left is not annotated (nothing legible remains; its traces stay).

Output: ``OUT/images/page_0000.png ...`` and ``OUT/annotations.json``; the settings are recorded in
its ``info`` so that a rerun into the same directory is recognised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFont

from ..console import progress
from ..data.base import DataError
from ..data.glyphs import (CAP_FRACTION, affine_poses, derive_seed, find_fonts, finish_patches, glyph_atlas,
                           glyph_masks, ink_on_texture, papyrus_texture, value_noise)
from .alphabet import FREQUENCIES, NUM_CLASSES, category_id, font_code_points
from .coco import CocoAnnotation, CocoDataset, CocoImage, letter_categories, write_coco
from .config import PapyriError, SynthConfig, nominal_cap_px, parse_fonts
from .outdir import entries, generator_of, shown, staged

__all__ = ['INK_LEVEL', 'MIN_SURVIVING', 'Glyph', 'Page', 'base_type', 'resolve_fonts', 'make_page', 'synthesize']

INK_LEVEL = 0.1        # a pixel is a glyph's ink where its coverage is at least this (fainter: anti-aliasing)
MIN_SURVIVING = 0.1    # glyphs with less of their ink left are not annotated
GENERATOR = 'deitlab papyri synth'
_STREAM = 0x50A9       # names the page generators' streams (derive_seed)
_PAD = 2.6             # glyph patch side in cap heights: room for wide, slanted and rotated letters
_CHUNK = 128           # glyph masks per batch
_INK = (0.13, 0.09, 0.06)
_MOUNT = (0.09, 0.085, 0.08)


@dataclass
class Glyph:
    """One written letter of a page."""
    cls: int                      # class 0..23 (alphabet.LETTERS)
    code_point: str               # the character drawn (a fallback for a font without the letter's own)
    font: str                     # font file
    hand: int                     # index of the page's hand
    box: Tuple[int, int, int, int]    # x, y, w, h: tight box of the ink as drawn (before damage)
    origin: Tuple[int, int]       # page x, y of mask[0, 0]
    mask: np.ndarray              # float32 coverage of this glyph's ink alone, before damage
    surviving: float              # fraction of the ink left after damage
    base_type: str                # bt1 | bt2 | bt3


@dataclass
class Page:
    image: np.ndarray             # uint8 (height, width, 3)
    glyphs: List[Glyph]           # the annotated glyphs, in writing order
    intact: np.ndarray            # float32 (height, width): the share of ink that survives at each pixel
    dropped: int = 0              # glyphs written but left unannotated (< MIN_SURVIVING left)


@dataclass
class _Hand:
    font: int                     # index into the page's fonts
    weight: float
    slant: float
    size: float
    aspect: float
    gap: float
    ink: Tuple[float, float, float]
    lines: List[int] = field(default_factory=list)


def base_type(surviving: float) -> str:
    """The competition's BaseType of a glyph with this fraction of its ink left."""
    return 'bt1' if surviving >= 0.9 else 'bt2' if surviving >= 0.5 else 'bt3'


def resolve_fonts(fonts: str) -> Tuple[str, ...]:
    """The font files of a ``--fonts`` value ('bundled', 'system' or comma-separated files), each
    checked to draw all 24 letters (with fallbacks, :func:`.alphabet.font_code_points`)."""
    files = parse_fonts(fonts)
    if files is None:
        try:
            files = find_fonts(fonts)
        except DataError as e:
            raise PapyriError(str(e).replace('glyphs: ', '')) from None
    for path in files:
        try:
            ImageFont.truetype(path, 12)
        except OSError as e:
            raise PapyriError(f'{path} is not a font file that can be read ({e})') from None
        font_code_points(path)
    return tuple(files)


# ------------------------------------------------------------------------------------------ layout
def _hands(rng: np.random.Generator, n_fonts: int, max_hands: int, lines: int) -> List[_Hand]:
    k = int(rng.integers(1, min(max_hands, lines) + 1))
    hands = []
    for _ in range(k):
        ink = np.array(_INK) * rng.uniform(0.4, 1.4) + rng.uniform(-0.03, 0.03, 3)
        hands.append(_Hand(font=int(rng.integers(n_fonts)), weight=rng.uniform(0.5, 2.0), slant=rng.uniform(-0.3, 0.12),
                           size=rng.uniform(0.85, 1.08), aspect=math.exp(rng.uniform(-0.15, 0.15)),
                           gap=rng.uniform(-0.04, 0.10), ink=tuple(np.clip(ink, 0, 1))))
    cuts = np.sort(rng.choice(np.arange(1, lines), k - 1, replace=False)) if k > 1 else np.array([], dtype=int)
    for line, h in enumerate(np.searchsorted(cuts, np.arange(lines), side='right')):
        hands[h].lines.append(line)
    return hands


def _ink_widths(atlas: torch.Tensor) -> np.ndarray:
    """Ink width of every font x letter of the atlas (regular weight), in cap heights."""
    cols = (atlas[:, :, 1] > 0.5).any(dim=2)   # (F, L, res)
    idx = torch.arange(atlas.shape[-1])
    left = torch.where(cols, idx, atlas.shape[-1]).min(-1).values
    right = torch.where(cols, idx, -1).max(-1).values
    return ((right - left + 1).clamp(min=1).float() / (CAP_FRACTION * atlas.shape[-1])).numpy()


def _write_lines(rng, hands: List[_Hand], width: int, height: int, lines: int, letters: int,
                 widths: np.ndarray, font_slot: Dict[int, int], line_caps: np.ndarray) -> dict:
    """Place the letters of every line: arrays (one entry per glyph) of class, hand, cap centre, cap
    height, aspect, rotation, shear and weight."""
    top, bottom = height * rng.uniform(0.05, 0.10), height * rng.uniform(0.05, 0.10)
    pitch = (height - top - bottom) / lines
    prob = np.array(FREQUENCIES, dtype=np.float64) / sum(FREQUENCIES)
    out = {k: [] for k in ('cls', 'hand', 'cx', 'cy', 'cap', 'aspect', 'rot', 'shear', 'weight')}
    for h_idx, hand in enumerate(hands):
        for line in hand.lines:
            cap = line_caps[line]
            baseline = top + (line + 0.5) * pitch + cap / 2 + rng.uniform(-0.06, 0.06) * pitch
            slope, amp = rng.uniform(-0.012, 0.012), rng.uniform(0.0, 0.08) * cap
            wave, phase = rng.uniform(5, 14) * cap, rng.uniform(0, 2 * math.pi)
            x = width * rng.uniform(0.04, 0.08) + rng.uniform(0, 0.04) * width
            right = width * (1 - rng.uniform(0.03, 0.07))
            for cls in rng.choice(NUM_CLASSES, size=letters, p=prob):
                size = cap * rng.uniform(0.94, 1.06)
                aspect = hand.aspect * math.exp(rng.uniform(-0.06, 0.06))
                shear = hand.slant + rng.uniform(-0.05, 0.05)
                jitter_rot, weight = rng.uniform(-3, 3) * math.pi / 180, hand.weight + rng.uniform(-0.25, 0.25)
                gap, lift = hand.gap + rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04) * cap
                half = size * (widths[font_slot[hand.font], cls] * aspect / 2 + 0.25 * abs(shear))
                cx = x + half
                if cx + half > right:
                    break
                y_base = baseline + slope * cx + amp * math.sin(2 * math.pi * cx / wave + phase)
                tilt = math.atan(slope + amp * 2 * math.pi / wave * math.cos(2 * math.pi * cx / wave + phase))
                for k, v in (('cls', int(cls)), ('hand', h_idx), ('cx', cx), ('cy', y_base - size / 2 + lift),
                             ('cap', size), ('aspect', aspect), ('rot', tilt + jitter_rot), ('shear', shear),
                             ('weight', weight)):
                    out[k].append(v)
                x = cx + half + gap * cap
    return {k: np.array(v, dtype=np.int64 if k in ('cls', 'hand') else np.float64) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ damage
def _threshold(noise: torch.Tensor, share: float, softness: float) -> torch.Tensor:
    """1 on the ``share`` of the pixels where ``noise`` is highest, with a soft rim."""
    if share <= 0:
        return torch.zeros_like(noise)
    flat = noise.flatten()
    level = torch.kthvalue(flat, max(1, min(len(flat), round((1 - share) * len(flat))))).values
    return ((noise - level) / softness + 0.5).clamp_(0, 1)


def _damage(height: int, width: int, amount: float, rng, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lost, abraded)``, each ``(1, 1, height, width)`` in [0, 1]: papyrus gone (torn edges and
    holes, where the mount shows) and ink rubbed off the surface."""
    if amount <= 0:
        return torch.zeros(1, 1, height, width), torch.zeros(1, 1, height, width)
    side = min(height, width)
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1) + 0.5
    depth = [float(d) * side * amount for d in rng.uniform(-0.08, 0.09, 4)]   # < 0: the sheet goes on beyond
    rag = (value_noise(1, height, width, side / 5, g) - 0.5) * (0.16 * side * amount) \
        + (value_noise(1, height, width, side / 25, g) - 0.5) * (0.05 * side * amount)
    inside = torch.minimum(torch.minimum(xs - depth[0], width - xs - depth[1]),
                           torch.minimum(ys - depth[2], height - ys - depth[3])) + rag
    torn = (0.5 - inside / 1.5).clamp_(0, 1)
    coarse = value_noise(1, height, width, side / 6, g)
    holes = _threshold(coarse + 0.3 * value_noise(1, height, width, side / 30, g),
                       min(0.3, rng.uniform(0.0, 0.05) * amount), 0.02)
    rub = value_noise(1, height, width, side / 8, g) + 0.25 * value_noise(1, height, width, side / 40, g)
    abraded = _threshold(rub, min(0.4, rng.uniform(0.0, 0.10) * amount), 0.08)
    return torch.maximum(torn, holes), abraded


# -------------------------------------------------------------------------------------------- page
def _f32(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def make_page(seed: int, index: int, fonts: Tuple[str, ...], *, size: Tuple[int, int] = (512, 384), lines: int = 8,
              letters: int = 24, hands: int = 3, damage: float = 1.0) -> Page:
    """Page ``index`` of the dataset of ``seed``: the image, its glyphs and the damage map.

    ``fonts``: the font files the hands choose from (:func:`resolve_fonts`); ``size``: ``(width,
    height)``. Deterministic: the same arguments give the same page, whatever else is generated.
    """
    width, height = size
    rng = np.random.default_rng(derive_seed(seed, _STREAM, index, 1))          # layout
    g = torch.Generator().manual_seed(derive_seed(seed, _STREAM, index, 2))     # textures, noise
    page_hands = _hands(rng, len(fonts), hands, lines)
    used = sorted({h.font for h in page_hands})
    font_slot = {f: i for i, f in enumerate(used)}
    cap0 = nominal_cap_px(width, height, lines, letters)
    line_caps = np.zeros(lines)
    for hand in page_hands:
        for line in hand.lines:
            line_caps[line] = cap0 * hand.size * rng.uniform(0.92, 1.05)
    patch = 2 * math.ceil(_PAD * line_caps.max() * 1.06 / 2)   # even; every glyph of the page fits
    res = 32 * math.ceil(max(64, 1.6 * patch) / 32)             # atlas side: about 2x the drawn size
    page_fonts = tuple(fonts[f] for f in used)
    chars = tuple(font_code_points(p) for p in page_fonts)
    atlas = glyph_atlas(page_fonts, res, chars)
    lay = _write_lines(rng, page_hands, width, height, lines, letters, _ink_widths(atlas), font_slot, line_caps)
    n = len(lay['cls'])

    # the glyphs' ink, each alone, in a patch around its cap centre
    x0 = np.round(lay['cx'] - patch / 2).astype(np.int64)
    y0 = np.round(lay['cy'] - patch / 2).astype(np.int64)
    shift = torch.stack([_f32(2 * (lay['cx'] - x0) / patch - 1), _f32(2 * (lay['cy'] - y0) / patch - 1)], 1)
    poses = affine_poses(_f32(2 * lay['cap'] / patch), _f32(lay['aspect']), _f32(lay['rot']), _f32(lay['shear']),
                         shift)
    font_idx = torch.as_tensor([font_slot[page_hands[h].font] for h in lay['hand']], dtype=torch.long)
    cls_idx = torch.as_tensor(lay['cls'], dtype=torch.long)
    masks = np.zeros((n, patch, patch), np.float32)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        masks[s:e] = glyph_masks(atlas, font_idx[s:e], cls_idx[s:e], _f32(lay['weight'][s:e]), poses[s:e],
                                 patch)[:, 0].numpy()

    lost, abraded = _damage(height, width, damage, rng, g)
    intact = ((1 - lost) * (1 - abraded))[0, 0].numpy()
    hand_ink = np.zeros((len(page_hands), height, width), np.float32)
    glyphs, dropped = [], 0
    for k in range(n):
        xs, ys = max(0, x0[k]), max(0, y0[k])
        xe, ye = min(width, x0[k] + patch), min(height, y0[k] + patch)
        if xe <= xs or ye <= ys:
            continue
        m = masks[k, ys - y0[k]:ye - y0[k], xs - x0[k]:xe - x0[k]]
        region = hand_ink[lay['hand'][k], ys:ye, xs:xe]
        np.maximum(region, m, out=region)
        rows, cols = np.nonzero((m >= INK_LEVEL).any(1))[0], np.nonzero((m >= INK_LEVEL).any(0))[0]
        if not len(rows):
            continue
        total = float(m.astype(np.float64).sum())
        left = float((m.astype(np.float64) * intact[ys:ye, xs:xe]).sum()) / total
        if left < MIN_SURVIVING:
            dropped += 1
            continue
        hand, cls = page_hands[lay['hand'][k]], int(lay['cls'][k])
        box = (int(xs + cols[0]), int(ys + rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
        glyphs.append(Glyph(cls, chars[font_slot[hand.font]][cls], fonts[hand.font], int(lay['hand'][k]), box,
                            (int(xs), int(ys)), np.ascontiguousarray(m), left, base_type(left)))

    # compose: papyrus, its edges darkened next to losses, ink per hand, the mount in the losses
    fibre = max(1.0, min(width, height) / 200)
    tex = papyrus_texture(1, height, width, g, fibre_px=fibre)
    near = F.avg_pool2d(lost, 7, stride=1, padding=3, count_include_pad=False)
    tex = tex * (1 - 0.45 * (near - lost).clamp(min=0)) * (1 + 0.04 * abraded)
    img = tex.clamp(0, 1)
    for h_idx, hand in enumerate(page_hands):
        if hand_ink[h_idx].any():
            ink_mask = torch.from_numpy(hand_ink[h_idx]).view(1, 1, height, width) * (1 - abraded)
            img = ink_on_texture(img, ink_mask, g, opacity=(0.7, 0.95), fibre_px=fibre,
                                 ink=torch.tensor(hand.ink, dtype=torch.float32).view(1, 3))
    mount = torch.tensor(_MOUNT).view(1, 3, 1, 1) * float(rng.uniform(0.6, 1.6))
    mount = mount * (1 + 0.3 * (value_noise(1, height, width, max(4.0, min(width, height) / 20), g) - 0.5))
    img = img * (1 - lost) + mount.clamp(0, 1) * lost
    img = finish_patches(img, g).mul_(255).round_().to(torch.uint8)
    return Page(img[0].permute(1, 2, 0).contiguous().numpy(), glyphs, intact, dropped)


# ----------------------------------------------------------------------------------------- dataset
def _settings(cfg: SynthConfig, fonts: Tuple[str, ...]) -> dict:
    w, h = cfg.page_size
    return {'seed': cfg.seed, 'pages': cfg.pages, 'size': [w, h], 'lines': cfg.lines, 'letters': cfg.letters,
            'hands': cfg.hands, 'damage': float(cfg.damage), 'fonts': [Path(f).name for f in fonts]}


def _check_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse an output directory that holds something else, or pages of other settings without
    ``overwrite`` (a rerun with the same settings rewrites the same files)."""
    names = entries(out)
    if not names:
        return
    info = generator_of(out / 'annotations.json') or {}
    if not (set(names) <= {'images', 'annotations.json'} and info.get('generator') == GENERATOR):
        raise PapyriError(f'{out} is not empty ({shown(names)}) and holds no pages written by {GENERATOR}; choose '
                          f'another --out (--overwrite replaces only such pages)')
    old = info.get('settings', {})
    diff = [f'{k} {old.get(k)!r} vs now {v!r}' for k, v in settings.items() if old.get(k) != v]
    if diff and not overwrite:
        raise PapyriError(f'{out} already holds pages made with other settings ({"; ".join(diff)}); pass '
                          f'--overwrite to replace them, or choose another --out')


def synthesize(cfg: SynthConfig) -> dict:
    """Write ``cfg.pages`` pages and their annotations to ``cfg.out``; returns a summary.

    The pages are made in a hidden sibling directory and moved to ``cfg.out`` only when all are
    written, so an error or an interruption leaves nothing partial behind.
    """
    cfg.validate()
    fonts = resolve_fonts(cfg.fonts)
    width, height = cfg.page_size
    out = Path(cfg.out)
    settings = _settings(cfg, fonts)
    _check_out(out, settings, cfg.overwrite)
    with staged(out) as tmp:
        (tmp / 'images').mkdir()
        images, anns = [], []
        counts = {'bt1': 0, 'bt2': 0, 'bt3': 0}
        for p in progress(cfg.progress, iterable=range(cfg.pages), desc='pages', unit='page'):
            page = make_page(cfg.seed, p, fonts, size=(width, height), lines=cfg.lines, letters=cfg.letters,
                             hands=cfg.hands, damage=cfg.damage)
            name = f'images/page_{p:04d}.png'
            Image.fromarray(page.image).save(tmp / name, format='PNG')
            images.append(CocoImage(p + 1, name, width, height))
            for gl in page.glyphs:
                anns.append(CocoAnnotation(len(anns) + 1, p + 1, gl.box, category_id(gl.cls), gl.base_type,
                                           area=gl.box[2] * gl.box[3]))
                counts[gl.base_type] += 1
        info = {'description': 'synthetic Greek papyrus pages in the schema of the ICDAR 2023 competition on '
                               'detection and recognition of Greek letters on papyri',
                'generator': GENERATOR, 'settings': settings}
        write_coco(CocoDataset(images, anns, letter_categories(), info), tmp / 'annotations.json')
    return {'out': str(out), 'pages': cfg.pages, 'glyphs': len(anns), 'base_types': counts,
            'size': f'{width}x{height}', 'seed': cfg.seed, 'fonts': settings['fonts'],
            'annotations': str(out / 'annotations.json'), 'images': str(out / 'images')}
