"""``deitlab`` command line: each subcommand calls one public function.

With ``--json`` a subcommand prints one JSON object on the last line of stdout; progress and logs go
to stderr. Errors from bad input print ``deitlab: error: ...`` and exit with status 2.

``--help`` is the documentation. Every flag has a help line and sits in a section
(:data:`deitlab.cli_flags.GROUPS`); the flags of the configuration dataclasses (``TrainConfig``, ``NViTConfig``,
``FuseConfig``, ``SupernetConfig``, ``SearchConfig``, ``ExportConfig``, ``SynthConfig``,
``EvaluateConfig``, ``PredictConfig``, ``DetectorConfig``) are
their fields, with the ``help`` and ``group`` of each field's metadata. Each subcommand that makes
such a configuration also takes ``--config FILE.yaml``; precedence, lowest first: the dataclass
defaults (for ``train`` and ``unlearnable eval``: the named recipe's), the file's values, explicit
flags. :func:`main` adds the options of the subcommand it runs only, so ``deitlab --help`` loads no
configuration module and no torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from .cli_flags import add_config_args, add_output_flags, config_values, parse_kv, sentence, subcommand


def _is_main_process() -> bool:
    return os.environ.get('RANK', '0') == '0'


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        for k, v in result.items():
            print(f'{k}: {v}')


def build_train_config(args: argparse.Namespace):
    """Precedence, lowest first: the recipe (``--recipe``, or ``recipe:`` in the YAML), ``--config``
    values, explicit flags."""
    from .train.config import TrainConfig
    values = config_values(args, TrainConfig)
    if isinstance(values.get('model_kwargs'), list):
        values['model_kwargs'] = parse_kv(values['model_kwargs'])
    return TrainConfig.from_recipe(values.pop('recipe', 'deit'), **values)


def cmd_train(args) -> dict:
    from .train import train
    return train(build_train_config(args))


def cmd_eval(args) -> dict:
    if args.retrieval:
        from .retrieval import evaluate_retrieval
        return evaluate_retrieval(args.model, args.data, batch_size=args.batch_size, device=args.device,
                                  workers=args.workers)
    from .evaluate import evaluate_model
    return evaluate_model(args.model, args.data, split=args.split, batch_size=args.batch_size,
                          device=args.device, workers=args.workers)


def cmd_explain(args) -> dict:
    from .explain import explain_image
    return explain_image(args.model, args.image, out=args.out, head_fusion=args.head_fusion,
                         start_layer=args.start_layer, device=args.device)


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
            values[name] = parse_kv(values[name], '--' + name.replace('_', '-'))
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


def cmd_prune_ofb(args) -> dict:
    from .bench.speed import fix_malloc_thresholds
    from .prune.config import OFBConfig
    from .prune.ofb_search import prune_ofb
    cfg = OFBConfig(**config_values(args)).validate()
    fix_malloc_thresholds()
    report = prune_ofb(cfg)
    if not _is_main_process():
        return {}
    table = report.pop('table')
    if not args.json:
        print(table)
        print(f'run directory {report["run_dir"]}; widths plot {report["widths_plot"]}; '
              f'search trace {report["run_dir"]}/search_trace.png')
        return {}
    return report


def cmd_nas_train_supernet(args) -> dict:
    from .nas.config import SupernetConfig
    from .nas.train import train_supernet
    return train_supernet(SupernetConfig(**config_values(args)).validate())


def cmd_nas_search(args) -> dict:
    from .bench.speed import fix_malloc_thresholds
    from .nas.config import SearchConfig
    from .nas.search import search
    cfg = SearchConfig(**config_values(args)).validate()
    if cfg.latency is not None or cfg.lut is not None:
        fix_malloc_thresholds()   # a latency table timed now sees the allocation pattern of later measurements
    result = search(cfg)
    if args.json:
        return result
    lat = f', {result["best_latency_ms"]:.3f} ms predicted' if result['best_latency_ms'] is not None else ''
    rows = {'best': f'top-1 {result["best_fitness"]:.2f} on the held-out images, {result["best_macs"] / 1e6:.3f}M '
                    f'MACs{lat}', 'evaluated': f'{result["evaluated"]} networks ({result["method"]})'}
    if result['random_best_fitness'] is not None:
        rows['random baseline'] = f'top-1 {result["random_best_fitness"]:.2f}'
    rows.update(best_arch=result['best_arch_json'], search=result['search_json'], plot=result['plot'],
                export=f'deitlab nas export --arch {result["best_arch_json"]} --out RUN_DIR [--supernet SUPERNET]')
    return rows


def cmd_nas_export(args) -> dict:
    from .nas.config import ExportConfig
    from .nas.export import export_arch
    result = export_arch(ExportConfig(**config_values(args)).validate())
    if args.json:
        return result
    return {'run_dir': result['run_dir'], 'widths': result['widths'], 'depths': result['depths'],
            'GMACs': round(result['macs'] / 1e9, 4), 'params_m': round(result['params'] / 1e6, 3),
            'weights': result['weights'], 'train': f'deitlab train --model {result["run_dir"]} --data DATA ...'}


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


def cmd_export(args) -> dict:
    from .export.config import ModelExportConfig
    values = config_values(args)
    if isinstance(values.get('fusion_options'), list):
        values['fusion_options'] = parse_kv(values['fusion_options'], '--fusion-options')
    cfg = ModelExportConfig(**values)
    if cfg.measure:
        from .bench.speed import fix_malloc_thresholds
        fix_malloc_thresholds()   # the same allocation pattern in every round and every run
    from .export.command import export_model, summary_lines
    report = export_model(cfg)
    return report if args.json else summary_lines(report)


def cmd_demo(args) -> dict:
    from .bench.speed import fix_malloc_thresholds
    from .demo import run_demo
    fix_malloc_thresholds()   # the allocation pattern the demo's committed latency table was timed with
    result = run_demo(out=args.out, quick=args.quick, progress=not args.json, train_dense=args.train)
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
                           overwrite=args.overwrite, img_size=args.img_size)
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
    add_config_args(p, groups, TrainConfig, recipe=True)
    add_output_flags(groups)
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
    data.add_argument('--retrieval', action='store_true',
                      help="retrieval instead of accuracy: rank the data's gallery split for each image of its query "
                           "split (a re-ID spec such as glyphs-reid) by the cosine distance of the model's features; "
                           "mAP and CMC Rank-1/5, Market-1501 protocol (deitlab.retrieval)")
    data.add_argument('--batch-size', type=_positive_int, default=256, help='evaluation batch size (default: 256)')
    data.add_argument('--workers', type=_count, default=0, help='data loader worker processes (default: 0)')
    groups['run'].add_argument('--device', default=None, help=_DEVICE_HELP)
    add_output_flags(groups)
    p.set_defaults(func=cmd_eval)


def _explain_parser(p, groups) -> None:
    model = groups['model']
    model.add_argument('--model', required=True, help=_MODEL_HELP)
    model.add_argument('--head-fusion', default='mean', choices=['mean', 'max'],
                       help='how the heads of a block are fused into one map (default: mean)')
    model.add_argument('--start-layer', type=_count, default=0,
                       help='the first block rolled out, counted from 0 (default: 0)')
    groups['data'].add_argument('--image', required=True, help='the image file (read with PIL)')
    groups['run'].add_argument('--out', default=None,
                               help='the PNG to write (default: IMAGE-STEM_rollout.png in the current directory)')
    groups['run'].add_argument('--device', default=None, help=_DEVICE_HELP)
    add_output_flags(groups)
    p.set_defaults(func=cmd_explain)


def _bench_parser(p, groups) -> None:
    model = groups['model']
    model.add_argument('--model', required=True, help=_MODEL_HELP)
    model.add_argument('--img-size', type=_positive_int, default=None, help="input side (default: the model's)")
    model.add_argument('--in-chans', type=_positive_int, default=None, help="input channels (default: the model's)")
    groups['measurement'].add_argument('--batch-size', type=_positive_int, default=64,
                                       help='batch for throughput; latency uses 1 (default: 64)')
    groups['measurement'].add_argument('--quick', action='store_true', help='fewer repeats')
    groups['run'].add_argument('--device', default=None, help=_DEVICE_HELP)
    add_output_flags(groups)
    p.set_defaults(func=cmd_bench)


def _prune_parser(p, groups) -> None:
    methods = p.add_subparsers(dest='method', required=True)
    from .prune.config import NViTConfig
    q, g = subcommand(methods, 'nvit', 'NViT: Hessian-aware global pruning with a latency budget')
    add_config_args(q, g, NViTConfig, required=('model', 'data', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_prune_nvit)
    from .prune.config import OFBConfig
    q, g = subcommand(methods, 'ofb', 'OFB: one-stage search of importance and widths under a GMACs target')
    add_config_args(q, g, OFBConfig, required=('model', 'data', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_prune_ofb)


def _nas_parser(p, groups) -> None:
    actions = p.add_subparsers(dest='action', required=True)
    from .nas.config import ExportConfig, SearchConfig, SupernetConfig
    q, g = subcommand(actions, 'train-supernet', 'ViT-ResNAS: train the weight-sharing supernet of a search space, '
                                                 'several sub-networks per batch')
    add_config_args(q, g, SupernetConfig, required=('data', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_nas_train_supernet)
    q, g = subcommand(actions, 'search', 'ViT-ResNAS: search a trained supernet for the fittest sub-network under a '
                                         'MACs and / or latency budget (evolution, or NSGA-II)')
    add_config_args(q, g, SearchConfig, required=('supernet', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_nas_search)
    q, g = subcommand(actions, 'export', 'ViT-ResNAS: write a searched architecture as a ViT-Res run directory '
                                         '(fresh weights, or inherited from the supernet)')
    add_config_args(q, g, ExportConfig, required=('arch', 'out'))
    add_output_flags(g)
    q.set_defaults(func=cmd_nas_export)


def _fuse_parser(p, groups) -> None:
    methods = p.add_subparsers(dest='method', required=True)
    from .tokens.config import FuseConfig
    from .registry import TOKEN_FUSION
    for entry in TOKEN_FUSION:
        q, g = subcommand(methods, entry.name, entry.help.replace('%', '%%'))
        add_config_args(q, g, FuseConfig, required=('model',), exclude=('method',))
        add_output_flags(g)
        q.set_defaults(func=cmd_fuse)


def _unlearnable_parser(p, groups) -> None:
    actions = p.add_subparsers(dest='action', required=True)
    q, g = subcommand(actions, 'make', 'write a CUDA-poisoned ImageFolder copy of a dataset (load it with '
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
    poison.add_argument('--img-size', type=_int_at_least(1), default=None,
                        help='resize every image to this side before poisoning: the size the data will be '
                             'trained at, so that the model sees the filters unresized; default: each image\'s own')
    g['run'].add_argument('--overwrite', action='store_true', help='replace train/, val/, manifest.json in a '
                                                                   'non-empty --out')
    add_output_flags(g)
    q.set_defaults(func=cmd_unlearnable_make)

    q, g = subcommand(actions, 'eval', 'train one recipe on the clean data and on a poisoned copy (and with '
                                        'defences); report clean test accuracy')
    g['data'].add_argument('--poisoned', required=True, help='a directory written by deitlab unlearnable make')
    g['data'].add_argument('--source', help='the clean dataset spec (default: the manifest\'s source)')
    g['run'].add_argument('--out', required=True, help='directory for the runs and unlearnable_eval.json')
    g['augmentation'].add_argument(
        '--defences', default='none', help="';'-separated defences trained on the poisoned data, e.g. "
                                           "'none;blur:p=0.3;noise:std=0.25;adv:eps=4,steps=3' (default: none)")
    g['run'].add_argument('--no-clean', action='store_true', help='skip the clean-data run')
    from .train.config import TrainConfig
    add_config_args(q, g, TrainConfig, exclude=('data', 'out', 'defence'), recipe=True)
    add_output_flags(g)
    q.set_defaults(func=cmd_unlearnable_eval)


def _elsewhere(module: str, builder: str):
    """The parser builder ``builder`` of ``deitlab.<module>``, imported only when that command is built
    (cli_papyri: the papyri subcommands; cli_report: report; cli_share: push and pull; cli_pipeline:
    pipeline)."""
    def build(p, groups) -> None:
        import importlib
        getattr(importlib.import_module(f'.{module}', __package__), builder)(p, groups)
    return build


def _export_parser(p, groups) -> None:
    from .export.config import ModelExportConfig
    add_config_args(p, groups, ModelExportConfig, required=('model', 'out'))
    add_output_flags(groups)
    p.set_defaults(func=cmd_export)


def _models_parser(p, groups) -> None:
    add_output_flags(groups)
    p.set_defaults(func=cmd_models)


def _demo_parser(p, groups) -> None:
    groups['run'].add_argument('--out', default='demo-out', help='output directory (default: demo-out)')
    groups['run'].add_argument('--quick', action='store_true', help='a much shorter run (smoke test)')
    groups['run'].add_argument('--train', action='store_true',
                               help='train the dense model (4-5 CPU minutes) instead of starting from the committed '
                                    'run that the same recipe produced')
    add_output_flags(groups)
    p.set_defaults(func=cmd_demo)


#: name -> (its line of help, the function that adds its options)
COMMANDS = {
    'train': ('train a model with the DeiT recipe', _train_parser),
    'eval': ('top-1/top-5 of a model on a dataset split, or retrieval mAP / CMC (--retrieval)', _eval_parser),
    'explain': ('attention rollout of a ViT on one image, as a PNG heat-map', _explain_parser),
    'bench': ('params, GMACs, latency, throughput, peak memory', _bench_parser),
    'prune': ('structural pruning into a smaller, faster model', _prune_parser),
    'nas': ('neural architecture search (ViT-ResNAS): train a weight-sharing supernet, search it, export',
            _nas_parser),
    'fuse': ('token reduction (ToMe, MCTF): evaluate and benchmark the fused model', _fuse_parser),
    'unlearnable': ('unlearnable datasets (CUDA: class-wise convolution filters)', _unlearnable_parser),
    'papyri': ('Greek letters on papyri (ICDAR 2023 competition): synthetic annotated pages, glyph detectors, '
               'crop refiners (DeiT, SimCLR) and their vote, the organisers\' metric, predictions, a demo',
               _elsewhere('cli_papyri', 'papyri_parser')),
    'export': ('a model as an ONNX file, checked against PyTorch (logits within a tolerance) and timed against it '
               'with ONNX Runtime', _export_parser),
    'report': ('many models on one self-contained HTML page: top-1 against GMACs and latency (Pareto front), a '
               'sortable table, per-model widths, curves and configurations, the machine',
               _elsewhere('cli_report', 'report_parser')),
    'push': ('upload a run directory to the Hugging Face Hub in the layout timm\'s hf-hub: loader reads, with a '
             'generated model card', _elsewhere('cli_share', 'push_parser')),
    'pull': ('fetch a model from the Hugging Face Hub (or a local folder) into a run directory',
             _elsewhere('cli_share', 'pull_parser')),
    'pipeline': ('several commands in a row from a YAML file (train -> prune -> fuse -> export): each step\'s output '
                 'the next one\'s input, every step measured, one report; a re-run skips the steps done',
                 _elsewhere('cli_pipeline', 'pipeline_parser')),
    'models': ('registered deitlab architectures', _models_parser),
    'demo': ('the main job: train a small DeiT on glyphs and report', _demo_parser),
}
_NESTED = ('prune', 'nas', 'fuse', 'unlearnable', 'papyri')   # a method or action follows; the options are on it


def make_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``deitlab`` parser. Every subcommand is listed with its line of help; the options of
    those in ``commands`` (default: all) are added, which imports their configuration modules."""
    chosen = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog='deitlab', description='DeiT-family vision transformers on timm.',
                                     epilog='deitlab COMMAND --help shows the options of a command.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name, (text, build) in COMMANDS.items():
        if name in _NESTED:
            p = sub.add_parser(name, help=text, description=sentence(text))
            groups = None
        else:
            p, groups = subcommand(sub, name, text)
        if name in chosen:
            build(p, groups)
    return parser


def _command_in(argv: list) -> Optional[str]:
    """The subcommand named on the command line: the first word that is not an option (``deitlab``
    itself takes none but ``-h``)."""
    return next((a for a in argv if not a.startswith('-')), None)


def _resume_hint(args) -> str:
    out = getattr(args, 'out', None)
    for name, what in (('checkpoint.pt', 'the last finished epoch'), ('prune_checkpoint.pt', 'the last pruning event'),
                       ('supernet_checkpoint.pt', 'the last finished epoch')):
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
    debug = getattr(args, 'debug', False)
    from .console import is_quiet, set_quiet
    was_quiet = is_quiet()
    set_quiet(was_quiet or getattr(args, 'quiet', False))
    try:
        result = args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        return _fail(str(e), type(e).__name__, args.json)
    except KeyboardInterrupt as e:   # Ctrl-C: no traceback; say what is kept and how to go on
        print(f'deitlab: interrupted{f"; {e}" if str(e) else _resume_hint(args)}', file=sys.stderr)
        return 130
    except OSError as e:   # the file system: a read-only or full disk, a path through a file, ...
        if debug:
            raise
        where = f': {e.filename}' if e.filename else ''
        return _fail(f'{e.strerror or e}{where} (the file system refused; check the path, its permissions and '
                     f'free space)', type(e).__name__, args.json)
    finally:
        set_quiet(was_quiet)
    if _is_main_process() and (args.command not in ('models',) or args.json) and (result or args.json):
        _emit(result, args.json)   # under torchrun the main process prints the result
    return 0


if __name__ == '__main__':
    sys.exit(main())
