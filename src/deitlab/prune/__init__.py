"""Structural pruning: NViT's unit groups, saliency, latency table, ranking, densify; OFB's search
space, bi-mask and losses (ofb.py). DeiT models in
all five unit types; PoolFormer and SpectFormer in their MLP hidden widths (families.py).

The names below are imported from their modules on first use, so that ``deitlab.prune.config``
(the configuration, read by ``deitlab prune nvit --help``) loads without torch.
"""
from ..lazy import lazy_exports

_HOME = {
    'GROUP_TYPES': 'base', 'PruneError': 'base', 'committed_tables': 'base', 'lut_path': 'base',
    'Masks': 'groups', 'MaskedLayerNorm': 'groups', 'reduce_units': 'groups', 'use_masked_layernorm': 'groups',
    'densify': 'compact', 'rounded_masks': 'compact', 'Layout': 'families', 'layout_of': 'families',
    'LatencyTable': 'latency', 'MLPLatencyTable': 'latency', 'default_grid': 'latency', 'grid_for': 'latency',
    'load_latency_table': 'latency', 'build_latency_table': 'timing', 'NViTConfig': 'config',
    'NViTPruner': 'nvit', 'load_dense': 'nvit', 'prune_nvit': 'nvit', 'Budget': 'ranking', 'Group': 'ranking',
    'build_like': 'ranking', 'default_group_sizes': 'ranking', 'rank_groups': 'ranking', 'CRITERIA': 'saliency',
    'Saliency': 'saliency', 'per_sample_sq_grads': 'saliency', 'SCHEDULES': 'schedule', 'OFBSearch': 'ofb',
}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
