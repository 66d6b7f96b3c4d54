"""The settings of the ``deitlab papyri`` commands and the package's error type, without torch
(``deitlab papyri synth --help`` reads them).

``SynthConfig`` is ``deitlab papyri synth`` (:func:`deitlab.papyri.synth.synthesize`): synthetic
papyrus pages in the annotation schema of the ICDAR 2023 competition on detection and recognition
of Greek letters on papyri, the data of Turnbull & Mannix (IJDAR 2024).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

__all__ = ['PapyriError', 'SynthConfig', 'parse_size', 'parse_fonts', 'nominal_cap_px', 'MIN_CAP_PX', 'FONT_SETS']

FONT_SETS = ('bundled', 'system')
MIN_CAP_PX = 6          # smaller letters are specks, not glyphs: the settings are refused
_MIN_SIDE, _MAX_SIDE = 32, 8192
_SIZE = re.compile(r'^\s*(\d+)\s*[xX]\s*(\d+)\s*$')


class PapyriError(ValueError):
    """Bad input to the papyri tools: settings, fonts, annotation files (the message says what)."""


def parse_size(text: str) -> Tuple[int, int]:
    """``'WIDTHxHEIGHT'`` in pixels (``'512x384'``) as ``(width, height)``."""
    m = _SIZE.match(str(text))
    if not m:
        raise PapyriError(f'size must be WIDTHxHEIGHT in pixels, e.g. 512x384; got {text!r}')
    w, h = int(m.group(1)), int(m.group(2))
    if not (_MIN_SIDE <= w <= _MAX_SIDE and _MIN_SIDE <= h <= _MAX_SIDE):
        raise PapyriError(f'size {w}x{h}: each side must be in [{_MIN_SIDE}, {_MAX_SIDE}] pixels')
    return w, h


def nominal_cap_px(width: int, height: int, lines: int, letters: int) -> float:
    """The cap height (pixels) that ``lines`` lines of ``letters`` letters get on a page: half the line
    pitch over the written height (84 % of the page), or less when the letters (about 0.82 cap heights
    of advance each) would not fit in the written width (88 %). Each line varies around it."""
    return min(0.5 * 0.84 * height / lines, 0.88 * width / (0.82 * letters))


@dataclass
class SynthConfig:
    """Settings of :func:`deitlab.papyri.synth.synthesize` (one field per ``deitlab papyri synth`` flag).

    Every page is made from ``(seed, page index)`` alone, so a page does not depend on how many
    pages are written, and the same settings give byte-identical files.
    """
    pages: int = field(metadata={'group': 'pages', 'help': 'number of pages to generate'})
    out: str = field(metadata={'group': 'run', 'help': 'output directory: images/page_NNNN.png and '
                                                       'annotations.json (the competition schema)'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed'})
    fonts: str = field(default='bundled', metadata={
        'group': 'pages', 'help': "fonts of the hands: 'bundled' (the Greek fonts inside matplotlib), 'system' "
                                  "(those and the Greek fonts installed here) or comma-separated .ttf/.otf files"})
    size: str = field(default='512x384', metadata={'group': 'pages', 'help': 'page size WIDTHxHEIGHT in pixels'})
    lines: int = field(default=8, metadata={'group': 'pages', 'help': 'lines of writing per page'})
    letters: int = field(default=24, metadata={
        'group': 'pages', 'help': 'letters per line, at most (a line stops early at the right margin)'})
    hands: int = field(default=3, metadata={
        'group': 'pages', 'help': 'at most this many hands (font, size, weight, slant, spacing, ink) per page; '
                                  'each page draws 1..hands, each writing a run of lines'})
    damage: float = field(default=1.0, metadata={
        'group': 'pages', 'help': 'amount of holes, torn edges and abraded ink, in [0, 3] (0: intact pages)'})
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace a dataset this command wrote in --out with other settings'})
    progress: Optional[bool] = field(default=None, metadata={
        'group': 'run', 'help': 'progress bar; unset: when attached to a terminal'})

    def validate(self) -> 'SynthConfig':
        rules = [('pages', '>= 1', lambda v: v >= 1), ('lines', '>= 1', lambda v: v >= 1),
                 ('letters', '>= 1', lambda v: v >= 1), ('hands', '>= 1', lambda v: v >= 1),
                 ('damage', 'in [0, 3]', lambda v: 0 <= v <= 3)]
        for name, limit, ok in rules:
            if not ok(getattr(self, name)):
                raise PapyriError(f'{name} must be {limit}, got {getattr(self, name)}')
        if not str(self.out).strip():
            raise PapyriError('out is empty: give an output directory')
        w, h = parse_size(self.size)
        cap = nominal_cap_px(w, h, self.lines, self.letters)
        if cap < MIN_CAP_PX:
            raise PapyriError(f'{self.lines} lines of {self.letters} letters on a {w}x{h} page leave letters '
                              f'{cap:.1f} px high (at least {MIN_CAP_PX}): use fewer --lines or --letters, or a '
                              f'larger --size')
        self.font_files()
        return self

    @property
    def page_size(self) -> Tuple[int, int]:
        """``(width, height)`` of a page in pixels."""
        return parse_size(self.size)

    def font_files(self) -> Optional[Tuple[str, ...]]:
        """The font files given (each checked to exist), or None for a named set (:data:`FONT_SETS`)."""
        return parse_fonts(self.fonts)


def parse_fonts(text: str) -> Optional[Tuple[str, ...]]:
    """A ``--fonts`` value: None for a named set (:data:`FONT_SETS`), else the comma-separated font
    files, each checked to exist."""
    text = str(text).strip()
    if text in FONT_SETS:
        return None
    paths = tuple(p.strip() for p in text.split(',') if p.strip())
    if not paths:
        raise PapyriError("fonts is empty: give 'bundled', 'system' or comma-separated font files")
    for p in paths:
        if not os.path.isfile(p):
            if len(paths) == 1 and os.sep not in p and '.' not in p:   # a word, not a path
                raise PapyriError(f"fonts must be {' or '.join(repr(s) for s in FONT_SETS)} or font files; "
                                  f"{p!r} is neither (no such file)")
            raise PapyriError(f'font file does not exist: {p}')
    return paths
