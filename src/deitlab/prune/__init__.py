"""Structural pruning: NViT's unit groups, saliency, latency table, ranking, densify. DeiT models in
all five unit types; PoolFormer and SpectFormer in their MLP hidden widths (families.py)."""
from .densify import densify, rounded_masks
from .families import Layout, layout_of
from .groups import GROUP_TYPES, Masks, MaskedLayerNorm, PruneError, reduce_units, use_masked_layernorm
from .latency import (LatencyTable, MLPLatencyTable, committed_tables, default_grid, grid_for, load_latency_table,
                      lut_path)
from .nvit import NViTConfig, NViTPruner, load_dense, prune_nvit
from .ranking import Budget, Group, build_like, default_group_sizes, rank_groups
from .saliency import CRITERIA, Saliency, per_sample_sq_grads
from .schedule import SCHEDULES
from .timing import build_latency_table

__all__ = ['GROUP_TYPES', 'Masks', 'MaskedLayerNorm', 'PruneError', 'reduce_units', 'use_masked_layernorm',
           'densify', 'rounded_masks', 'LatencyTable', 'MLPLatencyTable', 'build_latency_table', 'default_grid',
           'grid_for', 'load_latency_table', 'Layout', 'layout_of', 'NViTConfig', 'NViTPruner', 'load_dense',
           'prune_nvit', 'Budget', 'Group', 'build_like', 'default_group_sizes', 'rank_groups', 'CRITERIA',
           'Saliency', 'per_sample_sq_grads', 'SCHEDULES', 'committed_tables', 'lut_path']
