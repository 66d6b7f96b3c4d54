"""The training engine: runs, run directory, resume, DDP, distillation, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from deitlab.rundir import create
from deitlab.train import ConfigError, DistillationLoss, TrainConfig, TrainingDiverged, train

DATA = 'glyphs:train=256,val=96,size=32,seed=1'
MODEL = 'deitlab_deit_pico_patch4_32'


def tiny_cfg(out, **kw):
    base = dict(model=MODEL, data=DATA, out=str(out), epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0,
                drop_path=0.0, mixup=0.0, cutmix=0.0, aug='light', tensorboard=False, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_run_directory(tmp_path):
    out = tmp_path / 'run'
    res = train(tiny_cfg(out, tensorboard=True))
    for name in ('config.json', 'model.safetensors', 'metrics.jsonl', 'checkpoint.pt', 'train_config.json'):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert all(0 <= r['val_top1'] <= 100 and r['val_top5'] >= r['val_top1'] for r in rows)
    assert res['val_top1'] == rows[-1]['val_top1']
    assert list((out / 'tb').iterdir()), 'tensorboard events expected'
    resolved = json.loads((out / 'train_config.json').read_text())
    assert resolved['lr_resolved'] == 1e-3 and resolved['input'] == [3, 32, 32]
    # the run directory rebuilds the trained model
    model = create(str(out)).eval()
    sd = load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_training_is_deterministic_and_learns(tmp_path):
    a = train(tiny_cfg(tmp_path / 'a', epochs=3))
    b = train(tiny_cfg(tmp_path / 'b', epochs=3))
    wa = load_file(str(tmp_path / 'a' / 'model.safetensors'))
    wb = load_file(str(tmp_path / 'b' / 'model.safetensors'))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a['val_top1'] == b['val_top1']
    rows = [json.loads(line) for line in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
    assert rows[-1]['train_loss'] < rows[0]['train_loss']


def test_existing_checkpoint_needs_resume(tmp_path):
    train(tiny_cfg(tmp_path / 'r', epochs=1))
    with pytest.raises(ConfigError, match='already holds a training checkpoint; pass --resume'):
        train(tiny_cfg(tmp_path / 'r', epochs=1))


def test_resume_refuses_other_settings(tmp_path):
    train(tiny_cfg(tmp_path / 'r', epochs=1))
    with pytest.raises(ConfigError, match=r'cannot resume .*batch_size: saved 32 vs now 64'):
        train(tiny_cfg(tmp_path / 'r', epochs=1, batch_size=64, resume=True))
    with pytest.raises(ConfigError, match=r'cannot resume .*lr: saved .* vs now 0.5.*start a new run from its weights'):
        train(tiny_cfg(tmp_path / 'r', epochs=1, lr=0.5, resume=True))
    with pytest.raises(ConfigError, match=r'cannot resume .*epochs: saved 1 vs now 2'):
        train(tiny_cfg(tmp_path / 'r', epochs=2, resume=True))


def test_mixup_needs_even_batch(tmp_path):
    with pytest.raises(ConfigError, match='--mix mixup-cutmix needs an even batch size per process, got 31'):
        train(tiny_cfg(tmp_path / 'm', batch_size=31, mixup=0.8))


def test_mixup_and_ema_run(tmp_path):
    res = train(tiny_cfg(tmp_path / 'e', epochs=1, mixup=0.8, cutmix=1.0, ema=True, ema_decay=0.9,
                         drop_path=0.1))
    assert (tmp_path / 'e' / 'ema' / 'model.safetensors').is_file()
    row = json.loads((tmp_path / 'e' / 'metrics.jsonl').read_text().splitlines()[-1])
    assert 'ema_top1' in row and res['epochs'] == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {'n': 0}
    real = DistillationLoss.forward

    def poisoned(self, inputs, outputs, targets):
        calls['n'] += 1
        loss = real(self, inputs, outputs, targets)
        return loss * float('nan') if calls['n'] == 8 + 3 else loss  # 8 steps per epoch: step 3 of epoch 2

    monkeypatch.setattr(DistillationLoss, 'forward', poisoned)
    out = tmp_path / 'nan'
    with pytest.raises(TrainingDiverged, match=r'loss became nan at epoch 2, step 3 .*Last good checkpoint: .*'
                                               r'checkpoint.pt \(after epoch 1\)'):
        train(tiny_cfg(out, epochs=3))
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ckpt['epoch'] == 0
    weights = load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(weights[k], ckpt['model'][k]) for k in weights)


def _cli(*args):
    return [sys.executable, '-m', 'deitlab', *args]


def _train_args(out, epochs):
    return ['train', '--model', MODEL, '--data', 'glyphs:train=1024,val=64,size=32,seed=2', '--out', str(out),
            '--epochs', str(epochs), '--batch-size', '32', '--lr', '1e-3', '--warmup-epochs', '0',
            '--drop-path', '0', '--mixup', '0.8', '--cutmix', '1.0', '--no-tensorboard', '--no-progress']


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    full = tmp_path / 'full'
    subprocess.run(_cli(*_train_args(full, 3)), check=True, env=env, capture_output=True)
    part = tmp_path / 'part'
    proc = subprocess.Popen(_cli(*_train_args(part, 3)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (part / 'checkpoint.pt').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be interrupted'
    killed_at = torch.load(part / 'checkpoint.pt', weights_only=True)['epoch']
    assert killed_at < 2
    subprocess.run(_cli(*_train_args(part, 3), '--resume'), check=True, env=env, capture_output=True)
    a = load_file(str(full / 'model.safetensors'))
    b = load_file(str(part / 'model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = (full / 'metrics.jsonl').read_text().splitlines()
    rows_b = (part / 'metrics.jsonl').read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items()
                           if 'time' not in k and 'per_s' not in k and 'cpu_s' not in k} for r in rows]
    assert strip(rows_a) == strip(rows_b)


def test_ddp_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    common = ['--model', MODEL, '--data', 'glyphs:train=256,val=64,size=32,seed=3', '--epochs', '2',
              '--batch-size', '32', '--lr', '1e-3', '--warmup-epochs', '0', '--drop-path', '0', '--mixup', '0',
              '--cutmix', '0', '--aug', 'none', '--no-tensorboard', '--no-progress']
    one, two = tmp_path / 'one', tmp_path / 'two'
    subprocess.run(_cli('train', '--out', str(one), *common), check=True, env=env, capture_output=True)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
                '-m', 'deitlab', 'train', '--out', str(two), *common]
    r = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((two / 'train_config.json').read_text())
    assert cfg['world_size'] == 2
    a = load_file(str(one / 'model.safetensors'))
    b = load_file(str(two / 'model.safetensors'))
    norm = lambda d: sum((v.double() ** 2).sum() for v in d.values()) ** 0.5
    diff = norm({k: a[k] - b[k] for k in a})
    # Adam amplifies float round-off where gradients are ~0; a wrong data split would differ by O(1)
    assert diff / norm(a) < 1e-3
    torch.manual_seed(0)
    moved = norm({k: a[k] - v for k, v in create(MODEL, num_classes=24).state_dict().items()})
    assert moved > 100 * diff


def test_cli_json_last_line(tmp_path):
    out = tmp_path / 'c'
    r = subprocess.run(_cli('train', '--model', MODEL, '--data', DATA, '--out', str(out), '--epochs', '1',
                            '--batch-size', '32', '--mixup', '0', '--cutmix', '0', '--no-tensorboard', '--json'),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['run_dir'] == str(out) and 0 <= res['val_top1'] <= 100
    r = subprocess.run(_cli('eval', '--model', str(out), '--data', DATA, '--json'), capture_output=True, text=True)
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev['top1'] == pytest.approx(res['val_top1']) and ev['count'] == 96


def test_cli_bad_input_messages(tmp_path):
    r = subprocess.run(_cli('train', '--model', 'no_such_model_xyz', '--data', DATA, '--out', str(tmp_path / 'x'),
                            '--json'), capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown model name 'no_such_model_xyz'" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])['type'] == 'ModelLoadError'
    r = subprocess.run(_cli('eval', '--model', MODEL, '--data', 'nosuchdata'), capture_output=True, text=True)
    assert r.returncode == 2 and 'nosuchdata' in r.stderr


# --- distillation losses (DeiT Sec. 3) ---

class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits


def test_hard_distillation_is_half_ce_plus_half_ce():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t), 'hard', alpha=0.5)
    x = torch.zeros(4, 3, 8, 8)
    expect = 0.5 * F.cross_entropy(s, y) + 0.5 * F.cross_entropy(s, t.argmax(1))
    assert torch.allclose(loss(x, s, y), expect)


def test_soft_distillation_kl_vanishes_when_teacher_equals_student():
    s, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(s.clone()), 'soft', alpha=0.3, tau=3.0)
    assert torch.allclose(loss(torch.zeros(4, 3, 8, 8), s, y), 0.7 * F.cross_entropy(s, y), atol=1e-6)
    t = torch.randn(4, 5)
    kd = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t), 'soft', alpha=1.0, tau=2.0, kd_norm='batch')
    manual = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction='batchmean') * 4
    assert torch.allclose(kd(torch.zeros(4, 3, 8, 8), s, y), manual, atol=1e-6)


def test_distillation_head_gets_gradient_only_from_teacher_term():
    torch.manual_seed(0)
    student = create('deitlab_deit_pico_distilled_patch4_32', num_classes=5)
    student.set_distilled_training(True)
    student.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    teacher = _Fixed(torch.randn(2, 5))
    out_cls, out_dist = student(x)
    DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard', alpha=0.0)(x, (out_cls, out_dist), y).backward()
    assert student.head_dist.weight.grad is None or student.head_dist.weight.grad.abs().max() == 0
    student.zero_grad()
    out_cls, out_dist = student(x)
    DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard', alpha=0.5)(x, (out_cls, out_dist), y).backward()
    assert student.head_dist.weight.grad.abs().max() > 0 and student.dist_token.grad.abs().max() > 0


def test_train_with_teacher_run_dir(tmp_path):
    train(tiny_cfg(tmp_path / 'teacher', epochs=1))
    res = train(tiny_cfg(tmp_path / 'student', epochs=1, model='deitlab_deit_pico_distilled_patch4_32',
                         teacher=str(tmp_path / 'teacher'), distill='hard'))
    assert res['epochs'] == 1
    with pytest.raises(ConfigError, match='needs --teacher'):
        train(tiny_cfg(tmp_path / 's2', distill='soft'))


def test_yaml_config_gives_defaults_and_flags_win(tmp_path):
    from deitlab.cli import build_train_config, make_parser
    cfg_file = tmp_path / 'recipe.yaml'
    cfg_file.write_text('epochs: 7\nbatch-size: 64\nsmoothing: 0.0\nmodel_kwargs: {drop_rate: 0.1}\n')
    args = make_parser().parse_args(['train', '--config', str(cfg_file), '--epochs', '3', '--out', 'x'])
    cfg = build_train_config(args)
    assert (cfg.epochs, cfg.batch_size, cfg.smoothing, cfg.out) == (3, 64, 0.0, 'x')
    assert cfg.model_kwargs == {'drop_rate': 0.1}
    assert cfg.resolved_lr() == 5e-4 * 64 / 512
    cfg_file.write_text('epochz: 7\n')
    with pytest.raises(ConfigError, match="unknown option 'epochz'"):
        build_train_config(make_parser().parse_args(['train', '--config', str(cfg_file)]))


def test_cnn_trains_at_the_requested_size(tmp_path):
    """A timm CNN has no img_size argument: --img-size goes to its pretrained_cfg, and the run
    directory reloads at that size."""
    from deitlab.bench import resolve_input_size
    train(tiny_cfg(tmp_path / 'cnn', model='resnet10t', epochs=1, img_size=24, in_chans=1, max_steps_per_epoch=1))
    cfg = json.loads((tmp_path / 'cnn' / 'train_config.json').read_text())
    assert cfg['input'] == [1, 24, 24]
    assert resolve_input_size(create(str(tmp_path / 'cnn'))) == (1, 24, 24)


# --- named recipes, the short-run warning, the mix log line ---

def test_recipes_precedence_recipe_then_yaml_then_flags(tmp_path):
    from deitlab.cli import build_train_config, make_parser
    from deitlab.train.config import RECIPES
    parse = make_parser().parse_args
    assert build_train_config(parse(['train'])) == TrainConfig()   # the default recipe is the dataclass defaults
    cfg = build_train_config(parse(['train', '--recipe', 'short']))
    assert cfg.recipe == 'short' and all(getattr(cfg, k) == v for k, v in RECIPES['short'].items())
    assert (cfg.batch_size, cfg.lr, cfg.warmup_epochs, cfg.mix, cfg.mixup, cfg.cutmix) == (32, 5e-4, 0.5, 'none', 0, 0)
    cfg_file = tmp_path / 'r.yaml'
    cfg_file.write_text('recipe: short\nlr: 1.0e-3\nbatch-size: 64\n')
    cfg = build_train_config(parse(['train', '--config', str(cfg_file), '--batch-size', '16']))
    assert (cfg.recipe, cfg.lr, cfg.batch_size, cfg.drop_path) == ('short', 1e-3, 16, 0.0)
    cfg = build_train_config(parse(['train', '--config', str(cfg_file), '--recipe', 'deit']))
    assert (cfg.recipe, cfg.lr, cfg.batch_size, cfg.mix) == ('deit', 1e-3, 64, 'mixup-cutmix')
    assert TrainConfig.from_recipe('short', epochs=3).validate().warmup_epochs == 0.5


def test_recipe_bad_input_messages(tmp_path, capsys):
    from deitlab.cli import main, make_parser
    with pytest.raises(ConfigError, match=r"unknown recipe 'paper'; known recipes: deit \(batch 128.*short \(batch 32"):
        TrainConfig.from_recipe('paper')
    with pytest.raises(ConfigError, match=r"recipe 'short' is named but none of its settings are applied.*"
                                          r"from_recipe\('short'"):
        TrainConfig(recipe='short').validate()
    assert main(['train', '--recipe', 'paper', '--data', DATA, '--out', str(tmp_path / 'x')]) == 2
    assert "deitlab: error: unknown recipe 'paper'; known recipes: deit (" in capsys.readouterr().err
    help_text = ' '.join(make_parser()._subparsers._group_actions[0].choices['train'].format_help().split())
    assert '--recipe' in help_text and "deit: the DeiT paper's" in help_text and 'short: for small data' in help_text


def test_short_run_warning():
    from deitlab.train.config import short_run_warning
    w = short_run_warning('deit', 165, 55, mixing=True)
    assert w.count('\n') == 0 and "recipe 'deit'" in w and '165 optimizer steps with batch mixing' in w
    assert '--recipe short' in w
    w = short_run_warning('deit', 90, 50, mixing=False)
    assert 'warm-up of 50 of 90 steps (more than a third)' in w and 'mixing' not in w
    assert short_run_warning('deit', 5000, 500, mixing=True) is None
    assert short_run_warning('short', 4, 1, mixing=False) is None
    w = short_run_warning('short', 100, 0, mixing=True)
    assert "recipe 'short'" in w and '--mix none' in w and '--recipe short' not in w


def test_mix_log_line_tells_what_is_applied():
    from deitlab.train.mixing import BatchMixer
    model = create(MODEL, num_classes=4)

    def describe(mode, **kw):
        return BatchMixer(mode, model, 4, (32, 32), **kw).describe()
    assert describe('mixup-cutmix', mixup_alpha=0, cutmix_alpha=0) == 'none (mixup and cutmix are 0)'
    assert describe('mixup-cutmix', mixup_prob=0) == 'none (mixup-prob is 0)'
    assert describe('none') == 'none'
    assert describe('mixup-cutmix') == 'mixup-cutmix, Mixup 0.8 / CutMix 1.0 switch 0.5'
    assert describe('mixup-cutmix', cutmix_alpha=0) == 'mixup-cutmix, Mixup 0.8 only (cutmix is 0)'
    assert describe('cutmix') == 'cutmix, CutMix 1.0 only'
    assert describe('maskmix', mixup_alpha=0, cutmix_alpha=0).endswith('other batches unmixed (mixup and cutmix are 0)')


def test_run_directory_keeps_its_size(tmp_path):
    train(tiny_cfg(tmp_path / 'r32', epochs=1, max_steps_per_epoch=1))
    with pytest.raises(ConfigError, match=r'img_size 28 \(--img-size\): the run directory .* takes 32x32 inputs'):
        train(tiny_cfg(tmp_path / 'ft', model=str(tmp_path / 'r32'), epochs=1, img_size=28))


def test_ctrl_c_exits_130_without_a_traceback_and_the_run_resumes(tmp_path):
    """SIGINT after the first checkpoint: exit 130, one line saying where the checkpoint is; --resume
    then finishes the run (to the same weights as an uninterrupted one: the SIGKILL test above)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    part = tmp_path / 'part'
    # a shell's background job inherits SIGINT ignored, and Python keeps it so: give the run the default
    proc = subprocess.Popen(_cli(*_train_args(part, 3)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (part / 'checkpoint.pt').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert 'Traceback' not in err and 'deitlab: interrupted; ' in err and 'checkpoint.pt holds the last finished epoch' in err
    done = subprocess.run(_cli(*_train_args(part, 3), '--resume', '--json'), env=env, capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[-1])['epochs'] == 3
