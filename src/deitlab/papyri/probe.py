"""How good a representation of letter crops is: features of a frozen encoder and a linear probe.

SimCLR (Chen et al., ICML 2020, section 4) is judged by the **linear evaluation protocol**: the
encoder is frozen, and a linear classifier (multinomial logistic regression) trained on its features
of the labelled training images is scored on held-out images. Here:

* :func:`encode`: the pooled features ``h = f(x)`` of every crop of a dataset (a timm model's
  ``forward_head(forward_features(x), pre_logits=True)``: the input of its classifier, which for a
  SimCLR backbone without head is its output), the encoder in eval mode, no gradients;
* :func:`linear_probe`: features standardised with the training set's mean and deviation, then
  ``W, b`` minimising the mean cross entropy plus ``weight_decay * |W|^2`` by full-batch L-BFGS from
  zero (deterministic), scored as top-1 on the test features;
* :func:`probe_crops`: both for a model or run directory on a crops dataset (``deitlab papyri
  crops``), the crops fed at the model's input size and normalisation as ``deitlab train`` feeds them.

The features are also what a palaeographer would cluster hands or letter forms with.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['encode', 'linear_probe', 'probe_crops']


@torch.inference_mode()
def encode(model: nn.Module, dataset, batch_size: int = 256, device=None) -> Tuple[np.ndarray, np.ndarray]:
    """``(features (N, F), labels (N,))`` of every item of ``dataset`` through the frozen ``model``."""
    from ..data.for_model import eval_loader
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in eval_loader(dataset, batch_size):
            x = x.to(device)
            if hasattr(model, 'forward_head') and hasattr(model, 'forward_features'):
                h = model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                h = model(x)
            feats.append(h.flatten(1).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, weight_decay: float = 1e-3,
                 steps: int = 100) -> float:
    """Top-1 (%) on ``test_x`` of the logistic regression fitted on ``train_x`` (the module's docstring)."""
    xtr, xte = torch.as_tensor(train_x, dtype=torch.float64), torch.as_tensor(test_x, dtype=torch.float64)
    ytr, yte = torch.as_tensor(train_y, dtype=torch.long), torch.as_tensor(test_y, dtype=torch.long)
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-8)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    w = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float(((xte @ w + b).argmax(1) == yte).double().mean())


def probe_crops(model, crops: str, weight_decay: float = 1e-3, device=None, batch_size: int = 256,
                test_split: str = 'val') -> dict:
    """The linear probe of ``model`` (a module, or a model name or run directory for
    :func:`deitlab.rundir.create`) on the crops directory ``crops``: trained on its ``train`` split,
    scored on ``test_split``. Returns top-1 and the sizes."""
    from ..data.for_model import model_datasets
    from ..rundir import create
    if not isinstance(model, nn.Module):
        model = create(str(model))
    device = torch.device(device or 'cpu')
    model = model.to(device)
    train, test = model_datasets(model, f'folder:{crops}', splits=('train', test_split))
    xtr, ytr = encode(model, train, batch_size, device)
    xte, yte = encode(model, test, batch_size, device)
    top1 = linear_probe(xtr, ytr, xte, yte, train.num_classes, weight_decay)
    return {'top1': top1, 'train': len(ytr), 'test': len(yte), 'features': int(xtr.shape[1])}
