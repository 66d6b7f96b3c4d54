"""Token reduction for DeiT-family ViTs: the shared merge machinery, ToMe and MCTF
(STViT, which changes the architecture, is a model family: ``deitlab.models.stvit``).

``apply_tome`` / ``apply_mctf`` patch a timm ``VisionTransformer`` (plain or distilled) or a
deitlab DeiT (also NViT-pruned ones) in place; ``remove_token_fusion`` undoes it. Schedules and
their GMACs are pure functions of the model's shape (``schedule.py``). The names below are imported
from their modules on first use, so that ``deitlab.tokens.config`` (read by ``deitlab fuse --help``)
loads without torch.
"""
from ..lazy import lazy_exports

_HOME = {'apply_tome': 'tome', 'apply_mctf': 'mctf', 'mctf_fast_layers': 'mctf', 'ConsistencyLoss': 'mctf',
         'remove_token_fusion': 'patch', 'token_fusion_of': 'patch', 'TokenFusionError': 'config',
         'token_schedule': 'schedule', 'parse_r': 'schedule', 'fusion_macs': 'schedule', 'fusion_gmacs': 'schedule'}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
