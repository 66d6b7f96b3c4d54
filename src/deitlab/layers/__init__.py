"""The layer core every family builds on: attention with per-block widths (self and cross),
the pre-norm blocks, class-token attention capture and attention rollout. See ``attention.py``
for the steps a method can step in between."""
from .attention import WidthAttention, attend, attention_output, attention_probs, cross_attention, fused_attention, project
from .block import CrossBlock, WidthBlock
from .capture import capture_cls_attention, find_cls_attention
from .rollout import attention_maps, attention_rollout, cls_rollout, top_tokens

__all__ = ['WidthAttention', 'WidthBlock', 'CrossBlock', 'fused_attention', 'project', 'attend', 'attention_probs',
           'attention_output', 'cross_attention', 'capture_cls_attention', 'find_cls_attention',
           'attention_maps', 'attention_rollout', 'cls_rollout', 'top_tokens']
