"""deitlab: DeiT-family vision transformers as a timm plug-in.

Importing deitlab registers its architectures with timm (names start with ``deitlab_``), so
``timm.create_model('deitlab_deit_nano_patch4_32')`` and ``timm.create_model('local-dir:RUN_DIR')``
work once ``import deitlab`` has run.
"""
from . import models  # noqa: F401  (registers the architectures)
from .tokens import stvit as _stvit  # noqa: F401  (registers deitlab_stvit_*)

__version__ = '0.1.0'
