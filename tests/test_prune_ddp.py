"""NViT pruning under torchrun: two gloo processes with half the batch each remove the same units
as one process with the whole batch (DDP averages the slices' gradients, so every process computes
the global batch's saliency)."""
import json
import os
import subprocess
import sys

import torch

from deitlab.rundir import save_run_dir

DATA = 'glyphs:train=96,val=32,size=32,seed=3'


def _dense(path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('deitlab_deit_pico_patch4_32', num_classes=24)
    save_run_dir(model, path)
    return path


def _prune(args, out, nproc):
    cmd = [sys.executable, '-m', 'deitlab', 'prune', 'nvit', '--out', str(out), *args]
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}',
               '-m', 'deitlab', *cmd[3:]]
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = [json.loads(line) for line in (out / 'prune_log.jsonl').read_text().splitlines()]
    widths = json.loads((out / 'pruned' / 'config.json').read_text())['model_args']
    return log, widths


def test_two_processes_remove_the_same_units_as_one(tmp_path):
    dense = _dense(tmp_path / 'dense')
    common = ['--model', str(dense), '--data', DATA, '--target-gmacs', '0.7', '--interval', '2', '--prune-steps', '6',
              '--lam', '0', '--no-measure', '--val-batches', '0', '--group-sizes', 'mlp=16', 'head=1',
              '--finetune-epochs', '0', '--no-progress', '--device', 'cpu']
    one_log, one = _prune(common + ['--batch-size', '16'], tmp_path / 'one', 1)
    two_log, two = _prune(common + ['--batch-size', '8'], tmp_path / 'two', 2)
    assert len(one_log) >= 2, 'the run should take several events'
    assert [r['removed'] for r in two_log] == [r['removed'] for r in one_log]
    for key in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'embed_dim'):
        assert two[key] == one[key], key
    # the check can fail: one process with only half of each batch removes other units
    half_log, half = _prune(common + ['--batch-size', '8'], tmp_path / 'half', 1)
    assert [r['removed'] for r in half_log] != [r['removed'] for r in one_log]
