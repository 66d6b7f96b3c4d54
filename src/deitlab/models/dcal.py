"""``deitlab_dcal``: DCAL's branches around a backbone (:class:`deitlab.train.dcal.DCAL`) as a
registered architecture, so that what ``deitlab train --dcal`` saves is a model on disk like any
other: ``config.json`` names ``deitlab_dcal`` with ``model_args`` = the backbone's architecture name
(``backbone``), its arguments (``backbone_args``) and the DCAL options, and ``rundir.create(RUN)``
or ``timm.create_model('local-dir:RUN', pretrained=True)`` rebuild the wrapper with its weights.

The wrapper lives with its training method (``train/dcal.py``, a layer above this one); the entry
point names it as ``'module:attr'`` and imports it when a model is built (``deitlab.registry``'s
convention for choices implemented above the code that offers them). Built by name alone it wraps
``deitlab_deit_pico_patch4_32`` (so ``deitlab models`` can list it).
"""
from __future__ import annotations

from ..registry import load_target
from .registry import register_variant

__all__ = ['DCAL_ENTRY']

DCAL_ENTRY = 'deitlab.train.dcal:create_dcal'


def _create(name: str, pretrained: bool, **kwargs):
    return load_target(DCAL_ENTRY)(name, pretrained, **kwargs)


register_variant('deitlab_dcal', _create, {}, 'DCAL (dual cross-attention learning) around a backbone given by '
                 'its architecture name: backbone=NAME, backbone_args={...}, DCAL options.', __name__)
