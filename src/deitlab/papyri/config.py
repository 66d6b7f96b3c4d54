"""The settings of the ``deitlab papyri`` commands and the package's error type, without torch
(``deitlab papyri synth --help`` reads them).

``SynthConfig`` is ``deitlab papyri synth`` (:func:`deitlab.papyri.synth.synthesize`): synthetic
papyrus pages in the annotation schema of the ICDAR 2023 competition on detection and recognition
of Greek letters on papyri, the data of Turnbull & Mannix (IJDAR 2024). ``PredictConfig`` is
``deitlab papyri predict`` (:func:`deitlab.papyri.predict.predict_files`): one or several trained
detectors on page images, their boxes fused, written in several formats.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

__all__ = ['PapyriError', 'SynthConfig', 'PredictConfig', 'parse_size', 'parse_fonts', 'nominal_cap_px', 'MIN_CAP_PX',
           'FONT_SETS']

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


@dataclass
class PredictConfig:
    """Settings of :func:`deitlab.papyri.predict.predict_files` (one field per ``deitlab papyri
    predict`` flag; ``images`` are the command's positional arguments)."""
    detector: tuple = field(metadata={
        'group': 'model', 'help': 'detector run directories; with several, their boxes on each page '
                                  'are fused (--fusion)'})
    out: str = field(metadata={
        'group': 'run', 'help': 'output directory: predictions.json (COCO), results.json (the COCO results list that '
                                'deitlab papyri evaluate --pred reads), predictions.csv, overlays/, text/'})
    images: tuple = field(default=(), metadata={
        'group': 'data', 'help': 'page images, or directories whose image files are all read'})
    ids_from: Optional[str] = field(default=None, metadata={
        'group': 'data', 'help': 'a COCO file (e.g. the ground truth) that numbers the pages: each image takes the id '
                                 'and file_name of its entry there (matched by path, then by file name), so that '
                                 'the predictions can be scored against that file; unset: ids 1, 2, ... in order'})
    fusion: str = field(default='wbf', metadata={
        'group': 'fusion', 'help': 'how several detectors\' boxes become one set per page: wbf (weighted boxes '
                                   'fusion), nms or soft-nms'})
    weights: Optional[tuple] = field(default=None, metadata={
        'group': 'fusion', 'help': 'one weight per detector, in --detector order (unset: equal weights)'})
    iou_thr: float = field(default=0.55, metadata={
        'group': 'fusion', 'help': 'boxes of different detectors overlapping by more than this IoU are one glyph'})
    class_aware: bool = field(default=True, metadata={
        'group': 'fusion', 'help': 'fuse each letter on its own (off: fuse boxes whatever their letter, then choose '
                                   'the letter by a score-weighted vote)'})
    score_thr: float = field(default=0.3, metadata={
        'group': 'run', 'help': 'boxes scored below this stay out of text/ and get no letter on the overlays (every '
                                'box is kept in the JSON and CSV files, which the metric ranks by score)'})
    overlays: bool = field(default=True, metadata={
        'group': 'run', 'help': 'draw each page with its boxes and letters in overlays/'})
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace the predictions this command wrote earlier in --out (a directory holding '
                                'anything else is always refused)'})
    progress: Optional[bool] = field(default=None, metadata={
        'group': 'run', 'help': 'progress bar; unset: when attached to a terminal'})

    def validate(self) -> 'PredictConfig':
        self.detector = tuple(str(d).strip() for d in self.detector if str(d).strip())
        if not self.detector:
            raise PapyriError('detector is empty: give one or more detector run directories, comma-separated')
        self.images = tuple(str(p) for p in self.images)
        if not self.images:
            raise PapyriError('no images given: name page images or directories of images')
        if not str(self.out).strip():
            raise PapyriError('out is empty: give an output directory')
        try:
            self.weights = None if self.weights is None else tuple(float(w) for w in self.weights)
        except (TypeError, ValueError):
            raise PapyriError(f'weights must be numbers, one per detector; got {",".join(map(str, self.weights))}') \
                from None
        if not 0 <= self.score_thr <= 1:
            raise PapyriError(f'score_thr must be in [0, 1], got {self.score_thr}')
        self.fusion_config()
        return self

    def fusion_config(self):
        """The :class:`~deitlab.papyri.fusion.FusionConfig` of these settings, checked against the number
        of detectors (imports numpy: not for ``--help``)."""
        from .fusion import FusionConfig, FusionError
        try:
            return FusionConfig(method=self.fusion, iou_thr=self.iou_thr, weights=self.weights or None,
                                class_aware=self.class_aware).validate(len(self.detector))
        except FusionError as e:
            raise PapyriError(f'fusion: {e}') from None
