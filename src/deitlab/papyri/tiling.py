"""Prediction on large pages by tiles (:func:`tile_predict`): split a page into overlapping tiles,
predict each, map the boxes back to page coordinates, drop the boxes a tile border cut when another
tile holds the glyph whole, and merge the rest with :func:`deitlab.papyri.fusion.fuse`.

Pages of the ICDAR 2023 Competition on Detection and Recognition of Greek Letters on Papyri are
scans of thousands of pixels with glyphs of a few dozen; a detector trained at about a thousand
pixels sees them too small on a resized page, so it runs on tiles at full resolution. The
organisers' Faster R-CNN baseline used non-overlapping 672 px tiles, which cut the glyphs on every
border; with an overlap at least as large as the largest glyph, every glyph lies whole inside some
tile, and the rules below recover it once, from that tile.

* **Tiles** (:func:`tile_grid`): ``tile`` x ``tile`` pixels (a page side shorter than ``tile`` gives
  tiles of that side), starting every ``tile - overlap`` pixels, the last one of a row or column
  aligned with the page's edge: the tiles cover the page, and neighbours overlap by at least
  ``overlap``.
* **Back to the page** (:func:`to_page`): a tile's boxes are clipped to the tile and moved by its
  offset (exact: one addition per coordinate).
* **Cut boxes** (:func:`drop_cut_boxes`): a box *touches an inner edge* of its tile when it comes
  within ``edge_margin`` pixels of a side of the tile that is not a side of the page (a detector
  stops a cut glyph at the border, or a pixel or two short of it). Such a box is dropped when another
  tile holds it *clear*: inside that tile and touching none of its inner edges; that tile saw the
  glyph whole (given the overlap). With no such tile (a glyph larger than the overlap) the box is
  kept.
* **Merge** (:func:`merge_tiles`): the boxes left, from all tiles, are one set fused by
  :func:`~deitlab.papyri.fusion.fuse`; the default, class-agnostic NMS keeping the best box and its
  label (:data:`MERGE`), removes the second copy of a glyph that lies whole in two tiles' overlap.
  A page that fits one tile is returned as its detector predicted it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from .fusion import Detections, FusionConfig, fuse

__all__ = ['Tile', 'MERGE', 'tile_grid', 'to_page', 'drop_cut_boxes', 'merge_tiles', 'tile_predict']

#: How :func:`merge_tiles` fuses the tiles' boxes by default: class-agnostic NMS, the best box's label.
MERGE = FusionConfig(method='nms', class_aware=False, label_rule='top')


class Tile(NamedTuple):
    """A tile's pixel extent on the page: columns ``x0:x1``, rows ``y0:y1``."""
    x0: int
    y0: int
    x1: int
    y1: int


def _starts(length: int, tile: int, overlap: int) -> list:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] + tile < length:
        starts.append(length - tile)   # the last tile flush with the page's edge
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list:
    """The tiles of a ``height`` x ``width`` page, row by row (the module's docstring has the rule)."""
    if min(height, width) < 1:
        raise ValueError(f'the page must be at least 1 x 1 pixels, got {height} x {width}')
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f'tile must be >= 1 and overlap in [0, tile), got tile {tile}, overlap {overlap}')
    th, tw = min(tile, height), min(tile, width)
    return [Tile(x, y, x + tw, y + th) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def to_page(detections: Detections, tile: Tile) -> Detections:
    """A tile's boxes (tile coordinates) clipped to the tile, in page coordinates."""
    w, h = tile.x1 - tile.x0, tile.y1 - tile.y0
    clipped = Detections(np.clip(detections.boxes, 0, np.array([w, h, w, h], dtype=np.float64)),
                         detections.scores, detections.labels)
    return clipped.shifted(tile.x0, tile.y0)


def _edges(boxes: np.ndarray, tile: Tile, page_size: Sequence[int], margin: float) -> tuple:
    """Per box: ``(touches, clear)``: within ``margin`` of an inner edge of ``tile``; inside the tile
    and touching none of its inner edges."""
    height, width = page_size
    inner = np.array([tile.x0 > 0, tile.y0 > 0, tile.x1 < width, tile.y1 < height])
    near = np.stack([boxes[:, 0] <= tile.x0 + margin, boxes[:, 1] <= tile.y0 + margin,
                     boxes[:, 2] >= tile.x1 - margin, boxes[:, 3] >= tile.y1 - margin], axis=1)
    touches = (near & inner).any(axis=1)
    inside = ((boxes[:, 0] >= tile.x0) & (boxes[:, 1] >= tile.y0) & (boxes[:, 2] <= tile.x1)
              & (boxes[:, 3] <= tile.y1))
    return touches, inside & ~touches


def drop_cut_boxes(tiles: Sequence[Tile], detections: Sequence[Detections], page_size: Sequence[int],
                   edge_margin: float = 2.0) -> list:
    """Each tile's boxes (page coordinates) without those touching an inner edge of their tile that
    another tile holds clear (the module's docstring)."""
    out = []
    for k, (tile, dets) in enumerate(zip(tiles, detections)):
        touches, _ = _edges(dets.boxes, tile, page_size, edge_margin)
        held = np.zeros(len(dets), dtype=bool)
        if touches.any():
            for j, other in enumerate(tiles):
                if j != k:
                    held |= _edges(dets.boxes, other, page_size, edge_margin)[1]
        out.append(dets.select(~(touches & held)))
    return out


def merge_tiles(tiles: Sequence[Tile], detections: Sequence[Detections], page_size: Sequence[int],
                edge_margin: float = 2.0, merge: Optional[FusionConfig] = None) -> Detections:
    """One set of page boxes from the tiles' boxes (page coordinates): the cut boxes dropped, the
    rest fused as one detector's boxes with ``merge`` (default :data:`MERGE`). One tile: its boxes."""
    if len(tiles) != len(detections):
        raise ValueError(f'{len(tiles)} tiles but {len(detections)} sets of detections')
    if len(tiles) == 1:
        return detections[0]
    kept = drop_cut_boxes(tiles, detections, page_size, edge_margin)
    return fuse([Detections.concat(kept)], page_size, merge or MERGE)


def tile_predict(image, predict_fn: Callable, tile: int, overlap: int, edge_margin: float = 2.0,
                 merge: Optional[FusionConfig] = None) -> Detections:
    """Detections on a whole page ``image`` (``(C, H, W)``, a tensor or an array) from a detector that
    sees one tile at a time: ``predict_fn(image[:, y0:y1, x0:x1])`` returns the tile's
    :class:`~deitlab.papyri.fusion.Detections` in tile pixels. Tiles of ``tile`` pixels overlapping
    by ``overlap`` (choose it at least as large as the largest glyph); cut boxes dropped and the
    rest merged as in :func:`merge_tiles`."""
    if len(image.shape) != 3:
        raise ValueError(f'image must be (C, H, W), got shape {tuple(image.shape)}')
    height, width = int(image.shape[-2]), int(image.shape[-1])
    tiles = tile_grid(height, width, tile, overlap)
    found = []
    for t in tiles:
        dets = predict_fn(image[:, t.y0:t.y1, t.x0:t.x1])
        if not isinstance(dets, Detections):
            raise TypeError(f'predict_fn must return Detections, got {type(dets).__name__}')
        found.append(to_page(dets, t))
    return merge_tiles(tiles, found, (height, width), edge_margin, merge)
