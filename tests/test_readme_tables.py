"""The READMEs quote benchmark figures only through ``benchmarks/tables.py``: every generated table
and inline value must equal what the committed JSON gives."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location('bench_tables', ROOT / 'benchmarks' / 'tables.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readmes_match_the_json():
    tables = _tables()
    diffs = tables.check()
    assert not diffs, 'README figures differ from the JSON; run python benchmarks/tables.py\n' + '\n'.join(diffs)


def test_every_readme_has_generated_figures():
    tables = _tables()
    for path in tables.DOCS:
        text = path.read_text()
        assert tables.BLOCK.search(text) or tables.INLINE.search(text), f'{path} quotes no generated figure'


def test_a_hand_edited_figure_is_caught():
    """Catches a check that compares a README with itself, or that skips inline values."""
    tables = _tables()
    text = (ROOT / 'benchmarks' / 'README.md').read_text()
    m = tables.INLINE.search(text)
    assert m is not None
    edited = text[:m.start('body')] + m.group('body') + '1' + text[m.end('body'):]
    assert tables.render(edited) == tables.render(text) != edited
    block = tables.BLOCK.search(text)
    body = block.group('body')
    edited = text.replace(body, body.replace('|', '| 0', 1), 1)
    assert tables.render(edited) == tables.render(text) != edited


def test_unknown_marker_is_an_error():
    tables = _tables()
    with pytest.raises(KeyError, match='unknown table'):
        tables.render('<!-- gen:no_such_table -->\n<!-- /gen:no_such_table -->')
    with pytest.raises(KeyError, match='unknown value'):
        tables.render('<!--v:no.such-->1<!--/v-->')
