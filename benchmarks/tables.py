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
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling table modules, also when imported by path

from _tables_base import (BLOCK, DOCS, INLINE, ROOT, MissingResult, f, f2, load, mean_std, source,  # noqa: E402
                          table)
from tables_methods import (t_dcal, t_dcal_reid_features, t_multilevel, t_multilevel_stages, t_papyri,  # noqa: E402
                            t_resnas)
from tables_papyri import t_papyri_demo, t_papyri_pipeline  # noqa: E402
from tables_prune import (_lc_mean, _lc_rows, _nvit_row, ofb_forced_max, ofb_nvit_gap, ofb_seed0, t_latency_check, t_nvit,  # noqa: E402
                          t_nvit_ablation, t_nvit_verdict, t_ofb, t_ofb_verdict)

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


def t_export() -> str:
    res = load('export')
    st, b = res['settings'], res['batch']

    def ratio(d: dict) -> str:
        return f"{d['ratio']:.2f} ({d['lo']:.2f}-{d['hi']:.2f})"

    def legacy(ts: dict) -> str:
        return 'refused' if ts['status'] == 'refused' else f"{ts['max_abs_diff']:.1e}"
    rows = [[r['name'], f"{r['max_abs_diff']:.1e}", f"{r['logits_abs_max']:.2g}", ratio(r['speed']['batch_1']),
             ratio(r['speed'][f'batch_{b}']), legacy(r['torchscript_exporter'])] for r in res['rows']]
    lines = [table(['model', 'max abs logit difference', 'largest logit', 'ONNX Runtime / PyTorch, batch 1',
                    f'batch {b}', 'TorchScript exporter: difference'], rows),
             f"Speed: ONNX Runtime's over PyTorch's (above 1: ONNX Runtime is faster), the median of {res['rounds']} "
             f"interleaved rounds (min-max over the rounds), {st['threads']} thread(s) each, CPU; load average "
             f"{st['load_avg_start']} -> {st['load_avg_end']}. Difference: the largest over 3 seeded random inputs "
             f"(the tolerance is {res['tolerance']:g}). onnxruntime {st['onnxruntime']}, torch {st['torch']}."]
    for r in res['refused']:
        lines.append(f"Refused: {r['name']}: {r['error']}" if r['refused'] else f"Exported: {r['name']}.")
    lines.append(source(['export'], res['command']))
    return '\n'.join(lines)


TABLES: Dict[str, Callable[[], str]] = {
    'tokens_deit_s': t_tokens_deit_s, 'export': t_export,
    'demo': t_demo, 'mixpro': t_mixpro, 'tokens_fmnist': t_tokens_fmnist, 'tokens_sweep': t_tokens_sweep,
    'mixers': t_mixers, 'unlearnable': t_unlearnable, 'unlearnable_curve': t_unlearnable_curve,
    'unlearnable_settings': t_unlearnable_settings, 'nvit': t_nvit, 'nvit_ablation': t_nvit_ablation,
    'nvit_verdict': t_nvit_verdict, 'latency_check': t_latency_check, 'ofb': t_ofb, 'ofb_verdict': t_ofb_verdict,
    'multilevel': t_multilevel, 'multilevel_stages': t_multilevel_stages, 'dcal': t_dcal,
    'dcal_reid_features': t_dcal_reid_features, 'resnas': t_resnas,
    'papyri': t_papyri, 'papyri_demo': t_papyri_demo, 'papyri_pipeline': t_papyri_pipeline,
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
    'ofb.forced.max': ofb_forced_max, 'ofb.nvit_gap.min': lambda: ofb_nvit_gap(min), 'ofb.nvit_gap.max': lambda: ofb_nvit_gap(max),
    **{f'ofb.s0.{arm}.{key}': (lambda arm=arm, key=key: ofb_seed0(arm, key))
       for arm in ('ofb', 'ofb_nopmim', 'ofb_paper') for key in ('top1', 'gmacs')},
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
