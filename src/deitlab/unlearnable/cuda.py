"""CUDA: Convolution-based Unlearnable DAtasets, generated from a private key.

Sadasivan, Soltanolkotabi and Feizi, "CUDA: Convolution-based Unlearnable Datasets", CVPR 2023.
A model trained on a CUDA-poisoned training set learns the class-wise blur instead of the image
content and generalises poorly to clean test data; the labels are unchanged.

Filters. A private key seeds a random generator (through SHA-256, so the same key gives the same
filters on every machine). For each class ``i = 0..K-1``, in order, a ``k x k`` filter is drawn::

    s_i[u, v] ~ U(0, p_b)  i.i.d.,          then   s_i[u*, v*] = 1,   (u*, v*) ~ U({0..k-1}^2)

``p_b`` is the blur parameter; the paper uses ``k=3, p_b=0.3`` on CIFAR (the defaults here) and
``k=9, p_b=0.06`` on ImageNet-100. Class ``i``'s filter does not depend on ``K``.

Poisoning an image ``x`` in [0, 1] of class ``y`` (C = 1 or 3 channels)::

    x_hat[c] = x[c] * s_y              (depthwise: the same filter on every channel; stride 1,
                                        zero padding k // 2, no bias; size preserved)
    x_tilde  = clip(x_hat / max_{c,h,w} x_hat, 0, 1)    (one global max; 0 stays 0)

``*`` is the convolution of deep-learning libraries (``torch.nn.functional.conv2d``, i.e.
cross-correlation: the filter is not flipped, which for random filters is the same law).
Stored images are ``round(255 x_tilde)`` as uint8.

``fraction`` poisons that share of every class (``floor(fraction * n_c + 1/2)`` images of a class
with ``n_c``), chosen from the key (or ``seed``); the rest and the whole val split are copied clean.
The selection is nested: the images chosen at a fraction are also chosen at any larger one.

Example::

    from deitlab.unlearnable import make_unlearnable
    info = make_unlearnable('fashion-mnist', key='my secret key', out_dir='fmnist-cuda')
    # then: deitlab train --data folder:fmnist-cuda ...

The key never leaves the process: ``manifest.json`` holds only :func:`key_fingerprint`.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..data import DataError, build_dataset, dataset_info, parse_spec
from ..data.base import TensorImageDataset
from ..data.folder import FolderDataset, load_image
from ..data.transforms import pil_to_tensor, resize_center_crop, resize_images, tensor_to_pil

__all__ = ['UnlearnableError', 'MIN_KEY_LENGTH', 'key_fingerprint', 'class_filters', 'apply_filters',
           'poison_mask', 'CUDATransform', 'PoisonedDataset', 'make_unlearnable', 'PAPER']

MIN_KEY_LENGTH = 8
PAPER = ('Sadasivan, Soltanolkotabi, Feizi. CUDA: Convolution-based Unlearnable Datasets. '
         'CVPR 2023')
_FINGERPRINT_SALT = b'deitlab-cuda-v1:'
_FILTER_SALT = b'deitlab-cuda-filters-v1:'
_SELECT_SALT = b'deitlab-cuda-select-v1:'
_CHUNK = 2048
_GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')

Key = Union[str, bytes]


class UnlearnableError(DataError):
    """Bad input to CUDA generation (short key, bad filter options, busy output directory...)."""


# ------------------------------------------------------------------------------------------ keys
def _key_bytes(key: Key) -> bytes:
    if isinstance(key, str):
        n, raw = len(key), key.encode('utf-8')
    elif isinstance(key, (bytes, bytearray)):
        n, raw = len(key), bytes(key)
    else:
        raise UnlearnableError(f'the key must be a str, got {type(key).__name__}')
    if n < MIN_KEY_LENGTH:
        raise UnlearnableError(f'the key is too short: a key needs at least {MIN_KEY_LENGTH} characters')
    return raw


def _seed_words(salt: bytes, key: Key) -> List[int]:
    digest = hashlib.sha256(salt + _key_bytes(key)).digest()
    return [int.from_bytes(digest[i:i + 4], 'little') for i in range(0, 32, 4)]


def key_fingerprint(key: Key) -> str:
    """16 hex characters of ``sha256(b'deitlab-cuda-v1:' + key)``: names a key without revealing it."""
    return hashlib.sha256(_FINGERPRINT_SALT + _key_bytes(key)).hexdigest()[:16]


# --------------------------------------------------------------------------------------- filters
def _check_options(num_classes: int, kernel_size: int, blur: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UnlearnableError(f'num_classes must be an int >= 1, got {num_classes!r}')
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise UnlearnableError(f'kernel_size must be an odd int >= 1 (so that zero padding k // 2 keeps '
                               f'the image size), got {kernel_size!r}')
    if not isinstance(blur, (int, float)) or isinstance(blur, bool) or not 0.0 <= blur < 1.0:
        raise UnlearnableError(f'blur must be a number with 0 <= blur < 1, got {blur!r}')


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise UnlearnableError(f'fraction must be a number in [0, 1], got {fraction!r}')
    return float(fraction)


def class_filters(key: Key, num_classes: int, kernel_size: int = 3, blur: float = 0.3) -> torch.Tensor:
    """The ``(num_classes, k, k)`` float32 filters of ``key``: entries U(0, blur), one entry set to 1."""
    _check_options(num_classes, kernel_size, blur)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_seed_words(_FILTER_SALT, key))))
    below = np.nextafter(np.float32(blur), np.float32(0))   # float32 rounding must stay below blur
    out = np.empty((num_classes, kernel_size, kernel_size), dtype=np.float32)
    for i in range(num_classes):
        s = np.minimum((rng.random((kernel_size, kernel_size)) * blur).astype(np.float32), max(below, 0))
        s.flat[int(rng.integers(kernel_size * kernel_size))] = 1.0
        out[i] = s
    return torch.from_numpy(out)


def apply_filters(images: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]],
                  filters: torch.Tensor) -> torch.Tensor:
    """Poison a batch: image ``j`` is filtered with ``filters[labels[j]]`` and max-normalised.

    Args:
        images: ``(B, C, H, W)``, either uint8 (0..255) or floating point with values in [0, 1].
        labels: ``B`` class indices into ``filters``.
        filters: ``(K, k, k)`` from :func:`class_filters` (k odd).

    Returns:
        The same dtype as ``images``: uint8 ``round(255 x_tilde)`` for uint8 input, else
        ``x_tilde`` in [0, 1]. Shape is preserved.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise UnlearnableError(f'images must be a tensor (B, C, H, W), got '
                               f'{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)}')
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UnlearnableError(f'images must be uint8 or floating point, got {images.dtype}')
    if filters.ndim != 3 or filters.shape[1] != filters.shape[2] or filters.shape[1] % 2 == 0:
        raise UnlearnableError(f'filters must be (K, k, k) with odd k, got {tuple(filters.shape)}')
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(images):
        raise UnlearnableError(f'{len(images)} images but {len(labels)} labels')
    if len(labels) and (labels.min() < 0 or labels.max() >= len(filters)):
        raise UnlearnableError(f'labels must be in 0..{len(filters) - 1}, got {labels.min()}..{labels.max()}')
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    b, c, _, _ = x.shape
    k = filters.shape[-1]
    w = filters.to(device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    for cls in labels.unique().tolist():   # one grouped (depthwise) convolution per class
        idx = (labels == cls).nonzero().squeeze(1).to(x.device)
        out[idx] = F.conv2d(x[idx], w[cls].expand(c, 1, k, k), padding=k // 2, groups=c)
    peak = out.amax(dim=(1, 2, 3), keepdim=True) if b else out
    out = torch.where(peak > 0, out / peak.clamp_min(torch.finfo(torch.float32).tiny), 0.0).clamp_(0, 1)
    if images.dtype == torch.uint8:
        return out.mul_(255).round_().to(torch.uint8)
    return out.to(images.dtype)


def poison_mask(targets: Union[torch.Tensor, Sequence[int]], key: Optional[Key], fraction: float,
                seed: Optional[int] = None) -> torch.Tensor:
    """Which items to poison: a bool ``(N,)`` with ``floor(fraction * n_c + 1/2)`` True per class.

    The choice is a random permutation of each class's items seeded from ``key`` (or from ``seed``
    when given), independent per class and nested in ``fraction``.
    """
    fraction = _check_fraction(fraction)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    mask = torch.zeros(len(targets), dtype=torch.bool)
    if fraction == 0.0 or not len(targets):
        return mask
    if seed is None:
        if key is None:
            raise UnlearnableError('poison_mask needs a key or a seed')
        words = _seed_words(_SELECT_SALT, key)
    else:
        words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, 0x5E1EC7]
    for cls in targets.unique().tolist():
        idx = (targets == cls).nonzero().squeeze(1)
        n = math.floor(fraction * len(idx) + 0.5)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words + [cls])))
        mask[idx[torch.from_numpy(rng.permutation(len(idx))[:n])]] = True
    return mask


# ---------------------------------------------------------------------------------- on the fly
class CUDATransform:
    """Poison one ``(image, label)`` pair on the fly: ``CUDATransform(key, K)(img, label)``.

    ``img`` is a ``(C, H, W)`` tensor (uint8, or float in [0, 1]; the same dtype is returned) or a
    PIL image ('L' or 'RGB'; a PIL image of the same mode is returned).
    """

    def __init__(self, key: Key, num_classes: int, kernel_size: int = 3, blur: float = 0.3):
        self.filters = class_filters(key, num_classes, kernel_size, blur)
        self.kernel_size, self.blur = kernel_size, float(blur)

    def __call__(self, img, label: int):
        if isinstance(img, Image.Image):
            mode = 'L' if img.mode in _GRAY_MODES else 'RGB'
            return tensor_to_pil(self(pil_to_tensor(img.convert(mode)), label))
        if not isinstance(img, torch.Tensor) or img.ndim != 3:
            raise UnlearnableError(f'CUDATransform expects a (C, H, W) tensor or a PIL image, got '
                                   f'{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}')
        return apply_filters(img.unsqueeze(0), [int(label)], self.filters)[0]

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={len(self.filters)}, kernel_size={self.kernel_size}, '
                f'blur={self.blur})')


class PoisonedDataset(Dataset):
    """A dataset whose items are CUDA-poisoned when loaded (the chosen ``fraction`` of each class).

    For deitlab's own datasets (from :func:`deitlab.data.build_dataset`) the raw uint8 image is
    poisoned *before* the dataset's transform (resize, augmentation, normalisation), exactly as
    :func:`make_unlearnable` stores it. Any other dataset must yield ``(image, label)`` with the
    image as :class:`CUDATransform` accepts it, and is poisoned after its own transform.
    ``fraction < 1`` needs the labels of all items: ``dataset.targets`` or ``targets=``.
    """

    def __init__(self, dataset: Dataset, key: Key, num_classes: Optional[int] = None, kernel_size: int = 3,
                 blur: float = 0.3, fraction: float = 1.0, seed: Optional[int] = None,
                 targets: Optional[Sequence[int]] = None):
        if num_classes is None:
            num_classes = getattr(dataset, 'num_classes', None) or len(getattr(dataset, 'classes', ()))
        if not num_classes:
            raise UnlearnableError('PoisonedDataset: the dataset has no num_classes/classes; pass num_classes=')
        self.dataset = dataset
        self.transform = CUDATransform(key, int(num_classes), kernel_size, blur)
        self.fraction = _check_fraction(fraction)
        targets = getattr(dataset, 'targets', None) if targets is None else targets
        if self.fraction in (0.0, 1.0):
            self.poisoned = torch.full((len(dataset),), self.fraction == 1.0)
        elif targets is None:
            raise UnlearnableError('PoisonedDataset: fraction < 1 needs the labels of all items '
                                   '(dataset.targets or targets=)')
        else:
            self.poisoned = poison_mask(targets, key, self.fraction, seed)
        for name in ('classes', 'num_classes', 'targets', 'spec'):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        ds, poison = self.dataset, bool(self.poisoned[index])
        if isinstance(ds, TensorImageDataset):
            img, label = ds.images[index], int(ds.targets[index])
            return ds.transform(self.transform(img, label) if poison else img), label
        if isinstance(ds, FolderDataset):
            img, label = load_image(ds.files[index], ds.mode), int(ds.targets[index])
            return ds.transform(self.transform(img, label) if poison else img), label
        img, label = ds[index]
        return (self.transform(img, int(label)) if poison else img), label

    def __repr__(self) -> str:
        return (f'{type(self).__name__}({self.dataset!r}, poisoned={int(self.poisoned.sum())}/{len(self)}, '
                f'{self.transform!r})')


# ---------------------------------------------------------------------------------- generation
class _Split:
    """One split of a dataset spec as raw uint8 images: labels, and images in same-shape batches;
    with ``size``, resized as training resizes them (in-memory images: bilinear, antialiased;
    files: shorter side bicubic, centre crop)."""

    def __init__(self, spec: str, split: str, native_chans: int, size: Optional[int] = None):
        self.size = size
        ds = build_dataset(spec, split, in_chans=native_chans)
        self.classes = list(ds.classes)
        self.targets = ds.targets
        self.images = ds.images if isinstance(ds, TensorImageDataset) else None
        self.files = ds.files if isinstance(ds, FolderDataset) else None
        if self.images is None and self.files is None:
            raise UnlearnableError(f'cannot read raw images of {type(ds).__name__}')

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(self), _CHUNK):
            idx = torch.arange(s, min(len(self), s + _CHUNK))
            if self.images is not None:
                batch = self.images[s:s + len(idx)]
                if self.size is not None and tuple(batch.shape[-2:]) != (self.size, self.size):
                    batch = resize_images(batch, self.size)
                yield idx, batch
                continue
            imgs = [pil_to_tensor(self._load(self.files[i])) for i in idx.tolist()]
            groups: Dict[tuple, List[int]] = {}
            for j, im in enumerate(imgs):
                groups.setdefault(tuple(im.shape), []).append(j)
            for pos in groups.values():
                yield idx[pos], torch.stack([imgs[j] for j in pos])


    def _load(self, path: Path) -> Image.Image:
        img = load_image(path, _file_mode(path))
        return img if self.size is None else resize_center_crop(img, self.size)


def _file_mode(path: Path) -> str:
    """'L' for a grayscale image file, else 'RGB' (unreadable files fail later, in load_image)."""
    try:
        with Image.open(path) as img:
            return 'L' if img.mode in _GRAY_MODES else 'RGB'
    except Exception:
        return 'RGB'


def _folder_names(classes: Sequence[str]) -> List[str]:
    """A valid, unique, non-hidden folder name per class ('T-shirt/top' -> 'T-shirt_top')."""
    out: List[str] = []
    for i, name in enumerate(classes):
        f = str(name).replace('/', '_').replace('\\', '_').replace('\0', '_').strip() or f'class_{i}'
        f = '_' + f if f.startswith('.') else f
        out.append(f if f not in out else f'{f}_{i}')
    return out


def _prepare_out(out: Path, overwrite: bool, source_root: Optional[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise UnlearnableError(f'output path {out} exists and is not a directory')
    if source_root is not None:
        a, b = out.resolve(), source_root.resolve()
        if a == b or b in a.parents or a in b.parents:
            raise UnlearnableError(f'output directory {out} overlaps the source folder {source_root}')
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UnlearnableError(f'output directory {out} is not empty; choose another or pass '
                                   f'overwrite=True (--overwrite)')
        for name in ('train', 'val', 'manifest.json'):   # only what this function writes
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_split(src: _Split, mask: torch.Tensor, filters: torch.Tensor, root: Path, folders: List[str],
                 classes: List[str], progress: Optional[bool], desc: str) -> dict:
    from ..console import progress as progress_bar
    width = max(6, len(str(len(src) - 1)))
    for c in sorted(set(src.targets.tolist())):
        (root / folders[c]).mkdir(parents=True, exist_ok=True)
    shapes = set()
    with progress_bar(progress, total=len(src), desc=desc, unit='img', leave=False) as bar:
        for idx, imgs in src.batches():
            labels = src.targets[idx]
            sel = mask[idx]
            if sel.any():
                imgs = imgs.clone()
                imgs[sel] = apply_filters(imgs[sel], labels[sel], filters)
            shapes.add(tuple(imgs.shape[1:]))
            for i, img, y in zip(idx.tolist(), imgs, labels.tolist()):
                tensor_to_pil(img.contiguous()).save(root / folders[y] / f'{i:0{width}d}.png')
            bar.update(len(idx))
    per_class = {}
    for c, name in enumerate(classes):
        in_c = src.targets == c
        p = int((mask & in_c).sum())
        per_class[name] = {'poisoned': p, 'clean': int(in_c.sum()) - p}
    p = int(mask.sum())
    return {'total': len(src), 'poisoned': p, 'clean': len(src) - p, 'per_class': per_class,
            'shapes': sorted(shapes)}


def make_unlearnable(data_spec: str, key: Key, out_dir: Union[str, Path], kernel_size: int = 3,
                     blur: float = 0.3, fraction: float = 1.0, progress: Optional[bool] = None, *,
                     overwrite: bool = False, seed: Optional[int] = None, img_size: Optional[int] = None) -> dict:
    """Write a CUDA-poisoned copy of a dataset spec as an ImageFolder tree that ``folder:OUT`` loads.

    Layout: ``OUT/train/<class>/<index>.png`` (the chosen ``fraction`` of each class poisoned, the
    rest clean), ``OUT/val/<class>/<index>.png`` (all clean), ``OUT/manifest.json`` (written last).
    ``<index>`` is the image's position in the source split, ``<class>`` the class name made safe
    for a folder (``/`` becomes ``_``). Pixels are the source's native size and channels (1 or 3;
    ``folder:`` sources keep each file's size and grayscale/colour), or ``img_size`` square when it is
    given: images are then resized the way training resizes them *before* they are filtered, so a
    model trained at that size sees the filters exactly as drawn (a resize after poisoning resizes the
    k x k filters too, and shrinking low-passes them; training a poisoned folder at another size logs a
    warning). ``folder:OUT`` numbers classes
    by sorted folder name; the manifest lists each class's source and ``folder:`` label.

    Args:
        data_spec: Any dataset spec of :mod:`deitlab.data` (``glyphs:...``, ``fashion-mnist``, ``folder:PATH``).
        key: Private key (at least 8 characters); it is not written anywhere.
        out_dir: Output directory; must be empty or absent unless ``overwrite``.
        kernel_size, blur: Filter side ``k`` (odd) and blur parameter ``p_b`` in [0, 1).
        fraction: Share of each training class to poison, in [0, 1].
        progress: tqdm bars on stderr: None = on a terminal only, True/False = always/never.
        overwrite: Replace ``train/``, ``val/`` and ``manifest.json`` in a non-empty ``out_dir``.
        seed: Seed of the choice of poisoned images; None = derived from the key.
        img_size: Side to resize every image to before poisoning (the training resolution); None =
            each image's own size.

    Returns:
        The manifest (a dict) with ``out_dir`` and ``manifest_path`` added.
    """
    _key_bytes(key)
    info = dataset_info(data_spec)
    _check_options(info.num_classes, kernel_size, blur)
    fraction = _check_fraction(fraction)
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise UnlearnableError(f'img_size must be a positive integer, got {img_size!r}')
    name, arg = parse_spec(data_spec)
    out = Path(out_dir).expanduser()
    _prepare_out(out, overwrite, Path(arg).expanduser() if name == 'folder' else None)
    filters = class_filters(key, info.num_classes, kernel_size, blur)
    classes = list(info.classes)
    folders = _folder_names(classes)
    order = sorted(range(len(classes)), key=lambda i: folders[i])
    splits = {}
    for split in ('train', 'val'):
        src = _Split(data_spec, split, info.in_chans, img_size)
        mask = poison_mask(src.targets, key, fraction, seed) if split == 'train' else \
            torch.zeros(len(src), dtype=torch.bool)
        splits[split] = _write_split(src, mask, filters, out / split, folders, classes, progress, f'cuda {split}')
    shapes = sorted(set(splits['train'].pop('shapes')) | set(splits['val'].pop('shapes')))
    from .. import __version__
    manifest = {
        'method': 'CUDA',
        'method_name': 'Convolution-based Unlearnable DAtaset',
        'paper': PAPER,
        'kernel_size': kernel_size,
        'blur': float(blur),
        'fraction': fraction,
        'poisoned_at': 'native size' if img_size is None else [img_size, img_size],
        'key_fingerprint': key_fingerprint(key),
        'selection': 'key' if seed is None else f'seed {int(seed)}',
        'source': data_spec,
        'num_classes': len(classes),
        'classes': [{'label': i, 'name': c, 'folder': folders[i], 'folder_label': order.index(i)}
                    for i, c in enumerate(classes)],
        'channels': shapes[0][0] if len({s[0] for s in shapes}) == 1 else None,
        'image_size': list(shapes[0][1:]) if len({s[1:] for s in shapes}) == 1 else None,
        'image_shapes': [list(s) for s in shapes],
        'splits': splits,
        'layout': 'ImageFolder: train/<class>/<index>.png (poisoned share), val/<class>/<index>.png '
                  '(clean); load with folder:OUT_DIR',
        'deitlab_version': __version__,
    }
    manifest_path = out / 'manifest.json'
    manifest_path.write_text(json.dumps(manifest, indent=2) + '\n')
    return {**manifest, 'out_dir': str(out), 'manifest_path': str(manifest_path)}
