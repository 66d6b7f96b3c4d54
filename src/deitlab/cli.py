"""``deitlab`` command line: each subcommand calls one public function.

With ``--json`` a subcommand prints one JSON object on the last line of stdout; progress and logs go
to stderr. Errors from bad input print ``deitlab: error: ...`` and exit with status 2.

``--help`` is the documentation. Every flag has a help line and sits in a section (:data:`GROUPS`);
the flags of the configuration dataclasses (``TrainConfig``, ``NViTConfig``, ``FuseConfig``) are
their fields, with the ``help`` and ``group`` of each field's metadata. Each subcommand that makes
such a configuration also takes ``--config FILE.yaml``; precedence, lowest first: the dataclass
defaults (for ``train`` and ``unlearnable eval``: the named recipe's), the file's values, explicit
flags. :func:`main` adds the options of the subcommand it runs only, so ``deitlab --help`` loads no
configuration module and no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Iterable, Optional

#: The sections of a subcommand's ``--help``, in order: metadata ``group`` key -> title.
GROUPS = {
    'config': 'configuration',
    'data': 'data',
    'model': 'model',
    'optimiser': 'optimiser',
    'schedule': 'schedule',
    'augmentation': 'augmentation and mixing',
    'distillation': 'distillation',
    'token fusion': 'token fusion',
    'pruning': 'pruning',
    'pruning schedule': 'pruning schedule',
    'latency table': 'latency table',
    'fine-tuning': 'fine-tuning of the pruned model',
    'poisoning': 'poisoning',
    'measurement': 'measurement',
    'run': 'run and output',
}


def _is_main_process() -> bool:
    return os.environ.get('RANK', '0') == '0'


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        for k, v in result.items():
            print(f'{k}: {v}')


def _sections(p: argparse.ArgumentParser) -> dict:
    """The argument groups of ``p`` in :data:`GROUPS` order (argparse leaves empty ones out), with
    ``-h`` in the last one."""
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups['run'].add_argument('-h', '--help', action='help', help='show this help message and exit')
    return groups


def _subcommand(sub, name: str, text: str) -> tuple:
    """A subcommand parser whose flags all sit in sections, and those sections."""
    p = sub.add_parser(name, help=text, description=_sentence(text), add_help=False)
    return p, _sections(p)


def _sentence(text: str) -> str:
    """A subcommand's line of help as its description (which argparse does not %-format)."""
    return text[0].upper() + text[1:].replace('%%', '%') + '.'


def _add_json(groups: dict) -> None:
    groups['run'].add_argument('--json', action='store_true', help='print one JSON object on the last line')


def field_doc(cls, f: dataclasses.Field) -> tuple:
    """``(group, help)`` of a configuration dataclass field, from its metadata (a callable help is
    called). ``TypeError`` when either is missing or the group is not one of :data:`GROUPS`."""
    text = f.metadata.get('help')
    text = text() if callable(text) else text
    group = f.metadata.get('group')
    if not text or group not in GROUPS:
        raise TypeError(f'{cls.__name__}.{f.name}: its metadata needs a help line and a group, one of '
                        f'{", ".join(GROUPS)}; got help={text!r}, group={group!r}')
    return group, text


def _shown_default(f: dataclasses.Field, base, required: bool) -> str:
    """`` (default: ...)`` for the help line; nothing for an unset (None) default, which the help
    line explains, a field without a default or a required one."""
    if required or f.default is dataclasses.MISSING or f.default is None:
        return ''
    if base is bool:
        return ' (default: on)' if f.default else ' (default: off)'
    if base is tuple:
        return f' (default: {",".join(f.default)})'
    return f' (default: {f.default})'


def _add_dataclass_args(groups: dict, cls, required=(), exclude=()) -> dict:
    """One flag per dataclass field, in the section its metadata names, with its help line: bools as
    --x/--no-x, dicts as K=V pairs, tuples comma-separated. Flags not given are left out of the
    namespace. Returns the fields that are flags, each with its type (int, float, bool, str, tuple, dict)."""
    hints = typing.get_type_hints(cls)
    names = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        group, text = field_doc(cls, f)
        g = groups[group]
        flag = '--' + f.name.replace('_', '-')
        hint = hints[f.name]
        base = hint
        if typing.get_origin(hint) is typing.Union:   # Optional[X] -> X
            base = next(a for a in typing.get_args(hint) if a is not type(None))
        base = typing.get_origin(base) or base        # Dict[str, int] -> dict
        names[f.name] = base
        text = text.replace('%', '%%') + _shown_default(f, base, f.name in required)
        default = argparse.SUPPRESS
        if f.name in required:
            g.add_argument(flag, type=base, default=default, help=f'{text} (required: here or in --config)')
        elif base is dict:
            g.add_argument(flag, nargs='*', default=default, metavar='K=V',
                           help=f'{text}; key=value pairs (values parsed as JSON when possible)')
        elif base is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif base is tuple:
            g.add_argument(flag, type=lambda v: tuple(x for x in v.split(',') if x), default=default,
                           help=f'{text}; comma-separated')
        else:
            g.add_argument(flag, type=base, default=default, help=text)
    return names


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    """How a subcommand makes its configuration: the fields that are flags (and may be keys of its
    ``--config`` file), those it must be given, and its parser (for the error when one is not)."""
    names: tuple
    required: tuple = ()
    parser: Optional[argparse.ArgumentParser] = None
    types: dict = dataclasses.field(default_factory=dict)   # name -> int, float, bool, str, tuple or dict


def _add_config_args(p: argparse.ArgumentParser, groups: dict, cls, required=(), exclude=(),
                     recipe: bool = False) -> None:
    """``--config FILE.yaml`` and one flag per field of ``cls`` (see :func:`config_values`)."""
    defaults = "the named recipe's defaults" if recipe else 'the defaults'
    groups['config'].add_argument(
        '--config', metavar='FILE.yaml',
        help=f'YAML file of options (the flag names, with dashes or underscores); its values replace {defaults}, '
             f'explicit flags replace its values')
    types = _add_dataclass_args(groups, cls, required=required, exclude=exclude)
    p.set_defaults(config_spec=ConfigSpec(tuple(types), tuple(required), p, types))


def config_values(args: argparse.Namespace, cls=None) -> dict:
    """The configuration's field values from ``--config`` (lowest) and the flags given (which win).
    A required field given in neither is the same usage error argparse gives for a missing flag."""
    from .train.config import coerce_value, load_yaml_defaults
    spec = getattr(args, 'config_spec', None) or ConfigSpec(tuple(f.name for f in dataclasses.fields(cls)))
    path = getattr(args, 'config', None)
    values = load_yaml_defaults(path, known=spec.names) if path else {}
    values = {k: coerce_value(v, spec.types.get(k), f'{path}: {k}') for k, v in values.items()}
    values.update({name: getattr(args, name) for name in spec.names if hasattr(args, name)})
    missing = ['--' + name.replace('_', '-') for name in spec.required if name not in values]
    if missing:
        spec.parser.error(f'the following arguments are required: {", ".join(missing)}')
    return values


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
    from .train.config import TrainConfig
    values = config_values(args, TrainConfig)
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
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    if args.in_chans is not None:
        kwargs['in_chans'] = args.in_chans
    model = create(args.model, **kwargs)
    if args.device:
        from .distributed import resolve_device
        model.to(resolve_device(args.device))
    res = benchmark_model(model, batch_size=args.batch_size, quick=args.quick)
    res['model'] = args.model
    if not args.json:   # a readable block; --json gives the whole result
        from .bench import format_benchmark
        print(format_benchmark(res))
        return {}
    return res


def cmd_models(args) -> dict:
    from .bench import format_table, models_table
    rows = models_table()
    if not args.json:
        print(format_table(rows, ['name', 'input_size', 'params_m', 'gmacs']))
    return {'models': rows}


def cmd_prune_nvit(args) -> dict:
    values = config_values(args)
    for name in ('group_sizes', 'min_keep', 'lut_grid'):
        if isinstance(values.get(name), list):
            values[name] = _parse_kv(values[name], '--' + name.replace('_', '-'))
    from .bench.speed import fix_malloc_thresholds
    from .prune import NViTConfig, prune_nvit
    cfg = NViTConfig(**values).validate()
    # the latency table and the final speed comparison see the same allocation pattern (timing.py)
    fix_malloc_thresholds()
    report = prune_nvit(cfg)
    if not _is_main_process():
        return {}
    if not args.json:
        print(report.pop('table'))
        print(f'run directory {report["run_dir"]}; widths plot {report["plot"]}')
        return {}
    report.pop('table', None)
    return report


def cmd_fuse(args) -> dict:
    values = dict(config_values(args), method=args.method)
    from .bench.speed import fix_malloc_thresholds
    from .tokens.fuse import FuseConfig, fuse_model
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


# --- the subcommands' parsers: each adds its options to the parser it is given ---

_MODEL_HELP = 'timm/deitlab name or run directory'
_DEVICE_HELP = 'torch device (default: CUDA when available, else the CPU)'


def _train_parser(p, groups) -> None:
    from .train.config import TrainConfig
    _add_config_args(p, groups, TrainConfig, recipe=True)
    _add_json(groups)
    p.set_defaults(func=cmd_train)


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (the message names the value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value
    parse.__name__ = f'int >= {minimum}'
    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def _eval_parser(p, groups) -> None:
    groups['model'].add_argument('--model', required=True, help=_MODEL_HELP)
    data = groups['data']
    data.add_argument('--data', required=True, help='dataset spec: glyphs, fashion-mnist[:PATH], folder:PATH')
    data.add_argument('--split', default='val', choices=['train', 'val'], help='the split to evaluate (default: val)')
    data.add_argument('--batch-size', type=_positive_int, default=256, help='evaluation batch size (default: 256)')
    data.add_argument('--workers', type=_count, default=0, help='data loader worker processes (default: 0)')
    groups['run'].add_argument('--device', default=None, help=_DEVICE_HELP)
    _add_json(groups)
    p.set_defaults(func=cmd_eval)


def _bench_parser(p, groups) -> None:
    model = groups['model']
    model.add_argument('--model', required=True, help=_MODEL_HELP)
    model.add_argument('--img-size', type=_positive_int, default=None, help="input side (default: the model's)")
    model.add_argument('--in-chans', type=_positive_int, default=None, help="input channels (default: the model's)")
    groups['measurement'].add_argument('--batch-size', type=_positive_int, default=64,
                                       help='batch for throughput; latency uses 1 (default: 64)')
    groups['measurement'].add_argument('--quick', action='store_true', help='fewer repeats')
    groups['run'].add_argument('--device', default=None, help=_DEVICE_HELP)
    _add_json(groups)
    p.set_defaults(func=cmd_bench)


def _prune_parser(p, groups) -> None:
    methods = p.add_subparsers(dest='method', required=True)
    from .prune.config import NViTConfig
    q, g = _subcommand(methods, 'nvit', 'NViT: Hessian-aware global pruning with a latency budget')
    _add_config_args(q, g, NViTConfig, required=('model', 'data', 'out'))
    _add_json(g)
    q.set_defaults(func=cmd_prune_nvit)


def _fuse_parser(p, groups) -> None:
    methods = p.add_subparsers(dest='method', required=True)
    from .tokens.config import FuseConfig
    from .registry import TOKEN_FUSION
    for entry in TOKEN_FUSION:
        q, g = _subcommand(methods, entry.name, entry.help.replace('%', '%%'))
        _add_config_args(q, g, FuseConfig, required=('model',), exclude=('method',))
        _add_json(g)
        q.set_defaults(func=cmd_fuse)


def _unlearnable_parser(p, groups) -> None:
    actions = p.add_subparsers(dest='action', required=True)
    q, g = _subcommand(actions, 'make', 'write a CUDA-poisoned ImageFolder copy of a dataset (load it with '
                                        'folder:OUT)')
    g['data'].add_argument('--data', required=True,
                           help='dataset spec: glyphs[:k=v,...], fashion-mnist[:PATH], folder:PATH')
    g['run'].add_argument('--out', required=True, help='output directory (train/, val/, manifest.json)')
    keys = g['poisoning'].add_mutually_exclusive_group(required=True)
    keys.add_argument('--key', help='private key, at least 8 characters (visible in the process list: '
                                    'prefer --key-file)')
    keys.add_argument('--key-file', help='file holding the key (surrounding whitespace is stripped)')
    poison = g['poisoning']
    poison.add_argument('--kernel-size', type=int, default=3, help='filter side k, odd (default: 3)')
    poison.add_argument('--blur', type=float, default=0.3, help='blur parameter p_b in [0, 1) (default: 0.3)')
    poison.add_argument('--fraction', type=float, default=1.0, help='share of each training class to poison '
                                                                    '(default: 1.0)')
    g['run'].add_argument('--overwrite', action='store_true', help='replace train/, val/, manifest.json in a '
                                                                   'non-empty --out')
    _add_json(g)
    q.set_defaults(func=cmd_unlearnable_make)

    q, g = _subcommand(actions, 'eval', 'train one recipe on the clean data and on a poisoned copy (and with '
                                        'defences); report clean test accuracy')
    g['data'].add_argument('--poisoned', required=True, help='a directory written by deitlab unlearnable make')
    g['data'].add_argument('--source', help='the clean dataset spec (default: the manifest\'s source)')
    g['run'].add_argument('--out', required=True, help='directory for the runs and unlearnable_eval.json')
    g['augmentation'].add_argument(
        '--defences', default='none', help="';'-separated defences trained on the poisoned data, e.g. "
                                           "'none;blur:p=0.3;noise:std=0.25;adv:eps=4,steps=3' (default: none)")
    g['run'].add_argument('--no-clean', action='store_true', help='skip the clean-data run')
    from .train.config import TrainConfig
    _add_config_args(q, g, TrainConfig, exclude=('data', 'out', 'defence'), recipe=True)
    _add_json(g)
    q.set_defaults(func=cmd_unlearnable_eval)


def _models_parser(p, groups) -> None:
    _add_json(groups)
    p.set_defaults(func=cmd_models)


def _demo_parser(p, groups) -> None:
    groups['run'].add_argument('--out', default='demo-out', help='output directory (default: demo-out)')
    groups['run'].add_argument('--quick', action='store_true', help='a much shorter run (smoke test)')
    _add_json(groups)
    p.set_defaults(func=cmd_demo)


#: name -> (its line of help, the function that adds its options)
COMMANDS = {
    'train': ('train a model with the DeiT recipe', _train_parser),
    'eval': ('top-1/top-5 of a model on a dataset split', _eval_parser),
    'bench': ('params, GMACs, latency, throughput, peak memory', _bench_parser),
    'prune': ('structural pruning into a smaller, faster model', _prune_parser),
    'fuse': ('token reduction (ToMe, MCTF): evaluate and benchmark the fused model', _fuse_parser),
    'unlearnable': ('unlearnable datasets (CUDA: class-wise convolution filters)', _unlearnable_parser),
    'models': ('registered deitlab architectures', _models_parser),
    'demo': ('the main job: train a small DeiT on glyphs and report', _demo_parser),
}
_NESTED = ('prune', 'fuse', 'unlearnable')   # a method or action follows; the options are on it


def make_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``deitlab`` parser. Every subcommand is listed with its line of help; the options of
    those in ``commands`` (default: all) are added, which imports their configuration modules."""
    chosen = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog='deitlab', description='DeiT-family vision transformers on timm.',
                                     epilog='deitlab COMMAND --help shows the options of a command.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name, (text, build) in COMMANDS.items():
        if name in _NESTED:
            p = sub.add_parser(name, help=text, description=_sentence(text))
            groups = None
        else:
            p, groups = _subcommand(sub, name, text)
        if name in chosen:
            build(p, groups)
    return parser


def _command_in(argv: list) -> Optional[str]:
    """The subcommand named on the command line: the first word that is not an option (``deitlab``
    itself takes none but ``-h``)."""
    return next((a for a in argv if not a.startswith('-')), None)


def _resume_hint(args) -> str:
    out = getattr(args, 'out', None)
    for name, what in (('checkpoint.pt', 'the last finished epoch'), ('prune_checkpoint.pt', 'the last pruning event')):
        if out and (Path(out) / name).is_file():
            return f'; {Path(out) / name} holds {what}: continue with the same command and --resume'
    return '; nothing was saved yet'


def _fail(message: str, kind: str, as_json: bool) -> int:
    print(f'deitlab: error: {message}', file=sys.stderr)
    if as_json:
        print(json.dumps({'error': message, 'type': kind}))
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser([_command_in(argv)])
    args = parser.parse_args(argv)
    from .errors import USER_ERRORS
    try:
        result = args.func(args)
    except USER_ERRORS as e:
        return _fail(str(e), type(e).__name__, args.json)
    except KeyboardInterrupt:   # Ctrl-C: no traceback; say what is kept and how to go on
        print(f'deitlab: interrupted{_resume_hint(args)}', file=sys.stderr)
        return 130
    except OSError as e:   # the file system: a read-only or full disk, a path through a file, ...
        where = f': {e.filename}' if e.filename else ''
        return _fail(f'{e.strerror or e}{where} (the file system refused; check the path, its permissions and '
                     f'free space)', type(e).__name__, args.json)
    if _is_main_process() and (args.command not in ('models',) or args.json) and (result or args.json):
        _emit(result, args.json)   # under torchrun the main process prints the result
    return 0


if __name__ == '__main__':
    sys.exit(main())
