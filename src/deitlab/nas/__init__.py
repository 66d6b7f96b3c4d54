"""Neural architecture search: ViT-ResNAS (Liao, Karaman, Sze, arXiv 2109.00642) over ViT-Res
models. ``space.py``: the search space and architectures (torch-free); ``supernet.py``: the
weight-sharing supernet with per-example masks (several architectures in one batch) and the
physically sliced sub-networks; ``warmup.py``: the supernet warm-up (growing choices, rewiring
by L1 norm); ``config.py`` (torch-free) and ``train.py``: supernet training on the shared
``Trainer`` (``deitlab nas train-supernet``); ``cost.py``: closed-form MACs from the genes;
``latency.py``: the latency table timed on this device; ``evolution.py``: evolution, random
search and NSGA-II under a MACs / latency budget; ``search.py``: the fitness on the held-out
images and ``deitlab nas search``; ``export.py``: an architecture as a run directory
(``deitlab nas export``).

The names below are imported from their modules on first use, so that the search space loads
without torch.
"""
from ..lazy import lazy_exports

_HOME = {
    'Arch': 'space', 'SearchSpace': 'space', 'SearchSpaceError': 'space', 'SPACES': 'space',
    'Supernet': 'supernet', 'masked_layer_norm': 'supernet',
    'SupernetConfig': 'config', 'train_supernet': 'train', 'holdout_indices': 'train',
    'allowed_space': 'warmup', 'allowed_counts': 'warmup', 'rewire': 'warmup',
    'SearchConfig': 'config', 'ExportConfig': 'config', 'arch_macs': 'cost',
    'LatencyTable': 'latency', 'LatencyTableError': 'latency', 'build_latency_table': 'latency',
    'check_predictions': 'latency',
    'Budget': 'evolution', 'SearchResult': 'evolution', 'evolve': 'evolution', 'random_search': 'evolution',
    'nsga2_search': 'evolution', 'pareto_front': 'evolution',
    'Fitness': 'search', 'load_supernet': 'search', 'read_supernet_dir': 'search',
    'export_arch': 'export', 'build_subnet': 'export',
}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
