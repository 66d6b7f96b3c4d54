"""Helpers shared by the counters and the timers: where a model lives, what input it takes, and
context managers that change a model's state for one measurement and always put it back."""
from __future__ import annotations

import contextlib
import os
import platform
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from ..models.inputs import InputSize, resolve_input_size  # noqa: F401  (re-exported: deitlab.bench's API)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device('cpu')


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter; float32 when it has none."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def fused_attn_state(model: nn.Module) -> Union[bool, str, None]:
    """True / False when every module with a ``fused_attn`` flag agrees, 'mixed' when they do
    not, None when the model has no such module."""
    flags = {bool(m.fused_attn) for m in model.modules() if hasattr(m, 'fused_attn')}
    if not flags:
        return None
    return flags.pop() if len(flags) == 1 else 'mixed'


@contextlib.contextmanager
def fused_attention(model: nn.Module, enable: Optional[bool]) -> Iterator[nn.Module]:
    """Set ``fused_attn = enable`` on every submodule that has the attribute, and restore each
    module's previous value on exit (also after an exception). ``enable=None`` changes nothing."""
    saved = []
    if enable is not None:
        for m in model.modules():
            if hasattr(m, 'fused_attn'):
                saved.append((m, m.fused_attn))
    try:
        for m, _ in saved:
            m.fused_attn = bool(enable)
        yield model
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode and restore every submodule's own ``training`` flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def num_threads(n: Optional[int]) -> Iterator[int]:
    """Use ``n`` intra-op CPU threads for the duration (None keeps the current setting)."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(int(n))
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass  # no /proc/cpuinfo (not Linux): fall back to platform below
    return platform.processor() or platform.machine() or device.type


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): timings taken while other
    processes compete for the cores are slower and noisier, and this records it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock reading covers the work (CUDA only)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def random_input(input_size: InputSize, batch_size: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal batch (drawn on the CPU, then moved)."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_size), generator=gen, dtype=torch.float32)
    x = x.to(device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
