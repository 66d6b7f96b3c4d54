"""Training-time defences (deitlab.unlearnable.defences) and deitlab unlearnable eval."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import deitlab.models  # noqa: F401
from deitlab.train import ConfigError, TrainConfig, train
from deitlab.unlearnable.defences import build_defence, parse_defence, pgd_linf, random_blur

DATA = 'glyphs:train=192,val=48,size=32,seed=2'


def test_parse_defence_defaults_options_and_errors():
    assert parse_defence('none') == ('none', {})
    assert parse_defence('blur') == ('blur', {'p': 0.3, 'k': 3})
    assert parse_defence('adv:eps=8,steps=5') == ('adv', {'eps': 8.0, 'steps': 5, 'alpha': 0.0})
    assert parse_defence('noise:std=0.1') == ('noise', {'std': 0.1})
    with pytest.raises(ValueError, match="unknown defence 'cutout'"):
        parse_defence('cutout')
    with pytest.raises(ValueError, match="unknown option 'sigma=1'"):
        parse_defence('noise:sigma=1')
    with pytest.raises(ValueError, match='k must be odd'):
        parse_defence('blur:k=4')
    with pytest.raises(ValueError, match='eps must be a number'):
        parse_defence('adv:eps=big')
    with pytest.raises(ConfigError, match="unknown defence 'x'"):
        TrainConfig(defence='x').validate()


def test_random_blur_is_a_max_normalised_cuda_filter():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 12, 12, generator=g).expand(6, 3, 12, 12).contiguous()
    out = random_blur(x, p=0.3, k=3, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(6))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # same filter per channel
    # p = 0: the filter is a single 1, so each image is a shifted copy of itself, over its max
    shifted = random_blur(x[:, :1], p=0.0, k=3, generator=torch.Generator().manual_seed(2))
    for i in range(6):
        pad = F.pad(x[i, :1], (1, 1, 1, 1))
        cands = [pad[:, a:a + 12, b:b + 12] for a in range(3) for b in range(3)]
        assert any(torch.allclose(shifted[i], c / c.max()) for c in cands)


def test_noise_defence_stays_in_pixel_range():
    mean, std = (0.5,), (0.5,)
    d = build_defence('noise:std=0.5', mean, std)
    x = torch.zeros(4, 1, 8, 8)  # pixel 0.5
    torch.manual_seed(0)
    px = d(None, x, None) * 0.5 + 0.5
    assert px.min() >= 0 and px.max() <= 1 and (px != 0.5).any()
    assert 0.3 < (px - 0.5).std() < 0.5


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = timm.create_model('deitlab_deit_pico_patch4_32', num_classes=5)
    model.train()
    x = torch.randn(8, 3, 32, 32).clamp(-1, 1)
    y = torch.randint(0, 5, (8,))
    d = build_defence('adv:eps=8,steps=4', (0.5,) * 3, (0.5,) * 3)
    xa = d(model, x, y)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    eps_norm = 8 / 255 / 0.5
    assert (xa - x).abs().max() <= eps_norm + 1e-6 and (xa - x).abs().max() > eps_norm / 2
    assert xa.min() >= -1 - 1e-6 and xa.max() <= 1 + 1e-6
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y)
    # steps with alpha = 0 stay at the random start inside the ball
    lo, hi, scale = torch.full((1, 3, 1, 1), -1.), torch.full((1, 3, 1, 1), 1.), torch.full((1, 3, 1, 1), 2.)
    x0 = pgd_linf(model, x, y, 4 / 255, 2, 0.0, lo, hi, scale)
    assert (x0 - x).abs().max() <= 4 / 255 * 2 + 1e-6


def test_train_with_each_defence(tmp_path):
    for d in ('blur', 'noise:std=0.1', 'adv:eps=2,steps=1'):
        res = train(TrainConfig(model='deitlab_deit_pico_patch4_32', data=DATA, out=str(tmp_path / d.split(':')[0]),
                                epochs=1, batch_size=32, mix='none', defence=d, tensorboard=False, progress=False,
                                max_steps_per_epoch=2))
        assert res['epochs'] == 1
        cfg = json.loads((tmp_path / d.split(':')[0] / 'train_config.json').read_text())
        assert cfg['defence'] == d


def test_unlearnable_eval_end_to_end(tmp_path):
    from deitlab.cli import main
    from deitlab.unlearnable import UnlearnableError, evaluate_unlearnable, make_unlearnable
    make_unlearnable(DATA, 'a key of sixteen', tmp_path / 'p', progress=False)
    cfg = TrainConfig(model='deitlab_deit_pico_patch4_32', epochs=1, batch_size=32, mix='none', tensorboard=False,
                      progress=False, max_steps_per_epoch=2)
    row = evaluate_unlearnable(tmp_path / 'p', cfg, tmp_path / 'e', defences=['none', 'blur'])
    assert set(row['runs']) == {'clean', 'poisoned', 'poisoned+blur'}
    assert row['chance_top1'] == pytest.approx(100 / 24) and 'a key of sixteen' not in json.dumps(row)
    assert json.loads((tmp_path / 'e' / 'unlearnable_eval.json').read_text())['runs'].keys() == row['runs'].keys()
    run_cfg = json.loads((tmp_path / 'e' / 'poisoned-none' / 'train_config.json').read_text())
    assert run_cfg['img_size'] == 32 and run_cfg['in_chans'] == 3 and run_cfg['data'].startswith('folder:')
    with pytest.raises(UnlearnableError, match='has no manifest.json'):
        evaluate_unlearnable(tmp_path / 'e', cfg, tmp_path / 'x')
    rc = main(['unlearnable', 'eval', '--poisoned', str(tmp_path / 'p'), '--out', str(tmp_path / 'cli'), '--no-clean',
               '--model', 'deitlab_deit_pico_patch4_32', '--epochs', '1', '--max-steps-per-epoch', '1',
               '--mix', 'none', '--no-tensorboard', '--no-progress', '--json'])
    assert rc == 0 and (tmp_path / 'cli' / 'poisoned-none' / 'model.safetensors').exists()
