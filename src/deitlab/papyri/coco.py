"""The annotation files of the ICDAR 2023 competition on detection and recognition of Greek letters
on papyri: read, check, write.

The competition ships COCO-style JSON (``HomerCompTraining.json``), which Turnbull & Mannix (IJDAR
2024) trained their YOLOv8 / DeiT / SimCLR pipeline on, and scores with COCO's bbox protocol:

* ``images``: ``id``, ``file_name``, ``width``, ``height`` (the real file adds ``img_url`` and, in its
  ``ReadCoco`` variant, ``bln_id``; such extra fields are kept as they are);
* ``annotations``: ``id``, ``image_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``category_id``,
  ``area``, ``iscrowd`` and ``tags: {"BaseType": ["bt1" | "bt2" | "bt3"]}``, the preservation of the
  glyph (bt3 the most damaged; the organisers drop bt3 ground truth before scoring);
* ``categories``: the real file lists about 227 Unicode categories, of which only the 24 letters
  (:mod:`.alphabet`) are scored.

Reading is tolerant of extra fields and of a missing ``area`` / ``iscrowd`` / ``tags``; everything
that would make scores wrong is an error that names the problem (:class:`CocoError`): a file that is
not JSON, an annotation of a category that is not a letter (``drop_other_categories=True`` leaves
those out), a box outside its image (``clip_boxes=True`` clips), an annotation of an image that is
not listed, an image file that is not there (with ``check_files``), duplicate ids. :func:`write_coco`
checks the same and writes atomically, so a failed write leaves no partial file.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .alphabet import CATEGORY_IDS, LETTERS, class_of, is_letter
from .config import PapyriError

__all__ = ['CocoError', 'CocoImage', 'CocoAnnotation', 'CocoDataset', 'BASE_TYPES', 'letter_categories',
           'parse_coco', 'read_coco', 'check_coco', 'coco_json', 'write_coco']

BASE_TYPES = ('bt1', 'bt2', 'bt3')
_EPS = 1e-6   # boxes may touch the image border up to float rounding


class CocoError(PapyriError):
    """An annotation file that cannot be used as it is, with the reason."""


@dataclass
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    extra: Dict[str, Any] = field(default_factory=dict)   # other fields (img_url, bln_id, ...), kept


@dataclass
class CocoAnnotation:
    id: int
    image_id: int
    bbox: Tuple[float, float, float, float]   # x, y, w, h in pixels
    category_id: int
    base_type: Optional[str] = None            # tags.BaseType: bt1 | bt2 | bt3, None when absent
    area: Optional[float] = None               # None: w * h
    iscrowd: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def letter(self) -> int:
        """The class 0..23 (:mod:`.alphabet`)."""
        return class_of(self.category_id)


@dataclass
class CocoDataset:
    images: List[CocoImage]
    annotations: List[CocoAnnotation]
    categories: List[dict] = field(default_factory=lambda: letter_categories())
    info: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)   # other top-level keys (licenses, ...), kept

    def annotations_of(self, image_id: int) -> List[CocoAnnotation]:
        return [a for a in self.annotations if a.image_id == image_id]


def letter_categories() -> List[dict]:
    """The 24 letter categories as the competition numbers them (``name``: the letter)."""
    return [{'id': cid, 'name': ch, 'supercategory': 'Greek'} for ch, cid in zip(LETTERS, CATEGORY_IDS)]


# ------------------------------------------------------------------------------------------ parse
def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise CocoError(f'{what} must be a whole number, got {value!r}')
    return int(value)


def _entries(obj: dict, key: str, source: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise CocoError(f"{source}: '{key}' must be a list of objects, got {type(value).__name__}")
    return value


def _image(d: dict, source: str, image_root: Optional[Path]) -> CocoImage:
    where = f'{source}: image {d.get("id")!r}'
    for key in ('id', 'file_name'):
        if key not in d:
            raise CocoError(f"{where} has no '{key}'")
    if not isinstance(d['file_name'], str) or not d['file_name']:
        raise CocoError(f"{where}: 'file_name' must be a non-empty string")
    if 'width' in d and 'height' in d:
        w, h = _int(d['width'], f'{where} width'), _int(d['height'], f'{where} height')
    else:   # read the size from the file's header when the file is at hand
        path = image_root / d['file_name'] if image_root is not None else None
        if path is None or not path.is_file():
            raise CocoError(f"{where} ({d['file_name']}) has no 'width' and 'height', and its file is not at hand "
                            f"to read them from")
        from PIL import Image
        with Image.open(path) as im:
            w, h = im.size
    if w < 1 or h < 1:
        raise CocoError(f'{where}: width and height must be >= 1, got {w}x{h}')
    extra = {k: v for k, v in d.items() if k not in ('id', 'file_name', 'width', 'height')}
    return CocoImage(_int(d['id'], f'{where} id'), d['file_name'], w, h, extra)


def _annotation(d: dict, source: str) -> CocoAnnotation:
    where = f'{source}: annotation {d.get("id")!r}'
    for key in ('id', 'image_id', 'bbox', 'category_id'):
        if key not in d:
            raise CocoError(f"{where} has no '{key}'")
    box = d['bbox']
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise CocoError(f'{where}: bbox must be [x, y, w, h], four finite numbers, got {box!r}')
    tags = d.get('tags')
    base_type = None
    if tags is not None:
        bt = tags.get('BaseType') if isinstance(tags, dict) else None
        if not (isinstance(bt, list) and len(bt) == 1 and bt[0] in BASE_TYPES):
            raise CocoError(f'{where}: tags.BaseType must be one of ["bt1"], ["bt2"], ["bt3"], got {tags!r}')
        base_type = bt[0]
    area = d.get('area')
    if area is not None and (isinstance(area, bool) or not isinstance(area, (int, float))):
        raise CocoError(f'{where}: area must be a number, got {area!r}')
    extra = {k: v for k, v in d.items() if k not in ('id', 'image_id', 'bbox', 'category_id', 'tags', 'area',
                                                    'iscrowd')}
    return CocoAnnotation(_int(d['id'], f'{where} id'), _int(d['image_id'], f'{where} image_id'), tuple(box),
                          _int(d['category_id'], f'{where} category_id'), base_type, area,
                          _int(d.get('iscrowd', 0), f'{where} iscrowd'), extra)


def parse_coco(obj: Any, *, source: str = 'annotations', drop_other_categories: bool = False,
               clip_boxes: bool = False, image_root: Optional[Path] = None) -> CocoDataset:
    """A :class:`CocoDataset` from the decoded JSON ``obj``, checked (:func:`check_coco`).

    Args:
        source: How messages name the data (the file's path).
        drop_other_categories: Leave out annotations of categories that are not letters (and those
            categories), instead of refusing them.
        clip_boxes: Clip boxes to their image (dropping those left empty) instead of refusing them.
        image_root: Where ``file_name`` is relative to; an image without ``width`` / ``height`` is
            measured from its file there.
    """
    if not isinstance(obj, dict):
        raise CocoError(f"{source}: expected a JSON object with 'images', 'annotations' and 'categories', "
                        f'got {type(obj).__name__}')
    images = [_image(d, source, image_root) for d in _entries(obj, 'images', source)]
    anns = [_annotation(d, source) for d in _entries(obj, 'annotations', source)]
    cats = _entries(obj, 'categories', source) if 'categories' in obj else letter_categories()
    if drop_other_categories:
        anns = [a for a in anns if is_letter(a.category_id)]
        cats = [c for c in cats if is_letter(c.get('id'))]
    ds = CocoDataset(images, anns, cats, obj.get('info') if isinstance(obj.get('info'), dict) else {},
                     {k: v for k, v in obj.items() if k not in ('images', 'annotations', 'categories', 'info')})
    if clip_boxes:
        _clip(ds)
    check_coco(ds, source)
    return ds


def read_coco(path, *, drop_other_categories: bool = False, clip_boxes: bool = False, check_files: bool = False,
              image_root=None) -> CocoDataset:
    """Read and check a competition-style annotation file (see :func:`parse_coco`).

    ``image_root``: the directory ``file_name`` is relative to (default: the file's directory);
    ``check_files``: also require every image file to be there.
    """
    path = Path(path)
    if not path.is_file():
        raise CocoError(f'annotation file does not exist: {path}' if not path.exists() else
                        f'{path} is not a file')
    try:
        obj = json.loads(path.read_bytes().decode('utf-8'))
    except UnicodeDecodeError as e:
        raise CocoError(f'{path} is not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise CocoError(f'{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})') from None
    root = Path(image_root) if image_root is not None else path.parent
    ds = parse_coco(obj, source=str(path), drop_other_categories=drop_other_categories, clip_boxes=clip_boxes,
                    image_root=root)
    if check_files:
        missing = [im for im in ds.images if not (root / im.file_name).is_file()]
        if missing:
            im = missing[0]
            more = f' ({len(missing) - 1} more missing)' if len(missing) > 1 else ''
            raise CocoError(f'{path}: image {im.id}: file {im.file_name} not found under {root}{more}')
    return ds


# ------------------------------------------------------------------------------------------ check
def _clip(ds: CocoDataset) -> None:
    size = {im.id: (im.width, im.height) for im in ds.images}
    kept = []
    for a in ds.annotations:
        if a.image_id not in size:
            kept.append(a)   # check_coco names it
            continue
        w, h = size[a.image_id]
        x0, y0 = max(0.0, a.bbox[0]), max(0.0, a.bbox[1])
        x1, y1 = min(float(w), a.bbox[0] + a.bbox[2]), min(float(h), a.bbox[1] + a.bbox[3])
        if x1 > x0 and y1 > y0:
            if (x0, y0, x1 - x0, y1 - y0) != tuple(a.bbox):
                a.bbox, a.area = (x0, y0, x1 - x0, y1 - y0), None
            kept.append(a)
    ds.annotations = kept


def _duplicates(ids: Iterable[int]) -> List[int]:
    return sorted(i for i, n in Counter(ids).items() if n > 1)


def check_coco(ds: CocoDataset, source: str = 'annotations') -> None:
    """Raise :class:`CocoError` naming the first problem of each kind: duplicate ids, annotations of
    unlisted images, non-letter categories, boxes that are empty or outside their image."""
    for what, ids in (('image', [im.id for im in ds.images]), ('annotation', [a.id for a in ds.annotations])):
        dup = _duplicates(ids)
        if dup:
            raise CocoError(f'{source}: {len(dup)} {what} id(s) occur more than once: {dup[:5]}')
    images = {im.id: im for im in ds.images}
    orphans = [a for a in ds.annotations if a.image_id not in images]
    if orphans:
        a = orphans[0]
        more = f' ({len(orphans) - 1} more such annotations)' if len(orphans) > 1 else ''
        raise CocoError(f"{source}: annotation {a.id} refers to image {a.image_id}, which is not among the "
                        f"file's {len(images)} images{more}")
    others = [a for a in ds.annotations if not is_letter(a.category_id)]
    if others:
        listed = {c.get('id') for c in ds.categories}
        counts = Counter(a.category_id for a in others)
        first = {}
        for a in others:
            first.setdefault(a.category_id, a.id)
        parts = [f'{cid} ({n} annotation{"s" if n > 1 else ""}, first id {first[cid]}'
                 f'{"" if cid in listed else ", not in categories either"})' for cid, n in sorted(counts.items())]
        raise CocoError(f'{source}: {len(others)} annotation(s) have category ids that are not letters: '
                        f'{", ".join(parts[:8])}{" ..." if len(parts) > 8 else ""}; only the 24 letter ids '
                        f'({", ".join(map(str, sorted(CATEGORY_IDS)))}) are used: read with '
                        f'drop_other_categories=True to leave those annotations out')
    bad = []
    for a in ds.annotations:
        im = images[a.image_id]
        x, y, w, h = a.bbox
        if w <= 0 or h <= 0:
            bad.append((a, im, 'has width or height <= 0'))
        elif x < -_EPS or y < -_EPS or x + w > im.width + _EPS or y + h > im.height + _EPS:
            edges = [f'x = {x:g} < 0' if x < -_EPS else '', f'y = {y:g} < 0' if y < -_EPS else '',
                     f'x + w = {x + w:g} > width {im.width}' if x + w > im.width + _EPS else '',
                     f'y + h = {y + h:g} > height {im.height}' if y + h > im.height + _EPS else '']
            bad.append((a, im, f'is outside the image ({", ".join(e for e in edges if e)})'))
    if bad:
        a, im, why = bad[0]
        more = f'; {len(bad) - 1} more such boxes' if len(bad) > 1 else ''
        raise CocoError(f'{source}: annotation {a.id} (image {im.id}, {im.file_name}, {im.width}x{im.height}): '
                        f'bbox [{", ".join(f"{v:g}" for v in a.bbox)}] {why}{more}; read with clip_boxes=True '
                        f'to clip boxes to their image')


# ------------------------------------------------------------------------------------------ write
def _number(v: float):
    return int(v) if float(v).is_integer() else float(v)


def coco_json(ds: CocoDataset) -> dict:
    """The JSON object of ``ds`` in the competition schema (extra fields written back as read)."""
    images = [{'id': im.id, 'file_name': im.file_name, 'width': im.width, 'height': im.height, **im.extra}
              for im in ds.images]
    anns = []
    for a in ds.annotations:
        d = {'id': a.id, 'image_id': a.image_id, 'bbox': [_number(v) for v in a.bbox], 'category_id': a.category_id,
             'area': _number(a.area if a.area is not None else a.bbox[2] * a.bbox[3]), 'iscrowd': a.iscrowd}
        if a.base_type is not None:
            d['tags'] = {'BaseType': [a.base_type]}
        anns.append({**d, **a.extra})
    return {**({'info': ds.info} if ds.info else {}), **ds.extra, 'images': images, 'annotations': anns,
            'categories': ds.categories}


def write_coco(ds: CocoDataset, path) -> Path:
    """Check ``ds`` (:func:`check_coco`) and write it to ``path`` atomically (a reader never sees a
    partial file; nothing is written when the check fails). Same data, same bytes."""
    path = Path(path)
    check_coco(ds, str(path))
    from ..rundir import atomic_write_bytes
    atomic_write_bytes(path, json.dumps(coco_json(ds), ensure_ascii=False).encode('utf-8'))
    return path
