"""Structural pruning of DeiT models: NViT's unit groups, saliency, latency table, ranking, densify."""
from .densify import densify, rounded_masks
from .groups import GROUP_TYPES, Masks, MaskedLayerNorm, PruneError, reduce_units, use_masked_layernorm
from .latency import LatencyTable, build_latency_table, default_grid
from .nvit import NViTConfig, NViTPruner, load_dense, prune_nvit
from .ranking import Budget, Group, build_like, default_group_sizes, rank_groups
from .saliency import CRITERIA, Saliency, per_sample_sq_grads

__all__ = ['GROUP_TYPES', 'Masks', 'MaskedLayerNorm', 'PruneError', 'reduce_units', 'use_masked_layernorm',
           'densify', 'rounded_masks', 'LatencyTable', 'build_latency_table', 'default_grid', 'NViTConfig',
           'NViTPruner', 'load_dense', 'prune_nvit', 'Budget', 'Group', 'build_like', 'default_group_sizes',
           'rank_groups', 'CRITERIA', 'Saliency', 'per_sample_sq_grads']
