"""The glyph detectors' data: pages of a dataset in the competition's COCO schema (:func:`read_pages`),
random crops of the tile size with their boxes (:class:`PageCrops`), and a page given in any form as
the tensor the detectors read (:func:`page_tensor`).

The organisers' Faster R-CNN baseline of the ICDAR 2023 papyri competition trained on random 672 px
crops of the scans; the detectors here train on random crops of the tile size they predict with
(:mod:`deitlab.papyri.tiling`), so a glyph is seen at the same scale in training and prediction.

* **Pages.** ``annotations.json`` and the images it names (:func:`~deitlab.papyri.config.annotation_file`:
  a ``deitlab papyri synth`` directory or any directory in that layout), read by
  :func:`~deitlab.papyri.coco.read_coco`: categories that are not letters are left out (the
  competition's file lists about 227), boxes are clipped to their image, every image file must be
  there and have the size the file gives it. Every letter box is a target, whatever its BaseType.
* **Crops.** Crop ``i`` of epoch ``e`` is drawn from ``(seed, e, i)`` alone: a page (chosen in
  proportion to its area, so every region of the data is equally likely), a position (uniform over
  the crops inside the page; a page smaller than the tile is padded with black, as a page lies on
  a dark mount), the boxes clipped to the crop, those keeping at least ``min_visible`` of their
  area (a glyph cut by the crop's border keeps its clipped box: so does prediction, where
  :mod:`~deitlab.papyri.tiling` drops the cut copies), and a mild photometric jitter (brightness,
  contrast, a colour cast). Never a flip: a mirrored letter is another shape, or none (Ϲ).
* **Batches.** Crops stack into ``(B, 3, T, T)``; their targets into one ``(B, N, 5)`` tensor of
  ``x1, y1, x2, y2, label`` rows padded with label -1 (:func:`collate_crops`), which the training
  loop moves to the device as it moves any label tensor; :func:`unpack_targets` gives torchvision's
  list of ``{boxes, labels}`` back.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.glyphs import derive_seed
from .coco import CocoDataset, read_coco
from .config import PapyriError, annotation_file

__all__ = ['Pages', 'read_pages', 'page_tensor', 'load_page', 'PageCrops', 'collate_crops', 'unpack_targets']

_STREAM = 0xDE7C   # names the crops' random stream (derive_seed)


def page_tensor(image) -> torch.Tensor:
    """A page as the detectors read it: a float tensor ``(3, H, W)`` of RGB in [0, 1]. ``image``: such a
    tensor (or ``(H, W)`` / ``(1, H, W)`` grey, ``uint8`` 0..255 too), a PIL image, a numpy array
    ``(H, W[, C])`` or the path of an image file."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return page_tensor(im.convert('RGB'))
    if isinstance(image, Image.Image):
        image = np.array(image.convert('RGB'))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image))   # a copy: the caller's array stays theirs
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise PapyriError(f'a page must be an image tensor, a PIL image, a numpy array or an image file; got '
                          f'{type(image).__name__}')
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise PapyriError(f'a page tensor must be (C, H, W) with 1 or 3 channels, got shape {tuple(image.shape)}')
    image = image[:3] if image.shape[0] == 4 else image.expand(3, -1, -1) if image.shape[0] == 1 else image
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    if not image.is_floating_point():
        raise PapyriError(f'a page tensor must be float in [0, 1] or uint8, got {image.dtype}')
    return image.float()


@dataclass
class Pages:
    """A detection dataset: its annotation file, the directory the images are relative to, the
    checked annotations, and per image its letter boxes (``(N, 4)`` xyxy pixels) and classes."""
    source: Path
    root: Path
    coco: CocoDataset
    boxes: List[np.ndarray] = field(default_factory=list)
    labels: List[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.coco.images)

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes)

    def describe(self) -> dict:
        """What a run directory records of the data it was trained on."""
        return {'annotations': str(self.source), 'images': len(self), 'boxes': self.num_boxes,
                'sha256': hashlib.sha256(self.source.read_bytes()).hexdigest()}


def read_pages(path, what: str = 'data') -> Pages:
    """The pages of ``path`` (a directory with ``annotations.json``, or that file); ``what`` names
    the setting in messages (``'data'``, ``'val'``)."""
    source = annotation_file(path, what)
    coco = read_coco(source, drop_other_categories=True, clip_boxes=True, check_files=True)
    if not coco.images:
        raise PapyriError(f'{what}: {source} lists no images')
    pages = Pages(source, source.parent, coco)
    by_image = {im.id: [] for im in coco.images}
    for a in coco.annotations:
        by_image[a.image_id].append(a)
    for im in coco.images:
        anns = by_image[im.id]
        pages.boxes.append(np.array([[a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]]
                                     for a in anns], dtype=np.float32).reshape(-1, 4))
        pages.labels.append(np.array([a.letter for a in anns], dtype=np.int64))
    return pages


def load_page(pages: Pages, index: int) -> torch.Tensor:
    """Image ``index`` of ``pages`` as ``uint8`` ``(3, H, W)``; :class:`PapyriError` when the file's size
    is not the one the annotations give (the boxes would not fit it)."""
    im = pages.coco.images[index]
    with Image.open(pages.root / im.file_name) as f:
        rgb = np.array(f.convert('RGB'))
    if rgb.shape[:2] != (im.height, im.width):
        raise PapyriError(f'{pages.source}: image {im.id} ({im.file_name}) is {rgb.shape[1]}x{rgb.shape[0]} pixels but '
                          f'the annotations say {im.width}x{im.height}')
    return torch.from_numpy(rgb).permute(2, 0, 1)


class PageCrops(torch.utils.data.Dataset):
    """``length`` random crops of ``tile`` x ``tile`` pixels of ``pages`` per epoch (the module's
    docstring): item ``i`` is ``(image (3, T, T) float in [0, 1], targets (N, 5))``, drawn from
    ``(seed, epoch, i)``; :meth:`set_epoch` before each epoch. Decoded pages are kept up to
    ``cache_bytes`` (the oldest dropped first), in each loader worker."""

    def __init__(self, pages: Pages, tile: int, length: int, seed: int = 0, jitter: float = 0.2,
                 min_visible: float = 0.5, cache_bytes: int = 1 << 30):
        self.pages, self.tile, self.length, self.seed = pages, int(tile), int(length), int(seed)
        self.jitter, self.min_visible, self.cache_bytes = float(jitter), float(min_visible), int(cache_bytes)
        area = np.array([im.width * im.height for im in pages.coco.images], dtype=np.float64)
        self.weights = area / area.sum()
        self.epoch = 0
        self._cache: OrderedDict = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _page(self, k: int) -> torch.Tensor:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        page = load_page(self.pages, k)
        self._cache[k] = page
        while len(self._cache) > 1 and sum(p.numel() for p in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return page

    def __getitem__(self, i: int):
        rng = np.random.default_rng(derive_seed(self.seed, _STREAM, self.epoch, int(i)))
        k = int(rng.choice(len(self.weights), p=self.weights))
        page, t = self._page(k), self.tile
        h, w = page.shape[1:]
        x0, y0 = int(rng.integers(0, max(0, w - t) + 1)), int(rng.integers(0, max(0, h - t) + 1))
        crop = torch.zeros(3, t, t)
        part = page[:, y0:y0 + t, x0:x0 + t]
        crop[:, :part.shape[1], :part.shape[2]] = part.float() / 255
        boxes = self.pages.boxes[k] - np.array([x0, y0, x0, y0], dtype=np.float32)
        clipped = np.clip(boxes, 0, [part.shape[2], part.shape[1]] * 2)
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        seen = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
        keep = (seen >= self.min_visible * area) & (seen > 0)
        target = np.concatenate([clipped[keep], self.pages.labels[k][keep, None].astype(np.float32)], axis=1)
        return self._jitter(crop, rng), torch.from_numpy(target)

    def _jitter(self, crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        j = self.jitter
        if j == 0:
            return crop
        brightness, contrast = 1 + rng.uniform(-j, j, size=2)
        cast = torch.from_numpy(1 + rng.uniform(-j / 2, j / 2, size=3)).float().view(3, 1, 1)
        mean = crop.mean()
        return ((crop - mean) * float(contrast) + mean).mul_(float(brightness) * cast).clamp_(0, 1)


def collate_crops(batch: Sequence) -> tuple:
    """``(images (B, 3, T, T), targets (B, N, 5))``: each crop's ``x1, y1, x2, y2, label`` rows, padded
    to the most boxes of the batch with rows of label -1."""
    images = torch.stack([b[0] for b in batch])
    n = max(len(b[1]) for b in batch)
    targets = torch.zeros(len(batch), n, 5)
    targets[:, :, 4] = -1
    for i, (_, t) in enumerate(batch):
        targets[i, :len(t)] = t
    return images, targets


def unpack_targets(targets: torch.Tensor) -> list:
    """torchvision's detection targets ``[{boxes (N, 4) float, labels (N,) int64}]`` from a batch of
    :func:`collate_crops` (the padding rows left out), on the tensor's device."""
    out = []
    for rows in targets:
        rows = rows[rows[:, 4] >= 0]
        out.append({'boxes': rows[:, :4].float(), 'labels': rows[:, 4].long()})
    return out
