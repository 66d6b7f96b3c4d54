"""The model card of a pushed run: what the model is, what it was trained, pruned or searched from,
its numbers and the command that made it, read from the run directory's records. Torch-free.

The records are the files deitlab writes beside ``config.json`` and ``model.safetensors``:
``train_config.json`` (the resolved settings of ``deitlab train``, also of a pruning run's
fine-tuning), ``metrics.jsonl`` (one row per epoch), ``report.json`` (``deitlab prune nvit|ofb``: the
dense and pruned models' numbers and the pruning settings), ``arch.json`` (``deitlab nas export``),
``summary.json`` (a run's summary, where one was written). A record may carry a ``command`` (a string
or a list of arguments): that is shown as the command. Otherwise the command is rebuilt from the
settings: the flags whose values differ from the defaults (for training, the recipe's). Local paths
are shown by their last component only, so the card does not publish a machine's directory layout.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from . import ShareError

#: the run's files that go to the Hub beside config.json and model.safetensors, when present
RECORDS = ('train_config.json', 'metrics.jsonl', 'summary.json', 'report.json', 'arch.json', 'widths.png')

_FAMILIES = (('deitlab_deit_', 'DeiT'), ('deitlab_stvit_', 'STViT (semantic tokens)'), ('deitlab_poolformer_',
             'PoolFormer (MetaFormer)'), ('deitlab_spectformer_', 'SpectFormer'), ('deitlab_vitres_', 'ViT-Res'),
             ('deitlab_dcal', 'DCAL (dual cross-attention)'))
_PRUNERS = {'nvit': 'NViT (Hessian-aware global structural pruning)',
            'ofb': 'OFB (once-for-both importance and sparsity search)'}
_FILE_NOTES = {
    'config.json': 'architecture, constructor arguments (`model_args`: per-block widths of a pruned model), timm\'s '
                   '`pretrained_cfg`, label names',
    'model.safetensors': 'the weights',
    'train_config.json': 'the resolved settings of the training run (of a pruned model: its fine-tuning)',
    'metrics.jsonl': 'one row per epoch: losses, learning rate, validation accuracy',
    'summary.json': "the run's summary",
    'report.json': 'the pruning report: dense and pruned models side by side, the pruning settings',
    'arch.json': 'the searched architecture and where its weights came from',
    'widths.png': 'per-block widths of the dense and the pruned model',
}
# settings that say where and how a run ran, not what it made: left out of a rebuilt command
_RUN_ONLY = ('out', 'device', 'progress', 'resume', 'overwrite', 'workers', 'tensorboard', 'recipe')


def run_records(run_dir: str | Path) -> dict:
    """The records present in ``run_dir``: JSON files parsed, ``metrics.jsonl`` as its list of rows,
    other files (a plot) as their path. ``ShareError`` for a record that is not valid JSON."""
    run_dir = Path(run_dir)
    records = {}
    for name in RECORDS:
        path = run_dir / name
        if not path.is_file():
            continue
        if name.endswith('.png'):
            records[name] = path
            continue
        try:
            text = path.read_text(encoding='utf-8')
            if name.endswith('.jsonl'):
                records[name] = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records[name] = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShareError(f'{path} is damaged ({e}); fix or remove it before pushing the run') from None
    return records


def shown(value):
    """A setting as the card shows it: a local path by its last component (``folder:/x/y`` ->
    ``folder:y``); Hub ids (``hf-hub:org/name``), names and numbers as they are."""
    if not isinstance(value, str) or '/' not in value or value.startswith('hf-hub:'):
        return value
    prefix, sep, rest = value.partition(':')
    if sep and '/' not in prefix and rest:
        return f'{prefix}:{Path(rest).name or rest}'
    return Path(value).name or value


def _family(arch: str) -> Optional[str]:
    return next((name for prefix, name in _FAMILIES if arch.startswith(prefix)), None)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flag(name: str, value) -> list:
    flag = '--' + name.replace('_', '-')
    if isinstance(value, bool):
        return [flag if value else '--no-' + name.replace('_', '-')]
    if isinstance(value, dict):
        return [flag, *(f'{k}={json.dumps(v)}' for k, v in value.items())] if value else []
    if isinstance(value, (list, tuple)):
        return [flag, ','.join(str(shown(v)) for v in value)]
    return [flag, str(shown(value))]


def _same(a, b) -> bool:
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def rebuild_command(words: list, cls, settings: dict, defaults: Optional[dict] = None) -> str:
    """``deitlab WORDS ... --out RUN_DIR``: a flag for each field of the configuration dataclass
    ``cls`` whose value in ``settings`` differs from its default (``defaults`` over the dataclass's),
    in field order; required fields always."""
    defaults = defaults or {}
    args = ['deitlab', *words]
    for f in dataclasses.fields(cls):
        if f.name in _RUN_ONLY or f.name not in settings:
            continue
        value, default = settings[f.name], defaults.get(f.name, _field_default(f))
        if value is None or (default is not dataclasses.MISSING and _same(value, default)):
            continue
        args += _flag(f.name, value)
    args += ['--out', 'RUN_DIR']
    return ' '.join(a if a and not any(c in a for c in ' \'"$;&|<>()*?[]{}') else json.dumps(a) for a in args)


def _recorded_command(records: dict) -> Optional[str]:
    for name in ('summary.json', 'report.json', 'train_config.json', 'arch.json'):
        command = (records.get(name) or {}).get('command') if isinstance(records.get(name), dict) else None
        if command:
            return ' '.join(map(str, command)) if isinstance(command, (list, tuple)) else str(command)
    return None


def _train_command(settings: dict) -> str:
    from ..train.config import RECIPES, TrainConfig
    recipe = settings.get('recipe') or 'deit'
    words = ['train'] + (['--recipe', recipe] if recipe != 'deit' else [])
    return rebuild_command(words, TrainConfig, settings, RECIPES.get(recipe, {}))


def _prune_command(method: str, settings: dict) -> str:
    from ..prune.config import NViTConfig, OFBConfig
    return rebuild_command(['prune', method], NViTConfig if method == 'nvit' else OFBConfig, settings)


def _pruning_method(report: dict) -> Optional[str]:
    names = [row.get('name') for row in report.get('rows') or [] if isinstance(row, dict)]
    return next((n for n in names if n in _PRUNERS), None)


def _trained(train: dict) -> list:
    """What a ``train_config.json`` says about how the model was trained."""
    model = train.get('model')
    if train.get('pretrained_file'):
        start = f'from the weights in `{shown(train["pretrained_file"])}`'
    elif train.get('pretrained'):
        start = f"from timm's pretrained weights of `{model}`"
    elif isinstance(model, str) and '/' in model:
        start = f'fine-tuned from the run directory `{shown(model)}`'
    else:
        start = f'from scratch (architecture `{model}`)'
    epochs = train.get('epochs')
    lines = [f'trained {start} on `{shown(train.get("data"))}` for {epochs} epoch{"" if epochs == 1 else "s"} with '
             f'deitlab\'s `{train.get("recipe", "deit")}` recipe (batch {train.get("batch_size")}, '
             f'{train.get("opt", "adamw")}, learning rate {train.get("lr_resolved", train.get("lr"))})']
    if train.get('teacher') and train.get('distill') not in (None, 'none'):
        lines.append(f'distilled ({train["distill"]}) from the teacher `{shown(train["teacher"])}`')
    extras = [f'{key} {shown(train[key])}' for key in ('mix', 'token_fusion', 'defence', 'multilevel')
              if train.get(key) not in (None, 'none', '', False)]
    if train.get('dcal'):
        extras.append('DCAL branches')
    if extras:
        lines.append('with ' + ', '.join(extras))
    return lines


def lineage(records: dict) -> tuple:
    """``(lines, command, command_note)``: what the model was made from and how, as bullet lines, and the
    command that made it (None when no record tells)."""
    report, train, arch = (records.get(n) if isinstance(records.get(n), dict) else None
                           for n in ('report.json', 'train_config.json', 'arch.json'))
    command, note = _recorded_command(records), 'as recorded'
    lines = []
    method = _pruning_method(report) if report else None
    if method:
        settings = report.get('config') or {}
        target = report.get('target') or {}
        lines.append(f'pruned with {_PRUNERS[method]} from the dense model `{shown(settings.get("model"))}` on '
                     f'`{shown(settings.get("data"))}`, to a {target.get("kind", "?")} target of {target.get("value")}')
        steps = report.get('prune_steps', report.get('search_steps'))
        if steps is not None:
            tuned = report.get('finetune')
            epochs = tuned.get('epochs') if isinstance(tuned, dict) else None
            lines.append(f'{steps} {"pruning" if method == "nvit" else "search"} steps, then '
                         + ((f'fine-tuned for {epochs} epoch{"" if epochs == 1 else "s"}' if epochs else 'fine-tuned')
                            + ' with soft distillation from the dense model' if tuned else 'no fine-tuning'))
        if command is None and settings:
            command, note = _prune_command(method, settings), 'rebuilt from report.json'
    elif train:
        lines += _trained(train)
        if command is None:
            command, note = _train_command(train), 'rebuilt from train_config.json'
    if arch:
        weights = 'inherited from the supernet' if arch.get('weights') == 'supernet' else 'freshly initialised'
        lines.append(f'a ViT-ResNAS architecture of the search space `{arch.get("space")}` (from '
                     f'`{shown(arch.get("source"))}`), weights {weights}')
    if not lines:
        lines.append('the run directory holds no training records: the card tells only what config.json and the '
                     'weights do')
    return lines, command, note


def results(records: dict) -> tuple:
    """``(rows, data)``: accuracy rows (name, top1, ...) and the dataset they were measured on."""
    report, train, summary = (records.get(n) if isinstance(records.get(n), dict) else None
                              for n in ('report.json', 'train_config.json', 'summary.json'))
    keep = ('name', 'top1', 'params_m', 'gmacs', 'latency_ms', 'images_per_s', 'latency_speedup', 'throughput_ratio')
    if report and report.get('rows'):
        data = (report.get('config') or {}).get('data')
        return [{k: row[k] for k in keep if row.get(k) is not None} for row in report['rows']], data
    data = (train or {}).get('data')
    if summary and summary.get('val_top1') is not None:
        row = {'name': 'this model', 'top1': summary['val_top1']}
        if summary.get('val_top5') is not None:
            row['top5'] = summary['val_top5']
        return [row], summary.get('data', data)
    metrics = [r for r in records.get('metrics.jsonl') or [] if isinstance(r, dict) and r.get('val_top1') is not None]
    if metrics:
        last = metrics[-1]
        row = {'name': f'this model (epoch {last.get("epoch")})', 'top1': last['val_top1']}
        if last.get('val_top5') is not None:
            row['top5'] = last['val_top5']
        return [row], data
    return [], data


def _number(v) -> str:
    if isinstance(v, float):
        return f'{v:.4g}' if abs(v) < 1000 else f'{v:.1f}'
    return str(v)


def _table(rows: list) -> list:
    cols = [c for c in ('name', 'top1', 'top5', 'params_m', 'gmacs', 'latency_ms', 'images_per_s',
                        'latency_speedup', 'throughput_ratio') if any(c in r for r in rows)]
    out = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    out += ['| ' + ' | '.join(_number(r.get(c, '')) for c in cols) + ' |' for r in rows]
    return out


def _front_matter(arch: str, license: str, pruned: bool) -> list:
    tags = ['image-classification', 'timm', 'deitlab']
    family = _family(arch)
    if family:
        tags.append(family.split(' ')[0].lower())
    if pruned:
        tags.append('pruned')
    return ['---', 'library_name: timm', f'license: {license}', 'pipeline_tag: image-classification', 'tags:',
            *(f'- {t}' for t in tags), '---', '']


def model_card(repo_id: str, config: dict, records: dict, numbers: dict, license: str = 'apache-2.0',
               files: Optional[list] = None) -> str:
    """The ``README.md`` of a pushed run (Markdown with the Hub's YAML front matter). ``numbers``:
    ``params`` and ``gmacs`` counted on the model (``gmacs`` may be None); ``files``: the files uploaded
    beside the card."""
    arch = config['architecture']
    pcfg = config.get('pretrained_cfg') or {}
    input_size = pcfg.get('input_size')
    lines_made, command, note = lineage(records)
    rows, data = results(records)
    pruned = any(line.startswith('pruned') for line in lines_made)
    family = _family(arch)
    own = arch.startswith('deitlab_')
    name = repo_id.split('/')[-1]

    md = _front_matter(arch, license, pruned)
    kind = family or f'`{arch}`'
    md += [f'# {name}', '',
           f'A{"n" if kind.strip("`")[0].lower() in "aeiou" else ""} {kind} image classifier for '
           f'{config.get("num_classes")} classes ({numbers["params"] / 1e6:.3f}M parameters'
           + (f', {numbers["gmacs"]:.4g} GMACs per image' if numbers.get('gmacs') is not None else '')
           + f'), {"pruned" if pruned else "made"} with deitlab and shared with `deitlab push`.', '']
    md += ['## Model', '', '| | |', '|---|---|', f'| architecture | `{arch}` |']
    if input_size:
        md.append(f'| input | {" x ".join(map(str, input_size))} (channels x height x width), mean {pcfg.get("mean")}, '
                  f'std {pcfg.get("std")}, {pcfg.get("interpolation", "bilinear")} resize |')
    md.append(f'| classes | {config.get("num_classes")} |')
    md.append(f'| parameters | {numbers["params"]:,} |')
    if numbers.get('gmacs') is not None:
        md.append(f'| GMACs | {numbers["gmacs"]:.4g} per image (counted on one forward, attention matmuls included) |')
    labels = config.get('label_names')
    if labels:
        shown_labels = ', '.join(map(str, labels[:30])) + (f', ... ({len(labels)} in all)' if len(labels) > 30 else '')
        md.append(f'| labels | {shown_labels} |')
    md += ['', '## How it was made', '']
    md += [f'- {line}' for line in lines_made]
    if command:
        md += ['', f'The command ({note}; local paths shortened to their last component):', '', '```bash', command,
               '```']
    if rows:
        md += ['', '## Results', '', f'Top-1 (%) on the validation split of `{shown(data)}`'
               + (', with the dense model it was pruned from; params_m in millions' if pruned else '')
               + ('; the speed columns as the pruning run measured them (its settings are in report.json)'
                  if any('latency_ms' in r for r in rows) else '')
               + ':', '', *_table(rows)]
    if 'widths.png' in records:
        md += ['', '![Per-block widths of the dense and the pruned model](widths.png)']
    snippet = ['```python']
    if own:
        snippet.append("import deitlab  # registers deitlab's architectures with timm")
    snippet += ['import timm', '', f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
                'config = timm.data.resolve_data_config({}, model=model)',
                'transform = timm.data.create_transform(**config)', '```']
    md += ['', '## Use', '']
    if own:
        md += [f'`{arch}` is one of deitlab\'s architectures: timm knows it once `import deitlab` has run.', '']
    md += snippet + ['', 'Or fetch it as a deitlab run directory (`config.json` + `model.safetensors`):', '',
                     '```bash', f'deitlab pull {repo_id} --out RUN_DIR', '```']
    if files:
        md += ['', '## Files', '', *(f'- `{f}`' + (f': {_FILE_NOTES[f]}' if f in _FILE_NOTES else '') for f in files)]
    md += ['', '## License', '', f'{license}', '']
    return '\n'.join(md)
