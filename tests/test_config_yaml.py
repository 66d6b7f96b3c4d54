"""A malformed ``--config`` file is a clear error naming the file and the place, not a traceback."""
import pytest

from deitlab.train.config import ConfigError, load_yaml_defaults


def test_malformed_yaml_names_file_and_line(tmp_path):
    """Catches ``yaml.safe_load`` errors escaping as a YAML parser traceback."""
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: 1e-3\nepochs: [1\n')
    with pytest.raises(ConfigError, match=r'bad\.yaml is not valid YAML \(line \d+, column \d+\)'):
        load_yaml_defaults(bad)


def _train_config(tmp_path, text):
    from deitlab.cli import build_train_config, make_parser
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    args = make_parser(['train']).parse_args(['train', '--config', str(path), '--model', 'deitlab_deit_pico_patch4_32',
                                              '--data', 'glyphs', '--out', str(tmp_path / 'run')])
    return build_train_config(args)


def test_yaml_values_take_the_option_types(tmp_path):
    """YAML reads 1e-3 as a string and 3 as an int: the options get a float and an int either way."""
    cfg = _train_config(tmp_path, 'lr: 1e-3\nepochs: "3"\nema: "yes"\nmin_lr: 0\nr: 16\n')
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.ema is True and cfg.min_lr == 0.0 and isinstance(cfg.min_lr, float) and cfg.r == '16'


@pytest.mark.parametrize('text, message', [
    ('epochs: 2.5\n', r'epochs must be int, got 2\.5'),
    ('lr: fast\n', r"lr must be float, got 'fast'"),
    ('ema: maybe\n', r"ema must be bool, got 'maybe'"),
    ('epochs: true\n', r'epochs must be int, got True'),
    ('model: [a, b]\n', r"model must be str, got \['a', 'b'\]"),
])
def test_yaml_values_of_the_wrong_type_name_file_and_option(tmp_path, text, message):
    with pytest.raises(ConfigError, match=r'c\.yaml, line 1: ' + message):
        _train_config(tmp_path, text)
