"""Token reduction on DeiT-S: throughput and batch-1 latency of ToMe, MCTF and MCTF-Fast against the
unpatched model, measured interleaved in one process, with the authors' ToMe alongside when a
checkout of it is given.

Model: timm ``deit_small_patch16_224`` with random weights (speed does not depend on the weights;
nothing is downloaded), 224 px, fp32, eval mode, ``--threads`` intra-op threads (2), fixed malloc
thresholds (``mallopt``). Arms: the unpatched model with fused attention (timm's default: the
baseline) and with explicit softmax attention, deitlab's ToMe r=13, MCTF r=16 and MCTF-Fast (35% at
blocks 3, 6, 9), and -- with ``--tome-path DIR``, a checkout of facebookresearch/ToMe -- the
authors' ToMe at the same r. The authors' code is imported from that directory only for this run
(it pins an old timm, so it is never installed and never part of this project); before any timing
its logits are compared with deitlab's ToMe on the same batch and the largest absolute difference
is recorded (the run stops if it exceeds 1e-3).

Speed: ``deitlab.bench.compare`` -- ``--rounds`` rounds (9), each running every model in turn
(the order reversed every other round) for batch-1 latency and then throughput at ``--batch``
(32); every ratio is taken within a round and reported as the median over the rounds with its
min-max range. GMACs are closed form (``model.token_fusion.gmacs``; the authors' ToMe has the same
token schedule as deitlab's at the same r).

    python benchmarks/tokens_deit_s.py [--tome-path /path/to/ToMe] [--rounds 9]

About 4 minutes on two idle CPU cores (longer on a busy machine; the load average before and
after is recorded). Writes ``results/tokens_deit_s.json`` and ``results/tokens_deit_s.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
MODEL = 'deit_small_patch16_224'
PARITY_TOL = 1e-3


def _git_commit(path: Path):
    try:
        out = subprocess.run(['git', '-C', str(path), 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _authors_tome(base, r: int, tome_path: Path):
    """``base`` copied and patched with the authors' timm patch from ``tome_path``."""
    sys.path.insert(0, str(tome_path))
    try:
        import tome  # noqa: the checkout given on the command line
    finally:
        sys.path.pop(0)
    m = copy.deepcopy(base)
    tome.patch.timm(m, trace_source=False, prop_attn=True)
    m.r = r
    return m


def build(args):
    import timm
    import torch
    from deitlab.bench import analytic_gmacs
    from deitlab.bench.common import random_input
    from deitlab.tokens.fuse import apply_token_fusion

    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    explicit = copy.deepcopy(base)
    for mod in explicit.modules():
        if hasattr(mod, 'fused_attn'):
            mod.fused_attn = False
    tome = apply_token_fusion(copy.deepcopy(base), 'tome', args.tome_r)
    arms = {'DeiT-S': (base, dict(method='none', r=None)),
            'DeiT-S explicit attention': (explicit, dict(method='explicit attention', r=None)),
            f'ToMe r={args.tome_r}': (tome, dict(method='tome', r=args.tome_r))}
    parity = None
    if args.tome_path:
        authors = _authors_tome(base, args.tome_r, Path(args.tome_path))
        x = random_input((3, 224, 224), 4, torch.device('cpu'), torch.float32, seed=1)
        with torch.inference_mode():
            ours, theirs = tome(x), authors(x)
        diff = float((ours - theirs).abs().max())
        parity = dict(max_abs_diff_logits=diff, images=4, logits_max_abs=float(ours.abs().max()),
                      tolerance=PARITY_TOL, tome_commit=_git_commit(Path(args.tome_path)))
        print(f'authors\' ToMe r={args.tome_r} against deitlab ToMe: max |logit difference| {diff:.2e}', flush=True)
        if not diff <= PARITY_TOL:
            raise SystemExit(f'the authors\' ToMe and deitlab\'s differ by {diff:.2e} > {PARITY_TOL}: not timing them')
        arms[f'ToMe r={args.tome_r} (authors)'] = (authors, dict(method='tome (authors)', r=args.tome_r))
    arms[f'MCTF r={args.mctf_r}'] = (apply_token_fusion(copy.deepcopy(base), 'mctf', args.mctf_r),
                                     dict(method='mctf', r=args.mctf_r))
    arms['MCTF-Fast'] = (apply_token_fusion(copy.deepcopy(base), 'mctf-fast', None), dict(method='mctf-fast', r=0.35))
    base_gmacs = analytic_gmacs(base)
    info = {}
    for name, (m, meta) in arms.items():
        tf = getattr(m, 'token_fusion', None)
        if tf is not None:
            g = tf.gmacs(m)
            s = tf.schedule(m.patch_embed.num_patches + m.num_prefix_tokens, len(m.blocks))
            tokens = [b['tokens_in'] for b in s] + [s[-1]['tokens_out']]
        elif meta['method'] == 'tome (authors)':
            g, tokens = info[f'ToMe r={args.tome_r}']['gmacs'], info[f'ToMe r={args.tome_r}']['tokens']
        else:
            g, tokens = base_gmacs, None
        info[name] = dict(meta, gmacs=g, tokens=tokens)
    return {n: m for n, (m, _) in arms.items()}, info, parity


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], 'throughput_ratio', f'throughput / DeiT-S (batch {res["batch"]})'),
                           (axes[1], 'latency_speedup', 'batch-1 latency speed-up over DeiT-S')):
        for row in res['rows']:
            y, lo, hi = row[key], row[f'{key}_lo'], row[f'{key}_hi']
            ax.errorbar(row['gmacs'], y, yerr=[[y - lo], [hi - y]], fmt='*' if row['baseline'] else 'o', capsize=3)
            ax.annotate(row['name'], (row['gmacs'], y), textcoords='offset points', xytext=(5, 3), fontsize=7)
        ax.set_xlabel('GMACs (closed form)')
        ax.set_ylabel(label)
        ax.grid(alpha=.3)
    fig.suptitle(f'DeiT-S token reduction, {res["settings"]["threads"]} CPU threads: median of {res["rounds"]} '
                 f'interleaved rounds, bars min-max', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tome-path', default=None, help='a checkout of facebookresearch/ToMe (its tome/ package is '
                                                     'imported from there for this run only)')
    p.add_argument('--rounds', type=int, default=9)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--tome-r', type=int, default=13)
    p.add_argument('--mctf-r', type=int, default=16)
    p.add_argument('--out', default=str(RESULTS / 'tokens_deit_s.json'))
    args = p.parse_args(argv)

    from deitlab.bench.speed import fix_malloc_thresholds
    malloc = fix_malloc_thresholds()
    import timm
    import torch
    from deitlab.bench import compare
    from deitlab.bench.common import load_average
    from deitlab.bench.report import format_compare
    from deitlab.bench.speed import noise_warnings

    torch.set_num_threads(args.threads)
    t0 = time.time()
    load_before = load_average()
    models, info, parity = build(args)
    rows = compare(models, 'DeiT-S', input_size=(3, 224, 224), batch_size=args.batch, rounds=args.rounds,
                   threads=args.threads, gmacs=False)
    settings = rows[0]['settings']
    base_gmacs = info['DeiT-S']['gmacs']
    for row in rows:
        row.pop('settings')
        row.update(info[row['name']])
        row['gmacs_ratio'] = row['gmacs'] / base_gmacs
    res = dict(benchmark='tokens_deit_s', model=MODEL, weights='random (timm init, seed 0)', batch=args.batch,
               rounds=args.rounds, command=' '.join(['python', 'benchmarks/tokens_deit_s.py'] + (argv or sys.argv[1:])),
               authors_tome=parity if parity else 'not run (no --tome-path)', rows=rows,
               warnings=noise_warnings(rows, settings=settings),
               settings=dict(settings, threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
                             python=platform.python_version(), machine=platform.machine(), malloc=malloc,
                             load_avg_before_build=load_before, load_avg_end=load_average(),
                             wall_s=round(time.time() - t0, 1)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + '\n')
    plot(res, out.with_suffix('.png'))
    print(format_compare(rows, ['name', 'gmacs', 'latency_ms', 'images_per_s', 'latency_speedup', 'throughput_ratio']))
    for line in res['warnings']:
        print(line)
    print(f'{args.rounds} rounds, batch {args.batch}, {res["settings"]["threads"]} threads, load average '
          f'{load_before} -> {res["settings"]["load_avg_end"]}, {res["settings"]["wall_s"]} s; wrote {out}')


if __name__ == '__main__':
    main()
