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
    dense, pruned, fused, pool = res['rows']
    for row in (dense, pruned, fused, pool):
        assert 0 <= row['top1'] <= 100 and row['params_m'] > 0 and row['gmacs'] > 0 and row['img_per_s'] > 0
    # the pruning step met its latency budget (predicted by the table it measured) and shrank the model
    assert pruned['predicted'] >= 1.9 and pruned['gmacs'] < dense['gmacs'] and pruned['params_m'] < dense['params_m']
    # token fusion on top of the pruned model: same weights, fewer tokens per block
    assert fused['params_m'] == pruned['params_m'] and fused['gmacs'] < pruned['gmacs'] and fused['predicted'] is None
    tokens = res['fusion']['tokens']
    assert tokens[0] == 65 and tokens[-1] < tokens[0] and res['fusion']['method'] == 'mctf'   # MCTF-Fast's schedule
    assert (out / 'widths.png').is_file()
    # the token-mixer row: a PoolFormer trained the same way, fewer GMACs, no latency-table prediction
    assert pool['model'].startswith('PoolFormer') and pool['gmacs'] < dense['gmacs'] and pool['predicted'] is None
    assert timm_local_dir_logits_match(res['pruned_run_dir']) and timm_local_dir_logits_match(res['mixer_run_dir'])
    assert json.loads((out / 'results.json').read_text())['rows'] == res['rows']


def timm_local_dir_logits_match(run_dir):
    import timm
    import torch
    from deitlab.rundir import create
    a = timm.create_model(f'local-dir:{run_dir}', pretrained=True).eval()
    b = create(run_dir).eval()
    x = torch.randn(2, 3, 32, 32)
    return torch.equal(a(x), b(x))


def test_prune_nvit_cli_json_and_bad_input(tmp_path):
    data = 'glyphs:train=320,val=64,size=32,seed=1'
    r = run('train', '--model', 'deitlab_deit_pico_patch4_32', '--data', data, '--out', str(tmp_path / 'dense'),
            '--epochs', '1', '--batch-size', '32', '--no-tensorboard', '--json')
    out = tmp_path / 'nvit'
    res = last_json(run('prune', 'nvit', '--model', str(tmp_path / 'dense'), '--data', data, '--out', str(out),
                        '--target-gmacs', '0.6', '--interval', '2', '--prune-steps', '4', '--total-steps', '6',
                        '--lam', '0', '--no-measure', '--val-batches', '1', '--group-sizes', 'mlp=16', '--json'))
    assert res['estimate']['gmacs'] <= 0.6 and res['target'] == {'kind': 'gmacs', 'value': 0.6}
    names = [row['name'] for row in res['rows']]
    assert names == ['dense', 'nvit']
    assert (out / 'config.json').is_file() and (out / 'prune_log.jsonl').is_file() and (out / 'widths.png').is_file()
    bad = run('prune', 'nvit', '--model', str(tmp_path / 'dense'), '--data', data, '--out', str(tmp_path / 'x'),
              '--json', ok=False)
    assert bad.returncode == 2 and 'exactly one pruning target' in bad.stderr
    again = run('prune', 'nvit', '--model', str(tmp_path / 'dense'), '--data', data, '--out', str(out),
                '--target-gmacs', '0.5', '--json', ok=False)
    assert again.returncode == 2 and 'already holds a pruning run' in again.stderr
