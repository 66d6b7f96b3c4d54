"""Letter crops: the refiners' input, cut the same way from annotated pages (training) and from
predicted boxes (inference): ``deitlab papyri crops``.

Turnbull & Mannix (IJDAR 2024) re-classify each box found on a papyrus page with crop classifiers
(a DeiT and a SimCLR-pretrained ResNet) trained on the ground-truth letters cut out of the training
pages. A crop here is one rule, :class:`CropPolicy`, applied by one function, :func:`crop_glyph`, at
both times, so a classifier sees at inference exactly the pixels it was trained on:

* the **window** is a square around the box's centre whose side is the box's longer side times
  ``1 + 2 * margin`` (``margin`` 0.15: the letter with a little of its neighbours, the context a
  reader uses; a thin iota keeps its proportions instead of being stretched to a square);
* the window is **resampled** to ``size`` x ``size`` pixels (bilinear, at sub-pixel position);
  whatever of it lies off the page is black, as a page lies on a dark mount.

:func:`write_crops` (``deitlab papyri crops``) writes the letters of annotated pages as an
image-folder dataset that ``deitlab train --data folder:OUT`` trains any deitlab or timm model on:

* ``train/NN-name/<page>_<id>.png`` and ``val/NN-name/...``: one folder per letter, ``00-alpha`` to
  ``23-omega`` in the order of :data:`~deitlab.papyri.alphabet.LETTERS`, every folder present even
  when the pages hold none of that letter (so the classifier always has the 24 classes in that
  order); the val split is the letters of other pages (``val``) or a random share of these;
* ``manifest.json``: what the crops were made from and how (the policy, which base types, the
  counts), and the tree's ``folder`` declaration (:func:`deitlab.data.folder.declared`): its
  classes in label order and ``hflip`` 0, so that augmentation never mirrors a letter.

Letters of BaseType bt3 (the most damaged, which the organisers leave out of the score) are left
out by default; ``label_fraction`` keeps a share of each letter's training crops (training with few
labels). The directory is written whole or not at all (:mod:`.outdir`).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from ..console import progress
from .alphabet import CATEGORY_IDS, LETTERS, NAMES, NUM_CLASSES
from .config import PapyriError
from .outdir import entries, generator_of, shown, staged
from .refine_config import CropsConfig

__all__ = ['GENERATOR', 'KIND', 'MANIFEST_NAME', 'CropPolicy', 'class_folder', 'letter_of_folder', 'crop_glyph',
           'crop_glyphs', 'read_crop_manifest', 'write_crops']

GENERATOR = 'deitlab papyri crops'
KIND = 'papyri-crops'
MANIFEST_NAME = 'manifest.json'   # data/folder.py reads its 'folder' declaration
_OUTPUTS = ('train', 'val', MANIFEST_NAME)


def class_folder(k: int) -> str:
    """The folder of letter ``k``: ``00-alpha`` ... ``23-omega`` (sorted by name = letter order)."""
    return f'{k:02d}-{NAMES[k]}'


def letter_of_folder(name: str) -> Optional[int]:
    """The letter of a class folder name from :func:`class_folder` (also the bare names ``alpha``, with
    ``lambda`` for Unicode's ``lamda``, as the ``glyphs`` dataset names its classes, and the letters
    themselves), else None."""
    name = 'lamda' if name == 'lambda' else name
    for k in range(NUM_CLASSES):
        if name in (class_folder(k), NAMES[k], LETTERS[k]):
            return k
    return None


@dataclass(frozen=True)
class CropPolicy:
    """How a box becomes a crop (the module's docstring): a square window of side ``longer side x (1 +
    2 margin)`` around the box's centre, resampled to ``size`` pixels."""
    margin: float = 0.15
    size: int = 64

    def window(self, box) -> tuple:
        """The window ``(x0, y0, x1, y1)`` in page pixels (floats) of an xyxy ``box``."""
        x0, y0, x1, y1 = (float(v) for v in box)
        side = max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * self.margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2

    def to_dict(self) -> dict:
        return {'margin': self.margin, 'size': self.size}


def crop_glyph(page: Image.Image, box, policy: CropPolicy = CropPolicy()) -> Image.Image:
    """The crop of ``box`` (xyxy page pixels) on the RGB ``page``: its window (:meth:`CropPolicy.window`)
    resampled bilinearly to ``policy.size`` pixels; the part of the window off the page is black."""
    x0, y0, x1, y1 = policy.window(box)
    ix0, iy0, ix1, iy1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
    region = page.crop((ix0, iy0, ix1, iy1))   # zero (black) outside the page
    return region.resize((policy.size, policy.size), Image.BILINEAR, box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0))


def crop_glyphs(page: Image.Image, boxes, policy: CropPolicy = CropPolicy()) -> List[Image.Image]:
    """:func:`crop_glyph` of every row of ``boxes`` (``(N, 4)`` xyxy)."""
    page = page.convert('RGB')
    return [crop_glyph(page, b, policy) for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]


def read_crop_manifest(path) -> Optional[dict]:
    """The manifest of a crops directory written by :func:`write_crops` (``path`` is the directory),
    or None when ``path`` holds none."""
    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get('kind') == KIND else None


# ------------------------------------------------------------------------------------------ writing
def _check_out(out: Path, overwrite: bool) -> None:
    names = entries(out)
    if not names:
        return
    info = generator_of(out / MANIFEST_NAME) or {}
    if not (set(names) <= set(_OUTPUTS) and info.get('generator') == GENERATOR):
        raise PapyriError(f'{out} is not empty ({shown(names)}) and holds no crops written by {GENERATOR}; choose '
                          f'another --out (--overwrite replaces only such crops)')
    if not overwrite:
        raise PapyriError(f'{out} already holds crops; pass --overwrite to replace them, or choose another --out')


def _letters(pages, base_types: Sequence[str]) -> List[tuple]:
    """``(page index, annotation)`` of every letter of ``pages`` of the given base types (a letter
    without a BaseType counts as bt1)."""
    keep = set(base_types)
    out = []
    by_image = {im.id: k for k, im in enumerate(pages.coco.images)}
    for a in pages.coco.annotations:
        if (a.base_type or 'bt1') in keep:
            out.append((by_image[a.image_id], a))
    return out


def _label_subset(items: List[tuple], fraction: float, rng: np.random.Generator) -> List[tuple]:
    """``fraction`` of each letter's items (rounded up: at least one of each letter present)."""
    if fraction >= 1:
        return items
    by_letter: dict = {}
    for item in items:
        by_letter.setdefault(item[1].letter, []).append(item)
    kept = []
    for letter in sorted(by_letter):
        group = by_letter[letter]
        n = max(1, math.ceil(fraction * len(group)))
        kept += [group[i] for i in sorted(rng.choice(len(group), size=n, replace=False))]
    return kept


def _write_split(tmp: Path, split: str, pages, items: List[tuple], policy: CropPolicy, bar) -> Counter:
    root = tmp / split
    for k in range(NUM_CLASSES):
        (root / class_folder(k)).mkdir(parents=True)
    counts: Counter = Counter()
    by_page: dict = {}
    for page_index, ann in items:
        by_page.setdefault(page_index, []).append(ann)
    for page_index in sorted(by_page):
        im = pages.coco.images[page_index]
        with Image.open(pages.root / im.file_name) as f:
            page = f.convert('RGB')
        stem = Path(im.file_name).stem
        for ann in by_page[page_index]:
            x, y, w, h = ann.bbox
            crop = crop_glyph(page, (x, y, x + w, y + h), policy)
            crop.save(root / class_folder(ann.letter) / f'{stem}_{ann.id}.png', format='PNG')
            counts[LETTERS[ann.letter]] += 1
        bar.update(1)
    return counts


def write_crops(cfg: CropsConfig) -> dict:
    """Write the letter crops of ``cfg.data`` (and ``cfg.val``) to ``cfg.out`` (the module's
    docstring); returns a summary (counts per split and letter, the ``folder:`` spec to train on)."""
    from .detect_data import read_pages
    cfg.validate()
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    train_pages = read_pages(cfg.data, 'data')
    val_pages = read_pages(cfg.val, 'val') if cfg.val is not None else None
    policy = CropPolicy(cfg.margin, cfg.size)
    rng = np.random.default_rng(cfg.seed)
    train_items = _letters(train_pages, cfg.base_types)
    if not train_items:
        raise PapyriError(f'data: {train_pages.source} has no letters of base type {"/".join(cfg.base_types)}')
    if val_pages is None:
        if len(train_items) < 2:
            raise PapyriError(f'data: {train_pages.source} has {len(train_items)} letter(s): too few to hold some out '
                              f'as the val split (give --val pages)')
        n_val = min(len(train_items) - 1, max(1, round(cfg.val_fraction * len(train_items))))
        held = set(rng.choice(len(train_items), size=n_val, replace=False).tolist())
        val_items = [it for i, it in enumerate(train_items) if i in held]
        train_items = [it for i, it in enumerate(train_items) if i not in held]
        val_source = val_pages_of = train_pages
    else:
        val_items = _letters(val_pages, cfg.base_types)
        if not val_items:
            raise PapyriError(f'val: {val_pages.source} has no letters of base type {"/".join(cfg.base_types)}')
        val_source = val_pages_of = val_pages
    train_items = _label_subset(train_items, cfg.label_fraction, rng)
    n_pages = len({p for p, _ in train_items}) + len({p for p, _ in val_items})
    with staged(out) as tmp:
        with progress(cfg.progress, total=n_pages, desc='crops', unit='page') as bar:
            train_counts = _write_split(tmp, 'train', train_pages, train_items, policy, bar)
            val_counts = _write_split(tmp, 'val', val_pages_of, val_items, policy, bar)
        classes = [class_folder(k) for k in range(NUM_CLASSES)]
        manifest = {
            'info': {'generator': GENERATOR},
            'kind': KIND, 'format': 1,
            'folder': {'classes': classes, 'hflip': 0.0},
            'crop': policy.to_dict(),
            'letters': LETTERS, 'category_ids': list(CATEGORY_IDS),
            'base_types': list(cfg.base_types), 'label_fraction': cfg.label_fraction, 'seed': cfg.seed,
            'source': {'train': train_pages.describe(),
                       'val': val_source.describe() if val_pages is not None else f'{cfg.val_fraction} of train'},
            'counts': {'train': dict(sorted(train_counts.items(), key=lambda kv: LETTERS.index(kv[0]))),
                       'val': dict(sorted(val_counts.items(), key=lambda kv: LETTERS.index(kv[0])))},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding='utf-8')
    missing = [LETTERS[k] for k in range(NUM_CLASSES) if not train_counts.get(LETTERS[k])]
    return {'out': str(out), 'train': sum(train_counts.values()), 'val': sum(val_counts.values()),
            'letters_missing_in_train': ''.join(missing), 'crop': policy.to_dict(),
            'base_types': list(cfg.base_types), 'data_spec': f'folder:{out}', 'manifest': str(out / MANIFEST_NAME)}
