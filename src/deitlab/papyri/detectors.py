"""The permissive glyph detectors: torchvision's FCOS and RetinaNet (BSD-3) on a small ResNet-18
FPN, built from scratch, sized for letters of a few dozen pixels. The targets of
:data:`deitlab.registry.DETECTORS` (``fcos-r18``, ``retinanet-r18``).

Turnbull & Mannix (IJDAR 2024) detect the letters of the ICDAR 2023 papyri competition with YOLOv8
(AGPL-3.0, the optional ``yolo`` extra here); these are the permissive stand-ins. Nothing is ever
downloaded: the backbone is torchvision's ResNet-18 with ``weights=None``, trained from scratch with
ordinary (trainable) BatchNorm, since torchvision's detection backbones default to frozen
BatchNorm, which without pretrained statistics is the identity.

**Why these sizes.** A glyph is about 10-30 px on a synthetic page (and some tens of pixels on the
competition's scans), tiny next to the objects of COCO that the detectors' defaults are made for
(FPN levels P3-P7, strides 8-128, anchors 32-512 px).

* The FPN is built on ResNet-18's ``layer1``-``layer3`` (strides 4, 8, 16) plus a max-pooled level
  (stride 32); ``layer4`` is not built. A stride-4 level (P2) puts several locations on every
  glyph, so neighbouring glyphs in *scriptio continua* get locations of their own, and the
  receptive field of ``layer3`` (a few hundred pixels) sees a glyph with its neighbours.
* FCOS (Tian, Shen, Chen, He, "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019)
  assigns a ground-truth box to the level whose range holds the largest distance from a location
  to the box's sides: ``(4 s, 8 s]`` for a level of anchor size ``s``, the first level from 0 and
  the last without bound. With each level's anchor size equal to its stride (4, 8, 16, 32), glyphs
  up to about 32 px train on P2 (with centre sampling, a 3 x 3 neighbourhood of locations each),
  larger ones on P3-P5.
* RetinaNet (Lin, Goyal, Girshick, He, Dollar, "Focal Loss for Dense Object Detection", ICCV 2017)
  matches anchors by IoU, so its anchors must be glyph-sized: per level three scales of 4 x the
  stride (16-25 px on P2, 32-50 px on P3, ...) and aspect ratios 1:2, 1:1, 2:1 (an iota is tall, a
  phi wide).
* The FPN is 64 channels wide and the FCOS head has 2 convolutions per branch (COCO's 256 and 4):
  24 letters on a plain background need far less than 80 classes of natural images, and it makes a
  training step on a 128 px crop a fraction of a second on one CPU core.

Both classify with a sigmoid per letter (focal loss), so the labels are 0..23 as they are, with
no background class. Inputs are RGB in [0, 1], normalised inside the model by ``image_mean`` /
``image_std``. With ``min_size`` / ``max_size`` unset (the default), torchvision's input transform
does not rescale: a tile is seen at the page's own scale, the scale the detector was trained at
(torchvision's default would scale a 128 px tile to 800 px). Set both to have torchvision's rule
(the shorter side to ``min_size``, the longer at most ``max_size``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .alphabet import NUM_CLASSES

__all__ = ['IMAGE_MEAN', 'IMAGE_STD', 'KeepScale', 'resnet18_fpn', 'build_fcos', 'build_retinanet']

#: The input normalisation (RGB in [0, 1]): a light page around mid-grey, ink and mount far below.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


class KeepScale(GeneralizedRCNNTransform):
    """torchvision's detection input transform (normalise, pad to a multiple of 32, batch) without
    its resize: images keep their scale, so boxes come back in the input's pixels unchanged."""

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float]):
        super().__init__(min_size=1, max_size=1, image_mean=list(image_mean), image_std=list(image_std))

    def resize(self, image, target=None):
        return image, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mean={self.image_mean}, std={self.image_std}, no resize)'


def resnet18_fpn(levels: Sequence[int] = (1, 2, 3), channels: int = 64) -> BackboneWithFPN:
    """ResNet-18 (random weights, trainable BatchNorm) up to ``layer{max(levels)}``, with an FPN of
    ``channels`` on ``layer{k}`` for ``k`` in ``levels`` (stride ``2 ** (k + 1)``) and a max-pooled
    level on top."""
    levels = sorted(int(k) for k in levels)
    if not levels or levels[0] < 1 or levels[-1] > 4:
        raise ValueError(f'levels must be among 1..4 (ResNet layers), got {levels}')
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(body, {f'layer{k}': str(i) for i, k in enumerate(levels)},
                           [64 * 2 ** (k - 1) for k in levels], channels, extra_blocks=LastLevelMaxPool())


def _strides(levels: Sequence[int]) -> list:
    strides = [2 ** (int(k) + 1) for k in sorted(levels)]
    return strides + [2 * strides[-1]]   # the max-pooled level


def _scale_args(min_size: Optional[int], max_size: Optional[int]) -> dict:
    if (min_size is None) != (max_size is None):
        raise ValueError('min_size and max_size go together (both, or neither for no rescaling)')
    return {} if min_size is None else dict(min_size=min_size, max_size=max_size)


def _finish(model: nn.Module, min_size: Optional[int], image_mean, image_std, args: dict) -> nn.Module:
    if min_size is None:
        model.transform = KeepScale(image_mean, image_std)
    # what rebuilds it (the run directory's config.json), as JSON has it
    model.detector_args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    return model


def build_fcos(num_classes: int = NUM_CLASSES, levels: Sequence[int] = (1, 2, 3), fpn_channels: int = 64,
               head_convs: int = 2, min_size: Optional[int] = None, max_size: Optional[int] = None,
               score_thresh: float = 0.05, nms_thresh: float = 0.6, detections: int = 3000,
               candidates: int = 5000, center_sampling_radius: float = 1.5,
               image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD) -> FCOS:
    """FCOS on :func:`resnet18_fpn` (the module's docstring says why these sizes). ``detections``:
    boxes kept per image after NMS; ``candidates``: best-scoring locations per level before NMS
    (both far above torchvision's 100 and 1000: a page holds hundreds of glyphs)."""
    args = dict(locals())
    strides = _strides(levels)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    model = FCOS(resnet18_fpn(levels, fpn_channels), num_classes, anchor_generator=anchors, head=head,
                 image_mean=list(image_mean), image_std=list(image_std), score_thresh=score_thresh,
                 nms_thresh=nms_thresh, detections_per_img=detections, topk_candidates=candidates,
                 center_sampling_radius=center_sampling_radius, **_scale_args(min_size, max_size))
    return _finish(model, min_size, image_mean, image_std, args)


def build_retinanet(num_classes: int = NUM_CLASSES, levels: Sequence[int] = (1, 2, 3), fpn_channels: int = 64,
                    anchor_scale: float = 4.0, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                    min_size: Optional[int] = None, max_size: Optional[int] = None, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections: int = 3000, candidates: int = 5000,
                    image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD) -> RetinaNet:
    """RetinaNet on :func:`resnet18_fpn` with anchors of ``anchor_scale`` x the stride at three
    octave scales (1, 2^(1/3), 2^(2/3)) and ``aspect_ratios`` (height / width) per level."""
    args = dict(locals())
    strides = _strides(levels)
    sizes = tuple(tuple(int(round(anchor_scale * s * 2 ** (k / 3))) for k in range(3)) for s in strides)
    anchors = AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(strides))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
    model = RetinaNet(resnet18_fpn(levels, fpn_channels), num_classes, anchor_generator=anchors, head=head,
                      image_mean=list(image_mean), image_std=list(image_std), score_thresh=score_thresh,
                      nms_thresh=nms_thresh, detections_per_img=detections, topk_candidates=candidates,
                      **_scale_args(min_size, max_size))
    return _finish(model, min_size, image_mean, image_std, args)
