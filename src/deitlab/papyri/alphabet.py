"""The 24 letters of the papyri task and the competition's category ids.

The ICDAR 2023 competition on detection and recognition of Greek letters on papyri (the data
Turnbull & Mannix, "Detecting and recognizing characters in Greek papyri with YOLOv8, DeiT and
SimCLR", IJDAR 2024, were trained and scored on) labels the 24 Greek capitals, with sigma written
as the lunate sigma Ϲ (U+03F9), as book hands of the Iliad papyri write it. Its annotation file has
a much larger table of Unicode categories (accented lower case, punctuation, a plain Σ); only the
24 letter ids below are scored, the others are ignored.

Here a class is a contiguous id 0..23 in Greek alphabetical order (``LETTERS[i]``);
:data:`CATEGORY_IDS` and :func:`class_of` map between it and the competition's ``category_id``.

Fonts rarely have the lunate sigma (matplotlib's STIX fonts and the GFS fonts lack it), so each
class has a list of candidate code points to draw it with (:data:`CANDIDATES`), and
:func:`font_code_points` picks, per font, the first one the font really draws. The label is the
class whatever was drawn.

Imports nothing heavy at module level (the font checks of :mod:`deitlab.data.glyphs` are imported
when a font is examined).
"""
from __future__ import annotations

import functools
import unicodedata
from typing import Dict, Optional, Sequence, Tuple

from .config import PapyriError

__all__ = ['LETTERS', 'NUM_CLASSES', 'NAMES', 'UNICODE_NAMES', 'CATEGORY_IDS', 'CANDIDATES', 'FREQUENCIES',
           'category_id', 'class_of', 'is_letter', 'choose_code_points', 'font_code_points']

#: The 24 classes in Greek alphabetical order; class ``i`` is ``LETTERS[i]`` (sigma: lunate, U+03F9).
LETTERS = 'ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡϹΤΥΦΧΨΩ'
NUM_CLASSES = len(LETTERS)
_LUNATE_SIGMA, _SIGMA = '\u03f9', '\u03a3'

#: Short class names, ``alpha`` ... ``omega`` (the lunate sigma is ``sigma``).
NAMES: Tuple[str, ...] = tuple(unicodedata.name(ch.replace(_LUNATE_SIGMA, _SIGMA)).rsplit(' ', 1)[1].lower()
                               for ch in LETTERS)
#: The Unicode names of the labelled code points (``GREEK CAPITAL LUNATE SIGMA SYMBOL`` for sigma).
UNICODE_NAMES: Tuple[str, ...] = tuple(unicodedata.name(ch) for ch in LETTERS)

#: The competition's ``category_id`` of each class, in class order (the competition's table: Α 8,
#: Β 9, Γ 111, Δ 186, Ε 23, Ζ 144, Η 150, Θ 7, Ι 212, Κ 33, Λ 120, Μ 59, Ν 119, Ξ 17, Ο 201, Π 107,
#: Ρ 100, Ϲ 225, Τ 14, Υ 161, Φ 77, Χ 177, Ψ 169, Ω 45).
CATEGORY_IDS: Tuple[int, ...] = (8, 9, 111, 186, 23, 144, 150, 7, 212, 33, 120, 59, 119, 17, 201, 107, 100, 225,
                                 14, 161, 77, 177, 169, 45)
_CLASS_OF: Dict[int, int] = {cid: i for i, cid in enumerate(CATEGORY_IDS)}

#: Per class, the code points a glyph may be drawn with, best first. The lunate sigma falls back to
#: the lunate small sigma ϲ (U+03F2), then Latin C (the same shape in a majuscule hand), then Σ.
CANDIDATES: Tuple[Tuple[str, ...], ...] = tuple(
    (_LUNATE_SIGMA, '\u03f2', 'C', _SIGMA) if ch == _LUNATE_SIGMA else (ch,) for ch in LETTERS)

#: Relative unigram frequencies of the letters (per mille, class order): rounded figures for literary
#: Ancient Greek, not measured on a corpus here. The page generator needs only their shape (vowels,
#: Ν, Σ, Τ common; Β, Ζ, Ξ, Ψ rare), which is what makes the class imbalance of real pages.
FREQUENCIES: Tuple[int, ...] = (110, 4, 18, 22, 85, 3, 40, 13, 85, 35, 30, 30, 85, 4, 90, 30, 40, 70, 75, 40, 10,
                                12, 2, 30)


def category_id(cls: int) -> int:
    """The competition ``category_id`` of class ``cls`` (0..23)."""
    if not 0 <= cls < NUM_CLASSES:
        raise PapyriError(f'class {cls} is out of range: the classes are 0..{NUM_CLASSES - 1}')
    return CATEGORY_IDS[cls]


def is_letter(category_id: int) -> bool:
    """True for the 24 competition category ids that are letters (the only ones scored)."""
    return category_id in _CLASS_OF


def class_of(category_id: int) -> int:
    """The class (0..23) of a competition ``category_id``; :class:`PapyriError` for a non-letter id."""
    try:
        return _CLASS_OF[category_id]
    except (KeyError, TypeError):
        raise PapyriError(f'category id {category_id!r} is not one of the 24 letters '
                          f'({", ".join(map(str, sorted(CATEGORY_IDS)))})') from None


def choose_code_points(drawn: Sequence[Optional[object]], candidates=CANDIDATES) -> Tuple[Optional[str], ...]:
    """Per class, the first candidate code point that is drawn, or None when none is.

    ``drawn`` holds one entry per candidate of every class, in order (``candidates`` flattened),
    anything truthy meaning the font draws it.
    """
    flat = [c for cands in candidates for c in cands]
    if len(drawn) != len(flat):
        raise ValueError(f'choose_code_points: {len(drawn)} entries for {len(flat)} candidates')
    ok = {ch: d is not None and d is not False for ch, d in zip(flat, drawn)}
    return tuple(next((c for c in cands if ok[c]), None) for cands in candidates)


@functools.lru_cache(maxsize=None)
def font_code_points(path: str) -> str:
    """The 24 characters to draw the classes with in the font at ``path``: per class, the first of its
    :data:`CANDIDATES` that the font really draws (in its character map, read with fontTools, with
    ink that is not the ``.notdef`` box: :func:`deitlab.data.glyphs.drawn_glyphs`).

    :class:`PapyriError` when the font draws no candidate of some letter, or draws two classes alike
    (a font of placeholder boxes).
    """
    from ..data.glyphs import drawn_glyphs
    flat = ''.join(c for cands in CANDIDATES for c in cands)
    masks = drawn_glyphs(path, flat)
    chosen = choose_code_points(masks)
    missing = [f'{LETTERS[i]} (tried {", ".join(f"U+{ord(c):04X}" for c in CANDIDATES[i])})'
               for i, ch in enumerate(chosen) if ch is None]
    if missing:
        raise PapyriError(f'font {path} does not draw {len(missing)} of the 24 letters: {"; ".join(missing)}')
    mask_of = dict(zip(flat, masks))
    if len({mask_of[ch].tobytes() for ch in chosen}) < NUM_CLASSES:
        raise PapyriError(f'font {path} draws some of the 24 letters alike (placeholder glyphs?); '
                          f'choose a font with real Greek capitals')
    return ''.join(chosen)
