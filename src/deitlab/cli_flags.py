"""Flags from configuration dataclasses, and the sections of a subcommand's ``--help``.

Each field of a configuration dataclass (``TrainConfig``, ``NViTConfig``, ``FuseConfig``,
``SupernetConfig``, ``SearchConfig``, ``ExportConfig``, ``SynthConfig``) becomes one flag, with the ``help`` and ``group`` of the field's metadata; :func:`config_values` merges a
``--config FILE.yaml`` under the flags given. Imports no torch: ``deitlab --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Optional

__all__ = ['GROUPS', 'ConfigSpec', 'field_doc', 'config_values', 'parse_kv', 'sections', 'subcommand',
           'sentence', 'add_output_flags', 'add_config_args', 'add_dataclass_args']

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
    'multi-level': 'multi-level training (V-cycle)',
    'dcal': 'DCAL (dual cross-attention)',
    're-identification': 're-identification loss',
    'pruning': 'pruning',
    'pruning schedule': 'pruning schedule',
    'search': 'width search',
    'nas': 'architecture search',
    'latency table': 'latency table',
    'fine-tuning': 'fine-tuning of the pruned model',
    'poisoning': 'poisoning',
    'pages': 'synthetic pages',
    'fusion': 'box fusion (several detectors)',
    'refine': 'refinement of the letters (crop classifiers and the vote)',
    'export': 'export',
    'measurement': 'measurement',
    'run': 'run and output',
}


def sections(p: argparse.ArgumentParser) -> dict:
    """The argument groups of ``p`` in :data:`GROUPS` order (argparse leaves empty ones out), with
    ``-h`` in the last one."""
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups['run'].add_argument('-h', '--help', action='help', help='show this help message and exit')
    return groups


def subcommand(sub, name: str, text: str) -> tuple:
    """A subcommand parser whose flags all sit in sections, and those sections."""
    p = sub.add_parser(name, help=text, description=sentence(text), add_help=False)
    return p, sections(p)


def sentence(text: str) -> str:
    """A subcommand's line of help as its description (which argparse does not %-format)."""
    return text[0].upper() + text[1:].replace('%%', '%') + '.'


def add_output_flags(groups: dict) -> None:
    """``--json``, ``--quiet`` and ``--debug``, which every subcommand takes."""
    run = groups['run']
    run.add_argument('--json', action='store_true', help='print one JSON object on the last line')
    run.add_argument('--quiet', action='store_true',
                     help='no progress bars and no log lines, only warnings, errors and the result (bars are also '
                          'off when standard error is not a terminal)')
    run.add_argument('--debug', action='store_true',
                     help='on an error from bad input, show the Python traceback too')


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


def _comma_separated(text: str) -> tuple:
    return tuple(x for x in text.split(',') if x)


def add_dataclass_args(groups: dict, cls, required=(), exclude=()) -> dict:
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
            g.add_argument(flag, type=_comma_separated if base is tuple else base, default=default,
                           help=f'{text}{"; comma-separated" if base is tuple else ""} (required: here or in --config)')
        elif base is dict:
            g.add_argument(flag, nargs='*', default=default, metavar='K=V',
                           help=f'{text}; key=value pairs (values parsed as JSON when possible)')
        elif base is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif base is tuple:
            g.add_argument(flag, type=_comma_separated, default=default, help=f'{text}; comma-separated')
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


def add_config_args(p: argparse.ArgumentParser, groups: dict, cls, required=(), exclude=(),
                     recipe: bool = False) -> None:
    """``--config FILE.yaml`` and one flag per field of ``cls`` (see :func:`config_values`)."""
    defaults = "the named recipe's defaults" if recipe else 'the defaults'
    groups['config'].add_argument(
        '--config', metavar='FILE.yaml',
        help=f'YAML file of options (the flag names, with dashes or underscores); its values replace {defaults}, '
             f'explicit flags replace its values')
    types = add_dataclass_args(groups, cls, required=required, exclude=exclude)
    p.set_defaults(config_spec=ConfigSpec(tuple(types), tuple(required), p, types))


def config_values(args: argparse.Namespace, cls=None) -> dict:
    """The configuration's field values from ``--config`` (lowest) and the flags given (which win).
    A required field given in neither is the same usage error argparse gives for a missing flag."""
    from .train.config import coerce_value, load_yaml_defaults, yaml_place
    spec = getattr(args, 'config_spec', None) or ConfigSpec(tuple(f.name for f in dataclasses.fields(cls)))
    path = getattr(args, 'config', None)
    values = load_yaml_defaults(path, known=spec.names) if path else {}
    values = {k: coerce_value(v, spec.types.get(k), f'{yaml_place(path, k)}: {k}') for k, v in values.items()}
    values.update({name: getattr(args, name) for name in spec.names if hasattr(args, name)})
    missing = ['--' + name.replace('_', '-') for name in spec.required if name not in values]
    if missing:
        spec.parser.error(f'the following arguments are required: {", ".join(missing)}')
    return values


def parse_kv(items, flag: str = '--model-kwargs') -> dict:
    """``K=V`` strings as a dict; each value parsed as JSON when it parses (``depth=6`` -> 6), else kept as text."""
    out = {}
    for item in items or []:
        if '=' not in item:
            from .train.config import ConfigError
            raise ConfigError(f'{flag} takes K=V pairs (e.g. depth=6), got {item!r}')
        k, v = item.split('=', 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
