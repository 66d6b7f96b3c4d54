"""The command line: --json contract of models, bench and demo."""
import json
import os
import subprocess
import sys

import pytest


def run(*args, ok=True, env=None):
    r = subprocess.run([sys.executable, '-m', 'deitlab', *args], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
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
    """The JSON is what was asked and its numbers agree with each other, no time asserted: the
    model built here at 1x28x28 has the reported parameters; the flat latency and images/s are the
    detailed results' medians, at batch 1 and 8; quick's sample counts (min_time 0); with an odd
    number of samples the median of 8 / t is 8 / median(t) = 8 / batch_ms; the settings record the
    one thread the process had.

    Wrong code this catches: --img-size / --in-chans not applied, flat fields from the wrong
    measurement, latency at the throughput batch, --batch-size or --quick ignored, images/s that
    is not batch / seconds, settings that do not say how the process ran."""
    import timm
    import deitlab  # noqa: F401
    from deitlab.bench.speed import QUICK
    res = last_json(run('bench', '--model', 'deitlab_deit_pico_patch4_32', '--img-size', '28', '--in-chans', '1',
                        '--batch-size', '8', '--quick', '--json', env=dict(OMP_NUM_THREADS='1')))
    model = timm.create_model('deitlab_deit_pico_patch4_32', img_size=28, in_chans=1)
    assert res['input_size'] == [1, 28, 28] and res['params'] == sum(p.numel() for p in model.parameters())
    assert res['gmacs'] == pytest.approx(res['gmacs_analytic'], rel=1e-6)
    lat, thr = res['latency'], res['throughput']
    assert res['latency_ms'] == lat['median_ms'] and res['images_per_s'] == thr['images_per_s']
    assert lat['settings']['batch_size'] == 1 and thr['settings']['batch_size'] == 8
    assert lat['samples'] == QUICK['latency']['repeats'] and thr['samples'] == QUICK['throughput']['repeats']
    if thr['samples'] % 2:
        assert res['images_per_s'] == pytest.approx(8 / (thr['batch_ms'] / 1e3), rel=1e-9)
    assert lat['p10_ms'] <= lat['median_ms'] <= lat['p90_ms']
    assert res['settings']['batch_size'] == 8 and res['settings']['latency_batch_size'] == 1
    assert res['settings']['quick'] is True
    assert res['settings']['threads'] == 1 and res['settings']['device'] == 'cpu'


def test_bench_unknown_model_message():
    r = run('bench', '--model', 'deitlab_nope', '--json', ok=False)
    assert r.returncode == 2
    assert "unknown model name 'deitlab_nope'" in r.stderr


def _top1_by_hand(model, data, batch_size):
    """Top-1 (%) of ``model`` on the val split of ``data``, counted here: argmax of the logits
    against the labels, the images shaped as training and evaluation shape them."""
    import torch
    from deitlab.data import build_dataset
    from deitlab.train.engine import model_input, norm_stats
    chans, size = model_input(model)
    mean, std = norm_stats(model, chans)
    ds = build_dataset(data, 'val', img_size=size, in_chans=chans, aug='none', mean=mean, std=std)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            xs, ys = zip(*(ds[j] for j in range(i, min(i + batch_size, len(ds)))))
            correct += int((model(torch.stack(xs)).argmax(1) == torch.tensor(ys)).sum())
    return 100 * correct / len(ds)


def test_demo_quick(tmp_path):
    """Every row of the demo's table is the model it names: the run directories it reports
    (dense, pruned, PoolFormer) and the pruned one with the demo's token fusion put back, run here
    on the whole validation split, get exactly the row's top-1 (as rounded), parameter count and
    counted GMACs; the baseline row's speed-up is exactly 1.

    Wrong code this catches: a row that reports the accuracy of a model other than the one it
    names (the dense model's for the pruned row, the pruned model's before fine-tuning), an
    accuracy on part of the validation split (the pruning run's ``val_batches``) or as a fraction,
    parameters or GMACs of another row, run directories that do not hold the models the table
    measured."""
    from deitlab.bench import count_gmacs
    from deitlab.demo import DEMO_FUSION
    from deitlab.rundir import create
    from deitlab.tokens.fuse import apply_token_fusion
    out = tmp_path / 'demo'
    res = last_json(run('demo', '--out', str(out), '--quick', '--json'))
    assert (out / 'demo.png').is_file() and (out / 'results.json').is_file()
    dense, pruned, fused, pool = res['rows']
    data = res['settings']['data']
    models = [(dense, create(res['run_dir']), 64), (pruned, create(res['pruned_run_dir']), 64),
              (fused, apply_token_fusion(create(res['pruned_run_dir']).eval(), **DEMO_FUSION), 256),
              (pool, create(res['mixer_run_dir']), 64)]
    for row, model, batch in models:
        assert row['top1'] == round(_top1_by_hand(model, data, batch), 2), row['model']
        assert row['params_m'] == round(sum(p.numel() for p in model.parameters()) / 1e6, 3), row['model']
        assert row['gmacs'] == round(count_gmacs(model), 4), row['model']
    assert dense['speedup'] == 1.0
    # --quick prunes to half the GMACs (a target that does not depend on the machine's load): the pruned
    # model met it and shrank; the latency table it measured gives a prediction (its value depends on load)
    assert pruned['model'] == 'NViT-pruned (GMACs 0.5)'
    assert pruned['gmacs'] <= 0.5 * dense['gmacs'] + 5e-5 and pruned['params_m'] < dense['params_m']
    assert isinstance(pruned['predicted'], float)
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


def test_bench_prints_a_readable_block_and_nothing_on_stderr():
    """Without --json: the formatted lines, no dicts; the profiler's native stderr lines are silenced
    (DEITLAB_VERBOSE=1 keeps them)."""
    r = run('bench', '--model', 'deitlab_deit_pico_patch4_32', '--quick')
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ['model', 'deitlab_deit_pico_patch4_32'] and any(ln.startswith('throughput') for ln in lines)
    assert '{' not in r.stdout and r.stderr.strip() == ''
