"""Pre-norm transformer blocks with per-block widths: self-attention and cross-attention.

``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))``, with the module names of timm's
``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2), so timm's ViT/DeiT weights
load unchanged. The MLP is timm's ``Mlp`` (fc1, act, fc2) with its own hidden width.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp
from timm.models.vision_transformer import init_weights_vit_timm

from .attention import WidthAttention, cross_attention

__all__ = ['WidthBlock', 'CrossBlock', 'block_macs']


def block_macs(N: int, D: int, H: int, dq: int, dv: int, M: int) -> dict:
    """MACs of one pre-norm block on N tokens of width D (heads H, query/key width dq and value
    width dv per head, MLP hidden width M), by part: qkv ``N D H (2 dq + dv)``, ``QK^T`` ``H N^2 dq``,
    ``AV`` ``H N^2 dv``, proj ``N H dv D``, MLP ``2 N D M`` (matmul convention: norms, softmax and
    adds are free)."""
    return dict(qkv=N * D * H * (2 * dq + dv), attn_qk=H * N * N * dq, attn_av=H * N * N * dv,
                proj=N * H * dv * D, mlp=2 * N * D * M)


class WidthBlock(nn.Module):
    """Pre-norm transformer block, ``x + ls1*attn(norm1(x))`` then ``x + ls2*mlp(norm2(x))``,
    with the names timm's ``Block`` uses (norm1, attn, ls1, drop_path1, norm2, mlp, ...)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qk_dim: int,
            v_dim: int,
            mlp_hidden: int,
            qkv_bias: bool = True,
            attn_scale: Optional[float] = None,
            init_values: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
    ):
        super().__init__()
        if mlp_hidden < 1:
            raise ValueError(f'the MLP needs at least one hidden unit, got {mlp_hidden}')
        self.norm1 = norm_layer(dim)
        self.attn = WidthAttention(dim, num_heads, qk_dim, v_dim, qkv_bias=qkv_bias, scale=attn_scale,
                                   attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden, act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class CrossBlock(WidthBlock):
    """A pre-norm block whose queries are ``x`` and whose keys/values are ``context``:
    ``x + Attn(LN(x), LN(context))``, then ``+ MLP(LN(.))``. Same parameters and names as
    ``WidthBlock``, so a DeiT block's weights load into it (STViT's refinement block; DCAL's
    cross-attention branches)."""

    @classmethod
    def like(cls, block: WidthBlock) -> 'CrossBlock':
        """A freshly initialised block with the shape and settings of ``block``."""
        new = copy.deepcopy(block)
        new.__class__ = cls
        new.apply(init_weights_vit_timm)
        return new

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path1(self.ls1(cross_attention(self.attn, self.norm1(x), self.norm1(context))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
