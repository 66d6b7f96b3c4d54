"""Attention rollout: how much each input token flows into each output token through all blocks.

Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020; used by DCAL (Zhu et al.,
"Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification", CVPR 2022) to pick the patches its global-local cross-attention (GLCA) attends
from. With ``A_l^h = softmax(scale q k^T)`` (T x T) the attention of head h in block l::

    Ā_l = mean_h A_l^h            (head_fusion='mean'; 'max' takes the element-wise max over heads)
    Â_l = (Ā_l + I) / rowsum(Ā_l + I)          the residual connection, rows renormalised to 1
                                               (= 0.5 Ā_l + 0.5 I for mean fusion)
    R   = Â_L · Â_{L-1} ··· Â_k                (k = start_layer, default 0; rows sum to 1)

Row 0 of R (the class token) over the patch columns is the saliency map (:func:`cls_rollout`);
DCAL's GLCA keeps the top ``R`` patches by it (:func:`top_tokens`), never the class or
distillation token.

The maps are recomputed in float32 from each block's attention input by forward pre-hooks on its
self-attention module (timm ``Attention`` or deitlab ``WidthAttention``, the same modules
``capture.py`` reads), with the q/k projection of ``attention.py``: the model's forward and output
are unchanged. A block whose token mixer is not self-attention (PoolFormer's pooling, SpectFormer's
spectral gating) gets a ValueError: the rollout has no map to multiply for it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.nn as nn

from .attention import attention_probs, project, self_attention_types

__all__ = ['HEAD_FUSIONS', 'self_attention_modules', 'record_attention_maps', 'attention_maps', 'rollout_maps',
           'check_start_layer', 'attention_rollout', 'cls_row', 'cls_rollout', 'top_tokens']

HEAD_FUSIONS = ('mean', 'max')


def self_attention_modules(model: nn.Module) -> List[nn.Module]:
    """The self-attention module of every block of ``model.blocks``, in order, or a ValueError
    naming the model class and why it has none to roll out."""
    name = type(model).__name__
    blocks = getattr(model, 'blocks', None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(f'{name} has no self-attention blocks: attention rollout multiplies one attention map per '
                         f'transformer block (model.blocks with timm Attention or deitlab WidthAttention), and '
                         f'{name} mixes its tokens otherwise')
    kinds = self_attention_types()
    modules = []
    for i, block in enumerate(blocks):
        attn = getattr(block, 'attn', None)
        if not isinstance(attn, kinds):
            raise ValueError(f'{name} has no self-attention in block {i}: {type(block).__name__} mixes tokens '
                             f'without an attention map (rollout needs timm Attention or deitlab WidthAttention in '
                             f'every block)')
        modules.append(attn)
    return modules


def _mask_bias(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An SDPA-style mask as an additive bias: a bool mask keeps True, a float mask is added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float('-inf'))
    return mask.float()


def _probs(module: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(scale q k^T + mask)`` (B, H, T, T) in float32 from the module's input ``h``."""
    q, k = project(module, h, 'qk')
    return attention_probs(module, q.float(), k.float(), _mask_bias(mask))


@contextmanager
def record_attention_maps(model: nn.Module) -> Iterator[List[Optional[torch.Tensor]]]:
    """Fill a list with every block's attention probabilities (B, H, T, T), float32, detached,
    during the forwards run inside the context (the last forward's maps are kept). The hooks are
    removed on leaving, also on an error. Usage::

        with record_attention_maps(model) as maps:
            logits = model(x)
        R = rollout_maps(maps)
    """
    modules = self_attention_modules(model)
    maps: List[Optional[torch.Tensor]] = [None] * len(modules)

    def hook_for(i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs['x']
            with torch.no_grad():
                maps[i] = _probs(module, h.detach(), kwargs.get('attn_mask'))
        return hook

    handles = []
    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(hook_for(i), with_kwargs=True))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The attention probabilities (B, H, T, T), float32, of every block during one forward of
    ``model(x)`` under no_grad (the model's mode is left as it is: call ``model.eval()`` for
    inference). STViT's maps change size after its semantic-token step."""
    with record_attention_maps(model) as maps, torch.no_grad():
        model(x)
    missing = [i for i, m in enumerate(maps) if m is None]
    if missing:
        raise ValueError(f'{type(model).__name__}: blocks {missing} did not run their self-attention in the forward')
    return list(maps)


def _check_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f'head fusion must be one of {", ".join(HEAD_FUSIONS)}, got {head_fusion!r}')


def check_start_layer(start_layer: int, depth: int) -> None:
    """ValueError unless ``start_layer`` is a block index of a model with ``depth`` blocks."""
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < depth:
        raise ValueError(f'start layer {start_layer!r} is out of range: the model has {depth} blocks '
                         f'(0..{depth - 1})')


def rollout_maps(maps: List[torch.Tensor], head_fusion: str = 'mean', start_layer: int = 0) -> torch.Tensor:
    """``R = Â_L ··· Â_k`` (B, T, T) from per-block maps (B, H, T, T); see the module docstring."""
    _check_fusion(head_fusion)
    check_start_layer(start_layer, len(maps))
    used = maps[start_layer:]
    sizes = [m.shape[-1] for m in used]
    if len(set(sizes)) > 1:
        j = next(i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1])
        raise ValueError(f'blocks {start_layer + j - 1} and {start_layer + j} see {sizes[j - 1]} and {sizes[j]} '
                         f'tokens: attention cannot be rolled out across a change of tokens (e.g. STViT\'s semantic '
                         f'tokens); choose a start layer whose blocks all see the same tokens')
    R = None
    for a in used:
        a = a.float()
        fused = a.mean(dim=1) if head_fusion == 'mean' else a.amax(dim=1)
        fused = fused + torch.eye(fused.shape[-1], device=fused.device)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        R = fused if R is None else fused @ R
    return R


def attention_rollout(model: nn.Module, x: torch.Tensor, head_fusion: str = 'mean', start_layer: int = 0
                      ) -> torch.Tensor:
    """The rollout ``R`` (B, T, T) of ``model`` on ``x`` (rows sum to 1); see the module docstring."""
    _check_fusion(head_fusion)
    depth = len(self_attention_modules(model))
    try:
        check_start_layer(start_layer, depth)
    except ValueError as e:
        raise ValueError(f'{type(model).__name__}: {e}') from None
    maps = attention_maps(model, x)
    try:
        return rollout_maps(maps, head_fusion, start_layer)
    except ValueError as e:
        raise ValueError(f'{type(model).__name__}: {e}') from None


def cls_row(R: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The class token's row of a rollout over the patch tokens (B, N): prefix columns dropped."""
    name = type(model).__name__
    if getattr(model, 'cls_token', None) is None:
        raise ValueError(f'{name} has no class token: its rollout has no class-token row')
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    n = R.shape[-1] - prefix
    patches = getattr(getattr(model, 'patch_embed', None), 'num_patches', n)
    if n != patches:
        raise ValueError(f'{name}: the blocks rolled out see {n} tokens after the {prefix} prefix token(s), not the '
                         f'{patches} patch tokens (the tokens changed on the way, e.g. STViT\'s semantic tokens)')
    return R[:, 0, prefix:]


def cls_rollout(model: nn.Module, x: torch.Tensor, head_fusion: str = 'mean', start_layer: int = 0) -> torch.Tensor:
    """Saliency of every patch (B, N_patches): the class token's rollout row over the patch tokens
    (class, distillation and register tokens dropped; not renormalised)."""
    if getattr(model, 'cls_token', None) is None:
        raise ValueError(f'{type(model).__name__} has no class token: its rollout has no class-token row')
    return cls_row(attention_rollout(model, x, head_fusion, start_layer), model)


def top_tokens(rollout_row: torch.Tensor, ratio: float) -> torch.Tensor:
    """Patch indices (B, R), most salient first, of the top ``R = ceil(ratio * N)`` patches of a
    rollout row (B, N) over the patch tokens (:func:`cls_rollout`); ``ratio`` in (0, 1]. Indices are
    patch indices 0..N-1: add ``num_prefix_tokens`` to index the token sequence."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f'ratio must be a fraction of the patches in (0, 1], got {ratio!r}')
    if rollout_row.dim() != 2:
        raise ValueError(f'the rollout row must be (batch, patches), got shape {tuple(rollout_row.shape)}')
    N = rollout_row.shape[1]
    r = min(N, max(1, math.ceil(round(ratio * N, 9))))   # round: 0.1 * 30 is 3.0000000000000004
    return rollout_row.topk(r, dim=1).indices
