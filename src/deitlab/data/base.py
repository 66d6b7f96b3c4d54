"""Shared pieces of :mod:`deitlab.data`: the error type, dataset metadata and the in-memory dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ['DataError', 'DatasetInfo', 'TensorImageDataset', 'ReidImageDataset']


class DataError(ValueError):
    """Raised for every bad dataset input: unknown spec, missing or corrupt files, bad options."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset spec describes, known without loading the images.

    Attributes:
        name: Dataset name (``glyphs``, ``glyphs-fine``, ``glyphs-reid``, ``fashion-mnist``, ``folder``).
        spec: The spec string the info was made from.
        num_classes: Number of classes.
        classes: Class names, index ``i`` is label ``i``.
        img_size: The size the spec declares (glyphs' ``size=``, Fashion-MNIST's 28): ``deitlab train``
            builds a ``patchN`` model at it when N divides it, and it is the size used when
            ``img_size=None``. None for ``folder``: a user's images set no size for the model, they
            are resized to the model's input.
        in_chans: Native number of channels (1 for grayscale data, 3 for RGB).
        default_hflip: Horizontal-flip probability used by augmentation when ``hflip=None``.
        native_size: ``(height, width)`` of the stored images when they share one (``folder``: read
            from a few image headers), None when they differ.
    """

    name: str
    spec: str
    num_classes: int
    classes: Tuple[str, ...]
    img_size: Optional[int]
    in_chans: int
    default_hflip: float
    native_size: Optional[Tuple[int, int]] = None

    def resize_note(self, size: int) -> Optional[str]:
        """What happens to the images when they are fed at ``size`` px, or None when nothing does.

        E.g. ``"images are 28x28, resized to the model's 32x32"``.
        """
        if self.native_size == (size, size):
            return None
        if self.native_size is None:
            return f"images have several sizes, resized (shorter side) and centre-cropped to the model's {size}x{size}"
        h, w = self.native_size
        how = 'resized' if h == w else 'resized (shorter side) and centre-cropped'
        return f"images are {h}x{w}, {how} to the model's {size}x{size}"


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor ``(N, C, H, W)``, transformed per item.

    Args:
        images: uint8 tensor ``(N, C, H, W)`` (already in the requested number of channels).
        targets: Integer labels ``(N,)``.
        classes: Class names.
        transform: Callable mapping one uint8 ``(C, H, W)`` tensor to a float tensor.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 transform: Callable[[torch.Tensor], torch.Tensor]):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f'expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}')
        if len(images) != len(targets):
            raise DataError(f'{len(images)} images but {len(targets)} labels')
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f'{type(self).__name__}(n={n}, stored={c}x{h}x{w}, classes={self.num_classes})'



class ReidImageDataset(TensorImageDataset):
    """A :class:`TensorImageDataset` of a re-identification split, with each image's identity and view.

    Args:
        images, targets, classes, transform: As :class:`TensorImageDataset` (``targets`` index
            ``classes``, the identities of this split).
        identities: Identity of each image ``(N,)``, global over the splits (disjoint test identities
            have numbers of their own).
        views: View (camera) of each image ``(N,)``.
        with_views: Items are ``(image, identity, view)`` (query and gallery sets) instead of
            ``(image, label)`` (training and classification).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 transform: Callable[[torch.Tensor], torch.Tensor], identities: torch.Tensor, views: torch.Tensor,
                 with_views: bool):
        super().__init__(images, targets, classes, transform)
        self.identities = torch.as_tensor(identities, dtype=torch.long)
        self.views = torch.as_tensor(views, dtype=torch.long)
        if not len(self.identities) == len(self.views) == len(self.targets):
            raise DataError(f'{len(self.targets)} images but {len(self.identities)} identities and '
                            f'{len(self.views)} views')
        self.with_views = bool(with_views)

    def __getitem__(self, index: int):
        if self.with_views:
            return self.transform(self.images[index]), int(self.identities[index]), int(self.views[index])
        return super().__getitem__(index)


def check_split(split: str, allowed: Optional[Sequence[str]] = ('train', 'val')) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise :class:`DataError`."""
    if split not in allowed:
        raise DataError(f'unknown split {split!r}; allowed: {", ".join(map(repr, allowed))}')
    return split
