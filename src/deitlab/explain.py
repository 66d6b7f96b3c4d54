"""``deitlab explain``: where a ViT looks, by attention rollout (``layers/rollout.py``).

:func:`explain_image` reads one image, shapes it to the model's input (channels, a bilinear resize
to its square input size, its normalisation), rolls the attention out over the blocks and writes a
PNG of three panels: the image, the class token's rollout over the patch grid (bilinearly
upsampled to the image), and the two overlaid, titled with the predicted class (a label name
from the run directory when it has them) and its probability.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.for_model import model_input, norm_stats
from .distributed import resolve_device
from .layers.rollout import (HEAD_FUSIONS, check_start_layer, cls_row, record_attention_maps, rollout_maps,
                             self_attention_modules)
from .rundir import create

__all__ = ['ExplainError', 'explain_image', 'load_image', 'predicted_label']


class ExplainError(ValueError):
    """Bad input to ``deitlab explain``: the image, the model or the rollout options."""


def load_image(path: Union[str, Path], chans: int):
    """The image at ``path`` as a PIL image in ``chans`` channels ('L' for 1, 'RGB' for 3), or an
    ExplainError that says why it cannot be used."""
    from PIL import Image
    path = Path(path)
    if not path.exists():
        raise ExplainError(f'image file does not exist: {path}')
    if not path.is_file():
        raise ExplainError(f'{path} is not a file: give an image file (PNG, JPEG, ...)')
    if chans not in (1, 3):
        raise ExplainError(f'the model takes {chans}-channel input; explain reads 1- or 3-channel images')
    try:
        with Image.open(path) as img:
            return img.convert('L' if chans == 1 else 'RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ExplainError(f'cannot read {path} as an image: {e}') from None


def _model_tensor(img, model: nn.Module, chans: int, size: int) -> torch.Tensor:
    """(1, chans, size, size): resized (bilinear) and normalised as the model expects."""
    import numpy as np
    from PIL import Image
    small = img.resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32).copy()) / 255.
    x = x.unsqueeze(-1) if x.dim() == 2 else x
    mean, std = norm_stats(model, chans)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(2, 0, 1).unsqueeze(0)


def predicted_label(model: nn.Module, index: int):
    """The name of class ``index`` from the model's ``label_names`` (a run directory's), else the index."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    if names and len(names) == getattr(model, 'num_classes', len(names)) and 0 <= index < len(names):
        return str(names[index])
    return index


def _check_model(model: nn.Module, spec: str, start_layer: int) -> None:
    """The model has a class token and self-attention blocks, and ``start_layer`` is one of them."""
    try:
        depth = len(self_attention_modules(model))
        if getattr(model, 'cls_token', None) is None:
            raise ValueError(f'{type(model).__name__} has no class token: its rollout has no class-token row '
                             f'to show')
        check_start_layer(start_layer, depth)
    except ValueError as e:
        raise ExplainError(f'{spec}: {e}') from None


def _write_figure(img, heat: torch.Tensor, title: str, out: Path) -> None:
    """Image, heat-map and overlay side by side (matplotlib's Agg canvas; no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    pixels = np.asarray(img.convert('RGB'))
    fig = Figure(figsize=(10.5, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(pixels)
    axes[0].set_title('image')
    shown = axes[1].imshow(heat.numpy(), cmap='inferno', vmin=0., vmax=1.)
    axes[1].set_title('CLS rollout (min-max scaled)')
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(pixels)
    axes[2].imshow(heat.numpy(), cmap='inferno', vmin=0., vmax=1., alpha=0.55)
    axes[2].set_title('overlay')
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def explain_image(model_spec: str, image: Union[str, Path], out: Optional[Union[str, Path]] = None,
                  head_fusion: str = 'mean', start_layer: int = 0, device: Optional[str] = None) -> dict:
    """Attention rollout of ``model_spec`` (a run directory or a timm/deitlab name) on one image,
    written as a PNG (default ``<image stem>_rollout.png`` in the current directory).

    Returns ``{'out': path, 'pred': label name or class index, 'prob': its softmax probability,
    'grid': [h, w]}`` (the patch grid the map was computed on). ``device``: as ``deitlab eval``'s
    (unset: CUDA when available, else the CPU)."""
    if head_fusion not in HEAD_FUSIONS:
        raise ExplainError(f'head fusion must be one of {", ".join(HEAD_FUSIONS)}, got {head_fusion!r}')
    model = create(model_spec).eval().to(resolve_device(device))
    _check_model(model, model_spec, start_layer)
    chans, size = model_input(model)
    img = load_image(image, chans)
    x = _model_tensor(img, model, chans, size).to(next(model.parameters()).device)
    with record_attention_maps(model) as maps, torch.no_grad():
        logits = model(x)
    try:
        row = cls_row(rollout_maps(maps, head_fusion, start_layer), model)[0].cpu()
    except ValueError as e:
        raise ExplainError(f'{model_spec}: {e}') from None
    grid = tuple(int(v) for v in getattr(model.patch_embed, 'grid_size', ()))
    if len(grid) != 2 or grid[0] * grid[1] != row.numel():
        raise ExplainError(f'{model_spec}: {row.numel()} patch tokens do not form the patch grid {list(grid)}')
    probs = logits.float().softmax(dim=-1)[0]
    index = int(probs.argmax())
    pred, prob = predicted_label(model, index), float(probs[index])
    heat = row.reshape(1, 1, *grid)
    heat = F.interpolate(heat, size=(img.height, img.width), mode='bilinear', align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    out = Path(out) if out is not None else Path.cwd() / f'{Path(image).stem}_rollout.png'
    _write_figure(img, heat, f'predicted: {pred} ({prob:.1%})  ·  rollout: {head_fusion} over heads, blocks '
                             f'{start_layer}..{len(maps) - 1}', out)
    return {'out': str(out), 'pred': pred, 'prob': prob, 'grid': list(grid)}
