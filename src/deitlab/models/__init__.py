"""Architectures. Importing this package registers every deitlab model name with timm."""
from . import deit  # noqa: F401  (registers deitlab_deit_* with timm)
from . import spectformer  # noqa: F401
from . import poolformer  # noqa: F401
from . import spectformer_h  # noqa: F401
from . import stvit  # noqa: F401
from . import vitres  # noqa: F401
from . import dcal  # noqa: F401  (deitlab_dcal: a saved DCAL wrapper, built by deitlab.train.dcal)
from ..layers import WidthAttention, WidthBlock
from .deit import DeiT, DeiTDistilled, resolve_widths

__all__ = ['DeiT', 'DeiTDistilled', 'WidthAttention', 'WidthBlock', 'resolve_widths']
