"""Registering a deitlab model family with timm: one entry point per name."""
from __future__ import annotations

from typing import Callable

from timm.models import register_model

__all__ = ['register_variant']


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
