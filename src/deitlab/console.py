"""Messages and progress bars on standard error, from the main process only."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

__all__ = ['log', 'progress', 'native_stderr_quiet', 'VERBOSE_ENV']

#: set to 1 to keep the native libraries' own stderr lines (profiler probes, device-count warnings)
VERBOSE_ENV = 'DEITLAB_VERBOSE'


def progress(enabled: Optional[bool], is_main: bool = True, **kw):
    """A tqdm bar on the main process: on a terminal by default, always/never if enabled is set."""
    from tqdm.auto import tqdm
    if not is_main:
        disable = True
    else:
        disable = None if enabled is None else not enabled  # None: tqdm shows it only on a TTY
    return tqdm(disable=disable, **kw)


def log(msg: str, is_main: bool = True) -> None:
    """One ``[deitlab] msg`` line on stderr (through tqdm, so that it does not break a bar)."""
    if is_main:
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
