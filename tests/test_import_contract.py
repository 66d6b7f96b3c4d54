"""The package's layers hold: ``lint-imports`` passes the contract in pyproject.toml
([tool.importlinter]): cli on top, then demo / unlearnable / evaluate / errors, prune, train,
tokens, data and bench, and models and rundir at the bottom."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract():
    pytest.importorskip('importlinter', reason='import-linter is not installed (pip install -e ".[test]")')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT / 'src'), os.environ.get('PYTHONPATH', '')])}
    r = subprocess.run([sys.executable, '-c', 'import sys; from importlinter.cli import lint_imports_command; '
                        'sys.exit(lint_imports_command())', '--no-cache'],   # reads ./pyproject.toml
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert 'Contracts: 1 kept, 0 broken.' in r.stdout
