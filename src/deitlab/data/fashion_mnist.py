"""``fashion-mnist[:PATH]``: Zalando's Fashion-MNIST, 28x28 grayscale, 10 classes.

60,000 training and 10,000 test images; the test set is the ``val`` split. The four IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are looked for in a directory, its ``raw/`` or
its ``FashionMNIST/raw/`` subfolder, in this order:

1. ``PATH`` from the spec (if given, it is the only place looked at);
2. the directory in the environment variable ``DEITLAB_FASHION_MNIST``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``);
4. the download cache ``~/.cache/deitlab`` (``$XDG_CACHE_HOME/deitlab``);
5. with ``download=True`` only: torchvision's ``FashionMNIST(download=True)`` into that cache.

Files are checked (IDX magic number, dimensions, exact size, label range) and a bad file raises
:class:`DataError` naming it. Loaded splits are kept in memory for the process.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import DataError

__all__ = ['CLASSES', 'ENV_VAR', 'SYSTEM_DIRS', 'cache_dir', 'find_split_files', 'read_idx', 'load_split']

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle boot')
ENV_VAR = 'DEITLAB_FASHION_MNIST'
SYSTEM_DIRS: List[str] = ['/usr/share/datasets/fashion-mnist']
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801
_PREFIX = {'train': 'train', 'val': 't10k'}
_SUBDIRS = ('', 'raw', 'FashionMNIST/raw')


def cache_dir() -> Path:
    """Where ``download=True`` puts the files: ``$XDG_CACHE_HOME/deitlab`` or ``~/.cache/deitlab``."""
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'deitlab'


def _find_in(directory: Path, split: str) -> Optional[Tuple[Path, Path]]:
    """The (images, labels) files of ``split`` in ``directory`` or its known subfolders, or None."""
    for sub in _SUBDIRS:
        d = directory / sub if sub else directory
        found = []
        for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
            name = f'{_PREFIX[split]}-{kind}'
            hit = next((d / n for n in (name, name + '.gz') if (d / n).is_file()), None)
            found.append(hit)
        if all(found):
            return found[0], found[1]
    return None


def find_split_files(split: str, path: Optional[str] = None, download: bool = False) -> Tuple[Path, Path]:
    """Locate the IDX files of ``split`` (see the module docstring for the search order)."""
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        candidates = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
        candidates += [Path(p) for p in SYSTEM_DIRS] + [cache_dir()]
    for d in candidates:
        hit = _find_in(d, split)
        if hit:
            return hit
    if path is None and download:
        return _download(split)
    tried = '\n  '.join(str(d) for d in candidates)
    stem = f'{_PREFIX[split]}-images-idx3-ubyte[.gz] and {_PREFIX[split]}-labels-idx1-ubyte[.gz]'
    raise DataError(
        f'fashion-mnist: {stem} not found; looked in (and in their raw/ and FashionMNIST/raw/):\n  {tried}\n'
        f'Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass a directory as '
        f'`fashion-mnist:PATH` (or set {ENV_VAR}), or use download=True on a machine with internet.')


def _download(split: str) -> Tuple[Path, Path]:
    root = cache_dir()
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(root), train=split == 'train', download=True)
    except Exception as e:  # network, disk or missing torchvision
        raise DataError(f'fashion-mnist: download into {root} failed: {e}. Without internet, use '
                        '`apt-get install dataset-fashion-mnist` or pass a path.') from e
    hit = _find_in(root, split)
    if hit is None:
        raise DataError(f'fashion-mnist: download finished but the IDX files are not in {root}')
    return hit


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or gzip) and check its magic number and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f'cannot read IDX file {path}: {e}') from e
    if len(raw) < 4:
        raise DataError(f'corrupt IDX file {path}: only {len(raw)} bytes')
    (got,) = struct.unpack('>I', raw[:4])
    if got != magic:
        raise DataError(f'corrupt IDX file {path}: magic number 0x{got:08x}, expected 0x{magic:08x}')
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f'corrupt IDX file {path}: truncated header')
    dims = struct.unpack(f'>{ndim}I', raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = 'truncated' if len(raw) < expected else 'has trailing bytes'
        raise DataError(f'corrupt IDX file {path}: {what} ({len(raw)} bytes, dimensions {dims} need {expected})')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load(images_path: str, labels_path: str, stamp: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(Path(images_path), IMAGE_MAGIC)
    labels = read_idx(Path(labels_path), LABEL_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f'corrupt IDX file {images_path}: images are {images.shape[1:]}, expected (28, 28)')
    if len(images) != len(labels):
        raise DataError(f'fashion-mnist: {images_path} has {len(images)} images but {labels_path} has '
                        f'{len(labels)} labels')
    if len(labels) and labels.max() >= len(CLASSES):
        raise DataError(f'corrupt IDX file {labels_path}: label {labels.max()} out of range 0..9')
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def load_split(split: str, path: Optional[str] = None, download: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 1, 28, 28)`` and long labels ``(N,)`` of ``split`` ('train' or 'val').

    Cached per file pair (the tensors are shared: do not modify them).
    """
    images_path, labels_path = find_split_files(split, path, download)
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in (images_path.stat(), labels_path.stat()))
    return _load(str(images_path.resolve()), str(labels_path.resolve()), stamp)
