"""Running a ViT with token reduction: the model patch, attention helpers, the plain block.

``patch_model`` swaps the model's class for a subclass whose ``forward_features`` runs the
blocks through a ``TokenFusion`` (ToMe or MCTF) that carries token sizes from block to block.
No weight, module or parameter name changes, so checkpoints, ``state_dict`` and the optimizer
see the same model; ``remove_token_fusion`` swaps the class back. Supported: timm
``VisionTransformer`` and ``VisionTransformerDistilled`` built from timm's ``Block`` /
``Attention`` (LayerScale, drop path, q/k-norm and gated attention honoured) and deitlab's DeiT
family, including NViT-pruned models with per-block widths. Prefix tokens (CLS, DIST,
registers) are protected: never merged, always first.

Models whose first blocks mix tokens on the patch grid (SpectFormer's spectral gating, pooling or
identity mixers, ``deitlab.models.spectformer``) are fused in their attention blocks only: the
grid blocks run on every token, and the schedule (``r``, ``layers``) counts from the first
attention block. A grid block after an attention block is refused, since merged tokens have no
grid. Mean-pooled models (``global_pool='avg'``, no class token) pool the merged tokens weighted
by their sizes, ``sum_i s_i x_i / sum_i s_i``, which is the mean over the original tokens when
merged tokens are exact duplicates.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import PatchDropout
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from ..layers import WidthAttention, WidthBlock
from ..layers.attention import attend, attention_output, project
from ..models.spectformer import MixerBlock
from .config import TokenFusionError
from .merge import TokenState, bipartite_plan, cosine_scores, merge_weighted
from .schedule import token_schedule

__all__ = ['TokenFusionError', 'TokenFusion', 'patch_model', 'remove_token_fusion', 'token_fusion_of',
           'grid_blocks', 'tome_block']


def tome_block(blk: nn.Module, x: torch.Tensor, st: TokenState, r: int, prop_attn: bool = True) -> torch.Tensor:
    """A block with ToMe: attention (``+ log s`` if ``prop_attn``), merge ``r`` tokens by the
    cosine similarity of the head-averaged keys, then the MLP. ``r = 0`` is the plain block."""
    attn = blk.attn
    h = blk.norm1(x)
    q, k, v = project(attn, h)
    ctx = attend(attn, q, k, v, st.log_size_bias() if prop_attn else None)
    x = x + blk.drop_path1(blk.ls1(attention_output(attn, ctx, h)))
    if r:
        with torch.no_grad():
            plan = bipartite_plan(cosine_scores(k.mean(1), st.p), r, st.p)
        size = st.sizes(x)
        total = plan.merge(size)   # the merged sizes are the weights' totals
        merged = merge_weighted(plan, x, size, total)
        st.update(plan, x, total)
        x = merged
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class TokenFusion(abc.ABC):
    """A token-reduction method attached to a model: its schedule and how a block runs.

    ``r``, ``layers`` and the method's options may be changed between forwards. After a forward,
    ``last`` holds that pass's final token sizes (B, T, 1), the source map (B, T, T0) when
    ``trace_source`` is on, and the token count entering each block.
    """
    method = ''

    def __init__(self, r, layers=None, prop_attn: bool = True, trace_source: bool = False):
        self.r = r
        self.layers = None if layers is None else list(layers)
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.protected = 1
        self.start = 0   # leading grid blocks (SpectFormer's spectral / pooling) that run unfused
        self.last: dict = {}
        self._r_override = None

    @abc.abstractmethod
    def block(self, blk: nn.Module, x: torch.Tensor, st: TokenState, r: int) -> torch.Tensor:
        """Run one block removing ``r`` tokens; each method (ToMe, MCTF) defines it."""

    def schedule(self, tokens: int, depth: int, r=None) -> list:
        """Per block: tokens in, r after clamps, tokens out (``schedule.token_schedule``)."""
        return token_schedule(tokens, depth, self.r if r is None else r, self.protected, self.method, self.layers)

    @contextlib.contextmanager
    def using_r(self, r):
        """Run the forwards inside with another r (the consistency pass of MCTF training)."""
        old, self._r_override = self._r_override, r
        try:
            yield self
        finally:
            self._r_override = old

    def run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        """Run ``blocks``: the first ``start`` plainly, the rest with this fusion."""
        for blk in blocks[:self.start]:
            x = blk(x)
        blocks = blocks[self.start:]
        st = TokenState(x, self.protected, self.trace_source)
        plan = self.schedule(x.shape[1], len(blocks), self._r_override)
        for blk, step in zip(blocks, plan):
            x = self.block(blk, x, st, step['r'])
        self.last = dict(size=st.sizes(x).detach(), source=st.source,
                         tokens=[s['tokens_in'] for s in plan] + [plan[-1]['tokens_out']])
        return x

    def describe(self) -> dict:
        return dict(method=self.method, r=self.r, layers=self.layers, prop_attn=self.prop_attn)

    def cost_options(self) -> dict:
        """Keyword arguments of ``schedule.fusion_macs`` that describe how this method computes."""
        return {}

    def gmacs(self, model: nn.Module, input_size=None, convention: str = 'matmul') -> float:
        """Closed-form GMACs per image of ``model`` running this fusion (``schedule.fusion_macs``)."""
        from .schedule import fusion_gmacs
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        return fusion_gmacs(model, self.schedule(tokens, len(model.blocks) - self.start), self.method,
                            input_size=input_size,
                            convention=convention, **self.cost_options())


class _TokenFusedViT:
    """Mixed in front of the model's class by ``patch_model``."""
    plain_class: type = VisionTransformer
    token_fusion: TokenFusion

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise TokenFusionError('token fusion cannot run with an attention mask or causal attention')
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.token_fusion.run_blocks(self.blocks, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool != 'avg':
            return super().forward_head(x, pre_logits)
        # merged tokens stand for several patches: the size-weighted mean is the mean over patches
        p = self.num_prefix_tokens
        size = self.token_fusion.last.get('size')
        if size is None or size.shape[:2] != x.shape[:2]:
            raise TokenFusionError('forward_head of a mean-pooled fused model must follow its forward_features '
                                   '(the pooling weights are the token sizes of that pass)')
        w = size[:, p:].to(x.dtype)
        x = (x[:, p:] * w).sum(1) / w.sum(1)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        hook = getattr(self.token_fusion, 'training_forward', None)
        if self.training and hook is not None:
            out = hook(self, x)
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)


_CLASSES: dict = {}


def _fused_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f'TokenFused{cls.__name__}', (_TokenFusedViT, cls), dict(plain_class=cls))
    return _CLASSES[cls]


def check_supported(model: nn.Module) -> None:
    """Raise ``TokenFusionError`` naming what token fusion cannot handle in ``model``."""
    if isinstance(model, _TokenFusedViT):
        raise TokenFusionError(f'the model already runs {model.token_fusion.method}; call '
                               f'remove_token_fusion(model) before applying another method')
    if not isinstance(model, VisionTransformer):
        raise TokenFusionError(f'token fusion applies to timm VisionTransformer / deitlab DeiT models, '
                               f'not {type(model).__name__}')
    if type(model).forward_features is not VisionTransformer.forward_features:
        raise TokenFusionError(f'{type(model).__name__} runs its blocks its own way (it overrides '
                               f'forward_features); token fusion patches plain ViT / DeiT models')
    if getattr(model, 'attn_pool', None) is not None or getattr(model, 'global_pool', 'token') not in ('token', 'avg'):
        raise TokenFusionError(f'token fusion needs class-token or mean pooling (global_pool="token" or "avg"); '
                               f'this model pools with {getattr(model, "global_pool", None)!r}')
    if model.global_pool == 'avg' and getattr(model, 'pool_include_prefix', False):
        raise TokenFusionError('token fusion does not support mean pooling that includes the prefix tokens')
    if isinstance(model.patch_drop, PatchDropout):
        raise TokenFusionError('token fusion cannot be combined with patch dropout (patch_drop_rate > 0)')
    if getattr(model, 'grad_checkpointing', False):
        raise TokenFusionError('token fusion does not support gradient checkpointing; turn it off')
    start = grid_blocks(model)
    if start == len(model.blocks):
        raise TokenFusionError(f'the model has no attention block to fuse tokens in (all {start} blocks mix '
                               f'tokens on the patch grid)')
    for i, blk in enumerate(model.blocks):
        if i < start:
            continue
        if isinstance(blk, MixerBlock):
            raise TokenFusionError(f'block {i} ({type(blk).__name__}) mixes tokens on the patch grid after an '
                                   f'attention block; token fusion runs in the attention blocks that follow the '
                                   f'last grid block, so put grid mixers first (e.g. mixers "s,s,a,a")')
        if type(blk) not in (Block, WidthBlock):
            raise TokenFusionError(f'block {i} is a {type(blk).__name__}; token fusion supports timm Block and '
                                   f'deitlab WidthBlock (pre-norm attention + MLP)')
        if type(blk.attn) not in (Attention, WidthAttention):
            raise TokenFusionError(f'block {i} uses {type(blk.attn).__name__}; token fusion supports timm '
                                   f'Attention and deitlab WidthAttention')


def grid_blocks(model: nn.Module) -> int:
    """How many leading blocks mix tokens on the patch grid (SpectFormer's spectral, pooling and
    identity mixers): token fusion starts after them."""
    n = 0
    while n < len(model.blocks) and isinstance(model.blocks[n], MixerBlock):
        n += 1
    return n


def patch_model(model: nn.Module, fusion: TokenFusion) -> nn.Module:
    """Attach ``fusion`` to ``model`` in place (see the module docstring); returns the model."""
    check_supported(model)
    fusion.protected = int(model.num_prefix_tokens)
    fusion.start = grid_blocks(model)
    try:   # a bad r or layer list fails here, not at the first forward
        fusion.schedule(model.patch_embed.num_patches + fusion.protected, len(model.blocks) - fusion.start)
    except ValueError as e:
        raise TokenFusionError(str(e)) from None
    model.__class__ = _fused_class(type(model))
    model.token_fusion = fusion
    return model


def token_fusion_of(model: nn.Module) -> Optional[TokenFusion]:
    """The ``TokenFusion`` a model runs, or None."""
    return model.token_fusion if isinstance(model, _TokenFusedViT) else None


def remove_token_fusion(model: nn.Module) -> nn.Module:
    """Undo ``apply_tome`` / ``apply_mctf``: the model runs all tokens again (in place)."""
    if isinstance(model, _TokenFusedViT):
        model.__class__ = model.plain_class
        del model.token_fusion
    return model
