"""A pipeline file, read and resolved into the commands its steps run.

```yaml
out: runs/pico-pipeline        # every step's output lives under it: OUT/NN-name
data: glyphs                   # --data of every step that takes one, unless the step sets its own
measure: false                 # true: time the models (the steps' own timing and the report's)
report: runs/pico-pipeline/report.html   # default OUT/report.html
title: DeiT-pico, pruned and fused      # default "deitlab pipeline: FILE"
steps:
  - train: {model: deitlab_deit_pico_patch4_32, epochs: 2}
  - prune: {method: nvit, target-gmacs: 0.5, name: half}
  - fuse: {method: tome, r: 4}
  - export: {format: onnx}
```

Each step is one deitlab command (``train``, ``prune METHOD``, ``fuse METHOD``, ``export``) and its
options are that command's flags (dashes or underscores). Paths are read as on the command line,
relative to the current directory. The pipeline sets ``--model`` (the run directory of the last train
or prune step, unless the step names a model), ``--data`` (the file's ``data``), ``--out``
(``OUT/NN-name``, a file ``OUT/NN-name.onnx`` for an export) and ``--json``; a fuse step writes no
model, its method, r and options go to the export after it (``--token-fusion``, ``--r``,
``--fusion-options``). Without ``measure: true`` the steps that time their models by default get
``--no-measure``.

:func:`load_pipeline` checks the whole file before anything runs: each step's options with its
command's own parser (``cli.make_parser``: the flags, their types and choices) and its settings with
the command's configuration class (``TrainConfig``, ``NViTConfig``, ``OFBConfig``, ``FuseConfig``,
``ModelExportConfig``). A problem is one :class:`PipelineError` line naming the file, the step and
its line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import PipelineError

__all__ = ['KINDS', 'TOP_KEYS', 'Step', 'Pipeline', 'load_pipeline']

#: the kinds of step, each one deitlab command
KINDS = ('train', 'prune', 'fuse', 'export')
#: the keys of a pipeline file
TOP_KEYS = ('out', 'data', 'measure', 'report', 'title', 'steps')
#: kinds whose output is a run directory: the model of the steps after them
MODEL_KINDS = ('train', 'prune')
_SET_BY_PIPELINE = {'out': 'the pipeline writes each step to OUT/NN-name (name it with name:)',
                    'json': 'the pipeline runs every step with --json'}


@dataclass
class Step:
    """One step, resolved: ``argv`` is the command after ``deitlab``; ``output`` the run directory
    (train, prune) or file (export) it writes, None for a fuse step; ``model`` and ``data`` what it
    reads; ``fusion`` what a fuse step hands to an export (``method``, ``r``, ``options``);
    ``source`` the step whose model it reads (None: a model named in the file); ``fusion_from`` the
    fuse step whose fusion an export applies; ``hash`` identifies
    the command and every step before it."""
    index: int
    kind: str
    method: Optional[str]
    name: str
    argv: List[str]
    output: Optional[Path]
    model: Optional[str]
    data: Optional[str]
    line: Optional[int] = None
    source: Optional[int] = None
    fusion: Optional[dict] = None
    fusion_from: Optional[int] = None
    hash: str = ''

    @property
    def label(self) -> str:
        return f'{self.kind} {self.method}' if self.method else self.kind

    @property
    def command(self) -> str:
        return 'deitlab ' + shlex.join(self.argv)

    @property
    def makes_run_dir(self) -> bool:
        return self.kind in MODEL_KINDS


@dataclass
class Pipeline:
    """A pipeline file, read: its settings and its resolved steps."""
    path: Path
    out: Path
    data: Optional[str]
    measure: bool
    report: Path
    title: str
    steps: List[Step]

    @property
    def records(self) -> Path:
        """``OUT/pipeline.json``: every step, its command, numbers and timing."""
        return self.out / 'pipeline.json'

    def record_of(self, step: Step) -> Path:
        """``OUT/NN-name.step.json``: the step's JSON and the hash of its command."""
        return self.out / f'{step.name}.step.json'


class _Refused(Exception):
    """What argparse would have printed before exiting."""


def _close(word, known) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _read(path: Path):
    import yaml
    if not path.is_file():
        raise PipelineError(f'pipeline file does not exist: {path}' if not path.exists() else
                            f'{path} is not a file: give the pipeline YAML file')
    try:
        text = path.read_text(encoding='utf-8')
        data, node = yaml.safe_load(text), yaml.compose(text)
    except UnicodeDecodeError:
        raise PipelineError(f'{path} is not a text file: give the pipeline YAML file') from None
    except yaml.YAMLError as e:
        from ..train.config import yaml_error
        raise PipelineError(yaml_error(path, e)) from None
    if not isinstance(data, dict):
        raise PipelineError(f'{path} must hold a mapping with out: and steps: (see deitlab pipeline --help)')
    return data, node


def _lines(node) -> Tuple[Dict[str, int], List[int]]:
    """The line of each top-level key, and of each item of ``steps``."""
    keys, steps = {}, []
    for k, v in getattr(node, 'value', None) or []:
        if isinstance(k.value, str):
            keys[k.value] = k.start_mark.line + 1
            if k.value == 'steps' and isinstance(v.value, list):
                steps = [item.start_mark.line + 1 for item in v.value]
    return keys, steps


def _parsers():
    """The parsers of the step kinds (``cli.make_parser``), raising :class:`_Refused` instead of exiting."""
    from ..cli import make_parser
    root = make_parser(KINDS)

    def refuse(message):
        raise _Refused(message)

    stack = [root]
    while stack:
        p = stack.pop()
        p.error = refuse
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return root, sub.choices


def _methods(p) -> Optional[dict]:
    """The methods of a step kind that has them (prune, fuse): name -> parser."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _value_text(v) -> str:
    """A YAML value as one command-line word (booleans, lists and mappings as compact JSON)."""
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(',', ':')) if isinstance(v, (bool, list, dict)) or v is None else str(v)


def _flag_args(key: str, value, p, say) -> List[str]:
    """The command-line words of one option of a step (``value`` as YAML read it)."""
    flag = '--' + key.replace('_', '-')
    action = p._option_string_actions.get(flag)
    if action is None or isinstance(action, argparse._HelpAction):
        known = sorted(s[2:] for s, a in p._option_string_actions.items()
                       if s.startswith('--') and not isinstance(a, argparse._HelpAction) and s[2:] not in _SET_BY_PIPELINE)
        raise say(f'unknown option {key.replace("_", "-")!r}{_close(key.replace("_", "-"), known)}; '
                  f'deitlab {p.prog.split(" ", 1)[1]} --help lists its options')
    if value is None:   # null: the command's default
        return []
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise say(f'{key.replace("_", "-")} is true or false, got {value!r}')
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        positive, negative = action.option_strings[0], action.option_strings[1]
        on = value if flag == positive else not value
        return [positive if on else negative]
    if action.nargs in ('*', '+'):
        if isinstance(value, dict):
            return [flag, *(f'{k}={_value_text(v)}' for k, v in value.items())]
        return [flag, *(_value_text(v) for v in (value if isinstance(value, list) else [value]))]
    if isinstance(value, dict):
        raise say(f'{key.replace("_", "-")} takes one value, got a mapping {value!r}')
    if isinstance(value, list):
        return [flag, ','.join(_value_text(v) for v in value)]
    return [flag, _value_text(value)]


def _settings(kind: str, method: Optional[str], args):
    """The step's configuration, built and checked as its command does (no model is built, no file
    written); a ValueError from the configuration says what is wrong."""
    from ..cli_flags import config_values, parse_kv
    if kind == 'train':
        from ..cli import build_train_config
        return build_train_config(args).validate()
    values = config_values(args)
    for name, kind_of in args.config_spec.types.items():
        if kind_of is dict and isinstance(values.get(name), list):
            values[name] = parse_kv(values[name], '--' + name.replace('_', '-'))
    if kind == 'prune':
        from ..prune.config import NViTConfig, OFBConfig
        return {'nvit': NViTConfig, 'ofb': OFBConfig}[method](**values).validate()
    if kind == 'fuse':
        from ..registry import TOKEN_FUSION
        from ..tokens.config import FuseConfig, TokenFusionError
        from ..tokens.fuse import parse_r_arg
        cfg = FuseConfig(**values, method=method)
        TOKEN_FUSION.check(method, TokenFusionError, 'method')
        parse_r_arg(cfg.r, cfg.inflect)
        cfg.layer_list()
        cfg.fusion_options()
        return cfg
    import tempfile

    from ..export.config import ModelExportConfig
    cfg = ModelExportConfig(**values)
    # every setting but the output path, which the pipeline makes (OUT exists when the step runs)
    dataclasses.replace(cfg, out=str(Path(tempfile.gettempdir()) / 'deitlab-pipeline-check.onnx'),
                        overwrite=True).validate()
    return cfg


def _fusion_of(cfg) -> dict:
    """What a fuse step hands to an export: its method, r and every option it fused with."""
    options = dict(cfg.fusion_options())
    layers = cfg.layer_list()
    if layers is not None:
        options['layers'] = layers
    return dict(method=cfg.method, r=cfg.r, options=options, inflect=cfg.inflect)


def _fusion_args(fusion: dict) -> List[str]:
    args = ['--token-fusion', fusion['method']]
    if fusion['r'] is not None:
        args += ['--r', str(fusion['r'])]
    if fusion['options']:
        args += ['--fusion-options', *(f'{k}={_value_text(v)}' for k, v in fusion['options'].items())]
    return args


def _split_item(item, where) -> Tuple[str, dict, Optional[str]]:
    """A step item as (kind, options, name): ``- export``, ``- train: {...}`` or ``- train:`` with
    its options below, and ``name:`` beside the kind or among the options."""
    if isinstance(item, str):
        return item, {}, None
    if not isinstance(item, dict) or not item:
        raise PipelineError(f'{where(None)}: a step is a kind with its options, e.g. "- train: {{epochs: 2}}", '
                            f'got {item!r}')
    name = item.get('name')
    kinds = [k for k in item if k != 'name']
    if len(kinds) != 1:
        raise PipelineError(f'{where(None)}: one kind per step, got {", ".join(map(str, kinds)) or "none"}; a '
                            f'step\'s options go under its kind, e.g. "- train: {{epochs: 2}}"')
    kind, options = kinds[0], item[kinds[0]]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise PipelineError(f'{where(str(kind))}: its options are a mapping of option: value, got {options!r}')
    options = dict(options)
    if 'name' in options:
        if name is not None:
            raise PipelineError(f'{where(str(kind))}: name is given twice')
        name = options.pop('name')
    return str(kind), options, name


def _check_name(name, where) -> str:
    text = str(name)
    if not text or not all(c.isalnum() or c in '._-' for c in text) or not text[0].isalnum():
        raise PipelineError(f'{where}: name {text!r} names the step\'s output: letters, digits, ".", "_" and "-", '
                            f'starting with a letter or digit')
    return text


def _top(data: dict, path: Path, lines: dict):
    for k in data:
        if k not in TOP_KEYS:
            at = f', line {lines[k]}' if k in lines else ''
            raise PipelineError(f'{path}{at}: unknown key {k!r}{_close(k, TOP_KEYS)}; a pipeline file has '
                                f'{", ".join(TOP_KEYS)}')
    out = data.get('out')
    if not isinstance(out, (str, int, float)) or not str(out).strip():
        raise PipelineError(f'{path}: give out: the directory every step writes under (e.g. out: runs/pipeline)')
    for key in ('data', 'report', 'title'):
        if data.get(key) is not None and not isinstance(data[key], (str, int, float)):
            raise PipelineError(f'{path}, line {lines.get(key)}: {key} is a text, got {data[key]!r}')
    if not isinstance(data.get('measure', False), bool):
        raise PipelineError(f'{path}, line {lines.get("measure")}: measure is true or false, got {data["measure"]!r}')
    steps = data.get('steps')
    if not isinstance(steps, list) or not steps:
        raise PipelineError(f'{path}: give steps: a list of steps, e.g. "- train: {{model: '
                            f'deitlab_deit_pico_patch4_32}}", then prune, fuse, export')
    return Path(str(out)).expanduser(), steps


def load_pipeline(path) -> Pipeline:
    """Read and check the pipeline file ``path``: every step resolved into its command (see the
    module docstring). A :class:`PipelineError` names the first problem."""
    path = Path(path)
    data, node = _read(path)
    lines, step_lines = _lines(node)
    out, items = _top(data, path, lines)
    pipe_data = None if data.get('data') is None else str(data['data'])
    measure = bool(data.get('measure', False))
    root, parsers = _parsers()
    steps: List[Step] = []
    model, source, fusion, chain = None, None, None, ''
    for i, item in enumerate(items, 1):
        line = step_lines[i - 1] if i - 1 < len(step_lines) else None

        def where(label, i=i, line=line):
            inside = ', '.join(x for x in (label, f'line {line}' if line else None) if x)
            return f'{path}, step {i}' + (f' ({inside})' if inside else '')

        kind, options, name = _split_item(item, where)
        if kind not in KINDS:
            raise PipelineError(f'{where(None)}: unknown step kind {kind!r}{_close(kind, KINDS)}; the kinds: '
                                f'{", ".join(KINDS)}')
        keys = [str(k).replace('-', '_') for k in options]
        twice = sorted({k.replace('_', '-') for k in keys if keys.count(k) > 1})
        if twice:
            raise PipelineError(f'{where(kind)}: {", ".join(twice)} given twice (with a dash and an underscore)')
        options = dict(zip(keys, options.values()))
        p, method = parsers[kind], None
        methods = _methods(p)
        if methods is not None:
            method = options.pop('method', None)
            if method is None:
                raise PipelineError(f'{where(kind)}: give method: one of {", ".join(methods)}')
            if str(method) not in methods:
                raise PipelineError(f'{where(kind)}: unknown method {method!r}{_close(method, methods)}; the '
                                    f'methods of {kind}: {", ".join(methods)}')
            method = str(method)
            p = methods[method]
        label = f'{kind} {method}' if method else kind

        def say(msg, label=label, where=where):
            return PipelineError(f'{where(label)}: {msg}')

        for key, why in _SET_BY_PIPELINE.items():
            if key in options:
                raise say(f'{key} is not a step option: {why}')
        name = _check_name(name, where(label)) if name is not None else label.replace(' ', '-')
        name = f'{i:02d}-{name}'
        step_model = options.pop('model', None)
        step_source = None
        if step_model is None and kind == 'export' and fusion is not None:   # the model the fuse step fused
            step_model, step_source = fusion['model'], fusion['source']
        elif step_model is None and model is not None:
            step_model, step_source = model, source
        if step_model is None:
            first = ('give model: (a deitlab/timm name, e.g. deitlab_deit_pico_patch4_32)' if kind == 'train' else
                     f'no model to {kind}: give model: (a run directory or a deitlab/timm name), or put a train '
                     f'step before it')
            raise say(first)
        takes_data = '--data' in p._option_string_actions
        step_data = options.pop('data', None) if takes_data else None
        if takes_data and step_data is None:
            step_data = pipe_data
        output, fusion_from = None, None
        if kind in MODEL_KINDS:
            output = out / name
        elif kind == 'export':
            output = out / f'{name}.{options.get("format") or "onnx"}'
        argv = [kind] + ([method] if method else []) + ['--model', str(step_model)]
        if step_data is not None:
            argv += ['--data', str(step_data)]
        if output is not None:
            argv += ['--out', str(output)]
        if kind == 'export' and fusion is not None:
            if 'token_fusion' in options:
                raise say(f'token-fusion is set here and carried from step {fusion["step"]} (fuse '
                          f'{fusion["method"]}); drop one of them')
            if fusion['inflect'] is not None:
                raise say(f'step {fusion["step"]} (fuse {fusion["method"]}) sets inflect, which export cannot take; '
                          f'drop inflect, or the fuse step before this export')
            argv += _fusion_args(fusion)
            fusion_from = fusion['step']
        for key, value in options.items():
            argv += _flag_args(key, value, p, say)
        if not measure and '--no-measure' in p._option_string_actions and 'measure' not in options:
            argv.append('--no-measure')
        argv.append('--json')
        try:
            args = root.parse_args(argv)
            cfg = _settings(kind, method, args)
        except _Refused as e:
            raise say(str(e)) from None
        except ValueError as e:   # the command's configuration refused a setting
            raise say(str(e)) from None
        chain = hashlib.sha256(json.dumps([chain, argv]).encode()).hexdigest()
        step = Step(index=i, kind=kind, method=method, name=name, argv=argv, output=output, model=str(step_model),
                    data=None if step_data is None else str(step_data), line=line, source=step_source,
                    fusion_from=fusion_from, hash=chain)
        if kind == 'fuse':
            step.fusion = dict(_fusion_of(cfg), step=i, model=str(step_model), source=step_source)
            fusion = step.fusion
        elif kind in MODEL_KINDS:
            model, source, fusion = str(output), i, None
        steps.append(step)
    report = Path(str(data['report'])).expanduser() if data.get('report') is not None else out / 'report.html'
    title = str(data['title']) if data.get('title') is not None else f'deitlab pipeline: {path.name}'
    return Pipeline(path=path, out=out, data=pipe_data, measure=measure, report=report, title=title, steps=steps)
