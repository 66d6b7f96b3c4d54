"""Capture the class token's attention during a forward, without changing the forward.

The last block's class-token row over the keys, averaged over heads (TransMix, Chen et al. 2022;
MixPro, Zhao et al. 2023, use it to weigh a mixed image's labels; attention rollout, as DCAL uses
it, multiplies such maps over blocks)::

    a = mean_heads softmax(scale q_cls K^T)[num_prefix_tokens:]     (B, N), detached,

i.e. the class-token row over all keys restricted to the patch columns, not renormalised.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn

from .attention import attention_logits, project, self_attention_types

__all__ = ['CapturedAttention', 'cls_attention_row', 'find_cls_attention', 'capture_cls_attention']


class CapturedAttention:
    """Holder filled by :func:`capture_cls_attention`: ``attn`` (B, N) from the last forward."""

    def __init__(self, num_prefix_tokens: int):
        self.num_prefix_tokens = num_prefix_tokens
        self.attn: Optional[torch.Tensor] = None


def cls_attention_row(attn_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(scale q_cls k^T)`` (B, heads, T) in float32, recomputed from the module's input."""
    q, k, _ = project(attn_module, x)
    return attention_logits(attn_module, q[:, :, :1], k).float().softmax(dim=-1)[:, :, 0]


def find_cls_attention(model: nn.Module) -> Tuple[nn.Module, int]:
    """The last block's self-attention module and the number of prefix tokens, or a ValueError that
    says why the model has no class-token attention (no class token, no blocks, or a last block
    that is not timm ``Attention`` / deitlab ``WidthAttention``, e.g. PoolFormer or SpectFormer)."""
    name = type(model).__name__
    if getattr(model, 'cls_token', None) is None:
        raise ValueError(f'{name} has no class-token attention: it has no class token')
    blocks = getattr(model, 'blocks', None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f'{name} has no class-token attention: no transformer blocks found')
    last = blocks[-1]
    attn_module = getattr(last, 'attn', None)
    if not isinstance(attn_module, self_attention_types()):
        raise ValueError(f'{name} has no class-token attention in its last block: {type(last).__name__} is not a '
                         f'self-attention block (needs timm Attention or deitlab WidthAttention)')
    return attn_module, int(getattr(model, 'num_prefix_tokens', 1))


@contextmanager
def capture_cls_attention(model: nn.Module) -> Iterator[CapturedAttention]:
    """Record the last block's class-token attention to the patch tokens during ``model(x)``.

    Works for timm ``VisionTransformer`` models (and deitlab's DeiT / distilled DeiT) whose last
    block's ``attn`` is timm's ``Attention`` or deitlab's ``WidthAttention``. A forward pre-hook
    on that module recomputes q and k from its input (qkv Linear, q_norm/k_norm) and stores the
    map of the module docstring. The model's output is unchanged. ``model`` is the bare module
    (under DDP, the wrapped ``.module``: the hook then fires inside the DDP forward). Usage::

        with capture_cls_attention(model) as cap:
            logits = model(x)
        attn = cap.attn
    """
    attn_module, prefix = find_cls_attention(model)
    cap = CapturedAttention(prefix)

    def hook(module, args):
        with torch.no_grad():
            cap.attn = cls_attention_row(module, args[0].detach())[..., prefix:].mean(dim=1)

    handle = attn_module.register_forward_pre_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()
