"""Messages and progress bars on standard error, from the main process only."""
from __future__ import annotations

import sys
from typing import Optional

__all__ = ['log', 'progress']


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
