"""The README tables and quoted figures, generated from the benchmarks' JSON results.

Every figure the READMEs quote from a benchmark stands between markers that this script fills in:

* a block ``<!-- gen:NAME -->`` ... ``<!-- /gen:NAME -->`` holds a whole table (and a line naming the
  JSON it comes from and the command that re-measures it);
* an inline value ``<!--v:NAME-->89.12<!--/v-->`` holds one figure in the prose.

NAME is a key of ``TABLES`` or ``VALUES`` below; each reads ``benchmarks/results/*.json`` (written only
by the benchmark scripts) and returns Markdown. ::

    python benchmarks/tables.py            # rewrite README.md and benchmarks/README.md in place
    python benchmarks/tables.py --check    # exit 1, with a diff, where a README disagrees with the JSON

``tests/test_readme_tables.py`` runs the check, so CI fails when a README and its JSON disagree, when a
marker names an unknown table, or when a JSON a README quotes is missing.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

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


# ---------------------------------------------------------------- tables

def t_mixpro() -> str:
    res = load('mixpro_fmnist')
    names = {'none': 'none', 'mixup-cutmix': 'Mixup+CutMix', 'transmix': 'TransMix', 'mixpro': 'MixPro'}
    rows = [[names.get(a, a)] + [mean_std(s[k]) for k in ('clean', 'noise', 'occlusion')]
            for a, s in res['summary'].items()]
    seeds = ', '.join(str(s) for s in res['setup']['seeds'])
    return '\n'.join([table(['mix', 'clean', 'noise', 'occlusion'], rows, bold=(1, 2, 3)), '',
                      f'Top-1 (%) on the 10k test images, mean ± std over seeds {seeds}, '
                      f"{res['setup']['epochs']} epochs.",
                      source(['mixpro_fmnist'], 'python benchmarks/mixpro_fmnist.py train && python '
                                                'benchmarks/mixpro_fmnist.py eval')])


def _token_rows(ref: str) -> Dict[tuple, dict]:
    out = {}
    for r in load('tokens_fmnist')['rows']:
        if r['ref'] == ref:
            out[(r['name'], r['stage'])] = r
    return out


def t_tokens_fmnist() -> str:
    rows = _token_rows('nano')
    base = rows[('nano/baseline', 'off-the-shelf')]
    tuned = [k[0] for k in rows if k[1] == 'fine-tuned' and k[0] != 'nano/control']
    names = [n for n in tuned]
    names.sort(key=lambda n: -rows[(n, 'fine-tuned')]['gmacs'])
    control = rows[('nano/control', 'fine-tuned')]
    explicit = rows[('nano/explicit attention', 'baseline')]
    out = [['dense, fused attention', f"{base['gmacs']:.4f} (1.00)", f2(base['top1']),
            f"{f2(control['top1'])} (control)", '', _secs(control), '1.00', '1.00'],
           ['dense, explicit attention', '1.00', f2(explicit['top1']), '', '', '', f(explicit['throughput_ratio']),
            f(explicit['latency_speedup'])]]
    for n in names:
        ft = rows[(n, 'fine-tuned')]
        off = rows.get((n, 'off-the-shelf'))
        label = n.split('/', 1)[1].replace('tome', 'ToMe').replace('mctf-fast', 'MCTF-Fast').replace('mctf', 'MCTF')
        label = 'STViT (9 semantic tokens)' if label == 'stvit' else label
        out.append([label, f"{ft['gmacs'] / base['gmacs']:.3f}", f2(off['top1']) if off else '', f2(ft['top1']),
                    f"{ft['top1'] - control['top1']:+.2f}", _secs(ft), f(ft['throughput_ratio']),
                    f(ft['latency_speedup'])])
    return '\n'.join([table(['setting', 'GMACs (x dense)', 'top-1 off the shelf', 'top-1 fine-tuned',
                             'vs control (pt)', 'fine-tune s', 'throughput', 'batch-1 latency'], out),
                      'Every fine-tune: one epoch, the same recipe; the control is the unpatched model fine-tuned '
                      'the same way. MCTF trains with its consistency loss (a second forward pass per step) '
                      'unless marked one-pass (ToMe\'s cost). Fine-tune seconds at 1 thread, two jobs at a time.',
                      source(['tokens_fmnist'], 'python benchmarks/tokens_fmnist.py offshelf && ... finetune '
                                                '--jobs 2 && ... speed')])


def _secs(r: dict) -> str:
    return f"{r['train_wall_s']:.0f}" if r.get('train_wall_s') else ''


def t_tokens_sweep() -> str:
    out = []
    for ref in ('nano', 'nvit'):
        rows = _token_rows(ref)
        base = rows[(f'{ref}/baseline', 'off-the-shelf')]
        for (n, stage), r in rows.items():
            if stage != 'off-the-shelf':
                continue
            out.append([ref, n.split('/', 1)[1], f"{r['gmacs']:.4f}", f"{r['gmacs'] / base['gmacs']:.3f}",
                        f2(r['top1']), f(r['throughput_ratio']), f(r['latency_speedup'])])
    return '\n'.join([table(['model', 'setting', 'GMACs', 'x dense', 'top-1', 'throughput', 'batch-1 latency'], out),
                      source(['tokens_fmnist'], 'python benchmarks/tokens_fmnist.py offshelf && ... speed')])


def f2(v):
    return f(v, 2)


def t_mixers() -> str:
    res = load('mixers')
    by = {}
    for r in res['rows']:
        by.setdefault(r['name'], {})[r['dataset']] = r
    out = []
    for name, d in by.items():
        row = [name]
        for ds in ('fashion-mnist', 'glyphs'):
            r = d.get(ds)
            row += [f2(r['top1']), f"{r['gmacs']:.4f}", f(r['throughput_ratio']), f(r['latency_speedup'])] if r \
                else [''] * 4
        out.append(row)
    return '\n'.join([table(['model', 'FMNIST top-1', 'GMACs', 'throughput', 'batch-1 speed-up', 'glyphs top-1',
                             'GMACs', 'throughput', 'batch-1 speed-up'], out, bold=(1, 5)),
                      'Throughput and batch-1 speed-up are ratios to DeiT-nano (higher is faster).',
                      source(['mixers'], 'python benchmarks/mixers.py train --jobs 2 && python benchmarks/mixers.py '
                                         'speed')])


def t_unlearnable() -> str:
    runs = load('unlearnable_fmnist')['runs']
    setup = load('unlearnable_fmnist')['setup']

    def pick(model, budget, fraction, blur=0.3, defence='none', augment=False):
        for r in runs:
            if (r['name'].split('/')[0] == model and r['budget'] == budget and r['fraction'] == fraction
                    and r['blur'] == blur and r['defence'] == defence and r['name'].endswith('+augment') == augment):
                return r
        return None

    label = {('deit-nano', 'short'): f"DeiT-nano, {setup['short_steps']} steps",
             ('resnet18', 'short'): f"ResNet-18, {setup['short_steps']} steps",
             ('deit-nano', 'long'): f"DeiT-nano, {setup['long_epochs']['deit-nano']} epochs",
             ('resnet18', 'long'): f"ResNet-18, {setup['long_epochs']['resnet18']} epochs",
             ('deit-nano', 'subset'): 'DeiT-nano, 10k-image subset'}
    out = []
    for (model, budget), name in label.items():
        row = [name]
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            r = pick(model, budget, frac)
            row.append(f2(r['top1']) if r else '')
        out.append(row)
    return '\n'.join([table(['model, budget', 'clean data', '25%', '50%', '75%', '100% poisoned'], out),
                      source(['unlearnable_fmnist'], 'python benchmarks/unlearnable_fmnist.py make && ... train '
                                                     '--jobs 2')])


def _uc_rows(data: str, model: str = 'deit-nano', poison=(3, 0.3), epochs: int = 40, train_px: int = 28,
             poison_px: int = 28) -> dict:
    """The summary row of ``unlearnable_curve.json`` (``poison`` None for clean data)."""
    for r in load('unlearnable_curve')['summary']:
        if (r['data'], r['model'], r['poison'] and tuple(r['poison']), r['epochs'], r['train_px'], r['poison_px']) == \
                (data, model, poison and tuple(poison), epochs, train_px, poison_px):
            return r
    raise MissingResult(f'unlearnable_curve has no {data}/{model}/{poison}/{epochs} ep/{train_px} px row')


def _uc_acc(r: dict) -> str:
    return f"{r['top1']:.1f}" + (f" ± {r['top1_std']:.1f}" if r['top1_std'] is not None else '')


def t_unlearnable_curve() -> str:
    res = load('unlearnable_curve')
    rows = []
    for data in res['data']:
        for model in ('deit-nano', 'resnet18'):
            for epochs in res['lengths']:
                try:
                    clean, cuda = _uc_rows(data, model, None, epochs), _uc_rows(data, model, (3, 0.3), epochs)
                except MissingResult:
                    continue
                rows.append([data, model, str(epochs), str(clean['n_seeds']), _uc_acc(clean), _uc_acc(cuda),
                             f"{cuda['top1'] - clean['top1']:+.1f}"])
    return '\n'.join([table(['data', 'model', 'epochs', 'seeds', 'clean data', 'poisoned (k = 3, p_b = 0.3)',
                             'poisoned − clean'], rows),
                      source(['unlearnable_curve'], 'python benchmarks/unlearnable_curve.py make && ... train '
                                                    '--jobs 2 && ... report')])


def t_unlearnable_settings() -> str:
    res = load('unlearnable_curve')
    longest = max(res['lengths'])
    clean = _uc_rows('fmnist-1500', 'deit-nano', None, longest)
    rows = [['clean data', '28 / 28', '', '', _uc_acc(clean)]]
    for k, b in sorted([tuple(res['default'])] + [tuple(s) for s in res['sweep']]):
        r = _uc_rows('fmnist-1500', 'deit-nano', (k, b), longest)
        rows.append([f'k = {k}, p_b = {b:g}', '28 / 28', f"{res['psnr_db'][f'fmnist-1500/k{k}-pb{b:g}']:.1f}",
                     f"{res['filter_contrast_db'][f'fmnist-1500/k{k}-pb{b:g}']:.1f}", _uc_acc(r)])
    k, b = res['default']
    for poison_px in (28, res['resize']):
        r = _uc_rows('fmnist-1500', 'deit-nano', (k, b), longest, res['resize'], poison_px)
        key = f'fmnist-1500/k{k}-pb{b:g}' + ('' if poison_px == 28 else f'-at{poison_px}')
        rows.append([f'k = {k}, p_b = {b:g}', f"{poison_px} / {res['resize']}", f"{res['psnr_db'][key]:.1f}", '',
                     _uc_acc(r)])
    return '\n'.join([table(['setting', 'poisoned / trained at (px)', 'PSNR vs clean (dB)',
                             'PSNR between two classes\' filters (dB)', f'clean top-1 after {longest} epochs'], rows),
                      source(['unlearnable_curve'], 'python benchmarks/unlearnable_curve.py report')])


_ARM = {'dense': 'dense', 'nvit': 'NViT', 'tp_taylor': 'TP Taylor', 'tp_hessian': 'TP Hessian', 'uniform': 'uniform',
        'nvit_taylor': 'NViT, Taylor score', 'nvit_magnitude': 'NViT, magnitude score',
        'nvit_fisher': 'NViT, diagonal Fisher', 'nvit_lam0': 'NViT, no latency penalty'}


def _pm(r: dict, key: str, fmt: str = '{:.2f}') -> str:
    """``mean ± std`` over seeds (the std only when the row has several seeds)."""
    if r.get(key) is None:
        return ''
    if r.get('n_seeds', 1) > 1 and f'{key}_std' in r:
        return f"{fmt.format(r[key])} ± {fmt.format(r[key + '_std'])}"
    return fmt.format(r[key])


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


def t_demo() -> str:
    res = load('demo')
    try:
        busy = load('demo_busy')
    except MissingResult:
        busy = None
    def speed(r):
        lo, hi = r.get('speedup_range') or (None, None)
        return f(r['speedup']) + (f' ({f(lo)}-{f(hi)})' if lo is not None and r['speedup'] != 1 else '')

    out = [[r['model'], f2(r['top1']), f"{r['params_m']:.3f}", f"{r['gmacs']:.4f}", f(r['latency_ms']),
            f"{r['img_per_s']:.0f}", speed(r), f(r.get('predicted'))] for r in res['rows']]
    header = ['model', 'top-1', 'params (M)', 'GMACs', 'batch-1 ms', 'img/s', 'speed-up (range)', 'predicted']
    if busy:
        header += ['top-1, busy run', 'speed-up, busy run']
        for row, b in zip(out, busy['rows']):
            row += [f2(b['top1']), speed(b)]
    s = res['settings']
    lines = [table(header, out),
             f"Speed-up: measured throughput at batch {s['batch']} over the dense model (median of interleaved "
             f"rounds; in brackets the min-max over the rounds), {s['threads']} "
             f"threads, {s['device']}; predicted: the NViT latency table's. Whole run: "
             f"{res['total_time_s'] / 60:.1f} min (load average {res['load_avg']['start']} at the start)."]
    if busy:
        lines.append(f"Busy run: the same command while another training job loaded the CPU (load average "
                     f"{busy['load_avg']['start']} -> {busy['load_avg']['end']}; {busy['total_time_s'] / 60:.1f} min).")
    lines.append(source(['demo'] + (['demo_busy'] if busy else []), 'python benchmarks/demo_run.py'))
    return '\n'.join(lines)


def t_tokens_deit_s() -> str:
    res = load('tokens_deit_s')
    st = res['settings']
    out = [[r['name'], f"{r['gmacs']:.2f}",
            f"{r['throughput_ratio']:.2f} ({r['throughput_ratio_lo']:.2f}-{r['throughput_ratio_hi']:.2f})",
            f"{r['latency_speedup']:.2f} ({r['latency_speedup_lo']:.2f}-{r['latency_speedup_hi']:.2f})"]
           for r in res['rows']]
    tome = res.get('authors_tome') or {}
    lines = [table(['model', 'GMACs', 'throughput (range over rounds)', 'batch-1 speed-up (range)'], out),
             f"{res['model']}, {res['weights']}, batch {res['batch']}, {st['threads']} thread(s), "
             f"{res['rounds']} interleaved rounds, median ratio; load average {st.get('load_avg')} while measuring."]
    if tome:
        lines.append(f"The authors' ToMe (commit {tome['tome_commit'][:7]}) gives the same logits as deitlab's "
                     f"to {tome['max_abs_diff_logits']:.1e}.")
    lines.append(source(['tokens_deit_s'], res['command'].replace('/tmp/ToMe', 'PATH_TO_TOME')))
    return '\n'.join(lines)


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


TABLES: Dict[str, Callable[[], str]] = {
    'tokens_deit_s': t_tokens_deit_s,
    'demo': t_demo, 'mixpro': t_mixpro, 'tokens_fmnist': t_tokens_fmnist, 'tokens_sweep': t_tokens_sweep,
    'mixers': t_mixers, 'unlearnable': t_unlearnable, 'unlearnable_curve': t_unlearnable_curve,
    'unlearnable_settings': t_unlearnable_settings, 'nvit': t_nvit, 'nvit_ablation': t_nvit_ablation,
    'nvit_verdict': t_nvit_verdict, 'latency_check': t_latency_check,
}


# ---------------------------------------------------------------- inline values

def _mix(arm: str, kind: str, nd: int = 1) -> Callable[[], str]:
    return lambda: f"{load('mixpro_fmnist')['summary'][arm][kind]['mean']:.{nd}f}"


def _unlvis(k: int = 3, blur: float = 0.3) -> dict:
    return next(r for r in load('unlearnable_visibility')['rows'] if r['kernel_size'] == k and r['blur'] == blur)


def _demo_row(i: int, key: str, fmt: str = '{:.1f}') -> Callable[[], str]:
    return lambda: fmt.format(load('demo')['rows'][i][key])


def _ref(*path: str, fmt: str = '{}') -> Callable[[], str]:
    def get():
        d = load('reference_fmnist')
        for p in path:
            d = d[p]
        return fmt.format(d)
    return get


def _unl(name: str, budget: str, key: str = 'top1', control: Optional[str] = None) -> Callable[[], str]:
    def get():
        for r in load('unlearnable_fmnist')['runs']:
            if r['name'] == name and r['budget'] == budget:
                return f"{(r['controls'][control] if control else r[key]):.2f}"
        raise MissingResult(f'unlearnable run {name} ({budget})')
    return get


def _nvit_row(arm: str, budget: float) -> dict:
    for r in load('nvit_fmnist')['rows']:
        if r['arm'] == arm and r['budget'] == budget:
            return r
    raise MissingResult(f'nvit_fmnist has no {arm} row at budget {budget}')


def _tt(key: str) -> Callable[[], str]:
    return lambda: f"{load('train_throughput')[key]:.2f}"


def _tok(name: str, stage: str, key: str) -> Callable[[], str]:
    """A value of the nano token-reduction table: ``tok.NAME.STAGE3.KEY``, NAME as ``mctf-r8-one-pass``
    (STAGE3: 'off' or 'fin')."""
    return lambda: (f2 if key == 'top1' else f)(_token_rows('nano')[(f'nano/{name}', stage)][key])


VALUES: Dict[str, Callable[[], str]] = {
    **{f'mixpro.{a}.{k}': _mix(a, k) for a in ('none', 'mixup-cutmix', 'transmix', 'mixpro')
       for k in ('clean', 'noise', 'occlusion')},
    'ref.top1': _ref('measured', 'test_top1', fmt='{:.2f}'),
    'ref.epochs': _ref('train', 'epochs'),
    'ref.cpu_min': lambda: f"{load('reference_fmnist')['train']['cpu_s'] / 60:.0f}",
    'ref.img_per_s': _ref('measured', 'bench', 'images_per_s', fmt='{:.0f}'),
    'ref.latency_ms': _ref('measured', 'bench', 'latency_ms', fmt='{:.1f}'),
    'tt.median': _tt('median_ratio'), 'tt.min': _tt('min_ratio'), 'tt.max': _tt('max_ratio'),
    'tt.cpu_median': _tt('median_cpu_ratio'),
    'unlvis.kept': lambda: f"{_unlvis()['resize_kept']:.2f}",
    'unlvis.agree': lambda: f"{_unlvis()['resize_agree']:.2f}",
    'unlvis.psnr': lambda: f"{_unlvis()['psnr_median']:.1f}",
    'unl.deit.clean': _unl('deit-nano/clean', 'long'), 'unl.deit.cuda': _unl('deit-nano/cuda 1', 'long'),
    'unl.r18.clean': _unl('resnet18/clean', 'long'), 'unl.r18.cuda': _unl('resnet18/cuda 1', 'long'),
    'unl.deit.own': _unl('deit-nano/cuda 1', 'long', control='own filter'),
    'unl.r18.own': _unl('resnet18/cuda 1', 'long', control='own filter'),
    'unl.deit.blur': _unl('deit-nano/cuda 1+blur', 'long'), 'unl.deit.adv': _unl('deit-nano/cuda 1+adv', 'long'),
    'unl.deit.augment': _unl('deit-nano/cuda 1+augment', 'long'),
    'demo.dense.top1': _demo_row(0, 'top1'), 'demo.nvit.top1': _demo_row(1, 'top1'),
    'demo.nvit.speedup': _demo_row(1, 'speedup', '{:.2f}'), 'demo.nvit.predicted': _demo_row(1, 'predicted', '{:.2f}'),
    'demo.dense.params': _demo_row(0, 'params_m', '{:.2f}'), 'demo.nvit.params': _demo_row(1, 'params_m', '{:.2f}'),
    'demo.fused.top1': _demo_row(2, 'top1'), 'demo.fused.speedup': _demo_row(2, 'speedup', '{:.2f}'),
    'demo.pool.top1': _demo_row(3, 'top1'), 'demo.pool.speedup': _demo_row(3, 'speedup', '{:.2f}'),
    'nvit.0.5.top1': lambda: f"{_nvit_row('nvit', 0.5)['top1']:.2f}",
    'nvit.0.5.gmacs_ratio': lambda: f"{_nvit_row('nvit', 0.5)['gmacs'] / _nvit_row('dense', 1.0)['gmacs']:.2f}",
    **{f"tok.{n.replace(' r=', '-r').replace(' ', '-')}.{stage[:3]}.{k}": _tok(n, stage, k) for n in ('tome r=4', 'tome r=6', 'tome r=8', 'tome r=10',
                                                               'mctf r=6', 'mctf r=8', 'mctf r=12', 'mctf r=16',
                                                               'mctf r=6 one-pass', 'mctf r=8 one-pass',
                                                               'mctf r=12 one-pass', 'mctf r=16 one-pass',
                                                               'mctf-fast r=0.35', 'stvit')
       for stage in ('off-the-shelf', 'fine-tuned') for k in ('top1', 'throughput_ratio', 'latency_speedup')},
    'lc.mean': lambda: f"{_lc_mean('paired', stat=None):.1%}", 'lc.max': lambda: f"{_lc_mean('paired'):.1%}",
    'lc.plain.mean': lambda: f"{_lc_mean('plain', stat=None):.1%}", 'lc.plain.max': lambda: f"{_lc_mean('plain'):.1%}",
    'lc.fastest.mean': lambda: f"{_lc_mean('fastest', stat=None):.1%}",
    'lc.fastest.max': lambda: f"{_lc_mean('fastest'):.1%}",
    'lc.n': lambda: str(len(_lc_rows()) - len(_lc_rows('probe'))),
    'lc.e95': lambda: f"{1 / next(r for r in _lc_rows('probe') if r['name'] == 'dense E=95')['measured'] - 1:.0%}",
    'lc.qk31': lambda: f"{1 / next(r for r in _lc_rows('probe') if r['name'] == 'dense qk=31')['measured'] - 1:.0%}",
    **{f"uc.{d.split('-')[0]}.{m.split('-')[0]}.{'clean' if p is None else 'cuda'}.{e}":
       (lambda d=d, m=m, p=p, e=e: f"{_uc_rows(d, m, p, e)['top1']:.1f}")
       for d in ('fmnist-1500', 'digits') for m in ('deit-nano', 'resnet18') for p in (None, (3, 0.3))
       for e in (5, 15, 40)},
    **{f"ucs.k{k}pb{b:g}.{what}": (lambda k=k, b=b, what=what: f"{_uc_rows('fmnist-1500', poison=(k, b))['top1']:.1f}"
                                   if what == 'top1' else
                                   f"{load('unlearnable_curve')['psnr_db'][f'fmnist-1500/k{k}-pb{b:g}']:.1f}")
       for k, b in ((3, 0.1), (3, 0.3), (3, 0.6), (5, 0.3), (7, 0.3), (7, 0.6)) for what in ('top1', 'psnr')},
    'uc.fmnist.deit.cuda.40.std': lambda: f"{_uc_rows('fmnist-1500')['top1_std']:.1f}",
    'ucs.digits.psnr': lambda: f"{load('unlearnable_curve')['psnr_db']['digits/k3-pb0.3']:.1f}",
    **{f'ucs.resize{px}': (lambda px=px: f"{_uc_rows('fmnist-1500', train_px=32, poison_px=px)['top1']:.1f}")
       for px in (28, 32)},
    'demo.minutes': lambda: f"{load('demo')['total_time_s'] / 60:.1f}",
    'demo.dense_train_min': lambda: f"{load('demo_dense')['train_time_s'] / 60:.1f}",
}


# ---------------------------------------------------------------- render / check

def render(text: str) -> str:
    def block(m):
        name = m.group('name')
        if name not in TABLES:
            raise KeyError(f'unknown table {name!r} (known: {", ".join(TABLES)})')
        return m.group(1) + TABLES[name]() + '\n' + m.group(4)

    def inline(m):
        name = m.group('name')
        if name not in VALUES:
            raise KeyError(f'unknown value {name!r}')
        return m.group(1) + VALUES[name]() + m.group(4)

    return INLINE.sub(inline, BLOCK.sub(block, text))


def check(paths: Sequence[Path] = DOCS) -> List[str]:
    """Unified diffs of every README against what the JSON gives (empty: they agree)."""
    diffs = []
    for p in paths:
        old = p.read_text()
        new = render(old)
        if new != old:
            diffs.append(''.join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                      f'{p.relative_to(ROOT)} (now)', f'{p.relative_to(ROOT)} '
                                                                                      f'(from the JSON)')))
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check', action='store_true', help='do not write; exit 1 where a README differs')
    args = p.parse_args(argv)
    if args.check:
        diffs = check()
        sys.stdout.write('\n'.join(diffs))
        if diffs:
            print('\nREADME figures differ from benchmarks/results/*.json: run python benchmarks/tables.py',
                  file=sys.stderr)
        return 1 if diffs else 0
    for path in DOCS:
        old = path.read_text()
        new = render(old)
        if new != old:
            path.write_text(new)
            print('updated', path.relative_to(ROOT))
    return 0


if __name__ == '__main__':
    sys.exit(main())
