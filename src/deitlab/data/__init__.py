"""Datasets named by spec strings, ready for a DataLoader.

Spec grammar: ``NAME[:ARG]`` (split at the first colon)::

    glyphs[:KEY=VALUE,...]   synthetic Greek capitals on papyrus, 24 classes (see .glyphs)
                             keys: train=12000 val=2400 size=32 seed=0 fonts=bundled|system
    glyphs-fine[:KEY=VALUE,...]
                             fine-grained: class = (letter, font), letters x fonts classes
                             (8 x 16 = 128 with the bundled fonts) (see .glyphs_fine)
                             keys: train=1920 val=1280 size=32 seed=0 letters=8 fonts=bundled|system
    glyphs-reid[:KEY=VALUE,...]
                             re-identification of writers (persistent hands) in views (see .glyphs_reid);
                             splits train, val (ids classes), query, gallery (test_ids other writers)
                             keys: ids=100 test_ids=50 per_id=16 views=4 val_per_id=4 size=32 seed=0
    fashion-mnist[:PATH]     Fashion-MNIST, 28x28 grayscale, 10 classes (see .fashion_mnist)
    folder:PATH              an ImageFolder tree PATH/{train,val}/<class>/ (see .folder)

Every dataset yields ``(image, label)``: a float32 tensor ``(in_chans, img_size, img_size)``
normalised with ``mean``/``std``, and an int. It has ``.classes``, ``.num_classes`` and
``.targets`` (a LongTensor, known without decoding images). The splits are ``train`` and
``val``; ``glyphs-reid`` also has ``query`` and ``gallery``, whose items are ``(image, identity,
view)`` and which have ``.identities`` and ``.views`` LongTensors (a :class:`ReidImageDataset`; its
``train`` and ``val`` sets have them too and yield ``(image, label)``). Bad input of any kind raises
:class:`DataError` with a message that says what is wrong.

Example::

    from deitlab.data import build_dataset
    train = build_dataset('glyphs', 'train', aug='light')
    val = build_dataset('glyphs', 'val')
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

from torch.utils.data import Dataset

from . import fashion_mnist, folder, glyphs, glyphs_fine, glyphs_reid
from .base import DataError, DatasetInfo, ReidImageDataset, TensorImageDataset, check_split
from .transforms import (AUGS, build_pil_transform, build_tensor_transform, channel_stats, check_aug,
                         convert_channels, resize_images)

__all__ = ['build_dataset', 'dataset_info', 'parse_spec', 'parse_glyph_options', 'parse_options', 'DataError',
           'DatasetInfo', 'ReidImageDataset', 'DATASETS', 'AUGS', 'GLYPH_DEFAULTS', 'SPLITS']

DATASETS = ('glyphs', 'fashion-mnist', 'folder', 'glyphs-fine', 'glyphs-reid')
GLYPH_DEFAULTS: Dict[str, Union[int, str]] = {'train': 12000, 'val': 2400, 'size': 32, 'seed': 0,
                                              'fonts': 'bundled'}
_DEFAULT_HFLIP = {'glyphs': 0.0, 'glyphs-fine': 0.0, 'glyphs-reid': 0.0, 'fashion-mnist': 0.5, 'folder': 0.5}
SPLITS = {name: ('train', 'val') for name in DATASETS}
SPLITS['glyphs-reid'] = glyphs_reid.REID_SPLITS
# the KEY=VALUE datasets: defaults and the minimum of each integer option
_OPTIONS = {
    'glyphs': (GLYPH_DEFAULTS, {'train': 1, 'val': 1, 'size': 8}),
    'glyphs-fine': (glyphs_fine.FINE_DEFAULTS, glyphs_fine.FINE_MINIMUM),
    'glyphs-reid': (glyphs_reid.REID_DEFAULTS, glyphs_reid.REID_MINIMUM),
}
_GRAMMAR = 'glyphs[:k=v,...] | glyphs-fine[:k=v,...] | glyphs-reid[:k=v,...] | fashion-mnist[:PATH] | folder:PATH'


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    """Split ``'NAME[:ARG]'`` into ``(NAME, ARG or None)`` and check that NAME is known."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f'empty dataset spec {spec!r}; known datasets: {", ".join(DATASETS)}')
    name, sep, arg = spec.strip().partition(':')
    name = name.strip().lower()
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r} in spec {spec!r}; known datasets: {", ".join(DATASETS)} '
                        f'(spec grammar: {_GRAMMAR})')
    return name, (arg if sep and arg else None)


def parse_options(name: str, arg: Optional[str]) -> Dict[str, Union[int, str]]:
    """Parse the ``KEY=VALUE,...`` options of dataset ``name`` (``glyphs``, ``glyphs-fine``,
    ``glyphs-reid``); only the keys given are returned. Each key is checked alone (known, an integer
    at or above its minimum, ``fonts`` bundled or system); the dataset checks them together."""
    defaults, minimum = _OPTIONS[name]
    out: Dict[str, Union[int, str]] = {}
    for item in (arg or '').split(','):
        if not item.strip():
            continue
        key, eq, value = (s.strip() for s in item.partition('='))
        if key not in defaults or not eq:
            raise DataError(f'{name}: bad option {item.strip()!r}; expected KEY=VALUE with KEY in '
                            f'{", ".join(defaults)}')
        if key == 'fonts':
            if value not in ('bundled', 'system'):
                raise DataError(f"{name}: fonts must be 'bundled' or 'system', got {value!r}")
            out[key] = value
            continue
        try:
            out[key] = int(value)
        except ValueError:
            raise DataError(f'{name}: option {key} needs an integer, got {value!r}') from None
        low = minimum.get(key)
        if low is not None and out[key] < low:
            raise DataError(f'{name}: option {key} must be >= {low}, got {out[key]}')
    return out


def parse_glyph_options(arg: Optional[str]) -> Dict[str, Union[int, str]]:
    """Parse ``'train=12000,val=2400,size=32,seed=0,fonts=bundled'``; only the keys given are returned."""
    return parse_options('glyphs', arg)


def _options(name: str, arg: Optional[str], seed: int = 0) -> Dict[str, Union[int, str]]:
    """All options of a KEY=VALUE dataset (``seed`` when the spec has none), checked together."""
    opts = {**_OPTIONS[name][0], 'seed': seed, **parse_options(name, arg)}
    if name == 'glyphs-fine':
        glyphs_fine.check_fine_options(opts)
    elif name == 'glyphs-reid':
        glyphs_reid.check_reid_options(opts)
    return opts


def dataset_info(spec: str) -> DatasetInfo:
    """Name, classes, declared and native size and channels of a spec, without loading images.

    ``glyphs``, ``glyphs-reid`` and ``fashion-mnist`` declare their size and touch no files;
    ``glyphs-fine`` reads the fonts (cached) for its class names. ``folder:PATH`` declares none
    (``img_size=None``): it lists ``PATH/train`` for its classes and reads a few image headers for
    ``native_size`` (see :func:`.folder.native_size`). ``glyphs-reid``'s classes are the training
    writers (``ids`` of them).
    """
    name, arg = parse_spec(spec)
    if name in _OPTIONS:
        opts = _options(name, arg)
        if name == 'glyphs':
            classes = glyphs.GLYPH_CLASSES
        elif name == 'glyphs-fine':
            classes = glyphs_fine.fine_classes(int(opts['letters']), str(opts['fonts']))
        else:
            classes = tuple(map(glyphs_reid.writer_name, range(int(opts['ids']))))
        size, chans = int(opts['size']), 3
    elif name == 'fashion-mnist':
        classes, size, chans = fashion_mnist.CLASSES, 28, 1
    else:
        if arg is None:
            raise DataError("folder needs a path: 'folder:PATH' with PATH/train/<class>/ and PATH/val/<class>/")
        classes, size, chans = tuple(folder.find_classes(arg)), None, 3
    native = (size, size) if size else folder.native_size(arg)
    return DatasetInfo(name=name, spec=spec, num_classes=len(classes), classes=tuple(classes),
                       img_size=size, in_chans=chans, default_hflip=_default_hflip(name, arg), native_size=native)


def _default_hflip(name: str, arg: Optional[str]) -> float:
    """The flip probability of a dataset when none is asked for; a folder tree may declare its own."""
    if name == 'folder' and arg is not None:
        return folder.declared(arg).get('hflip', _DEFAULT_HFLIP[name])
    return _DEFAULT_HFLIP[name]


def build_dataset(spec: str, split: str, *, img_size: Optional[int] = None, in_chans: int = 3,
                  aug: str = 'none', mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.5, 0.5, 0.5), hflip: Optional[float] = None, seed: int = 0,
                  download: bool = False) -> Dataset:
    """Build one split of a dataset spec.

    Args:
        spec: ``NAME[:ARG]``, see the module docstring.
        split: ``'train'`` or ``'val'``; for ``glyphs-reid`` also ``'query'`` or ``'gallery'``.
        img_size: Output side; None = the dataset's declared size (224 for ``folder``, which declares none).
        in_chans: 1 or 3; grayscale data is replicated to 3, colour data reduced to luminance for 1.
        aug: ``'none'`` (resize + normalise), ``'light'`` (random crop with 4 px zero padding at
            native scale, i.e. ``round(4 * img_size / native)`` px, 4 px per 32 px for ``folder``,
            + horizontal flip) or ``'deit'`` (timm's DeiT training transform).
        mean, std: Normalisation statistics; the first ``in_chans`` entries are used.
        hflip: Flip probability for ``'light'``/``'deit'``; None = the dataset's default (0.0 for
            the glyphs datasets, whose mirror images are not letters; a folder tree's declared
            ``hflip``, see :func:`.folder.declared`; 0.5 otherwise).
        seed: Generation seed of synthetic data (the glyphs datasets) when the spec has no ``seed=``;
            real datasets ignore it. Augmentation randomness comes from torch's RNG.
        download: ``fashion-mnist`` only: download with torchvision if no local copy is found.

    Returns:
        A map-style dataset with ``.classes``, ``.num_classes`` and ``.targets``; for ``glyphs-reid``
        a :class:`ReidImageDataset` (also ``.identities`` and ``.views``; ``query`` and ``gallery``
        items are ``(image, identity, view)``).

    Raises:
        DataError: for an unknown spec, split or aug, bad options, or missing/corrupt data.
    """
    name, arg = parse_spec(spec)
    check_split(split, SPLITS[name])
    check_aug(aug)
    if in_chans not in (1, 3):
        raise DataError(f'in_chans must be 1 or 3, got {in_chans!r}')
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise DataError(f'img_size must be a positive int or None, got {img_size!r}')
    mean, std = channel_stats(mean, std, in_chans)
    hflip = _default_hflip(name, arg) if hflip is None else float(hflip)
    if not 0.0 <= hflip <= 1.0:
        raise DataError(f'hflip must be a probability in [0, 1], got {hflip}')
    common = dict(in_chans=in_chans, mean=mean, std=std, hflip=hflip)

    if name == 'folder':
        if arg is None:
            raise DataError("folder needs a path: 'folder:PATH' with PATH/train/<class>/ and PATH/val/<class>/")
        size = img_size or folder.DEFAULT_IMG_SIZE
        ds = folder.FolderDataset(arg, split, in_chans, build_pil_transform(aug, img_size=size, **common))
    else:
        reid = None
        if name == 'glyphs':
            opts = _options(name, arg, seed)
            images, targets = glyphs.cached_glyphs(int(opts[split]), int(opts['size']), int(opts['seed']),
                                                   split, str(opts['fonts']))
            classes = glyphs.GLYPH_CLASSES
        elif name == 'glyphs-fine':
            opts = _options(name, arg, seed)
            classes = glyphs_fine.fine_classes(int(opts['letters']), str(opts['fonts']))
            images, targets = glyphs_fine.cached_fine_glyphs(int(opts[split]), int(opts['size']), int(opts['seed']),
                                                             split, int(opts['letters']), str(opts['fonts']))
        elif name == 'glyphs-reid':
            images, targets, classes, *reid = glyphs_reid.reid_split(split, _options(name, arg, seed))
        else:
            images, targets = fashion_mnist.load_split(split, arg, download)
            classes = fashion_mnist.CLASSES
        native = images.shape[-1]
        size = img_size or native
        if in_chans == 1:
            images = convert_channels(images, 1)
        if size != native and aug != 'deit':  # resize once rather than per item, if it fits in memory
            resized = resize_images(images, size)
            images = images if resized is None else resized
        tf = build_tensor_transform(aug, img_size=size, native_size=native, **common)
        if reid is None:
            ds = TensorImageDataset(convert_channels(images, in_chans), targets, classes, tf)
        else:
            ds = ReidImageDataset(convert_channels(images, in_chans), targets, classes, tf, *reid,
                                  with_views=split in ('query', 'gallery'))
    ds.spec = spec
    return ds
