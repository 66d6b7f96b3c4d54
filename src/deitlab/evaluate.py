"""Accuracy of a model: :func:`evaluate` over a loader (training, pruning and token fusion report
with it) and ``deitlab eval`` (:func:`evaluate_model`: a model name or run directory on a split)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
from timm.utils import accuracy

from .console import progress as _progress
from .data.for_model import eval_loader, model_datasets, model_input
from .distributed import all_reduce_sum, resolve_device
from .rundir import create

__all__ = ['evaluate', 'evaluate_model']


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False,
             progress: Optional[bool] = None, is_main: bool = True, max_batches: Optional[int] = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over a loader (summed over processes), or over
    its first ``max_batches`` batches. A model whose ``output_is_probability`` is true (DCAL's
    softmax(SA) + softmax(GLCA)) outputs sums of class distributions: its loss is the negative
    log-likelihood of their normalised sum."""
    was_training = model.training
    model.eval()
    probabilities = bool(getattr(model, 'output_is_probability', False))
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss, count
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if amp and device.type == 'cuda' \
        else contextlib.nullcontext()
    for i, (x, y) in enumerate(_progress(progress, is_main, iterable=loader, desc='eval', leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        top1, top5 = accuracy(out, y, topk=(1, k))
        n = y.shape[0]
        if probabilities:   # a sum of class distributions (DCAL's SA + GLCA): the NLL of their mean
            loss = nn.functional.nll_loss((out / out.sum(1, keepdim=True)).clamp_min(1e-12).log(), y, reduction='sum')
        else:
            loss = nn.functional.cross_entropy(out, y, reduction='sum')
        sums += torch.tensor([top1.item() * n / 100, top5.item() * n / 100, loss.item(), n], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(device)).cpu()
    model.train(was_training)
    n = max(sums[3].item(), 1)
    return dict(top1=100 * sums[0].item() / n, top5=100 * sums[1].item() / n, loss=sums[2].item() / n,
                count=int(sums[3].item()))


def _short(names) -> str:
    names = [str(n) for n in names]
    return '[' + ', '.join(names[:6]) + (f', ... ({len(names)} in all)' if len(names) > 6 else '') + ']'


def _check_label_names(model: nn.Module, ds, model_spec: str, data: str) -> None:
    """Refuse data whose class names differ from the names the model was trained with (saved as
    ``label_names`` in its run directory): the accuracy would compare unrelated indices."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    classes = getattr(ds, 'classes', None)
    if not names or not classes or [str(n) for n in names] == [str(c) for c in classes]:
        return
    from .train.config import ConfigError
    how = 'the same names in another order' if sorted(map(str, names)) == sorted(map(str, classes)) else 'other names'
    raise ConfigError(f'{model_spec} was trained on the classes {_short(names)} but {data} has {_short(classes)} '
                      f'({how}): its accuracy there would compare unrelated class indices')


def evaluate_model(model_spec: str, data: str, split: str = 'val', batch_size: int = 256,
                   device: Optional[str] = None, workers: int = 0, progress: Optional[bool] = None) -> dict:
    """Accuracy of ``model_spec`` on ``data``; the data is shaped to the model's input (its size wins;
    other images are resized and the log says so)."""
    model = create(model_spec)
    dev = resolve_device(device)
    model.to(dev).eval()
    ds, = model_datasets(model, data, (split,))
    if getattr(model, 'num_classes', ds.num_classes) != ds.num_classes:
        from .train.config import ConfigError
        raise ConfigError(f'{model_spec} predicts {model.num_classes} classes but {data} has {ds.num_classes}')
    _check_label_names(model, ds, model_spec, data)
    loader = eval_loader(ds, batch_size, workers=workers)
    res = evaluate(model, loader, dev, amp=dev.type == 'cuda', progress=progress)
    chans, size = model_input(model)
    return dict(model=str(model_spec), data=data, split=split, input=[chans, size, size], **res)
