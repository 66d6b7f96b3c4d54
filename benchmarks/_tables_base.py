"""What the README generators share: where the results are, loading them, and Markdown formatting
(``tables.py`` and its table modules import from here)."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / 'results'
DOCS = [ROOT / 'README.md', HERE / 'README.md']

BLOCK = re.compile(r'(<!-- gen:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)', re.S)
INLINE = re.compile(r'(<!--v:(?P<name>[\w.-]+)-->)(?P<body>.*?)(<!--/v-->)')


class MissingResult(KeyError):
    """A README quotes a result that no JSON holds."""


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    path = RESULTS / f'{name}.json'
    if not path.exists():
        raise MissingResult(f'{path.relative_to(ROOT)} does not exist: run the benchmark that writes it')
    return json.loads(path.read_text())


# ---------------------------------------------------------------- formatting

def f(v: Optional[float], nd: int = 2) -> str:
    return '' if v is None else f'{v:.{nd}f}'


def table(header: Sequence[str], rows: List[Sequence[str]], bold: Sequence[int] = (), lower: Sequence[int] = ()) -> str:
    """A Markdown table; the best value of each column in ``bold`` (highest) / ``lower`` (lowest) in bold."""
    rows = [list(r) for r in rows]
    for col, pick in [(c, max) for c in bold] + [(c, min) for c in lower]:
        vals = [_num(r[col]) for r in rows]
        got = [v for v in vals if v is not None]
        if got:
            best = pick(got)
            for r, v in zip(rows, vals):
                if v == best:
                    r[col] = f'**{r[col]}**'
    out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    out += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(out)


def _num(s: str) -> Optional[float]:
    m = re.match(r'\s*(-?\d+(?:\.\d+)?)', s)
    return float(m.group(1)) if m else None


def source(json_names: Sequence[str], command: str) -> str:
    files = ', '.join(f'`benchmarks/results/{n}.json`' for n in json_names)
    return f'<sub>Generated from {files} by `python benchmarks/tables.py`; re-measure with `{command}`.</sub>'


def mean_std(d: dict, nd: int = 2) -> str:
    return f"{d['mean']:.{nd}f} ± {d['std']:.{nd}f}"


def f2(v):
    return f(v, 2)


def _pm(r: dict, key: str, fmt: str = '{:.2f}') -> str:
    """``mean ± std`` over seeds (the std only when the row has several seeds)."""
    if r.get(key) is None:
        return ''
    if r.get('n_seeds', 1) > 1 and f'{key}_std' in r:
        return f"{fmt.format(r[key])} ± {fmt.format(r[key + '_std'])}"
    return fmt.format(r[key])
