"""``deitlab`` command line: each subcommand calls one public function.

With ``--json`` a subcommand prints one JSON object on the last line of stdout; progress and logs go
to stderr. Errors from bad input print ``deitlab: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        for k, v in result.items():
            print(f'{k}: {v}')


def _add_dataclass_args(p: argparse.ArgumentParser, cls, required=(), exclude=()) -> None:
    """One flag per dataclass field: bools as --x/--no-x, dicts as K=V pairs, tuples comma-separated."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = '--' + f.name.replace('_', '-')
        hint = hints[f.name]
        base = hint
        if typing.get_origin(hint) is typing.Union:   # Optional[X] -> X
            base = next(a for a in typing.get_args(hint) if a is not type(None))
        base = typing.get_origin(base) or base        # Dict[str, int] -> dict
        default = argparse.SUPPRESS
        if f.name in required:
            p.add_argument(flag, required=True, type=base)
        elif base is dict:
            p.add_argument(flag, nargs='*', default=default, metavar='K=V',
                           help='key=value pairs (values parsed as JSON when possible)')
        elif base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif base is tuple:
            p.add_argument(flag, type=lambda v: tuple(x for x in v.split(',') if x), default=default,
                           help=f'comma-separated (default: {",".join(f.default)})')
        else:
            extra = f.metadata.get('help')
            extra = extra() if callable(extra) else extra
            p.add_argument(flag, type=base, default=default,
                           help=f'{extra} (default: {_default_of(f)})' if extra else f'(default: {_default_of(f)})')


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig
    p.add_argument('--config', help='YAML file of options; its values become the defaults, flags win')
    _add_dataclass_args(p, TrainConfig)


def _default_of(f) -> str:
    if f.default is not dataclasses.MISSING:
        return str(f.default)
    return '{}'


def _parse_kv(items, flag: str = '--model-kwargs') -> dict:
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ValueError(f'{flag} takes K=V pairs, got {item!r}')
        k, v = item.split('=', 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_train_config(args: argparse.Namespace):
    """Precedence, lowest first: the recipe (``--recipe``, or ``recipe:`` in the YAML), ``--config``
    values, explicit flags."""
    from .train.config import TrainConfig, config_fields, load_yaml_defaults
    values = load_yaml_defaults(args.config) if getattr(args, 'config', None) else {}
    for name in config_fields():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    if isinstance(values.get('model_kwargs'), list):
        values['model_kwargs'] = _parse_kv(values['model_kwargs'])
    return TrainConfig.from_recipe(values.pop('recipe', 'deit'), **values)


def cmd_train(args) -> dict:
    from .train import train
    return train(build_train_config(args))


def cmd_eval(args) -> dict:
    from .evaluate import evaluate_model
    return evaluate_model(args.model, args.data, split=args.split, batch_size=args.batch_size,
                          device=args.device, workers=args.workers)


def cmd_bench(args) -> dict:
    from .bench import benchmark_model
    from .rundir import create
    kwargs = {}
    if args.img_size:
        kwargs['img_size'] = args.img_size
    if args.in_chans:
        kwargs['in_chans'] = args.in_chans
    model = create(args.model, **kwargs)
    if args.device:
        model.to(args.device)
    res = benchmark_model(model, batch_size=args.batch_size, quick=args.quick)
    res['model'] = args.model
    return res


def cmd_models(args) -> dict:
    from .bench import format_table, models_table
    rows = models_table()
    if not args.json:
        print(format_table(rows, ['name', 'input_size', 'params_m', 'gmacs']))
    return {'models': rows}


def cmd_prune_nvit(args) -> dict:
    from .bench.speed import fix_malloc_thresholds
    from .prune import NViTConfig, prune_nvit
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(NViTConfig) if hasattr(args, f.name)}
    for name in ('group_sizes', 'min_keep', 'lut_grid'):
        if isinstance(values.get(name), list):
            values[name] = _parse_kv(values[name], '--' + name.replace('_', '-'))
    cfg = NViTConfig(**values).validate()
    # the latency table and the final speed comparison see the same allocation pattern (timing.py)
    fix_malloc_thresholds()
    report = prune_nvit(cfg)
    if not args.json:
        print(report.pop('table'))
        print(f'run directory {report["run_dir"]}; widths plot {report["plot"]}')
        return {}
    report.pop('table', None)
    return report


def cmd_fuse(args) -> dict:
    from .bench.speed import fix_malloc_thresholds
    from .tokens.fuse import FuseConfig, fuse_model
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FuseConfig) if hasattr(args, f.name)}
    cfg = FuseConfig(**values)
    if cfg.measure:
        fix_malloc_thresholds()   # the same allocation pattern in every round and every run
    report = fuse_model(cfg)
    table = report.pop('table')
    if not args.json:
        print(table)
        print(f'tokens per block: {report["tokens"]}; GMACs {report["gmacs_ratio"]:.3f} of the model')
        s = report.get('settings')
        if s:
            print(f'speed-ups: throughput / batch-1 latency over the unpatched model with fused attention, the '
                  f'median of {s["rounds"]} interleaved rounds (min-max over the rounds in brackets); batch '
                  f'{s["batch_size"]}, {s["threads"]} threads, load average {s.get("load_avg")} -> '
                  f'{s.get("load_avg_after")}')
        for line in report['warnings']:
            print(line)
        return {}
    return report


def cmd_demo(args) -> dict:
    from .bench.speed import fix_malloc_thresholds
    from .demo import run_demo
    fix_malloc_thresholds()   # the allocation pattern the demo's committed latency table was timed with
    result = run_demo(out=args.out, quick=args.quick, progress=not args.json)
    return result if args.json else {}   # without --json the demo has printed its table


def _read_key(args) -> str:
    from .unlearnable import UnlearnableError
    if args.key_file is None:
        return args.key
    try:
        with open(args.key_file, encoding='utf-8') as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UnlearnableError(f'cannot read key file {args.key_file}: '
                               f'{getattr(e, "strerror", None) or type(e).__name__}') from None


def cmd_unlearnable_make(args) -> dict:
    from .unlearnable import make_unlearnable
    res = make_unlearnable(args.data, _read_key(args), args.out, kernel_size=args.kernel_size, blur=args.blur,
                           fraction=args.fraction, progress=False if args.json else None,
                           overwrite=args.overwrite)
    if args.json:
        return res
    tr, va = res['splits']['train'], res['splits']['val']
    return {'out_dir': res['out_dir'], 'train': f'{tr["poisoned"]} of {tr["total"]} images poisoned',
            'val': f'{va["total"]} images, clean', 'key_fingerprint': res['key_fingerprint'],
            'manifest': res['manifest_path'], 'load_with': f'folder:{res["out_dir"]}'}


def cmd_unlearnable_eval(args) -> dict:
    from .unlearnable import evaluate_unlearnable
    cfg = build_train_config(args)
    defences = [d for d in args.defences.split(';') if d.strip()] or ['none']
    return evaluate_unlearnable(args.poisoned, cfg, args.out, defences=defences, data_spec=args.source,
                                clean=not args.no_clean)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='deitlab', description='DeiT-family vision transformers on timm.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('train', help='train a model with the DeiT recipe')
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('eval', help='top-1/top-5 of a model on a dataset split')
    p.add_argument('--model', required=True, help='timm/deitlab name or run directory')
    p.add_argument('--data', required=True, help='dataset spec: glyphs, fashion-mnist[:PATH], folder:PATH')
    p.add_argument('--split', default='val', choices=['train', 'val'])
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--device', default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('bench', help='params, GMACs, latency, throughput, peak memory')
    p.add_argument('--model', required=True, help='timm/deitlab name or run directory')
    p.add_argument('--batch-size', type=int, default=64, help='batch for throughput (latency uses 1)')
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--in-chans', type=int, default=None)
    p.add_argument('--device', default=None)
    p.add_argument('--quick', action='store_true', help='fewer repeats')
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser('prune', help='structural pruning into a smaller, faster model')
    methods = p.add_subparsers(dest='method', required=True)
    from .prune import NViTConfig
    q = methods.add_parser('nvit', help='NViT: Hessian-aware global pruning with a latency budget')
    _add_dataclass_args(q, NViTConfig, required=('model', 'data', 'out'))
    q.add_argument('--json', action='store_true', help='print one JSON object on the last line')
    q.set_defaults(func=cmd_prune_nvit)

    p = sub.add_parser('fuse', help='token reduction (ToMe, MCTF): evaluate and benchmark the fused model')
    methods = p.add_subparsers(dest='method', required=True)
    from .tokens.fuse import FuseConfig
    for method, text in (('tome', 'ToMe: bipartite token merging on keys'),
                         ('mctf', 'MCTF: multi-criteria token fusion with one-step-ahead attention'),
                         ('mctf-fast', 'MCTF-Fast: fuse 35%% of the tokens at three blocks')):
        q = methods.add_parser(method, help=text)
        _add_dataclass_args(q, FuseConfig, required=('model',), exclude=('method',))
        q.add_argument('--json', action='store_true', help='print one JSON object on the last line')
        q.set_defaults(func=cmd_fuse)

    p = sub.add_parser('unlearnable', help='unlearnable datasets (CUDA: class-wise convolution filters)')
    actions = p.add_subparsers(dest='action', required=True)
    q = actions.add_parser('make', help='write a CUDA-poisoned ImageFolder copy of a dataset (load it with '
                                        'folder:OUT)')
    q.add_argument('--data', required=True, help='dataset spec: glyphs[:k=v,...], fashion-mnist[:PATH], folder:PATH')
    q.add_argument('--out', required=True, help='output directory (train/, val/, manifest.json)')
    keys = q.add_mutually_exclusive_group(required=True)
    keys.add_argument('--key', help='private key, at least 8 characters (visible in the process list: '
                                    'prefer --key-file)')
    keys.add_argument('--key-file', help='file holding the key (surrounding whitespace is stripped)')
    q.add_argument('--kernel-size', type=int, default=3, help='filter side k, odd (default: 3)')
    q.add_argument('--blur', type=float, default=0.3, help='blur parameter p_b in [0, 1) (default: 0.3)')
    q.add_argument('--fraction', type=float, default=1.0, help='share of each training class to poison '
                                                               '(default: 1.0)')
    q.add_argument('--overwrite', action='store_true', help='replace train/, val/, manifest.json in a '
                                                            'non-empty --out')
    q.add_argument('--json', action='store_true', help='print one JSON object on the last line')
    q.set_defaults(func=cmd_unlearnable_make)
    q = actions.add_parser('eval', help='train one recipe on the clean data and on a poisoned copy (and with '
                                        'defences); report clean test accuracy')
    q.add_argument('--poisoned', required=True, help='a directory written by deitlab unlearnable make')
    q.add_argument('--source', help='the clean dataset spec (default: the manifest\'s source)')
    q.add_argument('--out', required=True, help='directory for the runs and unlearnable_eval.json')
    q.add_argument('--defences', default='none', help="';'-separated defences trained on the poisoned data, "
                   "e.g. 'none;blur:p=0.3;noise:std=0.25;adv:eps=4,steps=3' (default: none)")
    q.add_argument('--no-clean', action='store_true', help='skip the clean-data run')
    q.add_argument('--json', action='store_true', help='print one JSON object on the last line')
    from .train.config import TrainConfig
    _add_dataclass_args(q, TrainConfig, exclude=('data', 'out', 'defence'))
    q.set_defaults(func=cmd_unlearnable_eval)

    p = sub.add_parser('models', help='registered deitlab architectures')
    p.set_defaults(func=cmd_models)

    p = sub.add_parser('demo', help='the main job: train a small DeiT on glyphs and report')
    p.add_argument('--out', default='demo-out')
    p.add_argument('--quick', action='store_true', help='a much shorter run (smoke test)')
    p.set_defaults(func=cmd_demo)

    for name, p in sub.choices.items():
        if name not in ('prune', 'fuse', 'unlearnable'):
            p.add_argument('--json', action='store_true', help='print one JSON object on the last line')
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from .errors import USER_ERRORS
    try:
        result = args.func(args)
    except USER_ERRORS as e:
        print(f'deitlab: error: {e}', file=sys.stderr)
        if args.json:
            print(json.dumps({'error': str(e), 'type': type(e).__name__}))
        return 2
    if (args.command not in ('models',) or args.json) and (result or args.json):
        _emit(result, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
