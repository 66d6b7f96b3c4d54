"""Registering a deitlab model family: with timm, one entry point per name, and its closed-form MAC
count with :func:`deitlab.bench.analytic_macs`."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from timm.models import register_model

__all__ = ['register_variant', 'register_closed_form', 'closed_form_of']

# model families' closed forms: class -> fn(model, input_size) -> dict with 'total' (matmul)
_CLOSED_FORMS: Dict[type, Callable] = {}


def register_variant(name: str, build: Callable, defaults: dict, doc: str, module: str) -> Callable:
    """Register ``name`` with timm: ``timm.create_model(name, pretrained, **kw)`` calls
    ``build(name, pretrained, **{**defaults, **kw})``. ``module`` is the family's module: timm
    reads the name's pretrained configuration from that module's ``default_cfgs``."""
    def entry(pretrained: bool = False, **kwargs):
        return build(name, pretrained, **{**defaults, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    entry.__module__ = module
    register_model(entry)
    return entry


def register_closed_form(cls: type, fn: Callable) -> None:
    """Make ``analytic_macs`` / ``analytic_gmacs`` (and so ``deitlab bench``'s check against the
    counter) use ``fn(model, input_size)`` for ``cls`` and its subclasses. ``fn`` returns the
    itemised MACs with a ``total`` under the 'matmul' convention."""
    _CLOSED_FORMS[cls] = fn


def closed_form_of(model) -> Optional[Callable]:
    """The closed form registered for the class of ``model`` or its nearest base class, or None."""
    return next((_CLOSED_FORMS[c] for c in type(model).__mro__ if c in _CLOSED_FORMS), None)
