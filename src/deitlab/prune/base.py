"""What the pruning configuration needs without torch: the error type, the unit types, and where
the committed latency tables are (so that ``deitlab prune nvit --help`` and the config load fast)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

__all__ = ['PruneError', 'GROUP_TYPES', 'BLOCK_TYPES', 'WIDTH_KEYS', 'TABLES_DIR', 'committed_tables', 'lut_path']

GROUP_TYPES = ('emb', 'head', 'qk', 'v', 'mlp')
BLOCK_TYPES = ('head', 'qk', 'v', 'mlp')
# the width (a per-block list in model_args / Masks.kept()) each block unit type counts
WIDTH_KEYS = dict(head='num_heads', qk='qk_dim', v='v_dim', mlp='mlp_hidden')
TABLES_DIR = Path(__file__).resolve().parent / 'tables'   # committed tables, by name (lut_path)


class PruneError(ValueError):
    """A model or setting the pruner cannot handle, with the reason."""


def committed_tables() -> List[str]:
    """Names of the tables committed in ``deitlab/prune/tables/`` (file names without ``.json``)."""
    return sorted(p.stem for p in TABLES_DIR.glob('*.json'))


def lut_path(spec) -> Optional[Path]:
    """Where ``NViTConfig.lut`` / ``--lut`` points: None for ``None`` or ``'measure'`` (time a table
    on this device), else an existing file, or the name of a committed table. ``PruneError`` otherwise."""
    if spec is None or str(spec).strip().lower() == 'measure':
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = TABLES_DIR / f'{spec}.json'
    if '/' not in str(spec) and named.is_file():
        return named
    names = ', '.join(committed_tables()) or 'none'
    raise PruneError(f'latency table file does not exist: {spec}; --lut takes a latency_table.json, "measure" '
                     f'(time one on this device) or a committed table ({names})')
