"""A malformed ``--config`` file is a clear error naming the file and the place, not a traceback."""
import pytest

from deitlab.train.config import ConfigError, load_yaml_defaults


def test_malformed_yaml_names_file_and_line(tmp_path):
    """Catches ``yaml.safe_load`` errors escaping as a YAML parser traceback."""
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: 1e-3\nepochs: [1\n')
    with pytest.raises(ConfigError, match=r'bad\.yaml is not valid YAML \(line \d+, column \d+\)'):
        load_yaml_defaults(bad)
