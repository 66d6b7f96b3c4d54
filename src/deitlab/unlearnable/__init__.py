"""CUDA unlearnable data (Sadasivan et al., CVPR 2023) and the training-time defences against it.

* ``cuda.py``: class-wise convolution filters from a private key, poisoned datasets and copies
  (``deitlab unlearnable make``);
* ``defences.py``: blur, noise and PGD adversarial training on a training batch
  (``deitlab train --defence``);
* ``protocol.py``: clean vs poisoned (+ defences) training, clean test accuracy
  (``deitlab unlearnable eval``).
"""
from .cuda import (MIN_KEY_LENGTH, PAPER, CUDATransform, PoisonedDataset, UnlearnableError, apply_filters,
                   class_filters, key_fingerprint, make_unlearnable, poison_mask)
from .defences import build_defence, parse_defence
from .protocol import evaluate_unlearnable

__all__ = ['UnlearnableError', 'MIN_KEY_LENGTH', 'key_fingerprint', 'class_filters', 'apply_filters', 'poison_mask',
           'CUDATransform', 'PoisonedDataset', 'make_unlearnable', 'PAPER', 'build_defence', 'parse_defence',
           'evaluate_unlearnable']
