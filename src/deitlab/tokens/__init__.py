"""Token reduction for DeiT-family ViTs: the shared merge machinery, ToMe and MCTF
(STViT, which changes the architecture, is a model family: ``deitlab.models.stvit``).

``apply_tome`` / ``apply_mctf`` patch a timm ``VisionTransformer`` (plain or distilled) or a
deitlab DeiT (also NViT-pruned ones) in place; ``remove_token_fusion`` undoes it. Schedules and
their GMACs are pure functions of the model's shape (``schedule.py``).
"""
from .mctf import ConsistencyLoss, apply_mctf, mctf_fast_layers
from .patch import TokenFusionError, remove_token_fusion, token_fusion_of
from .schedule import fusion_gmacs, fusion_macs, parse_r, token_schedule
from .tome import apply_tome

__all__ = ['apply_tome', 'apply_mctf', 'mctf_fast_layers', 'remove_token_fusion', 'token_fusion_of',
           'TokenFusionError', 'ConsistencyLoss', 'token_schedule', 'parse_r', 'fusion_macs', 'fusion_gmacs']
