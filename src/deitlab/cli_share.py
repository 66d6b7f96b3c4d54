"""``deitlab push`` and ``deitlab pull``: their parsers and the functions they run, imported by
:mod:`deitlab.cli`. :mod:`deitlab.share` is imported only when a command runs, so ``--help`` stays
torch-free."""
from __future__ import annotations

from .cli_flags import add_output_flags

_ENDPOINT_HELP = ('the Hub to talk to (default: huggingface_hub\'s, https://huggingface.co or HF_ENDPOINT): a mirror '
                  'or a local Hub server')


def cmd_push(args) -> dict:
    from .share.hub import push_run
    result = push_run(args.run, args.repo_id, private=args.private, revision=args.revision, endpoint=args.endpoint,
                      license=args.license, stage=args.stage, dry_run=args.dry_run, commit_message=args.message,
                      progress=not (args.json or args.quiet))
    if args.json:
        result.pop('card', None)
        return result
    rows = {'repository': result['repo_id'] + (f' (branch {result["revision"]})' if result['revision'] != 'main'
                                               else ''),
            'model': f'{result["architecture"]}, {result["params"] / 1e6:.3f}M params'
                     + (f', {result["gmacs"]:.4g} GMACs' if result['gmacs'] is not None else ''),
            'files': f'{", ".join(result["files"])} ({result["bytes"] / 1e6:.2f} MB)'}
    if result['dry_run']:
        rows['dry run'] = 'nothing was uploaded' + (f'; the folder is in {result["stage"]}' if result['stage'] else
                                                    '; --stage DIR keeps the folder')
    else:
        rows['uploaded'] = result.get('commit_url') or result.get('url')
    rows['load with'] = f"import deitlab, timm; timm.create_model('{result['load_with']}', pretrained=True)"
    return rows


def cmd_pull(args) -> dict:
    from .share.hub import pull_run
    result = pull_run(args.repo_id, args.out, revision=args.revision, endpoint=args.endpoint,
                      progress=not (args.json or args.quiet))
    if args.json:
        return result
    return {'run directory': result['run_dir'], 'from': result['source'] + (' (a local folder)' if result['local']
                                                                            else f' ({result["revision"]})'),
            'model': f'{result["architecture"]}, {result["num_classes"]} classes, {result["params"] / 1e6:.3f}M params',
            'files': ', '.join(result['files']),
            'load with': f"import deitlab, timm; timm.create_model('{result['load_with']}', pretrained=True)"}


def push_parser(p, groups) -> None:
    g = groups
    g['model'].add_argument('run', metavar='RUN', help='the run directory to upload (config.json + model.safetensors, '
                                                       'as deitlab train, prune and nas export write)')
    g['model'].add_argument('repo_id', metavar='REPO_ID', help='the Hub repository, OWNER/NAME (created when it does '
                                                               'not exist)')
    g['model'].add_argument('--license', default=None,
                            help="the license in the model card (default: the run's pretrained_cfg license, else "
                                 "apache-2.0)")
    run = g['run']
    run.add_argument('--private', action='store_true', help='create the repository private (an existing one keeps '
                                                            'its visibility)')
    run.add_argument('--revision', default=None, help='the branch to commit to, created from main if new '
                                                      '(default: main)')
    run.add_argument('--message', default=None, help='the commit message (default: names the architecture and run)')
    run.add_argument('--endpoint', default=None, help=_ENDPOINT_HELP)
    run.add_argument('--dry-run', action='store_true',
                     help='upload nothing (no token needed): write the folder (with --stage) and list its files')
    run.add_argument('--stage', default=None, metavar='DIR',
                     help='write the upload folder into DIR (new or empty) and keep it (default: a temporary '
                          'directory)')
    add_output_flags(g)
    p.set_defaults(func=cmd_push)


def pull_parser(p, groups) -> None:
    g = groups
    g['model'].add_argument('repo_id', metavar='REPO_ID',
                            help='the Hub repository, OWNER/NAME; or a local folder (a path starting with /, ./, ../ '
                                 'or ~, or an existing directory), e.g. what push --stage wrote')
    run = g['run']
    run.add_argument('--out', required=True, help='the run directory to write (must not exist, or be empty)')
    run.add_argument('--revision', default=None, help='a branch, tag or commit of the repository (default: main)')
    run.add_argument('--endpoint', default=None, help=_ENDPOINT_HELP)
    add_output_flags(g)
    p.set_defaults(func=cmd_pull)
