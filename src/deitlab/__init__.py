"""deitlab: DeiT-family vision transformers as a timm plug-in.

Importing deitlab registers its architectures with timm (names start with ``deitlab_``), so
``timm.create_model('deitlab_deit_nano_patch4_32')`` and ``timm.create_model('local-dir:RUN_DIR')``
work once ``import deitlab`` has run.

The registration needs timm, and so torch, which ``import deitlab`` itself does not load: when
timm is already loaded the architectures are registered at once, otherwise as soon as timm has
been imported and no deitlab module is half-way through its own import (a meta-path hook watches
the imports of timm and of deitlab's modules until then). That keeps ``deitlab --help`` free of
torch. :func:`register_models` registers them explicitly.
"""
from __future__ import annotations

import importlib
import sys
import threading

__version__ = '0.1.0'

_SUBMODULES = frozenset(('bench', 'cli', 'data', 'demo', 'errors', 'evaluate', 'models', 'nas', 'prune', 'report',
                         'retrieval', 'rundir', 'share', 'tokens', 'train', 'unlearnable'))
_registered = False
_executing = threading.local()   # per thread: how many watched modules are executing


def register_models() -> None:
    """Register every deitlab architecture with timm (imports torch and timm; does nothing the second
    time)."""
    global _registered
    if _registered:
        return
    _registered = True   # first: the imports below pass through the hook again
    try:
        from . import models  # noqa: F401  (registers deitlab_deit_*, _stvit_*, _poolformer_*, _spectformer_*, _vitres_*)
    except BaseException:
        _registered = False
        raise
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


class _WatchedLoader:
    """A module's own loader, which calls :func:`register_models` after the module has executed if
    timm is loaded by then and no other watched module is executing in this thread."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):   # get_code, get_source, get_resource_reader, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        create = getattr(self._loader, 'create_module', None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        depth = getattr(_executing, 'depth', 0)
        _executing.depth = depth + 1
        try:
            self._loader.exec_module(module)
        finally:
            _executing.depth = depth
        if depth == 0 and 'timm' in sys.modules:
            register_models()


class _RegisterWhenTimmLoads:
    """Meta-path finder: finds ``timm`` and ``deitlab.*`` with the other finders and watches their
    loaders (see :class:`_WatchedLoader`)."""

    def find_spec(self, name, path=None, target=None):
        if _registered or (name != 'timm' and not name.startswith(__name__ + '.')):
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, 'find_spec', None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _WatchedLoader(spec.loader)
                return spec
        return None


_HOOK = _RegisterWhenTimmLoads()


def __getattr__(name: str):
    """``deitlab.models`` and the other subpackages and modules, imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | _SUBMODULES)


if 'timm' in sys.modules:
    register_models()
else:
    sys.meta_path.insert(0, _HOOK)
