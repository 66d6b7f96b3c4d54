"""The organisers' metric of the ICDAR 2023 Competition on Detection and Recognition of Greek Letters
on Papyri, on COCO dicts and files: ``deitlab papyri evaluate`` (:func:`evaluate_files`,
:func:`evaluate`).

The organisers' evaluation script runs pycocotools' bbox evaluation with three changes, which this
module reproduces:

* **bt3 removed.** Ground truth whose ``tags.BaseType`` is in ``ignore_base_types`` (default
  ``bt3``: the most damaged glyphs) is *removed* before scoring, not marked ignore. A detection on
  such a glyph therefore matches nothing and counts as a false positive (COCO's ``iscrowd`` /
  ignore flags would have hidden it). Every remaining box is scored with ``iscrowd`` 0.
* **maxDets 10000.** A page holds hundreds of glyphs; COCO's default maxDets (1, 10, 100) would keep
  only the 100 best detections of an image (per class), so the evaluation uses one value,
  ``max_dets`` (10000 by default).
* **Two tasks.** Recognition is class-aware (``useCats=1``); detection is class-agnostic
  (``useCats=0``: a detection may match any glyph, whatever its letter; for the detection task
  alone the predictions' ``category_id`` is not read).

The matching and accumulation run on faster-coco-eval (``COCOeval_faster``: pycocotools' algorithm
in C++, equal numbers, about 100x faster on dense pages). Its ``summarize()``, like pycocotools',
assumes maxDets (1, 10, 100), so the numbers are read from the evaluation arrays by
:func:`read_out` (the same code reads pycocotools' arrays in the tests' cross-check).

Ground truth: a COCO dict in the competition schema (``images``, ``categories``, ``annotations``
with a pixel ``bbox`` ``[x, y, w, h]``, a ``category_id`` and ``tags: {"BaseType": ["bt1"]}``).
Every annotation is scored (minus the removed base types); keeping only the 24 letters is the
reader's business. Predictions: a COCO results list ``[{image_id, category_id, bbox, score}]``.
Bad input of either raises :class:`EvaluationError` with one line naming the entry.

Imports faster-coco-eval (the ``papyri`` extra) when it evaluates and numpy when it reads the
arrays, so :class:`EvaluateConfig` serves ``--help`` without either.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..train.config import ConfigError
from .config import PapyriError

__all__ = ['EvaluationError', 'TASKS', 'EvaluateConfig', 'load_json', 'prepare_ground_truth', 'check_predictions',
           'read_out', 'evaluate', 'evaluate_files', 'summary_lines']

#: The two tasks of the competition: class-aware and class-agnostic.
TASKS = ('recognition', 'detection')
INSTALL_HINT = "pip install 'deitlab[papyri]'"


class EvaluationError(PapyriError):
    """Bad input to the metric: a missing or non-JSON file, malformed ground truth or predictions."""


@dataclass
class EvaluateConfig:
    """Settings of ``deitlab papyri evaluate`` (one field per flag; torch-free)."""
    pred: str = field(metadata={'group': 'data', 'help': 'predictions: a COCO results JSON list '
                                                         '[{image_id, category_id, bbox [x,y,w,h], score}, ...]'})
    gt: str = field(metadata={'group': 'data', 'help': 'ground truth: a COCO JSON in the competition schema '
                                                       '(annotations with bbox, category_id, tags.BaseType)'})
    task: str = field(default='both', metadata={
        'group': 'measurement', 'help': 'recognition (class-aware), detection (class-agnostic) or both'})
    max_dets: int = field(default=10000, metadata={
        'group': 'measurement', 'help': 'detections kept per image (and class), best first; the organisers use '
                                        '10000'})
    ignore_base_types: tuple = field(default=('bt3',), metadata={
        'group': 'measurement', 'help': 'ground truth of these tags.BaseType values is removed before scoring (a '
                                        'detection on it is a false positive)'})

    def validate(self) -> 'EvaluateConfig':
        if self.task not in TASKS + ('both',):
            raise ConfigError(f'task must be one of {", ".join(TASKS)}, both; got {self.task!r}')
        if self.max_dets < 1:
            raise ConfigError(f'max_dets must be >= 1, got {self.max_dets}')
        return self

    @property
    def tasks(self) -> tuple:
        return TASKS if self.task == 'both' else (self.task,)


# --- reading and checking the input ---

def load_json(path, what: str):
    """The JSON value in ``path``; :class:`EvaluationError` naming ``what`` (e.g. ``'predictions'``)
    when the file is missing, a directory, or not JSON."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f'{what} file does not exist: {path}')
    if path.is_dir():
        raise EvaluationError(f'{what} file {path} is a directory')
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except UnicodeDecodeError:
        raise EvaluationError(f'{what} file {path} is not JSON (not UTF-8 text)') from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f'{what} file {path} is not JSON ({e.msg}: line {e.lineno}, column {e.colno})') \
            from None


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _box(bbox, where: str) -> list:
    """``[x, y, w, h]`` as floats: four finite numbers, width and height > 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise EvaluationError(f'{where}: bbox must be [x, y, w, h], four finite numbers; got {bbox!r}')
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise EvaluationError(f'{where}: bbox [x, y, w, h] needs a width and height > 0, got w={w:g}, h={h:g}')
    return [x, y, w, h]


def _list_of_dicts(data: dict, key: str) -> list:
    items = data.get(key)
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise EvaluationError(f'ground truth: {key!r} must be a list of objects')
    return items


def _ids(items: list, what: str) -> list:
    ids = []
    for i, item in enumerate(items):
        if not _is_int(item.get('id')):
            raise EvaluationError(f'ground truth {what} {i}: id must be an integer, got {item.get("id")!r}')
        ids.append(int(item['id']))
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvaluationError(f'ground truth: {what} id {dup} appears more than once')
    return ids


def _base_types(ann: dict, where: str) -> list:
    tags = ann.get('tags') or {}
    if not isinstance(tags, dict):
        raise EvaluationError(f'{where}: tags must be an object such as {{"BaseType": ["bt1"]}}, got {tags!r}')
    kinds = tags.get('BaseType', [])
    return [kinds] if isinstance(kinds, str) else list(kinds) if isinstance(kinds, (list, tuple)) else [kinds]


def prepare_ground_truth(ground_truth: dict, ignore_base_types: Iterable[str] = ('bt3',)) -> tuple:
    """``(scored, removed)``: a fresh COCO dict of the annotations to score, and how many were
    removed for their base type.

    The scored dict holds every image and category, and every annotation whose ``tags.BaseType``
    names none of ``ignore_base_types``, with ``iscrowd`` 0, ``area`` ``w * h`` and ids renumbered
    from 1 (pycocotools reads a matched ground-truth id of 0 as no match). Checks what the metric
    reads: integer, unique image and category ids; each annotation's image and category known; its
    bbox four finite numbers with a positive size."""
    if not isinstance(ground_truth, dict):
        raise EvaluationError(f'ground truth must be a COCO object with images, annotations and categories, got a '
                              f'JSON {type(ground_truth).__name__}')
    images = _list_of_dicts(ground_truth, 'images')
    image_ids = _ids(images, 'image')
    categories = _list_of_dicts(ground_truth, 'categories')
    category_ids = _ids(categories, 'category')
    known_images, known_categories = set(image_ids), set(category_ids)
    ignored = set(ignore_base_types)
    scored, removed = [], 0
    for i, ann in enumerate(_list_of_dicts(ground_truth, 'annotations')):
        where = f'ground truth annotation {i} (id {ann.get("id")})'
        if not _is_int(ann.get('image_id')) or ann['image_id'] not in known_images:
            raise EvaluationError(f'{where}: image_id {ann.get("image_id")!r} is not an image of the ground truth')
        if not _is_int(ann.get('category_id')) or ann['category_id'] not in known_categories:
            raise EvaluationError(f'{where}: category_id {ann.get("category_id")!r} is not a category of the ground '
                                  f'truth')
        box = _box(ann.get('bbox'), where)
        if ignored.intersection(_base_types(ann, where)):
            removed += 1
            continue
        scored.append({'id': len(scored) + 1, 'image_id': int(ann['image_id']),
                       'category_id': int(ann['category_id']), 'bbox': box, 'area': box[2] * box[3], 'iscrowd': 0})
    return {'images': [{'id': i, 'file_name': str(img.get('file_name', ''))} for i, img in zip(image_ids, images)],
            'categories': [{'id': c, 'name': str(cat.get('name', c))} for c, cat in zip(category_ids, categories)],
            'annotations': scored}, removed


def _results_of_dataset(dataset: dict, ground_truth: dict) -> list:
    """The results list of a COCO dataset of predictions (``deitlab papyri predict``'s
    ``predictions.json``: annotations with a ``score``), its image ids mapped to the ground truth's
    by file name (the base name), so that pages numbered in another order still meet their truth."""
    by_name = {Path(str(img.get('file_name', ''))).name: img['id'] for img in ground_truth['images']}
    ids = {}
    for img in dataset.get('images') or []:
        if isinstance(img, dict) and 'id' in img:
            name = Path(str(img.get('file_name', ''))).name
            if name not in by_name:
                raise EvaluationError(f'predicted image {img.get("file_name")!r} is not an image of the ground truth '
                                      f'(matched by file name)')
            ids[img['id']] = by_name[name]
    out = []
    for i, ann in enumerate(dataset['annotations']):
        if not isinstance(ann, dict) or 'score' not in ann:
            raise EvaluationError(f'predicted annotation {i} has no score: a COCO dataset of predictions needs a score '
                                  f'per annotation')
        out.append(dict(ann, image_id=ids.get(ann.get('image_id'), ann.get('image_id'))))
    return out


def check_predictions(predictions, ground_truth: dict, categories: bool = True) -> list:
    """Fresh, checked copies ``{image_id, category_id, bbox, score}`` of a COCO results list (or of
    the annotations of a COCO dataset of scored predictions, :func:`_results_of_dataset`).

    ``ground_truth`` is a dict from :func:`prepare_ground_truth`. Each entry must name an image of
    the ground truth, a finite score, a bbox ``[x, y, w, h]`` of four finite numbers with a
    positive size and, when ``categories``, a category of the ground truth. Without
    ``categories`` (the detection task alone) ``category_id`` is not read and every copy carries
    the first category of the ground truth."""
    if isinstance(predictions, dict) and isinstance(predictions.get('annotations'), list):
        predictions = _results_of_dataset(predictions, ground_truth)
    if not isinstance(predictions, list):
        kind = 'a JSON object without annotations' if isinstance(predictions, dict) else \
            f'a JSON {type(predictions).__name__}'
        raise EvaluationError(f'predictions must be a COCO results list [{{image_id, category_id, bbox, score}}, '
                              f'...], got {kind}')
    images = {img['id'] for img in ground_truth['images']}
    cats = [c['id'] for c in ground_truth['categories']]
    known = set(cats)
    if not cats:
        raise EvaluationError('ground truth has no categories')
    out = []
    for i, p in enumerate(predictions):
        where = f'prediction {i}'
        if not isinstance(p, dict):
            raise EvaluationError(f'{where} must be an object {{image_id, category_id, bbox, score}}, got {p!r}')
        for key in ('image_id', 'bbox', 'score') + (('category_id',) if categories else ()):
            if key not in p:
                raise EvaluationError(f'{where} has no {key}')
        if not _is_int(p['image_id']) or p['image_id'] not in images:
            raise EvaluationError(f'{where} names image_id {p["image_id"]!r}, which is not an image of the ground '
                                  f'truth')
        if categories and (not _is_int(p['category_id']) or p['category_id'] not in known):
            raise EvaluationError(f'{where} has category_id {p["category_id"]!r}, which is not a category of the '
                                  f'ground truth')
        if not _is_number(p['score']):
            raise EvaluationError(f'{where}: score must be a finite number, got {p["score"]!r}')
        out.append({'image_id': int(p['image_id']), 'category_id': int(p['category_id']) if categories else cats[0],
                    'bbox': _box(p['bbox'], where), 'score': float(p['score'])})
    return out


# --- the evaluation and its read-out ---

def _mean_valid(a) -> Optional[float]:
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else None


def read_out(precision, recall, iou_thrs: Sequence[float], area_index: int = 0, max_dets_index: int = -1,
             cat_ids: Optional[Sequence[int]] = None) -> dict:
    """The metric from COCO evaluation arrays (pycocotools' or faster-coco-eval's ``eval``):
    ``precision`` ``[T, R, K, A, M]`` (IoU thresholds x 101 recall points x classes x area ranges x
    maxDets), ``recall`` ``[T, K, A, M]``. Entries of -1 belong to classes without ground truth and
    are left out of every mean, as in COCO's ``summarize``.

    At the area range ``area_index`` (``all``) and the maxDets ``max_dets_index`` (the one value):

    * ``mAP``: mean precision over all thresholds .50:.05:.95, recall points and classes
      (mAP@[.5:.95]); ``mAP50`` / ``mAP75``: the same at IoU .50 / .75 only;
    * ``mAR``: mean recall over thresholds and classes; ``AR50``: at IoU .50 only;
    * with ``cat_ids`` (the classes in K order, class-aware evaluation): ``per_class_AP``, category
      id -> mean precision over thresholds and recall points, for the classes with ground truth.

    A mean over nothing (no ground truth at all) is ``None``."""
    import numpy as np
    p = np.asarray(precision)[..., area_index, max_dets_index]   # T x R x K
    r = np.asarray(recall)[..., area_index, max_dets_index]      # T x K
    thrs = np.asarray(iou_thrs)
    at = {t: int(np.flatnonzero(np.isclose(thrs, t))[0]) for t in (0.5, 0.75)}
    out = {'mAP': _mean_valid(p), 'mAP50': _mean_valid(p[at[0.5]]), 'mAP75': _mean_valid(p[at[0.75]]),
           'mAR': _mean_valid(r), 'AR50': _mean_valid(r[at[0.5]])}
    if cat_ids is not None:
        out['per_class_AP'] = {int(c): _mean_valid(p[:, :, k]) for k, c in enumerate(cat_ids)
                               if (p[:, :, k] > -1).any()}
    return out


def _faster_coco_eval():
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise EvaluationError(f'the papyri metric needs faster-coco-eval, which is not installed: {INSTALL_HINT}') \
            from None
    return COCO, COCOeval_faster


def _quiet(*args, **kwargs) -> None:
    """A ``print`` that prints nothing (faster-coco-eval's progress lines would break ``--json``)."""
    return None


def _run(scored: dict, predictions: list, class_aware: bool, max_dets: int) -> dict:
    """One task on faster-coco-eval: bbox IoU, maxDets ``[max_dets]``, useCats on or off."""
    COCO, COCOeval = _faster_coco_eval()
    coco_gt = COCO(scored, print_function=_quiet)
    coco_dt = coco_gt.loadRes([dict(p) for p in predictions])   # loadRes adds keys to the entries
    ev = COCOeval(coco_gt, coco_dt, 'bbox', print_function=_quiet)
    ev.params.maxDets = [max_dets]
    ev.params.useCats = int(class_aware)
    ev.evaluate()
    ev.accumulate()
    return read_out(ev.eval['precision'], ev.eval['recall'], ev.params.iouThrs,
                    area_index=ev.params.areaRngLbl.index('all'),
                    cat_ids=ev.params.catIds if class_aware else None)


def evaluate(ground_truth: dict, predictions: list, tasks: Sequence[str] = TASKS, max_dets: int = 10000,
             ignore_base_types: Iterable[str] = ('bt3',)) -> dict:
    """The organisers' metric of ``predictions`` (a COCO results list) against ``ground_truth`` (a
    COCO dict in the competition schema): for each of ``tasks`` (``recognition``, ``detection``) a
    dict of :func:`read_out` (recognition adds ``per_class_AP``), plus the counts: ``images``,
    ``ground_truth`` (boxes scored), ``removed`` (boxes of an ignored base type), ``predictions``."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f'tasks must be among {", ".join(TASKS)}, got {list(tasks)}')
    if max_dets < 1:
        raise ConfigError(f'max_dets must be >= 1, got {max_dets}')
    ignore = tuple(ignore_base_types)
    scored, removed = prepare_ground_truth(ground_truth, ignore)
    preds = check_predictions(predictions, scored, categories='recognition' in tasks)
    result = {'images': len(scored['images']), 'ground_truth': len(scored['annotations']), 'removed': removed,
              'predictions': len(preds), 'max_dets': max_dets, 'ignore_base_types': list(ignore)}
    for task in tasks:
        result[task] = _run(scored, preds, task == 'recognition', max_dets)
    return result


def evaluate_files(config: EvaluateConfig) -> dict:
    """:func:`evaluate` of the files named by ``config`` (``deitlab papyri evaluate``)."""
    config.validate()
    ground_truth = load_json(config.gt, 'ground truth')
    predictions = load_json(config.pred, 'predictions')
    result = evaluate(ground_truth, predictions, config.tasks, config.max_dets, config.ignore_base_types)
    return {'gt': str(config.gt), 'pred': str(config.pred), **result}


def _fmt(v: Optional[float]) -> str:
    return 'n/a' if v is None else f'{v:.4f}'


def summary_lines(result: dict) -> dict:
    """A result of :func:`evaluate` as readable lines (name -> text)."""
    lines = {}
    for task in TASKS:
        if task in result:
            m = result[task]
            lines[task] = (f'mAP@[.5:.95] {_fmt(m["mAP"])}  mAP@.5 {_fmt(m["mAP50"])}  mAP@.75 {_fmt(m["mAP75"])}  '
                           f'mAR {_fmt(m["mAR"])}  AR@.5 {_fmt(m["AR50"])}')
    if 'recognition' in result:
        per_class = result['recognition']['per_class_AP']
        lines['AP per category'] = ', '.join(f'{c}: {_fmt(v)}' for c, v in per_class.items())
    removed = f' ({result["removed"]} of base type {"/".join(result["ignore_base_types"])} removed)' \
        if result['ignore_base_types'] else ''
    lines['scored'] = (f'{result["ground_truth"]} ground-truth boxes{removed} on {result["images"]} images, '
                       f'{result["predictions"]} predictions, maxDets {result["max_dets"]}')
    return lines
