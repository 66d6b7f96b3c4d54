"""Neural architecture search: ViT-ResNAS (Liao, Karaman, Sze, arXiv 2109.00642) over ViT-Res
models. ``space.py``: the search space and architectures (torch-free); ``supernet.py``: the
weight-sharing supernet with per-example masks (several architectures in one batch) and the
physically sliced sub-networks.

The names below are imported from their modules on first use, so that the search space loads
without torch.
"""
from ..lazy import lazy_exports

_HOME = {
    'Arch': 'space', 'SearchSpace': 'space', 'SearchSpaceError': 'space', 'SPACES': 'space',
    'Supernet': 'supernet', 'masked_layer_norm': 'supernet',
}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
