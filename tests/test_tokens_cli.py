"""``deitlab fuse`` and ``deitlab train --token-fusion``: the --json contract and bad input."""
import pytest

from test_cli import last_json, run

DATA = 'glyphs:train=256,val=64,size=32,seed=2'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('fuse') / 'pico'
    run('train', '--model', 'deitlab_deit_pico_patch4_32', '--data', DATA, '--out', str(out), '--epochs', '1',
        '--batch-size', '32', '--no-tensorboard', '--json')
    return str(out)


def test_fuse_mctf_reports_baselines_and_the_fused_model(run_dir):
    res = last_json(run('fuse', 'mctf', '--model', run_dir, '--r', '6', '--data', DATA, '--quick', '--batch-size',
                        '16', '--json'))
    names = [r['name'] for r in res['rows']]
    assert names == ['fused attention', 'explicit attention', 'mctf r=6']
    base, explicit, fused = res['rows']
    assert res['tokens'] == [65, 65, 59, 53, 47]   # r=6 at blocks 1..3 of 4
    assert fused['gmacs_closed_form'] < base['gmacs_closed_form'] == explicit['gmacs_closed_form']
    assert res['gmacs_ratio'] == pytest.approx(fused['gmacs_closed_form'] / base['gmacs_closed_form'])
    assert fused['gmacs'] == pytest.approx(fused['gmacs_closed_form'], rel=1e-9)   # counted == closed form
    assert explicit['top1'] == base['top1'] and 0 <= fused['top1'] <= 100
    assert base['throughput_ratio'] == 1.0 and fused['images_per_s'] > 0
    assert res['fusion']['tau_info'] == 20.0 and res['fusion']['layers'] == [1, 2, 3]


def test_fuse_tome_r0_is_the_model(run_dir):
    res = last_json(run('fuse', 'tome', '--model', run_dir, '--r', '0', '--data', DATA, '--no-measure', '--json'))
    base, _, fused = res['rows']
    assert res['gmacs_ratio'] == 1.0 and res['tokens'] == [65] * 5
    assert fused['top1'] == base['top1']


@pytest.mark.parametrize('args,message', [
    (['--r', 'many'], 'r must be a number'),
    (['--r', '4', '--layers', '7'], 'out of range'),
    (['--r', '4', '--pooling', 'median'], 'pooling must be one of'),
])
def test_fuse_bad_input_message(run_dir, args, message):
    r = run('fuse', 'mctf', '--model', run_dir, '--no-measure', *args, '--json', ok=False)
    assert r.returncode == 2 and message in r.stderr


def test_train_with_mctf_consistency(run_dir, tmp_path):
    res = last_json(run('train', '--model', run_dir, '--data', DATA, '--out', str(tmp_path / 'ft'), '--epochs', '1',
                        '--batch-size', '16', '--max-steps-per-epoch', '3', '--token-fusion', 'mctf', '--r', '4',
                        '--r-teacher-max', '2', '--mixup', '0', '--cutmix', '0', '--no-tensorboard', '--json'))
    assert 0 <= res['val_top1'] <= 100
    cfg = (tmp_path / 'ft' / 'train_config.json').read_text()
    assert '"token_fusion": "mctf"' in cfg
    bad = run('train', '--model', run_dir, '--data', DATA, '--out', str(tmp_path / 'x'), '--r', '4', '--json', ok=False)
    assert bad.returncode == 2 and '--r needs --token-fusion' in bad.stderr
