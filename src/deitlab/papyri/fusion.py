"""Fusion of several detectors' boxes on one image (:func:`fuse`): Weighted Boxes Fusion by default,
NMS or soft-NMS as options, computed by the ensemble-boxes package; and :class:`Detections`, the
boxes of one image that fusion and tiling pass around.

In Turnbull & Mannix's entry to the ICDAR 2023 Competition on Detection and Recognition of Greek
Letters on Papyri, an ensemble of YOLOv8 detectors is merged with Weighted Boxes Fusion (WBF;
Solovyev, Wang, Gabruseva, "Weighted boxes fusion: Ensembling boxes from different object detection
models", Image and Vision Computing 107, 2021). WBF clusters the boxes of all detectors whose IoU
with a cluster's fused box exceeds ``iou_thr`` and replaces each cluster by the score-weighted mean
of its boxes, instead of keeping one box and dropping the others as NMS does.

Inputs are pixel ``xyxy`` boxes with scores and labels (0..23 for the letters), one
:class:`Detections` per detector. :func:`fuse` clips them to the image, drops boxes of zero size
and scores below ``skip_box_thr``, and normalises by the image size (ensemble-boxes works on
``[0, 1]`` coordinates); the result is in pixels again, sorted by score (best first).

* ``wbf``: ``conf_type`` sets the fused score (ensemble-boxes' four rules): ``avg``, for a cluster
  of at most one box per detector the sum of ``weight * score`` over the cluster divided by the sum
  of all detectors' weights, so a box found by one of two equally weighted detectors keeps half its
  score; ``max``; ``box_and_model_avg``; ``absent_model_aware_avg``. Fused coordinates are float32 inside the
  package (well under a thousandth of a pixel on a page).
* ``nms``: per label, the highest-scoring box suppresses the boxes overlapping it by more than
  ``iou_thr``; kept boxes are unchanged.
* ``soft-nms`` (Gaussian, ``sigma``): as ensemble-boxes 1.0.9 computes it, the decayed scores only
  decide which boxes fall below ``soft_thresh``; the boxes kept carry their original scores.
* ``weights`` (one per detector): WBF weighs boxes and scores with them; NMS and soft-NMS scale
  each detector's scores by ``w / sum(w)`` before suppressing (the package's rule; without weights
  scores are unchanged).

**Class-aware or agnostic.** Class-aware fusion (``class_aware=True``) fuses each label on its
own, so two detectors disagreeing on the letter give two boxes. Class-agnostic fusion gives every
box label 0 for the fusion (one box per glyph, what the detection task scores), then chooses each
fused box's label: every input box is assigned to the fused box it overlaps most (highest IoU, if
above 0), and ``label_rule`` picks

* ``vote`` (default): the label with the largest sum of ``weight * score`` over the boxes assigned
  to the fused box (a score-weighted majority vote; a tie goes to the smaller label);
* ``top``: the label of the assigned box with the largest ``weight * score``.

A fused box with nothing assigned (possible only if a cluster's mean drifted off all its members)
takes the label of the input box overlapping it most. Under NMS the kept box is assigned to itself,
so ``top`` keeps its label and ``vote`` lets the boxes it suppressed vote too.

Imports ensemble-boxes (the ``papyri`` extra, which pulls in numba) when it fuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ['Detections', 'FusionConfig', 'FusionError', 'METHODS', 'CONF_TYPES', 'LABEL_RULES', 'fuse', 'box_iou']

METHODS = ('wbf', 'nms', 'soft-nms')
CONF_TYPES = ('avg', 'max', 'box_and_model_avg', 'absent_model_aware_avg')
LABEL_RULES = ('vote', 'top')


class FusionError(ValueError):
    """Bad fusion settings or inputs, or ensemble-boxes missing."""


def _array(x, dtype) -> np.ndarray:
    if hasattr(x, 'detach'):   # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=dtype)


@dataclass
class Detections:
    """The boxes of one image: ``boxes`` ``(N, 4)`` xyxy pixels (float64), ``scores`` ``(N,)``
    (float64), ``labels`` ``(N,)`` (int64; 0..23 for the letters). Array-likes and torch tensors
    are copied into numpy arrays."""
    boxes: Any
    scores: Any
    labels: Any

    def __post_init__(self):
        self.boxes = _array(self.boxes, np.float64)
        if self.boxes.size == 0:
            self.boxes = self.boxes.reshape(0, 4)
        self.scores = _array(self.scores, np.float64).reshape(-1)
        self.labels = _array(self.labels, np.int64).reshape(-1)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise FusionError(f'boxes must have shape (N, 4) (x1, y1, x2, y2), got {tuple(self.boxes.shape)}')
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise FusionError(f'{len(self.boxes)} boxes, {len(self.scores)} scores and {len(self.labels)} labels: '
                              f'one of each per box')

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> 'Detections':
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence['Detections']) -> 'Detections':
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.labels for p in parts]))

    def select(self, index) -> 'Detections':
        """The boxes at ``index`` (a boolean mask or integer indices)."""
        return Detections(self.boxes[index], self.scores[index], self.labels[index])

    def shifted(self, dx: float, dy: float) -> 'Detections':
        """The same boxes moved by ``(dx, dy)`` pixels."""
        return Detections(self.boxes + np.array([dx, dy, dx, dy], dtype=np.float64), self.scores, self.labels)


@dataclass(frozen=True)
class FusionConfig:
    """Settings of :func:`fuse` (see the module's docstring for each)."""
    method: str = 'wbf'
    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    conf_type: str = 'avg'
    weights: Optional[tuple] = None
    class_aware: bool = True
    label_rule: str = 'vote'
    sigma: float = 0.5
    soft_thresh: float = 0.001

    def validate(self, detectors: Optional[int] = None) -> 'FusionConfig':
        for name, value, allowed in (('method', self.method, METHODS), ('conf_type', self.conf_type, CONF_TYPES),
                                     ('label_rule', self.label_rule, LABEL_RULES)):
            if value not in allowed:
                raise FusionError(f'{name} must be one of {", ".join(allowed)}; got {value!r}')
        if not 0 < self.iou_thr < 1:
            raise FusionError(f'iou_thr must be in (0, 1), got {self.iou_thr}')
        if self.skip_box_thr < 0 or self.soft_thresh < 0 or self.sigma <= 0:
            raise FusionError(f'skip_box_thr and soft_thresh must be >= 0 and sigma > 0, got {self.skip_box_thr}, '
                              f'{self.soft_thresh}, {self.sigma}')
        if self.weights is not None:
            if detectors is not None and len(self.weights) != detectors:
                raise FusionError(f'{len(self.weights)} weights for {detectors} detectors: one weight per detector')
            if not all(w > 0 for w in self.weights):
                raise FusionError(f'weights must be > 0, got {list(self.weights)}')
        return self


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(len(a), len(b))`` of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _ensemble_boxes():
    try:
        import ensemble_boxes
    except ImportError:
        raise FusionError("box fusion needs ensemble-boxes, which is not installed: pip install 'deitlab[papyri]'") \
            from None
    return ensemble_boxes


def _usable(d: Detections, k: int, width: float, height: float, skip_box_thr: float) -> Detections:
    """Detector ``k``'s boxes clipped to the image, without zero-size boxes or scores below the
    threshold."""
    if not (np.isfinite(d.boxes).all() and np.isfinite(d.scores).all()):
        raise FusionError(f'detector {k}: boxes and scores must be finite numbers')
    if (d.boxes[:, 2:] < d.boxes[:, :2]).any():
        raise FusionError(f'detector {k}: boxes must be (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2')
    boxes = np.clip(d.boxes, 0, np.array([width, height, width, height]))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (d.scores >= skip_box_thr)
    return Detections(boxes[keep], d.scores[keep], d.labels[keep])


def _agnostic_labels(fused: np.ndarray, boxes: np.ndarray, labels: np.ndarray, weight: np.ndarray,
                     rule: str, chunk: int = 512) -> np.ndarray:
    """The label of each fused box after class-agnostic fusion (the module's docstring: each input
    box assigned to the fused box it overlaps most; ``vote`` or ``top`` over the assigned boxes)."""
    m, n = len(fused), len(boxes)
    best_iou, owner = np.zeros(n), np.full(n, -1)
    closest = np.zeros(m, dtype=np.int64)   # per fused box: the input overlapping it most (the fallback)
    for start in range(0, m, chunk):   # IoU in blocks of fused boxes: pages hold thousands of boxes
        iou = box_iou(fused[start:start + chunk], boxes)
        closest[start:start + chunk] = iou.argmax(axis=1)
        row = iou.argmax(axis=0)
        value = iou[row, np.arange(n)]
        better = value > best_iou   # first block wins a tie: the higher-scoring fused box
        best_iou[better], owner[better] = value[better], row[better] + start
    out = labels[closest].copy()
    assigned = owner >= 0
    names, index = np.unique(labels, return_inverse=True)
    if rule == 'vote':
        votes = np.zeros((m, len(names)))
        np.add.at(votes, (owner[assigned], index[assigned]), weight[assigned])
        has = votes.max(axis=1) > 0
        out[has] = names[votes[has].argmax(axis=1)]   # argmax: a tie goes to the smaller label
    else:   # 'top'
        members = np.flatnonzero(assigned)
        order = members[np.lexsort((-weight[members], owner[members]))]
        fused_ids, first = np.unique(owner[order], return_index=True)
        out[fused_ids] = labels[order[first]]
    return out


def fuse(detections: Sequence[Detections], image_size: Sequence[float],
         config: Optional[FusionConfig] = None) -> Detections:
    """One set of boxes from several detectors' boxes on the same image of ``image_size``
    ``(height, width)`` pixels: WBF, NMS or soft-NMS by ensemble-boxes, class-aware or agnostic
    (the module's docstring has every rule). Pixel xyxy in and out, best score first."""
    config = (config or FusionConfig()).validate(len(detections))
    height, width = (float(v) for v in image_size)
    if not (height > 0 and width > 0):
        raise FusionError(f'image_size is (height, width) in pixels, both > 0; got {tuple(image_size)}')
    dets = [_usable(d, k, width, height, config.skip_box_thr) for k, d in enumerate(detections)]
    if not sum(len(d) for d in dets):
        return Detections.empty()
    scale = np.array([width, height, width, height])
    boxes = [d.boxes / scale for d in dets]
    scores = [d.scores.copy() for d in dets]   # the package's NMS replaces entries of this list when weighted
    labels = [d.labels if config.class_aware else np.zeros(len(d), dtype=np.int64) for d in dets]
    weights = list(config.weights) if config.weights is not None else None
    eb = _ensemble_boxes()
    if config.method == 'wbf':
        b, s, lab = eb.weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=config.iou_thr,
                                             skip_box_thr=config.skip_box_thr, conf_type=config.conf_type)
    elif config.method == 'nms':
        b, s, lab = eb.nms(boxes, scores, labels, iou_thr=config.iou_thr, weights=weights)
    else:
        b, s, lab = eb.soft_nms(boxes, scores, labels, iou_thr=config.iou_thr, sigma=config.sigma,
                                thresh=config.soft_thresh, weights=weights)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if config.class_aware:
        lab = np.asarray(lab).astype(np.int64)
    else:
        w = np.concatenate([np.full(len(d), 1.0 if weights is None else weights[k]) for k, d in enumerate(dets)])
        lab = _agnostic_labels(b, np.concatenate(boxes), np.concatenate([d.labels for d in dets]),
                               w * np.concatenate([d.scores for d in dets]), config.label_rule)
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind='stable')
    return Detections(b[order] * scale, np.asarray(s, dtype=np.float64)[order], lab[order])
