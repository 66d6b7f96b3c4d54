"""``deitlab eval``: top-1/top-5 of a model (name or run directory) on a dataset split."""
from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader

from .rundir import create
from .train.distributed import resolve_device
from .train.engine import evaluate, model_datasets, model_input


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
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    res = evaluate(model, loader, dev, amp=dev.type == 'cuda', progress=progress)
    chans, size = model_input(model)
    return dict(model=str(model_spec), data=data, split=split, input=[chans, size, size], **res)
