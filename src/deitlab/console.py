"""Messages and progress bars on standard error, from the main process only.

Bars show on a terminal by default. :func:`set_quiet` (the CLI's ``--quiet``) turns every bar and
every log line off except warnings (lines that start with ``warning``) and errors.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

__all__ = ['log', 'progress', 'set_quiet', 'is_quiet', 'native_stderr_quiet', 'VERBOSE_ENV']

#: set to 1 to keep the native libraries' own stderr lines (profiler probes, device-count warnings)
VERBOSE_ENV = 'DEITLAB_VERBOSE'

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """No progress bars and no log lines but warnings from now on (``--quiet``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def progress(enabled: Optional[bool], is_main: bool = True, **kw):
    """A tqdm bar on the main process: on a terminal by default, always/never if enabled is set;
    never when quiet. Use it as tqdm (``iterable=``, ``total=``, ``desc=``...)."""
    from tqdm.auto import tqdm
    if not is_main or _quiet:
        disable = True
    else:
        disable = None if enabled is None else not enabled  # None: tqdm shows it only on a TTY
    return tqdm(disable=disable, **kw)


def log(msg: str, is_main: bool = True) -> None:
    """One ``[deitlab] msg`` line on stderr (through tqdm, so that it does not break a bar). When
    quiet, only a message that starts with ``warning`` is printed."""
    if is_main and (not _quiet or msg.startswith('warning')):
        from tqdm.auto import tqdm
        tqdm.write(f'[deitlab] {msg}', file=sys.stderr)


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration: the lines C++ libraries print there
    (torch.profiler's ``USDT: profiler_start``, a GPU count failing on a CPU machine) bypass Python.
    Off when ``DEITLAB_VERBOSE=1``."""
    if os.environ.get(VERBOSE_ENV) == '1':
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
