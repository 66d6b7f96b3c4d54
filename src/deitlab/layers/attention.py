"""Multi-head attention with per-block widths, and the pieces every family builds on.

Scaled dot-product attention (Vaswani et al., 2017), per head::

    A = softmax(scale * Q K^T + bias),    out = proj(concat_h(A V))

``WidthAttention`` lets the query/key head width ``qk_dim`` differ from the value head width
``v_dim`` and lets every block have its own ``num_heads`` (NViT's pruned models). The functions
below take an attention module (``WidthAttention`` or timm's ``Attention``, whose q/k norms and
gate they honour) and split its forward into steps, so that methods can step in between without a
copy of the q/k/v projection and the softmax:

* ``project``         ``h -> (q, k, v)``, or only q/k, k/v or v (the rows of ``qkv`` needed),
* ``project_cross``   q from one token set, k/v from another (STViT's refinement, DCAL),
* ``attention_probs`` ``softmax(scale q k^T + bias)``, the map token fusion and capture read,
* ``attend``          the context ``A V`` (fused SDPA when the module uses it),
* ``attention_output`` heads concatenated, optional norm and gate, ``proj``.

``WidthAttention.forward`` is ``attention_output(attend(project(x)))``; ``cross_attention`` is the
same with ``project_cross``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import use_fused_attn

__all__ = ['fused_attention', 'WidthAttention', 'head_dims', 'self_attention_types', 'project', 'project_cross', 'attention_logits',
           'attention_probs', 'attend', 'attention_output', 'cross_attention']


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    dropout_p: float = 0., scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(scale q k^T + mask) v`` by fused SDPA, also when q/k and v head widths differ.

    SDPA's fast kernels need one head width for q, k and v (on the CPU a mismatch falls back to a
    path ~3x slower). Zero-padding q and k, or v, is exact: q.k and the kept output columns do
    not change.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if dq < dv:
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    elif dv < dq:
        v = F.pad(v, (0, dq - dv))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return x[..., :dv] if dv < dq else x


def head_dims(attn: nn.Module) -> Tuple[int, int, int]:
    """``(num_heads, qk_dim, v_dim)`` of a ``WidthAttention`` or a timm ``Attention``."""
    if isinstance(attn, WidthAttention):
        return attn.num_heads, attn.qk_dim, attn.v_dim
    return attn.num_heads, attn.head_dim, attn.head_dim


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.reshape(B, N, H, -1).transpose(1, 2)


def _qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
    q_norm, k_norm = getattr(attn, 'q_norm', None), getattr(attn, 'k_norm', None)
    return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k))


def _rows(attn: nn.Module, h: torch.Tensor, start: int, stop: Optional[int] = None) -> torch.Tensor:
    """``h`` through rows ``start:stop`` of ``attn.qkv`` only."""
    W, b = attn.qkv.weight, attn.qkv.bias
    return F.linear(h, W[start:stop], None if b is None else b[start:stop])


def project(attn: nn.Module, h: torch.Tensor, parts: str = 'qkv'):
    """Per-head projections of tokens ``h`` (B, N, D): 'qkv' -> (q, k, v), 'qk' -> (q, k), 'kv' -> (k, v)
    (DCAL's pair-wise keys), 'v' -> v, each (B, H, N, width); only the rows of ``attn.qkv`` that are
    needed are multiplied. The qkv
    rows are ``[Q (H x qk_dim), K (H x qk_dim), V (H x v_dim)]``, each head contiguous."""
    H, dq, dv = head_dims(attn)
    if parts == 'qkv':
        q, k, v = (_heads(t, H) for t in attn.qkv(h).split([H * dq, H * dq, H * dv], dim=-1))
        return (*_qk_norm(attn, q, k), v)
    if parts == 'qk':
        q, k = (_heads(t, H) for t in _rows(attn, h, 0, 2 * H * dq).split(H * dq, dim=-1))
        return _qk_norm(attn, q, k)
    if parts == 'v':
        return _heads(_rows(attn, h, 2 * H * dq), H)
    if parts == 'kv':
        k, v = (_heads(t, H) for t in _rows(attn, h, H * dq).split([H * dq, H * dv], dim=-1))
        k_norm = getattr(attn, 'k_norm', None)
        return (k if k_norm is None else k_norm(k)), v
    raise ValueError(f"parts must be 'qkv', 'qk', 'kv' or 'v', got {parts!r}")


def project_cross(attn: nn.Module, q_in: torch.Tensor, kv_in: torch.Tensor):
    """q (B, H, Nq, qk_dim) from ``q_in`` and k, v (B, H, Nk, .) from ``kv_in``, with the rows of
    the module's own ``qkv`` layer, so a self-attention block's weights serve as cross-attention."""
    H, dq, dv = head_dims(attn)
    q = _heads(_rows(attn, q_in, 0, H * dq), H)
    k, v = (_heads(t, H) for t in _rows(attn, kv_in, H * dq).split([H * dq, H * dv], dim=-1))
    return (*_qk_norm(attn, q, k), v)


def attention_logits(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``scale q k^T`` (B, H, Nq, Nk)."""
    return (q * attn.scale) @ k.transpose(-2, -1)


def attention_probs(attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(scale q k^T + bias)`` (B, H, Nq, Nk), before attention dropout."""
    logits = attention_logits(attn, q, k)
    return (logits if bias is None else logits + bias.to(logits.dtype)).softmax(dim=-1)


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention context (B, H, Nq, dv): fused SDPA when the module uses it, else explicit; the
    module's attention dropout applies in training."""
    if attn.fused_attn:
        if bias is not None:
            bias = bias.to(q.dtype)
        return fused_attention(q, k, v, bias, attn.attn_drop.p if attn.training else 0., attn.scale)
    return attn.attn_drop(attention_probs(attn, q, k, bias)) @ v


def attention_output(attn: nn.Module, ctx: torch.Tensor, h: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The module's output from its context (B, H, N, dv): heads concatenated, the module's norm and
    gate if it has them (the gate reads the module's input ``h``), then ``proj`` and dropout."""
    B, H, N, dv = ctx.shape
    x = ctx.transpose(1, 2).reshape(B, N, H * dv)
    norm = getattr(attn, 'norm', None)
    if norm is not None:
        x = norm(x)
    gate = getattr(attn, 'gate', None)
    if gate is not None:
        x = x * gate(h).sigmoid()
    return attn.proj_drop(attn.proj(x))


def cross_attention(attn: nn.Module, q_in: torch.Tensor, kv_in: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``proj(softmax(scale Q K^T + bias) V)`` with Q from ``q_in`` and K, V from ``kv_in``."""
    return attention_output(attn, attend(attn, *project_cross(attn, q_in, kv_in), bias), q_in)


class WidthAttention(nn.Module):
    """Multi-head self-attention whose query/key and value head widths may differ.

    ``qkv`` is one linear layer whose output rows are ``[Q (heads x qk_dim), K (heads x qk_dim),
    V (heads x v_dim)]``, each head contiguous, which is timm's layout when ``qk_dim == v_dim``.
    ``Attention(Q, K, V) = softmax(scale * Q K^T) V`` per head, then ``proj``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qk_dim: int,
            v_dim: int,
            qkv_bias: bool = True,
            scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if num_heads < 1 or qk_dim < 1 or v_dim < 1:
            raise ValueError(f'attention needs at least one head and one channel per head, '
                             f'got heads={num_heads} qk_dim={qk_dim} v_dim={v_dim}')
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.scale = float(scale) if scale is not None else qk_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_qkv(self, x: torch.Tensor):
        """Return q, k (B, H, N, qk_dim) and v (B, H, N, v_dim) for tokens x (B, N, C)."""
        return project(self, x)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention map (B, H, N, N) this layer computes for tokens x."""
        q, k, _ = project(self, x)
        return attention_probs(self, q, k)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention_output(self, attend(self, *project(self, x), attn_mask), x)


def self_attention_types() -> tuple:
    """The attention modules the step functions here (and class-token capture, rollout) take: timm's
    ``Attention`` and deitlab's ``WidthAttention``."""
    from timm.models.vision_transformer import Attention
    return Attention, WidthAttention
