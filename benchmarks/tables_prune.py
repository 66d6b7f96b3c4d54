"""The pruning tables of the READMEs (NViT, OFB, the latency table's check), generated from
``results/nvit_fmnist*.json``, ``ofb_fmnist.json`` and ``latency_check.json`` (``tables.py``)."""
from __future__ import annotations

from typing import List, Optional

from _tables_base import MissingResult, _pm, f, f2, load, source, table

_ARM = {'dense': 'dense', 'nvit': 'NViT', 'tp_taylor': 'TP Taylor', 'tp_hessian': 'TP Hessian', 'uniform': 'uniform',
        'nvit_taylor': 'NViT, Taylor score', 'nvit_magnitude': 'NViT, magnitude score',
        'nvit_fisher': 'NViT, diagonal Fisher', 'nvit_lam0': 'NViT, no latency penalty'}


def _nvit_table(rows: List[dict]) -> List[List[str]]:
    return [[f"{r['budget']:g}", _ARM.get(r['arm'], r['arm']), _pm(r, 'top1'), f"{r['gmacs']:.4f}",
             f"{r['params_m']:.3f} M", _pm(r, 'throughput_ratio'), _pm(r, 'latency_speedup'),
             _pm(r, 'predicted_speedup')] for r in rows]


def _top1(r: dict) -> str:
    if 'top1_std' in r:
        return _pm(r, 'top1')
    return f2(r['top1'])


def _nvit_source(extra: str = '') -> str:
    st = load('nvit_fmnist')['settings']
    seeds = st.get('seeds', [0])
    return source(['nvit_fmnist'], 'python benchmarks/nvit_fmnist.py all --jobs 2' + extra)[:-len('</sub>')] + \
        f" Mean ± sample std over {len(seeds)} seed(s); speed-ups over the dense model, measured interleaved " \
        f"(batch 64 throughput and batch-1 latency, {st['threads']} threads, median of {st['rounds']} rounds) and " \
        f"predicted by the latency table.</sub>"


def t_nvit() -> str:
    rows = [r for r in load('nvit_fmnist')['rows'] if r['arm'] in ('dense', 'nvit', 'tp_taylor', 'tp_hessian',
                                                                     'uniform')]
    header = ['budget', 'arm', 'top-1 (%)', 'GMACs', 'params', 'measured throughput speed-up',
              'measured batch-1 speed-up', 'predicted']
    return '\n'.join([table(header, _nvit_table(rows)), _nvit_source()])


def verdict(a: dict, b: dict, key: str = 'top1') -> str:
    """``a`` against ``b`` on ``key``: 'ahead' / 'behind' when the gap of the means exceeds the sum of
    their standard deviations over seeds, else 'within the spread' (one seed: no verdict)."""
    if min(a.get('n_seeds', 1), b.get('n_seeds', 1)) < 2:
        return 'one seed: no verdict'
    gap, spread = a[key] - b[key], a.get(f'{key}_std', 0.0) + b.get(f'{key}_std', 0.0)
    if gap > spread:
        return 'ahead'
    if gap < -spread:
        return 'behind'
    return 'within the spread'


def t_nvit_verdict() -> str:
    """NViT against each peer at each budget: accuracy gap and measured speed, with the verdict."""
    rows = load('nvit_fmnist')['rows']
    out = []
    for b in sorted({r['budget'] for r in rows if r['arm'] == 'nvit'}, reverse=True):
        ours = _nvit_row('nvit', b)
        for peer in ('tp_taylor', 'tp_hessian', 'uniform'):
            try:
                other = _nvit_row(peer, b)
            except MissingResult:
                continue
            gap = ours['top1'] - other['top1']
            spread = ours.get('top1_std', 0.0) + other.get('top1_std', 0.0)
            out.append([f'{b:g}', _ARM[peer], f'{gap:+.2f} (spread {spread:.2f})', verdict(ours, other),
                        f"{f(ours.get('throughput_ratio'))} vs {f(other.get('throughput_ratio'))}",
                        verdict(ours, other, 'throughput_ratio') if ours.get('throughput_ratio') else ''])
    return '\n'.join([table(['budget', 'NViT against', 'top-1 gap (pt)', 'accuracy', 'measured throughput speed-up',
                             'speed'], out),
                      "'ahead' / 'behind': the gap of the means exceeds the sum of the two standard deviations over "
                      "seeds; otherwise 'within the spread'."])


def t_nvit_ablation() -> str:
    rows = [r for r in load('nvit_fmnist_ablation')['rows'] if r['arm'].startswith('nvit') and r['budget'] == 0.5]
    out = [[_ARM.get(r['arm'], r['arm']), _top1(r), f"{r['gmacs']:.4f}"] for r in rows]
    return '\n'.join([table(['arm (budget 0.5)', 'top-1', 'GMACs'], out, bold=(1,)),
                      source(['nvit_fmnist_ablation'], 'python benchmarks/nvit_fmnist.py all --arms nvit nvit_lam0 '
                                                       'nvit_taylor nvit_magnitude nvit_fisher --budgets 0.5 --seeds 0 '
                                                       '--result benchmarks/results/nvit_fmnist_ablation.json')])


def _lc_rows(arm: Optional[str] = None) -> List[dict]:
    return [r for r in load('latency_check')['rows'] if arm is None or r['arm'] == arm]


def _lc_mean(table: str, arm: Optional[str] = None, stat=max) -> float:
    """Mean (``stat=None``) or largest |predicted / measured - 1| of a table in latency_check."""
    errs = [abs(r[f'error_{table}']) for r in _lc_rows(arm)]
    return sum(errs) / len(errs) if stat is None else stat(errs)


def t_latency_check() -> str:
    """Predicted against measured speed-up of every model of the NViT benchmark, per arm and table."""
    out = []
    for arm in dict.fromkeys(r['arm'] for r in _lc_rows()):
        rows = _lc_rows(arm)
        out.append([_ARM.get(arm, arm if arm != 'probe' else 'probes (dense, one width moved)'), str(len(rows)),
                    f"{min(r['measured'] for r in rows):.2f}-{max(r['measured'] for r in rows):.2f}",
                    *(f"{_lc_mean(t, arm, None):.1%} ({_lc_mean(t, arm):.1%})" for t in ('paired', 'plain', 'fastest'))])
    st = load('latency_check')['settings']
    return '\n'.join([
        table(['models', 'n', 'measured speed-up', 'paired + alignment (default)', 'paired, no alignment',
               'fastest round (before)'], out),
        source(['latency_check'], 'python benchmarks/latency_check.py')[:-len('</sub>')] +
        f" |predicted / measured - 1|: mean (largest). Measured: whole models timed paired against the dense "
        f"DeiT-nano, median of {st['rounds']} rounds, batch {st['batch']}, {st['threads']} threads; tables timed in "
        f"the same process.</sub>"])


_OFB_ARMS = {'ofb': 'OFB', 'ofb_nopmim': 'OFB, no PMIM', 'ofb_paper': 'OFB, paper head grid', 'nvit': 'NViT',
             'tp_taylor': 'TP Taylor', 'uniform': 'uniform'}


def _cost_s(r: dict) -> str:
    """Mean search / pruning CPU-minutes over seeds (wall time at 1 thread), from each seed's report,
    and the search's forward passes (images) where the report counts them."""
    vals = [sd['detail'].get('search_time_s', sd['detail'].get('prune_time_s')) for sd in r.get('seeds', [])]
    vals = [v for v in vals if v is not None]
    passes = [sd['detail']['search_forward_passes'] for sd in r.get('seeds', []) if 'search_forward_passes' in sd['detail']]
    text = f'{sum(vals) / len(vals) / 60:.1f}' if vals else ''
    return text + (f' ({sum(passes) / len(passes) / 1e3:.0f}k passes)' if passes and text else '')


def t_ofb() -> str:
    rows = load('ofb_fmnist')['rows']
    dense = next(r for r in rows if r['arm'] == 'dense')
    out = []
    for b in sorted({r['budget'] for r in rows if r['arm'] != 'dense'}, reverse=True):
        for arm, name in _OFB_ARMS.items():
            r = next((x for x in rows if x['arm'] == arm and x['budget'] == b), None)
            if r is not None:
                out.append([f'{b:g}', name, _top1(r), f"{r['gmacs'] / dense['gmacs']:.3f}", f"{r['params_m']:.3f} M",
                            _pm(r, 'throughput_ratio'), _pm(r, 'latency_speedup'), _cost_s(r)])
    return '\n'.join([table(['GMACs budget', 'arm', 'top-1 (%)', 'GMACs / dense', 'params',
                             'measured throughput speed-up', 'measured batch-1 speed-up',
                             'search / pruning CPU-min (forward passes)'], out),
                      source(['ofb_fmnist'], 'python benchmarks/ofb_fmnist.py all --jobs 2')[:-len('</sub>')] +
                      f" Dense DeiT-nano: {dense['top1']:.2f}%. Mean ± sample std over seeds; speed-ups measured "
                      f"interleaved against the dense model in one process.</sub>"])


def t_ofb_verdict() -> str:
    rows = load('ofb_fmnist')['rows']
    out = []
    for b in sorted({r['budget'] for r in rows if r['arm'] == 'ofb'}, reverse=True):
        ours = next(r for r in rows if r['arm'] == 'ofb' and r['budget'] == b)
        for peer in ('nvit', 'tp_taylor', 'uniform'):
            other = next((r for r in rows if r['arm'] == peer and r['budget'] == b), None)
            if other is None:
                continue
            gap = ours['top1'] - other['top1']
            spread = ours.get('top1_std', 0.0) + other.get('top1_std', 0.0)
            out.append([f'{b:g}', _OFB_ARMS[peer], f'{gap:+.2f} (spread {spread:.2f})', verdict(ours, other)])
    return '\n'.join([table(['GMACs budget', 'OFB against', 'top-1 gap (pt)', 'accuracy'], out),
                      "'ahead' / 'behind': the gap of the means exceeds the sum of the two standard deviations over "
                      "seeds; otherwise 'within the spread'."])


def _nvit_row(arm: str, budget: float) -> dict:
    for r in load('nvit_fmnist')['rows']:
        if r['arm'] == arm and r['budget'] == budget:
            return r
    raise MissingResult(f'nvit_fmnist has no {arm} row at budget {budget}')


def _ofb_rows() -> list:
    return load('ofb_fmnist')['rows']


def ofb_nvit_gap(pick) -> str:
    """``pick`` (min / max) over the budgets of NViT's top-1 minus OFB's (points)."""
    rows = _ofb_rows()
    gaps = [next(r for r in rows if r['arm'] == 'nvit' and r['budget'] == o['budget'])['top1'] - o['top1']
            for o in rows if o['arm'] == 'ofb']
    return f'{pick(gaps):.1f}'


def ofb_seed0(arm: str, key: str, budget: float = 0.35) -> str:
    """Seed 0's top-1 (%) or GMACs / dense of ``arm`` at ``budget`` (the ablations ran seed 0 only)."""
    rows = _ofb_rows()
    dense = next(r for r in rows if r['arm'] == 'dense')
    s = next(s for r in rows if r['arm'] == arm and r['budget'] == budget for s in r['seeds'] if s['seed'] == 0)
    return f"{s['top1']:.2f}" if key == 'top1' else f"{s['gmacs'] / dense['gmacs']:.3f}"


def ofb_forced_max() -> str:
    """The most modules any OFB run of the benchmark had to settle when its step budget ended."""
    return str(max(s['detail'].get('forced_modules', 0) for r in _ofb_rows() if r['arm'] == 'ofb' for s in r['seeds']))
