"""``folder:PATH``: an ImageFolder tree of the user's images.

Layout::

    PATH/train/<class>/**/*.png|jpg|...
    PATH/val/<class>/...          (or PATH/validation/<class>/...)

* Classes are the sub-folders of ``train/``, sorted by name; label ``i`` is ``classes[i]``. A
  ``val/`` tree may lack some classes, but a class that is not in ``train/`` is an error.
* Image files are those ending in .png .jpg .jpeg .bmp .gif .webp .tif .tiff (any case), found
  recursively; other files and hidden folders are ignored. A class folder without images is an
  error.
* The tree declares no image size: commands build the model at its own input size and resize the
  images to it (:func:`native_size` reads a few image headers so the log can say so).
  :func:`~deitlab.data.build_dataset` with ``img_size=None`` gives 224: images are resized (shorter
  side) and centre-cropped to the size (``aug='deit'`` uses timm's random-resized crop instead).
* Grayscale images give 3 channels by replication, colour images 1 channel by luminance.
* A tree may declare itself in ``PATH/manifest.json`` under the key ``folder`` (:func:`declared`):
  ``classes``, the class folders in label order (all of them sub-folders of ``train/``; a declared
  class may have no images, so a tree of glyph crops has its 24 letters whatever the pages held), and
  ``hflip``, the flip probability augmentation uses when none is asked for (0 for glyphs, whose mirror
  images are other letters or none). ``deitlab papyri crops`` writes such trees.

Corrupt or unreadable images: the policy is to FAIL, naming the file. The tree is only listed
when the dataset is built; each image is decoded when its item is loaded, and an image PIL cannot
read raises ``DataError("cannot read image PATH: REASON")`` there (in a DataLoader worker the
error reaches the main process with the message intact). Nothing is skipped silently.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..console import log
from .base import DataError

__all__ = ['IMAGE_EXTENSIONS', 'DEFAULT_IMG_SIZE', 'MANIFEST_NAME', 'split_dir', 'declared', 'find_classes',
           'scan_split', 'native_size', 'FolderDataset']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
DEFAULT_IMG_SIZE = 224
MANIFEST_NAME = 'manifest.json'
_SPLIT_NAMES = {'train': ('train',), 'val': ('val', 'validation')}


def _root(path: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f'dataset path does not exist: {root}')
    if not root.is_dir():
        raise DataError(f'dataset path is not a directory: {root}')
    return root


def _subdirs(d: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith('.'))


def split_dir(path: str, split: str) -> Path:
    """The folder of ``split`` under ``path`` (``val`` may also be called ``validation``)."""
    root = _root(path)
    for name in _SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    found = ', '.join(sorted(e.name for e in os.scandir(root))) or 'nothing'
    want = ' or '.join(f'{n}/' for n in _SPLIT_NAMES[split])
    raise DataError(f'folder: no {want} folder in {root} (found: {found}); expected PATH/train/<class>/ '
                    f'and PATH/val/<class>/')


def declared(path: str) -> dict:
    """The tree's declaration: the ``folder`` object of ``PATH/manifest.json`` (``classes``: the class
    folders in label order; ``hflip``: the default flip probability), checked; ``{}`` when there is none."""
    file = Path(path).expanduser() / MANIFEST_NAME
    if not file.is_file():
        return {}
    try:
        decl = json.loads(file.read_text(encoding='utf-8')).get('folder')
    except (OSError, ValueError, AttributeError):
        return {}
    if decl is None:
        return {}
    classes, hflip = decl.get('classes') if isinstance(decl, dict) else None, \
        decl.get('hflip', 0.5) if isinstance(decl, dict) else None
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(c, str) and c and '/' not in c for c in classes)):
        raise DataError(f"{file}: 'folder.classes' must list at least two distinct class folder names")
    if isinstance(hflip, bool) or not isinstance(hflip, (int, float)) or not 0 <= hflip <= 1:
        raise DataError(f"{file}: 'folder.hflip' must be a probability in [0, 1], got {hflip!r}")
    return {'classes': list(classes), 'hflip': float(hflip)}


def find_classes(path: str) -> List[str]:
    """Class names: the classes the tree declares (:func:`declared`), else the sub-folders of
    ``PATH/train``, sorted."""
    d = split_dir(path, 'train')
    classes = declared(path).get('classes')
    if classes is not None:
        missing = [c for c in classes if not (d / c).is_dir()]
        if missing:
            raise DataError(f'folder: {Path(path) / MANIFEST_NAME} declares classes with no folder in {d}: '
                            f'{", ".join(missing[:6])}')
        return classes
    classes = _subdirs(d)
    if not classes:
        files = sorted(e.name for e in os.scandir(d))[:5]
        raise DataError(f'folder: no class folders in {d} (found files: {", ".join(files) or "none"}); '
                        f'put each class\'s images in {d}/<class>/')
    if len(classes) < 2:
        raise DataError(f'folder: {d} has one class ({classes[0]}); a classifier needs at least two (every '
                        f'image would be right)')
    return classes


def _images_under(d: Path) -> List[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith('.'))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
    return out


def _first_images(d: Path, n: int) -> List[Path]:
    out: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith('.'))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')][:n - len(out)]
        if len(out) >= n:
            break
    return out


def native_size(path: str, max_classes: int = 16, per_class: int = 4) -> Optional[Tuple[int, int]]:
    """``(height, width)`` shared by the images of ``PATH/train``, or None when they differ.

    Reads the headers of the first ``per_class`` images of the first ``max_classes`` class folders,
    so it costs a few dozen file opens whatever the tree's size; a tree whose sampled images agree is
    taken to have that size. An unreadable sampled image raises :class:`DataError` naming it.
    """
    d = split_dir(path, 'train')
    sizes = set()
    for name in find_classes(path)[:max_classes]:
        for file in _first_images(d / name, per_class):
            try:
                with Image.open(file) as img:
                    w, h = img.size
            except Exception as e:  # noqa: BLE001 - PIL raises many types
                raise DataError(f'cannot read image {file}: {e}') from e
            sizes.add((h, w))
    return sizes.pop() if len(sizes) == 1 else None


def scan_split(path: str, split: str) -> Tuple[List[str], List[Path], List[int]]:
    """``(classes, files, labels)`` of one split; classes always come from ``train/``."""
    classes = find_classes(path)
    d = split_dir(path, split)
    names = _subdirs(d)
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DataError(f'folder: {d} has classes that are not in train/: {", ".join(unknown)} '
                        f'(train classes: {", ".join(classes)})')
    if not names:
        raise DataError(f'folder: no class folders in {d}')
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    may_be_empty = set(declared(path).get('classes') or ())
    for name in names:
        imgs = _images_under(d / name)
        if not imgs and name not in may_be_empty:
            raise DataError(f'folder: class folder {d / name} has no images '
                            f'({", ".join(IMAGE_EXTENSIONS)})')
        files += imgs
        labels += [index[name]] * len(imgs)
    return classes, files, labels


def load_image(path: Path, mode: str) -> Image.Image:
    """Decode one image into PIL ``mode`` ('L' or 'RGB'); unreadable files raise :class:`DataError`."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ('P', 'PA', 'LA', 'RGBA') and mode == 'RGB':
                img = img.convert('RGBA').convert('RGB')
            return img.convert(mode)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DataError(f'cannot read image {path}: {e}') from e


class FolderDataset(Dataset):
    """Images listed from an ImageFolder split, decoded per item.

    Args:
        path: The tree's root (holding ``train/`` and ``val/``).
        split: ``'train'`` or ``'val'``.
        in_chans: 1 (luminance) or 3 (RGB).
        transform: Callable on a PIL image ('L' or 'RGB') returning a float tensor.
    """

    def __init__(self, path: str, split: str, in_chans: int, transform: Callable[[Image.Image], torch.Tensor]):
        self.root = Path(path).expanduser()
        self.split = split
        self.classes, self.files, labels = scan_split(path, split)
        missing = sorted(set(self.classes) - {self.classes[i] for i in set(labels)})
        if missing:
            log(f'warning: the {split} split of {path} has no images of {len(missing)} class(es): '
                f'{", ".join(missing[:6])}{", ..." if len(missing) > 6 else ""}')
        self.num_classes = len(self.classes)
        self.targets = torch.tensor(labels, dtype=torch.long)
        self.mode = 'L' if in_chans == 1 else 'RGB'
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(load_image(self.files[index], self.mode)), int(self.targets[index])

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, '
                f'classes={self.num_classes})')

