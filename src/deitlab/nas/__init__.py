"""Neural architecture search: ViT-ResNAS (Liao, Karaman, Sze, arXiv 2109.00642) over ViT-Res
models. ``space.py``: the search space and architectures (torch-free); ``supernet.py``: the
weight-sharing supernet with per-example masks (several architectures in one batch) and the
physically sliced sub-networks; ``warmup.py``: the supernet warm-up (growing choices, rewiring
by L1 norm); ``config.py`` (torch-free) and ``train.py``: supernet training on the shared
``Trainer`` (``deitlab nas train-supernet``).

The names below are imported from their modules on first use, so that the search space loads
without torch.
"""
from ..lazy import lazy_exports

_HOME = {
    'Arch': 'space', 'SearchSpace': 'space', 'SearchSpaceError': 'space', 'SPACES': 'space',
    'Supernet': 'supernet', 'masked_layer_norm': 'supernet',
    'SupernetConfig': 'config', 'train_supernet': 'train', 'holdout_indices': 'train',
    'allowed_space': 'warmup', 'allowed_counts': 'warmup', 'rewire': 'warmup',
}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
