"""The settings of the ``deitlab papyri`` commands and the package's error type, without torch
(``deitlab papyri synth --help`` and ``deitlab papyri train-detector --help`` read them).

``SynthConfig`` is ``deitlab papyri synth`` (:func:`deitlab.papyri.synth.synthesize`): synthetic
papyrus pages in the annotation schema of the ICDAR 2023 competition on detection and recognition
of Greek letters on papyri, the data of Turnbull & Mannix (IJDAR 2024). ``PredictConfig`` is
``deitlab papyri predict`` (:func:`deitlab.papyri.predict.predict_files`): one or several trained
detectors on page images, their boxes fused, written in several formats. ``DetectorConfig`` is
``deitlab papyri train-detector`` (:func:`deitlab.papyri.detect.train_detector`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

__all__ = ['PapyriError', 'SynthConfig', 'PredictConfig', 'DetectorConfig', 'ANNOTATIONS_NAME', 'parse_size',
           'parse_fonts', 'nominal_cap_px', 'annotation_file', 'MIN_CAP_PX', 'FONT_SETS']

FONT_SETS = ('bundled', 'system')
ANNOTATIONS_NAME = 'annotations.json'   # what deitlab papyri synth writes next to images/
MIN_CAP_PX = 6          # smaller letters are specks, not glyphs: the settings are refused
_MIN_SIDE, _MAX_SIDE = 32, 8192
_SIZE = re.compile(r'^\s*(\d+)\s*[xX]\s*(\d+)\s*$')


class PapyriError(ValueError):
    """Bad input to the papyri tools: settings, fonts, annotation files (the message says what)."""


# the run settings the papyri commands share, one definition each (a dataclass field with its --help)
def progress_field():
    return field(default=None, metadata={'group': 'run', 'help': 'progress bar; unset: when attached to a terminal'})


def device_field():
    return field(default=None, metadata={'group': 'run', 'help': 'torch device (default: CUDA when available, else '
                                                                  'the CPU)'})


def amp_field():
    return field(default=True, metadata={'group': 'run', 'help': 'bf16 autocast on CUDA (ignored on the CPU)'})


def workers_field():
    return field(default=0, metadata={'group': 'data', 'help': 'data loader worker processes'})


def resume_field():
    return field(default=False, metadata={'group': 'run', 'help': 'continue the checkpoint in --out'})


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
    progress: Optional[bool] = progress_field()

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
    refiners: tuple = field(default=(), metadata={
        'group': 'refine', 'help': 'crop classifiers that re-classify every box, NAME=RUN each (e.g. deit=runs/deit,'
                                   'simclr=runs/simclr-ft): run directories of deitlab train on deitlab papyri crops; '
                                   'the detector and they vote on each letter (--vote)'})
    vote: str = field(default='majority', metadata={
        'group': 'refine', 'help': 'with --refiners: majority (the letter most members name; a tie goes to the most '
                                   'confident member) or average (the largest mean probability)'})
    vote_score: str = field(default='agree', metadata={
        'group': 'refine', 'help': "with --refiners: a box's score, agree (the detector's score times the agreeing "
                                   "members' share of the vote) or detector (kept)"})
    vote_weights: Optional[tuple] = field(default=None, metadata={
        'group': 'refine', 'help': 'one weight per member of the vote: the detector, then each refiner in order '
                                   '(unset: equal)'})
    score_thr: float = field(default=0.3, metadata={
        'group': 'run', 'help': 'boxes scored below this stay out of text/ and off the overlays (every '
                                'box is kept in the JSON and CSV files, which the metric ranks by score)'})
    overlays: bool = field(default=True, metadata={
        'group': 'run', 'help': 'draw each page with its boxes and letters in overlays/'})
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace the predictions this command wrote earlier in --out (a directory holding '
                                'anything else is always refused)'})
    progress: Optional[bool] = progress_field()

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
        self.refiner_pairs()
        try:
            self.vote_weights = None if self.vote_weights is None else tuple(float(w) for w in self.vote_weights)
        except (TypeError, ValueError):
            raise PapyriError(f'vote_weights must be numbers, one per member of the vote; got '
                              f'{",".join(map(str, self.vote_weights))}') from None
        if self.refiners:
            self.vote_config()
        return self

    def refiner_pairs(self) -> Tuple[Tuple[str, str], ...]:
        """``(name, run directory)`` of each ``--refiners`` entry (``NAME=RUN``; a bare ``RUN`` is named
        after its directory); names unique, and not ``detector`` (the first member of the vote)."""
        pairs = []
        for item in (str(r).strip() for r in self.refiners):
            if not item:
                continue
            name, eq, path = item.partition('=')
            name, path = (name.strip(), path.strip()) if eq else (Path(item).name, item)
            if not name or not path:
                raise PapyriError(f'refiners: expected NAME=RUN_DIR, got {item!r}')
            pairs.append((name, path))
        names = [n for n, _ in pairs]
        clash = sorted({n for n in names if names.count(n) > 1 or n == 'detector'})
        if clash:
            raise PapyriError(f'refiners: each needs its own name, not detector; {", ".join(clash)} is taken (name '
                              f'them NAME=RUN_DIR)')
        return tuple(pairs)

    def vote_config(self):
        """The :class:`~deitlab.papyri.vote.VoteConfig` of these settings, checked against the number
        of members (the detector and each refiner; imports numpy: not for ``--help``)."""
        from .vote import VoteConfig
        return VoteConfig(self.vote, self.vote_score, self.vote_weights).validate(1 + len(self.refiner_pairs()))

    def fusion_config(self):
        """The :class:`~deitlab.papyri.fusion.FusionConfig` of these settings, checked against the number
        of detectors (imports numpy: not for ``--help``)."""
        from .fusion import FusionConfig, FusionError
        try:
            return FusionConfig(method=self.fusion, iou_thr=self.iou_thr, weights=self.weights or None,
                                class_aware=self.class_aware).validate(len(self.detector))
        except FusionError as e:
            raise PapyriError(f'fusion: {e}') from None


def annotation_file(path, what: str = 'data') -> Path:
    """The annotation file of a dataset given as a directory (its ``annotations.json``, the layout
    ``deitlab papyri synth`` writes) or as the JSON file itself; :class:`PapyriError` saying what is
    missing (``what`` names the setting, e.g. ``'val'``)."""
    p = Path(str(path))
    if not str(path).strip():
        raise PapyriError(f'{what} is empty: give a directory with {ANNOTATIONS_NAME} and its images')
    if p.is_file():
        return p
    if not p.exists():
        raise PapyriError(f'{what} directory does not exist: {p}')
    if not (p / ANNOTATIONS_NAME).is_file():
        raise PapyriError(f'{what} directory {p} has no {ANNOTATIONS_NAME}: give a directory written by deitlab '
                          f'papyri synth, or one holding {ANNOTATIONS_NAME} (the competition\'s COCO schema) and the '
                          f'images it names')
    return p / ANNOTATIONS_NAME


def _detector_help() -> str:
    from ..registry import DETECTORS
    return 'the detector: ' + '; '.join(f'{e.name}: {e.help}' for e in DETECTORS)


@dataclass
class DetectorConfig:
    """Settings of :func:`deitlab.papyri.detect.train_detector` (one field per ``deitlab papyri
    train-detector`` flag). The defaults are those of the permissive default detector, ``fcos-r18``,
    tuned to learn synthetic pages on a CPU (:mod:`deitlab.papyri.detectors` says why)."""
    data: str = field(metadata={'group': 'data', 'help': f'training pages: a directory written by deitlab papyri '
                                                         f'synth, or any directory with {ANNOTATIONS_NAME} (the '
                                                         f'competition\'s COCO schema) and the images it names'})
    out: str = field(metadata={'group': 'run', 'help': 'the run directory to write (config.json, model.safetensors, '
                                                       'metrics.jsonl, summary.json, checkpoint.pt)'})
    val: Optional[str] = field(default=None, metadata={
        'group': 'data', 'help': 'validation pages (same layout as --data): detection and recognition mAP@.5 and '
                                 'mAP@[.5:.95] after every epoch, by the organisers\' metric; unset: none'})
    detector: str = field(default='fcos-r18', metadata={'group': 'model', 'help': _detector_help})
    tile: int = field(default=128, metadata={
        'group': 'data', 'help': 'side in pixels of the random training crops and of the tiles pages are predicted in'})
    overlap: int = field(default=32, metadata={
        'group': 'data', 'help': 'overlap in pixels of neighbouring prediction tiles: at least the largest glyph'})
    min_visible: float = field(default=0.5, metadata={
        'group': 'augmentation', 'help': 'a glyph cut by a training crop keeps its box (clipped to the crop) when at '
                                         'least this share of its box area is inside; less: it is left out'})
    jitter: float = field(default=0.2, metadata={
        'group': 'augmentation', 'help': 'photometric jitter of the crops: brightness and contrast factors in 1 +- '
                                         'jitter, a colour cast of half that (0: none); never a flip'})
    min_size: Optional[int] = field(default=None, metadata={
        'group': 'model', 'help': "torchvision's input rescaling: the shorter side scaled to this (with --max-size); "
                                  'unset: tiles are seen at the pages\' own scale, never rescaled'})
    max_size: Optional[int] = field(default=None, metadata={
        'group': 'model', 'help': 'the longer side at most this after rescaling (with --min-size)'})
    score_thresh: float = field(default=0.05, metadata={
        'group': 'model', 'help': 'detections scoring below this are dropped (low: more recall for mAP)'})
    detections: int = field(default=3000, metadata={
        'group': 'model', 'help': 'most detections kept per tile after NMS (a page holds hundreds of glyphs)'})
    epochs: int = field(default=20, metadata={'group': 'schedule', 'help': 'training epochs'})
    steps: int = field(default=0, metadata={
        'group': 'schedule', 'help': "updates per epoch; 0: as many as cover the training pages' area once with "
                                     "batches of crops"})
    warmup: float = field(default=0.1, metadata={
        'group': 'schedule', 'help': 'share of all updates with a linear warm-up of the learning rate, then a cosine '
                                     'to 1% of it'})
    batch_size: int = field(default=4, metadata={'group': 'optimiser', 'help': 'crops per update'})
    lr: float = field(default=2e-3, metadata={'group': 'optimiser', 'help': 'peak learning rate'})
    opt: str = field(default='adamw', metadata={'group': 'optimiser', 'help': 'optimizer (a timm optimizer name)'})
    weight_decay: float = field(default=1e-4, metadata={
        'group': 'optimiser', 'help': 'decoupled weight decay (not on norms and biases)'})
    grad_clip: Optional[float] = field(default=10.0, metadata={
        'group': 'optimiser', 'help': 'clip the gradient norm to this; unset or 0: no clipping'})
    seed: int = field(default=0, metadata={'group': 'run', 'help': 'random seed (weights, crops, jitter)'})
    device: Optional[str] = device_field()
    amp: bool = amp_field()
    workers: int = workers_field()
    resume: bool = resume_field()
    overwrite: bool = field(default=False, metadata={
        'group': 'run', 'help': 'replace what --out holds (another run, other files) instead of refusing'})
    progress: Optional[bool] = progress_field()

    def validate(self) -> 'DetectorConfig':
        from ..registry import DETECTORS
        DETECTORS.check(self.detector, PapyriError, 'detector')
        rules = [('epochs', '>= 1', lambda v: v >= 1), ('steps', '>= 0', lambda v: v >= 0),
                 ('batch_size', '>= 1', lambda v: v >= 1), ('lr', '> 0', lambda v: v > 0),
                 ('weight_decay', '>= 0', lambda v: v >= 0), ('warmup', 'in [0, 1)', lambda v: 0 <= v < 1),
                 ('tile', '>= 32', lambda v: v >= 32), ('overlap', 'in [0, tile)', lambda v: 0 <= v < self.tile),
                 ('min_visible', 'in (0, 1]', lambda v: 0 < v <= 1), ('jitter', 'in [0, 1)', lambda v: 0 <= v < 1),
                 ('score_thresh', 'in [0, 1)', lambda v: 0 <= v < 1), ('detections', '>= 1', lambda v: v >= 1),
                 ('workers', '>= 0', lambda v: v >= 0)]
        for name, limit, ok in rules:
            if not ok(getattr(self, name)):
                raise PapyriError(f'{name} must be {limit}, got {getattr(self, name)}')
        if self.grad_clip is not None and self.grad_clip < 0:
            raise PapyriError(f'grad_clip must be >= 0, got {self.grad_clip}')
        if (self.min_size is None) != (self.max_size is None):
            raise PapyriError('min_size and max_size go together: give both (torchvision\'s rescaling) or neither '
                              '(the pages\' own scale)')
        if self.min_size is not None and not 1 <= self.min_size <= self.max_size:
            raise PapyriError(f'min_size must be in [1, max_size], got min_size {self.min_size}, max_size '
                              f'{self.max_size}')
        if not str(self.out).strip():
            raise PapyriError('out is empty: give the run directory to write')
        annotation_file(self.data, 'data')
        if self.val is not None:
            annotation_file(self.val, 'val')
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
