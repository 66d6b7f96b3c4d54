"""The command line's --help is its documentation: answered without torch, every flag with a help
line in a named section, and ``--config FILE.yaml`` on every subcommand that makes a configuration
(the file's values over the defaults, explicit flags over the file, an unknown key named)."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deitlab.cli import build_train_config, main, make_parser
from deitlab.cli_flags import GROUPS, config_values
from deitlab.train.config import ConfigError, TrainConfig

SRC = str(Path(__file__).resolve().parents[1] / 'src')
HEAVY = ('torch', 'timm', 'numpy')


def _python(*args):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([SRC, os.environ.get('PYTHONPATH', '')])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


def _imported(importtime_stderr: str) -> list:
    """Module names from ``python -X importtime`` output."""
    return [line.rsplit('|', 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith('import time:') and '|' in line]


def test_top_level_help_lists_every_command_without_torch():
    r = _python('-X', 'importtime', '-m', 'deitlab', '--help')
    assert r.returncode == 0, r.stderr[-2000:]
    modules = _imported(r.stderr)
    assert 'deitlab.cli' in modules
    assert not [m for m in modules if m.split('.')[0] in HEAVY]
    assert not [m for m in modules if m.startswith('deitlab.') and m not in ('deitlab.__main__', 'deitlab.cli',
                                                                                   'deitlab.cli_flags')]
    from deitlab.cli import COMMANDS
    for name, (text, _) in COMMANDS.items():
        assert name in r.stdout and text.replace('%%', '%')[:30] in ' '.join(r.stdout.split())


@pytest.mark.parametrize('command', [['train'], ['unlearnable', 'eval'], ['eval'], ['explain'], ['bench'], ['models'],
                                     ['demo'], ['unlearnable', 'make'], ['prune', 'nvit'], ['fuse', 'tome'],
                                     ['fuse', 'mctf-fast'], ['nas', 'train-supernet'], ['nas', 'search'],
                                     ['nas', 'export'], ['papyri', 'evaluate'], ['papyri', 'synth'],
                                     ['papyri', 'predict'], ['papyri', 'train-detector'], ['papyri', 'crops'],
                                     ['papyri', 'pretrain-simclr'], ['papyri', 'demo'], ['export'], ['report'],
                                     ['push'], ['pull'], ['pipeline']])
def test_subcommand_help_without_torch(command):
    """The configurations (train/config.py, prune/config.py, tokens/config.py, nas/config.py, papyri/config.py) are
    torch-free, so every subcommand's --help is too."""
    code = ('import sys\nfrom deitlab.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n'
            '    assert e.code == 0\nprint(sorted(m for m in sys.modules if m.split(".")[0] in %r))' % (HEAVY,))
    r = _python('-c', code, *command, '--help')
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == '[]'
    assert 'show this help message and exit' in r.stdout


def _parsers(parser, path=()):
    """Every parser of the tree, with its path of subcommand names."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_flag_has_a_help_line_in_a_named_section():
    leaves = 0
    titles = set(GROUPS.values())
    for path, p in _parsers(make_parser()):
        p.format_help()   # the help texts format (a stray % would raise here)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(a.help and a.help.strip() for a in action._choices_actions), path
            else:
                assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                    (path, action.option_strings)
        if p.get_default('func') is None:
            continue
        leaves += 1
        for group in p._action_groups:   # a subcommand that runs: every option in one of the sections
            assert group.title in titles or not group._group_actions, (path, group.title)
    assert leaves == 28   # train eval explain bench models demo export report push pull pipeline, prune nvit|ofb,
    #                       fuse tome|mctf|mctf-fast, unlearnable make|eval, nas train-supernet|search|export,
    #                       papyri synth|train-detector|crops|pretrain-simclr|evaluate|predict|demo


def test_config_dataclass_fields_carry_their_help_and_section():
    from deitlab.cli_flags import field_doc
    from deitlab.prune import NViTConfig
    from deitlab.tokens.fuse import FuseConfig
    from deitlab.nas.config import ExportConfig, SearchConfig, SupernetConfig
    from deitlab.papyri.metric import EvaluateConfig
    from deitlab.papyri.config import DetectorConfig, PredictConfig, SynthConfig
    from deitlab.papyri.refine_config import CropsConfig, SimCLRConfig
    from deitlab.export.config import ModelExportConfig
    import dataclasses
    for cls in (TrainConfig, NViTConfig, FuseConfig, SupernetConfig, SearchConfig, ExportConfig, EvaluateConfig,
                SynthConfig, PredictConfig, DetectorConfig, ModelExportConfig, CropsConfig, SimCLRConfig):
        for f in dataclasses.fields(cls):
            group, text = field_doc(cls, f)
            assert group in GROUPS and text.strip(), f.name


def _yaml(tmp_path, text, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_train_and_unlearnable_eval(tmp_path):
    parse = make_parser().parse_args
    cfg_file = _yaml(tmp_path, 'recipe: short\nepochs: 4\nwarmup-epochs: 1.0\n')
    cfg = build_train_config(parse(['train', '--config', cfg_file, '--epochs', '2']))
    assert (cfg.recipe, cfg.epochs, cfg.warmup_epochs, cfg.batch_size) == ('short', 2, 1.0, 32)
    args = parse(['unlearnable', 'eval', '--poisoned', 'p', '--out', 'o', '--config', cfg_file])
    cfg = build_train_config(args)
    assert (cfg.recipe, cfg.epochs, cfg.warmup_epochs, cfg.mix) == ('short', 4, 1.0, 'none')
    # data, out and defence are not options of unlearnable eval (it sets them per run)
    with pytest.raises(ConfigError, match=r"unknown option 'out'"):
        build_train_config(parse(['unlearnable', 'eval', '--poisoned', 'p', '--out', 'o', '--config',
                                  _yaml(tmp_path, 'out: elsewhere\n', 'bad.yaml')]))


def test_config_file_prune_nvit(tmp_path):
    from deitlab.prune import NViTConfig
    parse = make_parser().parse_args
    cfg_file = _yaml(tmp_path, 'model: runs/dense\ndata: glyphs\nout: runs/nvit\ntarget-gmacs: 0.5\nlam: 0.1\n'
                               'group_sizes: {mlp: 16}\nprune-types: [mlp]\n')
    values = config_values(parse(['prune', 'nvit', '--config', cfg_file, '--lam', '0.3']))
    cfg = NViTConfig(**values).validate()
    assert (cfg.model, cfg.data, cfg.out, cfg.target_gmacs) == ('runs/dense', 'glyphs', 'runs/nvit', 0.5)
    assert cfg.lam == 0.3 and cfg.group_sizes == {'mlp': 16} and cfg.prune_types == ('mlp',)
    assert cfg.kl_tau == NViTConfig.__dataclass_fields__['kl_tau'].default
    # the required flags may come from the file, and a flag still wins over it
    values = config_values(parse(['prune', 'nvit', '--config', cfg_file, '--out', 'x']))
    assert values['out'] == 'x' and values['model'] == 'runs/dense'


def test_config_file_fuse(tmp_path):
    from deitlab.tokens.fuse import FuseConfig
    parse = make_parser().parse_args
    cfg_file = _yaml(tmp_path, 'model: deitlab_deit_pico_patch4_32\ntau-info: 10.0\nmeasure: false\n')
    for method in ('tome', 'mctf', 'mctf-fast'):
        args = parse(['fuse', method, '--config', cfg_file, '--r', '4'])
        cfg = FuseConfig(**config_values(args), method=args.method)
        assert (cfg.model, cfg.method, cfg.tau_info, cfg.measure, cfg.r) == (
            'deitlab_deit_pico_patch4_32', method, 10.0, False, '4')
    with pytest.raises(ConfigError, match=r"unknown option 'method'"):   # the subcommand names the method
        config_values(parse(['fuse', 'tome', '--config', _yaml(tmp_path, 'method: mctf\n', 'bad.yaml')]))


@pytest.mark.parametrize('command', [['train'], ['unlearnable', 'eval', '--poisoned', 'p', '--out', 'o'],
                                     ['prune', 'nvit'], ['fuse', 'mctf']])
def test_unknown_config_key_is_an_error_that_names_it(tmp_path, capsys, command):
    cfg_file = _yaml(tmp_path, 'device: cpu\nbatch-sise: 64\n')
    assert main([*command, '--config', cfg_file, '--json']) == 2
    out, err = capsys.readouterr()
    assert f"deitlab: error: {cfg_file}, line 2: unknown option 'batch-sise' (did you mean 'batch-size'?)" in err
    assert '"type": "ConfigError"' in out


def test_required_flags_missing_from_flags_and_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['prune', 'nvit', '--target-gmacs', '0.5'])
    assert e.value.code == 2
    assert 'the following arguments are required: --model, --data, --out' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(['fuse', 'tome', '--config', _yaml(tmp_path, 'r: 4\n')])
    assert e.value.code == 2 and 'the following arguments are required: --model' in capsys.readouterr().err
