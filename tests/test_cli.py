"""The command line: --json contract of models, bench and demo."""
import json
import subprocess
import sys

import pytest


def run(*args, ok=True):
    r = subprocess.run([sys.executable, '-m', 'deitlab', *args], capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_models_json_lists_every_deitlab_architecture():
    import timm
    import deitlab  # noqa: F401
    rows = last_json(run('models', '--json'))['models']
    assert sorted(r['name'] for r in rows) == sorted(timm.list_models('deitlab_*'))
    nano = next(r for r in rows if r['name'] == 'deitlab_deit_nano_patch4_32')
    assert nano['params_m'] == pytest.approx(0.683, abs=1e-3)


def test_bench_json_reports_measurements(tmp_path):
    res = last_json(run('bench', '--model', 'deitlab_deit_pico_patch4_32', '--img-size', '28', '--in-chans', '1',
                        '--batch-size', '8', '--quick', '--json'))
    assert res['input_size'] == [1, 28, 28]
    assert res['gmacs'] == pytest.approx(res['gmacs_analytic'], rel=1e-6)
    assert res['latency_ms'] > 0 and res['images_per_s'] > 0
    assert res['settings']['threads'] >= 1 and res['settings']['device'] == 'cpu'


def test_bench_unknown_model_message():
    r = run('bench', '--model', 'deitlab_nope', '--json', ok=False)
    assert r.returncode == 2
    assert "unknown model name 'deitlab_nope'" in r.stderr


def test_demo_quick(tmp_path):
    out = tmp_path / 'demo'
    res = last_json(run('demo', '--out', str(out), '--quick', '--json'))
    assert (out / 'demo.png').is_file() and (out / 'results.json').is_file()
    row = res['rows'][0]
    assert 0 <= row['top1'] <= 100 and row['params_m'] > 0 and row['gmacs'] > 0 and row['img_per_s'] > 0
    assert json.loads((out / 'results.json').read_text())['rows'] == res['rows']
