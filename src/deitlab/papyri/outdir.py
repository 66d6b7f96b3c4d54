"""Output directories that appear whole or not at all: the papyri commands' writing rule.

``deitlab papyri synth`` (pages and their annotations) and ``deitlab papyri predict`` (predictions,
overlays, text) write several files that belong together. Each writes them into a hidden sibling of
the output directory (:func:`staged`) and moves that into place when every file is written, so an
error or an interruption leaves neither a partial directory nor a mix of old and new files.

An output directory that already holds files is looked at with :func:`entries` first; each command
decides from them (and from the marker it writes, the ``info.generator`` of its JSON file, read by
:func:`generator_of`) whether it holds an earlier output of the same command, which it may replace,
or something else, which is refused: nothing unrelated is ever deleted.

Torch-free.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

from .config import PapyriError

__all__ = ['entries', 'generator_of', 'staged', 'shown']


def entries(out: Path) -> List[str]:
    """The names in ``out``, sorted; ``[]`` when it does not exist. :class:`PapyriError` when it is a
    file."""
    out = Path(out)
    if not out.exists():
        return []
    if not out.is_dir():
        raise PapyriError(f'{out} is a file, not a directory')
    return sorted(os.listdir(out))


def shown(names: List[str], limit: int = 4) -> str:
    """A few names for a message: ``a, b, c, d, ...``."""
    return ', '.join(names[:limit]) + (', ...' if len(names) > limit else '')


def generator_of(path: Path) -> Optional[dict]:
    """The ``info`` object of the JSON file at ``path`` when it has one (its ``generator`` names the
    command that wrote it), else None (no file, not JSON, no ``info``)."""
    try:
        info = json.loads(Path(path).read_text(encoding='utf-8')).get('info')
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


def _move_into_place(tmp: Path, out: Path) -> None:
    """Put the finished directory ``tmp`` at ``out`` (replacing an earlier output or an empty
    directory, which the caller has checked)."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
        os.replace(out, trash / 'old')
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def staged(out) -> Iterator[Path]:
    """A fresh hidden directory next to ``out`` to write the output in; when the block ends without
    an error it replaces ``out``, otherwise it is removed (``out`` is left as it was)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.partial-', dir=out.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)   # mkdtemp's 0700 would make the output private
        yield tmp
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
