"""Letters predicted on page images, written in several formats: ``deitlab papyri predict``.

Turnbull & Mannix ("Detecting and recognizing characters in Greek papyri with YOLOv8, DeiT and
SimCLR", IJDAR 2024) ran an ensemble of detectors on each papyrus page, merged their boxes with
Weighted Boxes Fusion, and released their predictions in several formats, for the competition's
scorer and for readers. This module does the same with deitlab's detectors:

* :func:`predict_pages`: each page through one or several detectors (anything with a ``predict``
  method returning :class:`~deitlab.papyri.fusion.Detections`, e.g. :func:`deitlab.papyri.detect.load_detector`'s);
  with several, their boxes are fused per page by :func:`~deitlab.papyri.fusion.fuse` (WBF by
  default). With one, its boxes are kept as they are, clipped to the page.
* With ``refiners`` (crop classifiers, :mod:`.refine`), every box is then re-classified and its
  letter and score set by the vote of the detector and the refiners (:mod:`.vote`), as Turnbull &
  Mannix re-classified theirs with a DeiT and a SimCLR-pretrained ResNet.
* :func:`write_outputs`: the output directory, written whole or not at all (:mod:`.outdir`):

  - ``predictions.json``: COCO in the competition's schema (:mod:`.coco`): the pages
    (``id``, ``file_name``, ``width``, ``height``), one annotation per box with its ``bbox``
    ``[x, y, w, h]`` in pixels, the competition ``category_id`` of its letter and its ``score`` (and,
    after refinement, ``votes``: every member's letter), the 24 letter categories, and the settings
    under ``info``;
  - ``results.json``: the same boxes as a COCO results list ``[{image_id, category_id, bbox,
    score}]``, what ``deitlab papyri evaluate --pred`` (:mod:`.metric`) and COCO tools read;
  - ``predictions.csv``: one row per box: ``image`` (the file name), ``x``, ``y``, ``w``, ``h``,
    ``letter``, ``unicode`` (``U+03F9``), ``category_id``, ``score``; UTF-8;
  - ``overlays/<page>.png``: the page with every box, coloured by score (red low, green high), and
    the letter of every box at or above the score threshold, drawn in DejaVu Sans (matplotlib's
    font, which has all 24 capitals and the lunate sigma);
  - ``text/<page>.txt``: the letters at or above the score threshold in reading order
    (:func:`reading_lines`), one line of text per line of writing, UTF-8.

  Boxes and files keep every prediction, best score first per page: the metric ranks them by score,
  so a threshold there would only lower recall. The threshold is for the text and the overlays.

**Bad input** is refused before any detector is loaded or anything is written, with a message
naming it (:class:`~deitlab.papyri.config.PapyriError`): a file that is not an image, a directory
without images, two pages of the same name (the overlays and texts are named after the pages), a
page that the ``ids_from`` file does not list, an output directory that holds anything but an
earlier prediction (an earlier prediction is replaced only with ``overwrite``), a detector path that
is not a run directory. A **blank page** (one colour: every channel spans at most
:data:`BLANK_LEVELS` grey levels) is not an error: it holds no letters, so it is not shown to the
detectors, a warning names it, and it is written with no boxes, an empty text and its overlay.
"""
from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ..console import log, progress
from .alphabet import LETTERS, NUM_CLASSES, category_id, font_code_points
from .coco import CocoAnnotation, CocoDataset, CocoImage, letter_categories, read_coco, write_coco
from .config import PapyriError, PredictConfig
from .fusion import Detections, FusionConfig, FusionError, box_iou, fuse
from .outdir import entries, generator_of, shown, staged

__all__ = ['GENERATOR', 'OUTPUTS', 'CSV_COLUMNS', 'BLANK_LEVELS', 'LINE_TOLERANCE', 'DUPLICATE_IOU', 'PagePrediction',
           'image_files', 'number_pages', 'is_blank', 'load_detectors', 'predict_pages', 'reading_lines',
           'page_text', 'overlay_font', 'draw_overlay', 'write_outputs', 'predict_files']

GENERATOR = 'deitlab papyri predict'
#: What an output directory of this command holds.
OUTPUTS = ('predictions.json', 'results.json', 'predictions.csv', 'overlays', 'text')
#: A page whose every channel spans at most this many grey levels (of 255) is blank.
BLANK_LEVELS = 2
#: Reading order: a letter joins a line when its centre is within this many letter heights of the line's.
LINE_TOLERANCE = 0.5
#: Reading order: of boxes overlapping by at least this IoU, only the best-scored enters the text.
DUPLICATE_IOU = 0.5
CSV_COLUMNS = ('image', 'x', 'y', 'w', 'h', 'letter', 'unicode', 'category_id', 'score')


@dataclass
class PagePrediction:
    """One page's prediction: its record (``id``, ``file_name``, ``width``, ``height``), the image
    file, the boxes on the page (best score first), the number of boxes each detector returned
    before fusion, and whether the page was blank (not shown to the detectors)."""
    image: CocoImage
    path: Path
    detections: Detections
    found: Tuple[int, ...] = ()
    blank: bool = False
    votes: Optional[dict] = None   # after refinement: each member's letter per box (detector first)

    @property
    def name(self) -> str:
        """The page's name for its overlay and text: its file name without the suffix."""
        return Path(self.image.file_name).stem


# ------------------------------------------------------------------------------------------ pages
def image_files(paths: Sequence) -> List[Path]:
    """The image files named by ``paths``: files as given, directories as the image files directly
    inside them (by the suffixes the image library reads; hidden files skipped), sorted. A file
    named twice counts once. :class:`PapyriError` for a missing path or a directory without images
    (that a file really is an image is checked by :func:`number_pages`)."""
    suffixes = {s.lower() for s in Image.registered_extensions()}
    found, seen = [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise PapyriError(f'image file does not exist: {p}')
        if p.is_dir():
            inside = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith('.')
                            and q.suffix.lower() in suffixes)
            if not inside:
                raise PapyriError(f'{p} holds no image files (none with a suffix the image library reads, such as '
                                  f'.png, .jpg or .tif)')
        else:
            inside = [p]
        for q in inside:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                found.append(q)
    return found


def _image_size(path: Path) -> Tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        why = '' if isinstance(e, UnidentifiedImageError) else f': {e}'
        raise PapyriError(f'{path} is not an image (the image library cannot read it{why})') from None


def _read_page(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PapyriError(f'{path} is not an image that can be read ({e})') from None


def number_pages(paths: Sequence, ids_from=None) -> List[CocoImage]:
    """One record per image file (each opened: :class:`PapyriError` for a file that is not an
    image): ids 1, 2, ... and the file's name; or, with ``ids_from`` (a COCO file in the
    competition's schema, e.g. the ground truth), the ``id`` and ``file_name`` of the image's entry
    there, so that the predictions are scored against that file. An image matches the entry whose
    file is the same file (``file_name`` under the COCO file's directory), else the one entry with
    the same file name; its size must be the entry's. Page names (file names without suffix) must
    be unique: the overlays and texts are named after them."""
    paths = [Path(p) for p in paths]
    sizes = [_image_size(p) for p in paths]
    if ids_from is None:
        records = [CocoImage(i + 1, p.name, w, h) for i, (p, (w, h)) in enumerate(zip(paths, sizes))]
    else:
        coco = read_coco(ids_from, drop_other_categories=True, clip_boxes=True)
        root = Path(ids_from).parent
        by_path = {(root / im.file_name).resolve(): im for im in coco.images}
        by_name = {}
        for im in coco.images:
            by_name.setdefault(Path(im.file_name).name, []).append(im)
        records = []
        for p, (w, h) in zip(paths, sizes):
            im = by_path.get(p.resolve())
            if im is None and len(by_name.get(p.name, [])) == 1:
                im = by_name[p.name][0]
            if im is None:
                raise PapyriError(f'{p} is not among the images of {ids_from} (matched by path under {root}, then by '
                                  f'file name{"; several entries have that name" if by_name.get(p.name) else ""})')
            if (im.width, im.height) != (w, h):
                raise PapyriError(f'{p} is {w}x{h} pixels but its entry in {ids_from} (image {im.id}, '
                                  f'{im.file_name}) is {im.width}x{im.height}: not the same image')
            records.append(CocoImage(im.id, im.file_name, w, h))
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise PapyriError(f'two images match image {dup} of {ids_from}: '
                              f'{", ".join(str(p) for p, r in zip(paths, records) if r.id == dup)}')
    names = {}
    for p, r in zip(paths, records):
        names.setdefault(Path(r.file_name).stem, []).append(p)
    clash = next(((n, ps) for n, ps in names.items() if len(ps) > 1), None)
    if clash:
        raise PapyriError(f'two pages are named {clash[0]} ({", ".join(map(str, clash[1]))}): the overlays and texts '
                          f'are named after the pages; rename one or predict them separately')
    return records


def is_blank(image) -> bool:
    """True for a page of one colour: every channel spans at most :data:`BLANK_LEVELS` grey levels."""
    a = np.asarray(image)
    a = a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a.reshape(-1, 1)
    return bool((a.max(axis=0).astype(np.int64) - a.min(axis=0) <= BLANK_LEVELS).all())


# -------------------------------------------------------------------------------------- detectors
def load_detectors(run_dirs: Sequence, loader: Optional[Callable] = None) -> list:
    """The detectors of ``run_dirs``, each loaded by ``loader`` (default:
    :func:`deitlab.papyri.detect.load_detector`, which refuses a run directory of another kind).
    Every path is first checked to be a run directory (a directory with ``config.json``), so that a
    wrong path is named before any model is loaded."""
    from ..rundir import CONFIG_NAME
    paths = [Path(d) for d in run_dirs]
    for p in paths:
        if not p.exists():
            raise PapyriError(f'detector run directory does not exist: {p}')
        if not p.is_dir() or not (p / CONFIG_NAME).is_file():
            raise PapyriError(f'{p} is not a detector run directory (no {CONFIG_NAME}); give a directory written '
                              f'when a detector was trained')
    if loader is None:
        from .detect import load_detector as loader
    return [loader(p) for p in paths]


def _name(detector, k: int) -> str:
    return str(getattr(detector, 'name', None) or getattr(detector, 'run_dir', None) or f'detector {k}')


def _on_page(dets, detector, k: int, width: int, height: int) -> Detections:
    """A detector's answer checked, clipped to the page, without empty boxes, best score first."""
    if not isinstance(dets, Detections):
        raise PapyriError(f'{_name(detector, k)} returned {type(dets).__name__}, not Detections')
    bad = (dets.labels < 0) | (dets.labels >= NUM_CLASSES)
    if bad.any():
        raise PapyriError(f'{_name(detector, k)} returned label {int(dets.labels[bad][0])}: the letters are '
                          f'0..{NUM_CLASSES - 1}')
    if not (np.isfinite(dets.boxes).all() and np.isfinite(dets.scores).all()):
        raise PapyriError(f'{_name(detector, k)} returned boxes or scores that are not finite numbers')
    boxes = np.clip(dets.boxes, 0, np.array([width, height, width, height], dtype=np.float64))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = Detections(boxes[keep], dets.scores[keep], dets.labels[keep])
    return out.select(np.argsort(-out.scores, kind='stable'))


def predict_pages(images: Sequence, detectors: Sequence, fusion_config: Optional[FusionConfig] = None, *,
                  records: Optional[Sequence[CocoImage]] = None, progress_bar: Optional[bool] = False) -> list:
    """A :class:`PagePrediction` per image file of ``images``: the boxes of ``detectors`` (objects
    with ``predict(image) -> Detections``, given the page as an RGB PIL image), fused per page by
    :func:`~deitlab.papyri.fusion.fuse` with ``fusion_config`` (default WBF, equal weights) when
    there are several. ``records``: the pages' ids and file names (default :func:`number_pages`). A
    blank page (:func:`is_blank`) gets no boxes and a warning."""
    paths = [Path(p) for p in images]
    detectors = list(detectors)
    if not detectors:
        raise PapyriError('no detector given')
    records = list(records) if records is not None else number_pages(paths)
    if len(records) != len(paths):
        raise PapyriError(f'{len(records)} page records for {len(paths)} images')
    config = fusion_config or FusionConfig()
    if len(detectors) > 1:
        try:
            config.validate(len(detectors))
        except FusionError as e:
            raise PapyriError(f'fusion: {e}') from None
    pages = []
    for path, rec in progress(progress_bar, iterable=list(zip(paths, records)), desc='pages', unit='page'):
        image = _read_page(path)
        if image.size != (rec.width, rec.height):
            raise PapyriError(f'{path} is {image.size[0]}x{image.size[1]} pixels, its record says '
                              f'{rec.width}x{rec.height}')
        if is_blank(image):
            log(f'warning: {path} is blank (one colour): no letters predicted on it')
            pages.append(PagePrediction(rec, path, Detections.empty(), (0,) * len(detectors), blank=True))
            continue
        found = [_on_page(d.predict(image), d, k, rec.width, rec.height) for k, d in enumerate(detectors)]
        if len(found) == 1:
            dets = found[0]
        else:
            try:
                dets = fuse(found, (rec.height, rec.width), config)
            except FusionError as e:
                raise PapyriError(f'fusion: {e}') from None
        pages.append(PagePrediction(rec, path, dets, tuple(len(f) for f in found)))
    return pages


# ---------------------------------------------------------------------------------- reading order
def _chain(cx: np.ndarray, cy: np.ndarray, h: np.ndarray) -> List[List[int]]:
    """Boxes into lines, left to right: each joins the line whose level (the median centre height of
    its last three boxes) is nearest, if within :data:`LINE_TOLERANCE` of the larger of its height
    and theirs (median); else it starts a line."""
    lines: List[List[int]] = []
    for i in np.lexsort((cy, cx)):
        best, best_d = None, None
        for line in lines:
            tail = line[-3:]
            ref_h = max(h[i], float(np.median(h[tail])))
            d = abs(cy[i] - float(np.median(cy[tail]))) / ref_h
            if d <= LINE_TOLERANCE and (best_d is None or d < best_d):
                best, best_d = line, d
        if best is None:
            lines.append([int(i)])
        else:
            best.append(int(i))
    return lines


def _skew(lines: List[List[int]], cx: np.ndarray, cy: np.ndarray, h: np.ndarray) -> float:
    """The page's slope (dy / dx of the lines): the median of the least-squares slopes of the lines
    with at least three boxes spanning at least two letter heights; 0 when none has."""
    slopes = []
    for line in lines:
        x, y = cx[line], cy[line]
        if len(line) >= 3 and x.max() - x.min() >= 2 * np.median(h[line]):
            slopes.append(np.polyfit(x, y, 1)[0])
    return float(np.median(slopes)) if slopes else 0.0


def _best_of_overlaps(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the boxes kept for the text: in order of score, a box overlapping a kept one by at
    least :data:`DUPLICATE_IOU` is dropped (one letter per glyph, e.g. after class-aware fusion of
    detectors that disagree on the letter)."""
    order = np.argsort(-scores, kind='stable')
    iou = box_iou(boxes[order], boxes[order])
    kept: List[int] = []
    for j in range(len(order)):
        if not kept or iou[j, kept].max() < DUPLICATE_IOU:
            kept.append(j)
    return np.sort(order[kept])


def reading_lines(detections: Detections, score_thr: float = 0.3) -> List[np.ndarray]:
    """The boxes of a page in reading order: a list of lines, top to bottom, each the indices (into
    ``detections``) of its boxes, left to right. Boxes scored below ``score_thr`` are left out, and
    of boxes overlapping by :data:`DUPLICATE_IOU` or more only the best-scored is kept.

    The rule, built on the boxes' centres ``(cx, cy)`` and heights ``h``:

    1. **Chaining.** Going through the boxes from left to right, a box joins the line whose
       current level, the median ``cy`` of the line's last three boxes, is nearest to its ``cy``,
       provided the distance is at most :data:`LINE_TOLERANCE` (0.5) times the larger of its height
       and the median height of those three boxes; otherwise it starts a new line. Comparing with
       the line's last boxes, not its mean, lets a line follow a wobbling or sloping baseline, and
       measuring the distance in the letters' own heights serves small and large writing alike (a
       tall Φ or a small Ο sits within half a height of its neighbours' centres, the next line
       about two heights away).
    2. **Skew.** The page's slope is the median least-squares slope of the lines found (those of
       at least three boxes spanning two letter heights); when it is not 0 the chaining is done
       again on ``cy - slope * cx``, i.e. on a page turned level, so that a rotated page is chained
       as an upright one.
    3. **Order.** Lines go top to bottom by their median level (after the skew correction), the
       boxes of a line left to right by ``cx``.

    Tolerance: consecutive letters of a line may differ in centre height (after the skew
    correction) by up to half a letter height, and neighbouring lines must be further apart than
    that; a page turned by up to about 10 degrees (the tests use 3 and 8, with wobbling baselines
    and two letter sizes) reads as the upright page. A page is taken as one column of writing.
    """
    keep = np.flatnonzero(detections.scores >= score_thr)
    if not len(keep):
        return []
    keep = keep[_best_of_overlaps(detections.boxes[keep], detections.scores[keep])]
    b = detections.boxes[keep]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    h = np.maximum(b[:, 3] - b[:, 1], 1e-6)
    lines = _chain(cx, cy, h)
    slope = _skew(lines, cx, cy, h)
    if slope:
        cy = cy - slope * cx
        lines = _chain(cx, cy, h)
    lines.sort(key=lambda line: float(np.median(cy[line])))
    return [keep[np.array(line)[np.argsort(cx[line], kind='stable')]] for line in lines]


def page_text(detections: Detections, score_thr: float = 0.3) -> str:
    """The letters of a page in reading order (:func:`reading_lines`): one line of text per line of
    writing, its letters without spaces (the pages are written in scriptio continua), each line
    ending in a newline; ``''`` for a page without letters at or above ``score_thr``."""
    return ''.join(''.join(LETTERS[c] for c in detections.labels[line]) + '\n'
                   for line in reading_lines(detections, score_thr))


# --------------------------------------------------------------------------------------- overlays
@functools.lru_cache(maxsize=None)
def overlay_font() -> str:
    """The path of DejaVu Sans, found by matplotlib's font manager (the font ships with matplotlib;
    nothing is downloaded), checked to draw the 24 letters as themselves, the lunate sigma included."""
    from matplotlib import font_manager
    try:
        path = font_manager.findfont(font_manager.FontProperties(family='DejaVu Sans'), fallback_to_default=False)
    except ValueError:
        raise PapyriError('the overlays need the DejaVu Sans font, which matplotlib ships, and it was not found; '
                          'turn the overlays off') from None
    if font_code_points(path) != LETTERS:
        raise PapyriError(f'{path} does not draw all 24 letters (the lunate sigma U+03F9 included)')
    return path


def _colour(score: float) -> Tuple[int, int, int]:
    """Red (low score) through yellow to green (high score)."""
    import matplotlib
    r, g, b, _ = matplotlib.colormaps['RdYlGn'](float(np.clip(score, 0, 1)))
    return int(round(255 * r)), int(round(255 * g)), int(round(255 * b))


def draw_overlay(image: Image.Image, detections: Detections, score_thr: float = 0.3) -> Image.Image:
    """A copy of the page with each box scoring at least ``score_thr`` outlined in the colour of its
    score and its letter above it (inside when at the top edge). The boxes below stay off the
    picture (a detector keeps thousands per page for the metric's ranking, which would bury the
    page); the JSON and CSV files hold them all."""
    out = image.convert('RGB')
    if not len(detections):
        return out
    draw = ImageDraw.Draw(out)
    heights = detections.boxes[:, 3] - detections.boxes[:, 1]
    size = max(8, int(round(0.6 * float(np.median(heights)))))
    font = ImageFont.truetype(overlay_font(), size)
    width = max(1, int(round(float(np.median(heights)) / 20)))
    for k in np.argsort(detections.scores, kind='stable'):   # best last: drawn on top
        if detections.scores[k] < score_thr:
            continue
        x0, y0, x1, y1 = (float(v) for v in detections.boxes[k])
        colour = _colour(detections.scores[k])
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        top = y0 - size - 1 if y0 - size - 1 >= 0 else y0 + 1
        draw.text((x0, top), LETTERS[detections.labels[k]], font=font, fill=colour, stroke_width=1,
                  stroke_fill=(255, 255, 255))
    return out


# ---------------------------------------------------------------------------------------- writing
def _rounded(boxes: np.ndarray) -> np.ndarray:
    """xyxy boxes as ``[x, y, w, h]`` rounded to a thousandth of a pixel."""
    b = np.round(boxes, 3)
    return np.round(np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1), 3)


def _number(v: float):
    v = float(v)
    return int(v) if v.is_integer() else v


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that holds anything but an earlier prediction, and an earlier
    prediction without ``overwrite``."""
    names = entries(out)
    if not names:
        return
    info = generator_of(out / 'predictions.json') or {}
    if not (set(names) <= set(OUTPUTS) and info.get('generator') == GENERATOR):
        raise PapyriError(f'{out} is not empty ({shown(names)}) and holds no predictions written by {GENERATOR}; '
                          f'choose another --out (--overwrite replaces only such predictions)')
    if not overwrite:
        raise PapyriError(f'{out} already holds predictions; pass --overwrite to replace them, or choose another --out')


def write_outputs(out_dir, pages: Sequence[PagePrediction], *, score_thr: float = 0.3, overwrite: bool = False,
                  overlays: bool = True, info: Optional[dict] = None) -> dict:
    """Write the predictions of ``pages`` to ``out_dir`` in every format of the module's docstring,
    all at once (:func:`~deitlab.papyri.outdir.staged`: nothing partial on an error). ``info`` is
    recorded in ``predictions.json``. Returns the paths written and the counts."""
    out = Path(out_dir)
    _check_out(out, overwrite)
    if not 0 <= score_thr <= 1:
        raise PapyriError(f'score_thr must be in [0, 1], got {score_thr}')
    images, anns, results = [], [], []
    rows = io.StringIO(newline='')
    table = csv.writer(rows, lineterminator='\n')
    table.writerow(CSV_COLUMNS)
    in_text = 0
    for page in pages:
        images.append(page.image)
        d = page.detections
        for i, (box, score, label) in enumerate(zip(_rounded(d.boxes).tolist(), d.scores.tolist(), d.labels.tolist())):
            if box[2] <= 0 or box[3] <= 0:
                continue   # thinner than the rounding
            box = [_number(v) for v in box]
            cid = category_id(label)
            extra = {'score': score}
            if page.votes:
                extra['votes'] = {name: letters[i] for name, letters in page.votes.items()}
            anns.append(CocoAnnotation(len(anns) + 1, page.image.id, tuple(box), cid, extra=extra))
            results.append({'image_id': page.image.id, 'category_id': cid, 'bbox': box, 'score': score})
            table.writerow([page.image.file_name, *box, LETTERS[label], f'U+{ord(LETTERS[label]):04X}', cid, score])
    record = {'generator': GENERATOR, **(info or {}), 'score_thr': score_thr}
    with staged(out) as tmp:
        write_coco(CocoDataset(images, anns, letter_categories(), record), tmp / 'predictions.json')
        (tmp / 'results.json').write_text(json.dumps(results), encoding='utf-8')
        (tmp / 'predictions.csv').write_text(rows.getvalue(), encoding='utf-8', newline='')
        (tmp / 'text').mkdir()
        if overlays:
            (tmp / 'overlays').mkdir()
        for page in pages:
            text = page_text(page.detections, score_thr)
            in_text += sum(ch != '\n' for ch in text)
            (tmp / 'text' / f'{page.name}.txt').write_text(text, encoding='utf-8', newline='')
            if overlays:
                draw_overlay(_read_page(page.path), page.detections, score_thr).save(
                    tmp / 'overlays' / f'{page.name}.png', format='PNG')
    files = {name: str(out / name) for name in OUTPUTS if overlays or name != 'overlays'}
    return {'out': str(out), 'pages': len(pages), 'boxes': len(anns), 'in_text': in_text, 'files': files}


def predict_files(config: PredictConfig, loader: Optional[Callable] = None) -> dict:
    """``deitlab papyri predict``: the images of ``config`` through its detectors (loaded by
    :func:`load_detectors` with ``loader``), written by :func:`write_outputs`. Every input is
    checked before a detector is loaded. Returns a summary (pages, boxes, blank pages, files)."""
    config.validate()
    fusion_config = config.fusion_config()
    paths = image_files(config.images)
    records = number_pages(paths, config.ids_from)
    _check_out(Path(config.out), config.overwrite)
    refiner_pairs = config.refiner_pairs()
    for name, path in refiner_pairs:   # named before any model is loaded
        if not Path(path).is_dir():
            raise PapyriError(f'refiner {name}: {path} {"is a file" if Path(path).exists() else "does not exist"}; '
                              f'give a run directory written by deitlab train on crops')
    detectors = load_detectors(config.detector, loader)
    refiners = []
    if refiner_pairs:
        from .refine import load_refiners
        refiners = load_refiners(refiner_pairs)
    pages = predict_pages(paths, detectors, fusion_config, records=records, progress_bar=config.progress)
    fused = len(detectors) > 1
    info = {'detectors': [_name(d, k) for k, d in enumerate(detectors)],
            'fusion': {'method': fusion_config.method, 'iou_thr': fusion_config.iou_thr,
                       'weights': list(fusion_config.weights) if fusion_config.weights else None,
                       'class_aware': fusion_config.class_aware} if fused else None}
    if refiners:
        from .refine import refine_pages
        vote_config = config.vote_config()
        pages = refine_pages(pages, refiners, vote_config, progress_bar=config.progress)
        info.update(refiners={r.name: str(r.run_dir) for r in refiners},
                    vote={'rule': vote_config.rule, 'score': vote_config.score,
                          'weights': list(vote_config.weights) if vote_config.weights else None})
    result = write_outputs(config.out, pages, score_thr=config.score_thr, overwrite=config.overwrite,
                           overlays=config.overlays, info=info)
    return {**result, 'detectors': info['detectors'], 'fusion': fusion_config.method if fused else None,
            'refiners': info.get('refiners', {}), 'vote': info.get('vote'),
            'blank': [str(p.path) for p in pages if p.blank]}
