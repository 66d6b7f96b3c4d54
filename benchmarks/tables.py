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
            f"{f2(control['top1'])} (control)", '1.00', '1.00'],
           ['dense, explicit attention', '1.00', f2(explicit['top1']), '', f(explicit['throughput_ratio']),
            f(explicit['latency_speedup'])]]
    for n in names:
        ft = rows[(n, 'fine-tuned')]
        off = rows.get((n, 'off-the-shelf'))
        label = n.split('/', 1)[1].replace('tome', 'ToMe').replace('mctf-fast', 'MCTF-Fast').replace('mctf', 'MCTF')
        label = 'STViT (9 semantic tokens)' if label == 'stvit' else label
        out.append([label, f"{ft['gmacs'] / base['gmacs']:.3f}", f2(off['top1']) if off else '', f2(ft['top1']),
                    f(ft['throughput_ratio']), f(ft['latency_speedup'])])
    return '\n'.join([table(['setting', 'GMACs (x dense)', 'top-1 off the shelf', 'top-1 fine-tuned', 'throughput',
                             'batch-1 latency'], out),
                      source(['tokens_fmnist'], 'python benchmarks/tokens_fmnist.py offshelf && ... finetune '
                                                '--jobs 2 && ... speed')])


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


_ARM = {'dense': 'dense', 'nvit': 'NViT', 'tp_taylor': 'TP Taylor', 'tp_hessian': 'TP Hessian', 'uniform': 'uniform',
        'nvit_taylor': 'NViT, Taylor score', 'nvit_magnitude': 'NViT, magnitude score',
        'nvit_fisher': 'NViT, diagonal Fisher', 'nvit_lam0': 'NViT, no latency penalty'}


def _nvit_table(rows: List[dict]) -> List[List[str]]:
    out = []
    for r in rows:
        speed = r.get('throughput_ratio')
        pred = r.get('predicted_speedup')
        out.append([f"{r['budget']:g}", _ARM.get(r['arm'], r['arm']), _top1(r), f"{r['gmacs']:.4f}",
                    f"{r['params_m']:.3f} M", f(speed), f(pred)])
    return out


def _top1(r: dict) -> str:
    if 'top1_std' in r:
        return f"{r['top1']:.2f} ± {r['top1_std']:.2f}"
    return f2(r['top1'])


def t_nvit() -> str:
    rows = [r for r in load('nvit_fmnist')['rows'] if r['arm'] in ('dense', 'nvit', 'tp_taylor', 'tp_hessian',
                                                                     'uniform')]
    header = ['budget', 'arm', 'top-1', 'GMACs', 'params', 'measured throughput speed-up', 'predicted']
    out = _nvit_table(rows)
    if not any(r.get('throughput_ratio') for r in rows):   # an older run recorded no measured speed
        header.pop(5)
        out = [r[:5] + r[6:] for r in out]
    return '\n'.join([table(header, out),
                      source(['nvit_fmnist'], 'python benchmarks/nvit_fmnist.py all --jobs 2')])


def t_nvit_ablation() -> str:
    rows = [r for r in load('nvit_fmnist')['rows'] if r['arm'].startswith('nvit') and r['budget'] == 0.5]
    out = [[_ARM.get(r['arm'], r['arm']), _top1(r), f"{r['gmacs']:.4f}"] for r in rows]
    return '\n'.join([table(['arm (budget 0.5)', 'top-1', 'GMACs'], out, bold=(1,)),
                      source(['nvit_fmnist'], 'python benchmarks/nvit_fmnist.py all --arms nvit_lam0 nvit_taylor '
                                              'nvit_magnitude nvit_fisher --budgets 0.5')])


def t_demo() -> str:
    res = load('demo')
    out = [[r['model'], f2(r['top1']), f"{r['params_m']:.3f}", f"{r['gmacs']:.4f}", f(r['latency_ms']),
            f"{r['img_per_s']:.0f}", f(r['speedup']), f(r.get('predicted'))] for r in res['rows']]
    s = res['settings']
    return '\n'.join([table(['model', 'top-1', 'params (M)', 'GMACs', 'batch-1 ms', 'img/s', 'speed-up',
                             'predicted'], out),
                      f"Speed-up: measured throughput at batch {s['batch']} over the dense model, {s['threads']} "
                      f"threads, {s['device']}; predicted: the NViT latency table's. Whole run: "
                      f"{res['total_time_s'] / 60:.1f} min.",
                      source(['demo'], 'python benchmarks/demo_run.py')])


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


TABLES: Dict[str, Callable[[], str]] = {
    'tokens_deit_s': t_tokens_deit_s,
    'demo': t_demo, 'mixpro': t_mixpro, 'tokens_fmnist': t_tokens_fmnist, 'tokens_sweep': t_tokens_sweep,
    'mixers': t_mixers, 'unlearnable': t_unlearnable, 'nvit': t_nvit, 'nvit_ablation': t_nvit_ablation,
}


# ---------------------------------------------------------------- inline values

def _mix(arm: str, kind: str, nd: int = 1) -> Callable[[], str]:
    return lambda: f"{load('mixpro_fmnist')['summary'][arm][kind]['mean']:.{nd}f}"


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


VALUES: Dict[str, Callable[[], str]] = {
    **{f'mixpro.{a}.{k}': _mix(a, k) for a in ('none', 'mixup-cutmix', 'transmix', 'mixpro')
       for k in ('clean', 'noise', 'occlusion')},
    'ref.top1': _ref('measured', 'test_top1', fmt='{:.2f}'),
    'ref.epochs': _ref('train', 'epochs'),
    'ref.cpu_min': lambda: f"{load('reference_fmnist')['train']['cpu_s'] / 60:.0f}",
    'ref.img_per_s': _ref('measured', 'bench', 'images_per_s', fmt='{:.0f}'),
    'ref.latency_ms': _ref('measured', 'bench', 'latency_ms', fmt='{:.1f}'),
    'tt.median': _tt('median_ratio'), 'tt.min': _tt('min_ratio'), 'tt.max': _tt('max_ratio'),
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
    'demo.minutes': lambda: f"{load('demo')['total_time_s'] / 60:.1f}",
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
