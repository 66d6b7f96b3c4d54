"""``glyphs``: synthetic Greek capital letters in ink on papyrus, generated from a seed.

Spec: ``glyphs[:train=12000,val=2400,size=32,seed=0,fonts=bundled]`` -- 24 balanced classes
(``alpha`` ... ``omega``), RGB images of ``size`` x ``size`` pixels. ``fonts=bundled`` uses the
TrueType fonts that ship inside matplotlib (DejaVu Sans/Serif/Mono and STIX in their weights and
slants), so the data is the same on every machine with the same library versions;
``fonts=system`` adds every Greek-capable font installed on the machine (e.g. Debian's
``fonts-gfs-*``). A font is used only if it really draws all 24 letters (it has them in its
character map, each renders ink, no two render alike, and none is the ``.notdef`` box).

How an image is made, in batches with torch ops:

1. Every font x letter is drawn once with PIL into an *atlas* at twice the output resolution,
   centred, with all fonts scaled to the same cap height, in four stroke weights (eroded, regular,
   dilated, twice dilated); a sample blends two adjacent weights for a continuous thickness.
2. A random affine pose (scale, aspect, rotation of a few degrees, shear, translation) is applied
   with ``affine_grid``/``grid_sample`` at 2x resolution and averaged down, which anti-aliases.
   Some samples get fragments of neighbouring letters (same hand) cut by the left/right or the
   top/bottom edge.
3. The mask is inked (dark brown, random opacity with low-frequency fading) onto a papyrus
   texture: light-brown base colour, horizontal and fainter vertical fibres, low-frequency
   blotches; then a random slight blur and pixel noise.

Randomness comes from one ``torch.Generator`` per split, seeded from ``(seed, split)``, so the same
options give bitwise-identical tensors, and train and val never share a stream.
The building blocks (:func:`glyph_atlas`, :func:`glyph_masks`, :func:`random_poses`,
:func:`papyrus_tones`, :func:`papyrus_texture`, :func:`ink_on_texture`, :func:`neighbour_masks`,
:func:`finish_patches`, :func:`compose_glyphs`, :func:`render_glyph`) work at any size so that whole
papyrus pages can be composed from them; the fine-grained (:mod:`.glyphs_fine`) and
re-identification (:mod:`.glyphs_reid`) datasets are made from them too.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .base import DataError

__all__ = [
    'GREEK_CAPITALS', 'GLYPH_CLASSES', 'find_fonts', 'drawn_glyphs', 'glyph_atlas', 'glyph_masks', 'random_poses',
    'affine_poses', 'value_noise', 'papyrus_tones', 'papyrus_texture', 'ink_on_texture', 'neighbour_masks',
    'finish_patches', 'compose_glyphs', 'render_glyph', 'generate_glyphs', 'split_seed', 'derive_seed',
]

GREEK_CAPITALS = 'ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ'
GLYPH_CLASSES = (
    'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta', 'iota', 'kappa', 'lambda',
    'mu', 'nu', 'xi', 'omicron', 'pi', 'rho', 'sigma', 'tau', 'upsilon', 'phi', 'chi', 'psi', 'omega',
)
CAP_FRACTION = 0.5      # cap height of a glyph in the atlas, as a fraction of the atlas side
NUM_WEIGHTS = 4         # stroke weights in the atlas: eroded, regular, dilated, twice dilated
_CHUNK = 2048           # batch size of generation; fixed so that results do not depend on it
_SYSTEM_FONT_DIRS = ('/usr/share/fonts', '/usr/local/share/fonts', '~/.local/share/fonts', '~/.fonts')


# ----------------------------------------------------------------------------------------- fonts
def _draw(font: ImageFont.FreeTypeFont, ch: str, side: int) -> np.ndarray:
    img = Image.new('L', (side, side), 0)
    ImageDraw.Draw(img).text((side // 4, side // 4), ch, fill=255, font=font)
    return np.asarray(img)


def _font_cmap(path: str) -> Optional[frozenset]:
    """The code points in the font's character map, or None when fontTools is missing or cannot read
    the file (then only rendering decides what the font draws)."""
    try:
        from fontTools.ttLib import TTFont
        with TTFont(path, lazy=True, fontNumber=0) as tt:
            return frozenset(tt.getBestCmap() or {})
    except Exception:   # ImportError included: the rendering check decides
        return None


def drawn_glyphs(path: str, chars: str) -> Tuple[Optional[np.ndarray], ...]:
    """What the font at ``path`` really draws of ``chars``: per character its rendered mask, or None
    when the font lacks it (not in its character map, no ink, or the ``.notdef`` box). All None when
    PIL cannot load the font. Comparing the masks tells whether two characters render alike."""
    cmap = _font_cmap(path)
    try:
        font = ImageFont.truetype(path, 32)
        notdef = _draw(font, '\U0010FFFD', 96).tobytes()
        masks = [_draw(font, ch, 96) for ch in chars]
    except Exception:
        return (None,) * len(chars)
    return tuple(m if (cmap is None or ord(ch) in cmap) and m.any() and m.tobytes() != notdef else None
                 for ch, m in zip(chars, masks))


def _draws_greek(path: str) -> bool:
    """True if the font at ``path`` draws 24 distinct, real Greek capitals."""
    cmap = _font_cmap(path)
    if cmap is not None and any(ord(ch) not in cmap for ch in GREEK_CAPITALS):
        return False   # cheap early exit before rendering
    masks = drawn_glyphs(path, GREEK_CAPITALS)
    return all(m is not None for m in masks) and len({m.tobytes() for m in masks}) == len(masks)


@functools.lru_cache(maxsize=None)
def _bundled_fonts() -> Tuple[str, ...]:
    import matplotlib
    root = Path(matplotlib.get_data_path()) / 'fonts' / 'ttf'
    return tuple(str(p) for p in sorted(root.glob('*.ttf')) if _draws_greek(str(p)))


@functools.lru_cache(maxsize=None)
def _system_fonts() -> Tuple[str, ...]:
    found = []
    for d in _SYSTEM_FONT_DIRS:
        d = Path(os.path.expanduser(d))
        if d.is_dir():
            found += [p for p in d.rglob('*') if p.suffix.lower() in ('.ttf', '.otf')]
    return tuple(str(p) for p in sorted(set(found)) if _draws_greek(str(p)))


def find_fonts(fonts: str = 'bundled') -> Tuple[str, ...]:
    """Paths of the usable fonts: ``'bundled'`` (matplotlib's) or ``'system'`` (those plus installed ones).

    System copies of a bundled file (same file name) are skipped so no design counts twice.
    """
    if fonts not in ('bundled', 'system'):
        raise DataError(f"glyphs: fonts must be 'bundled' or 'system', got {fonts!r}")
    paths = list(_bundled_fonts())
    if fonts == 'system':
        names = {Path(p).name for p in paths}
        paths += [p for p in _system_fonts() if Path(p).name not in names]
    if not paths:
        raise DataError('glyphs: no font that draws Greek capitals was found (matplotlib fonts missing?)')
    return tuple(paths)


# ----------------------------------------------------------------------------------------- atlas
@functools.lru_cache(maxsize=8)
def glyph_atlas(fonts: Tuple[str, ...], res: int = 64, chars: Optional[Tuple[str, ...]] = None) -> torch.Tensor:
    """Every font x letter drawn centred at the same cap height: float ``(F, L, NUM_WEIGHTS, res, res)``.

    Weights are: eroded, regular, dilated, twice dilated, by ``max(1, res // 64)`` pixels each.
    ``chars``: per font, the string of characters to draw (``L`` of them, the same count for every
    font); default :data:`GREEK_CAPITALS` for each. A font may draw a letter with another code point
    than its neighbours (e.g. lunate sigma where the font has it, ``deitlab.papyri.alphabet``).
    """
    chars = (GREEK_CAPITALS,) * len(fonts) if chars is None else chars
    if len(chars) != len(fonts) or len({len(c) for c in chars}) > 1:
        raise ValueError('glyph_atlas: give one string of characters per font, all of the same length')
    masks = []
    for path, letters in zip(fonts, chars):
        probe = ImageFont.truetype(path, 100)
        cap = -probe.getbbox('Η', anchor='ls')[1]  # cap height at size 100
        font = ImageFont.truetype(path, max(4, round(100 * CAP_FRACTION * res / cap)))
        cap = -font.getbbox('Η', anchor='ls')[1]
        for ch in letters:
            x0, _, x1, _ = font.getbbox(ch, anchor='ls')
            img = Image.new('L', (res, res), 0)
            ImageDraw.Draw(img).text((res / 2 - (x0 + x1) / 2, res / 2 + cap / 2), ch, fill=255,
                                     font=font, anchor='ls')
            masks.append(np.asarray(img))
    base = torch.from_numpy(np.stack(masks)).float().div_(255).unsqueeze(1)
    r = max(1, res // 64)
    grow = functools.partial(F.max_pool2d, kernel_size=2 * r + 1, stride=1, padding=r)
    weights = [-grow(-base), base, grow(base), grow(grow(base))]
    return torch.cat(weights, 1).reshape(len(fonts), len(chars[0]), NUM_WEIGHTS, res, res)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def random_poses(n: int, g: torch.Generator, *, scale: Tuple[float, float] = (0.85, 1.2),
                 max_rot_deg: float = 6., max_shear: float = 0.15, max_shift: float = 0.12) -> torch.Tensor:
    """Random glyph poses as forward affine maps ``(n, 2, 3)`` in normalised ``[-1, 1]`` coordinates.

    ``scale`` 1 draws a glyph at its atlas size (cap height = ``CAP_FRACTION`` of the patch side).
    """
    s = _uniform(n, *scale, g)
    aspect = torch.exp(_uniform(n, -0.12, 0.12, g))
    rot = _uniform(n, -max_rot_deg, max_rot_deg, g) * (math.pi / 180)
    shear = _uniform(n, -max_shear, max_shear, g)
    shift = _uniform(2 * n, -max_shift, max_shift, g).view(n, 2)
    return affine_poses(s, aspect, rot, shear, shift)


def affine_poses(scale: torch.Tensor, aspect: torch.Tensor, rot: torch.Tensor, shear: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:
    """Forward affine maps ``(n, 2, 3)`` atlas -> patch in normalised ``[-1, 1]`` coordinates (y down):
    ``scale * R(rot) @ [[1, shear], [0, 1]] @ diag(aspect, 1 / aspect)``, then ``shift`` ``(n, 2)``.

    ``rot`` in radians, positive clockwise on the image; ``shear`` > 0 moves a glyph's bottom to the
    right (a back-slant), < 0 its top (a forward slant). Inputs are ``(n,)`` tensors.
    """
    n = len(scale)
    c, si = torch.cos(rot), torch.sin(rot)
    a, b = c * aspect, (c * shear - si) / aspect
    cc, d = si * aspect, (si * shear + c) / aspect
    m = torch.stack([torch.stack([a, b], 1), torch.stack([cc, d], 1)], 1) * scale.view(n, 1, 1)
    return torch.cat([m, shift.unsqueeze(-1)], 2)


def glyph_masks(atlas: torch.Tensor, font_idx: torch.Tensor, letter_idx: torch.Tensor,
                weight: torch.Tensor, poses: torch.Tensor, size: int) -> torch.Tensor:
    """Ink coverage ``(n, 1, size, size)`` in [0, 1] of glyphs placed by forward affine ``poses``.

    Args:
        atlas: From :func:`glyph_atlas`.
        font_idx, letter_idx: Long tensors ``(n,)`` indexing the atlas.
        weight: Stroke weight ``(n,)`` in ``[0, NUM_WEIGHTS - 1]``, 1 = regular.
        poses: ``(n, 2, 3)`` forward maps atlas -> patch, e.g. from :func:`random_poses`.
        size: Output side in pixels (rendered at 2x and averaged down).
    """
    n, res = len(font_idx), atlas.shape[-1]
    weight = weight.clamp(0, NUM_WEIGHTS - 1)
    lo = weight.floor().long().clamp(max=NUM_WEIGHTS - 2)
    flat = atlas.view(-1, res, res)
    row = (font_idx * atlas.shape[1] + letter_idx) * NUM_WEIGHTS + lo
    src = torch.lerp(flat[row], flat[row + 1], (weight - lo).view(n, 1, 1)).unsqueeze(1)
    # grid = inverse pose applied to the output pixel centres (what affine_grid computes)
    m, t = poses[:, :, :2], poses[:, :, 2]
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    inv = torch.stack([m[:, 1, 1], -m[:, 0, 1], -m[:, 1, 0], m[:, 0, 0]], 1) / det.unsqueeze(1)
    off = torch.stack([inv[:, 0] * t[:, 0] + inv[:, 1] * t[:, 1], inv[:, 2] * t[:, 0] + inv[:, 3] * t[:, 1]], 1)
    c = (torch.arange(2 * size, dtype=torch.float32) * 2 + 1) / (2 * size) - 1
    cx, cy = c.view(1, 1, -1), c.view(1, -1, 1)
    grid = torch.empty(n, 2 * size, 2 * size, 2)
    for k in range(2):  # only the final add is full-size
        a, b, o = inv[:, 2 * k].view(n, 1, 1), inv[:, 2 * k + 1].view(n, 1, 1), off[:, k].view(n, 1, 1)
        torch.add(a * cx, b * cy - o, out=grid[..., k])
    out = F.grid_sample(src, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    out = (out[..., 0::2, 0::2] + out[..., 1::2, 0::2] + out[..., 0::2, 1::2] + out[..., 1::2, 1::2]) * 0.25
    return out.clamp_(0, 1)


# --------------------------------------------------------------------------------------- texture
def value_noise(n: int, h: int, w: int, cell: float, g: torch.Generator) -> torch.Tensor:
    """Smooth noise in [0, 1], ``(n, 1, h, w)``, with features about ``cell`` pixels apart (random
    values on a grid, bilinearly interpolated): blotches, fading, and thresholded, holes."""
    z = torch.rand(n, 1, max(2, round(h / cell) + 1), max(2, round(w / cell) + 1), generator=g)
    return F.interpolate(z, size=(h, w), mode='bilinear', align_corners=True)


def _fibres(n: int, h: int, w: int, along: float, across: float, g: torch.Generator) -> torch.Tensor:
    """Zero-mean noise stretched horizontally: streaks ``along`` pixels long, ``across`` thick."""
    z = torch.randn(n, 1, max(2, round(h / across) + 1), max(2, round(w / along) + 1), generator=g)
    return F.interpolate(z, size=(h, w), mode='bilinear', align_corners=True)


def papyrus_tones(n: int, g: torch.Generator) -> torch.Tensor:
    """Random offsets ``(n, 3)`` of the papyrus base colour: lighter or darker, warmer or cooler."""
    warm = torch.tensor([0.04, 0.0, -0.05]).view(1, 3) * _uniform(n, -1, 1, g).view(n, 1)
    return _uniform(n, -0.10, 0.06, g).view(n, 1) + warm + torch.randn(n, 3, generator=g) * 0.008


def papyrus_texture(n: int, height: int, width: int, g: torch.Generator, *,
                    fibre_px: float = 1.0, tone: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Papyrus-like backgrounds, float RGB ``(n, 3, height, width)`` in [0, 1].

    Light-brown base colour (per sample), horizontal fibres and fainter vertical ones (the
    crossed layers of a papyrus sheet), and low-frequency blotches. ``fibre_px`` is the fibre
    thickness in pixels; texture features scale with it, so pages use a larger value. ``tone``:
    the base-colour offsets ``(n, 3)`` instead of random ones (:func:`papyrus_tones`).
    """
    base = torch.tensor([0.80, 0.68, 0.49]).view(1, 3, 1, 1)
    tone = (papyrus_tones(n, g) if tone is None else tone).view(n, 3, 1, 1)
    horiz = _fibres(n, height, width, 10 * fibre_px, fibre_px, g)
    vert = _fibres(n, width, height, 12 * fibre_px, 1.5 * fibre_px, g).transpose(2, 3)
    blotch = value_noise(n, height, width, 14 * fibre_px, g) - 0.5
    large = value_noise(n, height, width, 40 * fibre_px, g) - 0.5
    light = 1 + 0.05 * horiz + 0.025 * vert + 0.12 * blotch + 0.12 * large
    tex = (base + tone) * light
    tex[:, 2:] -= 0.04 * blotch.clamp(min=0)  # darker patches are also browner
    return tex.clamp_(0, 1)


def ink_on_texture(texture: torch.Tensor, mask: torch.Tensor, g: torch.Generator, *,
                   opacity: Tuple[float, float] = (0.6, 0.95), fibre_px: float = 1.0,
                   ink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ink ``mask`` ``(n, 1, h, w)`` onto ``texture`` ``(n, 3, h, w)`` with a random dark-brown ink.

    Opacity is drawn per sample in ``opacity`` and fades in low-frequency patches (worn ink).
    ``ink``: the ink colour per sample ``(n, 3)`` instead of a random dark brown (e.g. a writer's).
    """
    n, _, h, w = texture.shape
    if ink is None:
        ink = torch.tensor([0.13, 0.09, 0.06]).view(1, 3, 1, 1) * _uniform(n, 0.4, 1.4, g).view(n, 1, 1, 1)
    else:
        ink = ink.view(n, 3, 1, 1)
    alpha = _uniform(n, *opacity, g).view(n, 1, 1, 1)
    fade = 1 - 0.45 * value_noise(n, h, w, 8 * fibre_px, g) ** 2
    a = (mask * alpha * fade).clamp_(0, 1)
    return texture * (1 - a) + ink * a


def finish_patches(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random slight blur (blend with a [1, 2, 1] blur) and pixel noise."""
    n = len(img)
    p = F.pad(img, (1, 1, 1, 1), mode='replicate')  # separable [1, 2, 1] / 4 filter
    v = p[..., :-2, :] + p[..., 2:, :] + 2 * p[..., 1:-1, :]
    blur = (v[..., :-2] + v[..., 2:] + 2 * v[..., 1:-1]) / 16
    img = torch.lerp(img, blur, _uniform(n, 0.0, 0.8, g).view(n, 1, 1, 1))
    sigma = _uniform(n, 0.01, 0.045, g).view(n, 1, 1, 1)
    noise = torch.randn(n, 1, *img.shape[2:], generator=g) + 0.4 * torch.randn(img.shape, generator=g)
    return (img + sigma * noise).clamp_(0, 1)


def render_glyph(letter: str, size: int, *, font: Optional[str] = None, seed: int = 0,
                 pose: Optional[torch.Tensor] = None, weight: float = 1.0) -> torch.Tensor:
    """One Greek capital in ink on a papyrus patch, float RGB ``(3, size, size)`` in [0, 1].

    Args:
        letter: A Greek capital (``'Α'``) or its class name (``'alpha'``).
        size: Patch side in pixels, any size.
        font: Font file; default the first bundled font.
        seed: Seed of the texture and ink.
        pose: Forward affine ``(2, 3)``; default identity (centred, cap height half the side).
        weight: Stroke weight, 1 = regular (see :func:`glyph_atlas`).
    """
    idx = GLYPH_CLASSES.index(letter) if letter in GLYPH_CLASSES else GREEK_CAPITALS.index(letter)
    font = font or find_fonts('bundled')[0]
    atlas = glyph_atlas((font,), max(64, 2 * size))
    pose = torch.tensor([[1., 0, 0], [0, 1, 0]]) if pose is None else torch.as_tensor(pose, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    mask = glyph_masks(atlas, torch.zeros(1, dtype=torch.long), torch.tensor([idx]),
                       torch.tensor([float(weight)]), pose.view(1, 2, 3), size)
    fibre = max(1.0, size / 32)
    return ink_on_texture(papyrus_texture(1, size, size, g, fibre_px=fibre), mask, g, fibre_px=fibre)[0]


# ------------------------------------------------------------------------------------ generation
def derive_seed(seed: int, *words: int) -> int:
    """A 64-bit generator seed from the user seed and some integer words (a stream's name)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, words)])
    return int(state.generate_state(1, np.uint64)[0])


def split_seed(seed: int, split: str) -> int:
    """The generator seed of one split, derived from the user seed so splits never share a stream."""
    return derive_seed(seed, {'train': 1, 'val': 2}[split], 0x61F2)


def neighbour_masks(atlas: torch.Tensor, font: torch.Tensor, weight: torch.Tensor, poses: torch.Tensor,
                    size: int, g: torch.Generator, prob: float, axis: int,
                    gap: Tuple[float, float]) -> torch.Tensor:
    """Masks of random letters beside (axis 0: left/right) or above/below (axis 1) the main glyph,
    in the same font, weight and pose, for a fraction ``prob`` of the samples (zero elsewhere);
    ``gap`` is the range of their offset in glyph-frame units."""
    n = len(font)
    on = torch.rand(n, generator=g) < prob
    letter = torch.randint(len(GREEK_CAPITALS), (n,), generator=g)
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    off = side * _uniform(n, *gap, g)
    idx = on.nonzero().squeeze(1)
    out = torch.zeros(n, 1, size, size)
    if len(idx):
        p = poses[idx].clone()
        # offset in the glyph's own (rotated, scaled) frame, so neighbours follow the line
        p[:, :, 2] += p[:, :, axis] * off[idx].unsqueeze(1)
        out[idx] = glyph_masks(atlas, font[idx], letter[idx], weight[idx], p, size)
    return out


def generate_glyphs(n: int, size: int = 32, seed: int = 0, split: str = 'train',
                    fonts: str = 'bundled') -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` balanced glyph images: uint8 ``(n, 3, size, size)`` and long labels ``(n,)``."""
    font_paths = find_fonts(fonts)
    atlas = glyph_atlas(font_paths, max(64, 2 * size))
    g = torch.Generator().manual_seed(split_seed(seed, split))
    labels = (torch.arange(n) % len(GREEK_CAPITALS))[torch.randperm(n, generator=g)]
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        lab = labels[start:start + _CHUNK]
        b = len(lab)
        font = torch.randint(len(font_paths), (b,), generator=g)
        weight = _uniform(b, 0.3, 2.2, g)
        images[start:start + b] = compose_glyphs(atlas, font, lab, weight, random_poses(b, g), size, g)
    return images, labels


def compose_glyphs(atlas: torch.Tensor, font: torch.Tensor, letter: torch.Tensor, weight: torch.Tensor,
                   poses: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """The ``glyphs`` look for given letters, fonts, weights and poses: uint8 RGB ``(n, 3, size, size)``.

    Glyph masks (:func:`glyph_masks`) with fragments of neighbours left/right (40 %) and above/below
    (15 %) (:func:`neighbour_masks`), inked onto papyrus (:func:`papyrus_texture`,
    :func:`ink_on_texture`), then :func:`finish_patches`; all randomness from ``g``.
    """
    b, fibre = len(font), max(1.0, size / 32)
    mask = glyph_masks(atlas, font, letter, weight, poses, size)
    mask = torch.maximum(mask, neighbour_masks(atlas, font, weight, poses, size, g, 0.4, 0, (1.1, 1.45)))
    mask = torch.maximum(mask, neighbour_masks(atlas, font, weight, poses, size, g, 0.15, 1, (1.2, 1.5)))
    img = ink_on_texture(papyrus_texture(b, size, size, g, fibre_px=fibre), mask, g, fibre_px=fibre)
    return finish_patches(img, g).mul_(255).round_().to(torch.uint8)


@functools.lru_cache(maxsize=6)
def cached_glyphs(n: int, size: int, seed: int, split: str, fonts: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`generate_glyphs`, remembered in-process (the tensors are shared: do not modify them)."""
    return generate_glyphs(n, size, seed, split, fonts)

