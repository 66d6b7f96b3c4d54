"""Packages whose public names are imported from their modules on first use, so that importing the
package (e.g. for a command's ``--help`` or its torch-free configuration) stays light."""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Tuple

__all__ = ['lazy_exports']


def lazy_exports(package: str, home: Dict[str, str]) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``home`` maps a public name to the module (relative
    to the package) that defines it; the name is imported there on first access and cached."""
    def __getattr__(name: str):
        if name in home:
            value = getattr(importlib.import_module(f'.{home[name]}', package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f'module {package!r} has no attribute {name!r}')

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
