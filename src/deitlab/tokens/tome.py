"""ToMe -- token merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

In every block, between the attention and the MLP, the non-protected tokens are split
alternately into sets A and B, each A token keeps its most similar B token by the cosine
similarity of the keys averaged over heads, ``k_bar = mean_h k_h``, and the ``r`` best-matched A
tokens are merged into their partners by a size-weighted average,
``x_g = sum_i s_i x_i / sum_i s_i``, ``s_g = sum_i s_i``. Proportional attention adds
``log s`` to the attention logits of every key, ``softmax(q k^T / sqrt(d) + log s)``, so a merged
token weighs as the ``s`` tokens it replaces. ``r`` may be constant, ``(r, inflect)``, a
fraction or a per-block list (``schedule.parse_r``); a block never removes more than half of its
non-protected tokens.

Unlike the reference patch, the blocks here honour LayerScale, q/k-norm and gated attention, the
distillation token stays at index 1, and attention keeps timm's fused kernel (with the
``log s`` bias as its mask) when the model uses it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .merge import TokenState
from .patch import TokenFusion, patch_model, tome_block

__all__ = ['ToMe', 'apply_tome']


class ToMe(TokenFusion):
    method = 'tome'

    def block(self, blk: nn.Module, x: torch.Tensor, st: TokenState, r: int) -> torch.Tensor:
        return tome_block(blk, x, st, r, self.prop_attn)


def apply_tome(model: nn.Module, r=8, prop_attn: bool = True, trace_source: bool = False,
               layers=None) -> nn.Module:
    """Patch ``model`` in place to merge ``r`` tokens per block (ToMe); ``r=0`` changes nothing.
    Change it later with ``model.token_fusion.r``; undo with ``remove_token_fusion(model)``."""
    return patch_model(model, ToMe(r, layers, prop_attn, trace_source))
