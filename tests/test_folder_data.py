"""``folder:`` data at the model's input size: train, eval, prune and fuse, and the resize log line.

A user's ImageFolder declares no size, so the model keeps its own (32 px for the patch-4 family)
and 28-px images are resized to it, unless ``--img-size`` says otherwise. Built-in specs keep
building a ``patchN`` model at their declared size.
"""
import json

import pytest
import timm
import torch
from PIL import Image

import deitlab  # noqa: F401  (registers the deitlab_* names)
from deitlab.cli import main
from deitlab.data import dataset_info
from deitlab.rundir import create, save_run_dir
from deitlab.train.config import TrainConfig
from deitlab.train.engine import build_student, model_input

MODEL = 'deitlab_deit_pico_patch4_32'
RESIZED = "images are 28x28, resized to the model's 32x32"


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def _tree(root, size=28, n_train=8, n_val=4, classes=('a', 'b')):
    """Grey squares of a different brightness per class, ``size`` px (an int or a list per image)."""
    sizes = size if isinstance(size, list) else [size] * (n_train + n_val)
    k = 0
    for c, name in enumerate(classes):
        for split, n in (('train', n_train), ('val', n_val)):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                s = sizes[k % len(sizes)]
                k += 1
                Image.new('RGB', (s, s), (40 + 150 * c + i, 60, 90)).save(d / f'{i}.png')
    return root


@pytest.fixture
def folder(tmp_path):
    return f'folder:{_tree(tmp_path / "digits")}'


@pytest.fixture
def run_dir(tmp_path):
    """A 2-class pico model saved as a run directory (random weights: only shapes matter here)."""
    torch.manual_seed(0)
    return str(save_run_dir(timm.create_model(MODEL, num_classes=2), tmp_path / 'pico'))


def _train(folder, out, *extra):
    return main(['train', '--model', MODEL, '--data', folder, '--out', str(out), '--epochs', '1', '--batch-size', '8',
                 '--max-steps-per-epoch', '1', '--no-tensorboard', '--no-progress', *extra, '--json'])


def _last_json(capsys):
    cap = capsys.readouterr()
    return json.loads(cap.out.strip().splitlines()[-1]), cap.err


def test_dataset_info_of_a_folder(tmp_path, folder):
    info = dataset_info(folder)
    assert info.img_size is None and info.native_size == (28, 28)   # declares no size, knows its images'
    assert info.resize_note(32) == RESIZED and info.resize_note(28) is None
    mixed = dataset_info(f'folder:{_tree(tmp_path / "mixed", size=[28, 36])}')
    assert mixed.native_size is None
    assert mixed.resize_note(32) == ("images have several sizes, resized (shorter side) and centre-cropped to the "
                                     "model's 32x32")


def test_size_rule_keeps_built_in_specs_and_gives_folder_the_model_size(folder):
    def size(model, data, img_size=None):
        info = dataset_info(data)
        cfg = TrainConfig(model=model, data=data, img_size=img_size)
        return model_input(build_student(cfg, info.num_classes, info.in_chans, info.img_size))

    assert size(MODEL, 'fashion-mnist') == (1, 28)          # declared 28, patch 4 divides it
    assert size(MODEL, 'glyphs:size=48') == (3, 48)
    assert size(MODEL, 'glyphs:size=30') == (3, 32)         # 4 does not divide 30: the model's 32
    assert size(MODEL, folder) == (3, 32)                   # a folder declares no size
    assert size(MODEL, folder, img_size=28) == (3, 28)      # --img-size wins


def test_train_on_a_folder_builds_the_model_at_its_size(tmp_path, folder, capsys):
    out = tmp_path / 'run'
    assert _train(folder, out) == 0
    _, err = _last_json(capsys)
    resolved = json.loads((out / 'train_config.json').read_text())
    assert resolved['input'] == [3, 32, 32] and resolved['recipe'] == 'deit'
    assert model_input(create(str(out))) == (3, 32)
    assert err.count(RESIZED) == 1
    # the default recipe mixes: 1 step is far too short for it, and the log says so in one line
    warnings = [ln for ln in err.splitlines() if 'too short' in ln]
    assert len(warnings) == 1 and "recipe 'deit'" in warnings[0] and '--recipe short' in warnings[0]
    assert 'mix: mixup-cutmix, Mixup 0.8 / CutMix 1.0' in err


def test_train_img_size_wins_and_mix_line_tells_what_is_applied(tmp_path, folder, capsys):
    out = tmp_path / 'run28'
    assert _train(folder, out, '--img-size', '28', '--mixup', '0', '--cutmix', '0', '--warmup-epochs', '0') == 0
    _, err = _last_json(capsys)
    assert json.loads((out / 'train_config.json').read_text())['input'] == [3, 28, 28]
    assert 'resized' not in err
    assert 'mix: none (mixup and cutmix are 0)' in err and 'mixup-cutmix' not in err
    assert 'too short' not in err   # nothing mixed and no warm-up: the short-run warning has nothing to say


def test_recipe_short_is_recorded_and_not_warned_about(tmp_path, folder, capsys):
    out = tmp_path / 'short'
    assert main(['train', '--recipe', 'short', '--model', MODEL, '--data', folder, '--out', str(out), '--epochs', '2',
                 '--batch-size', '8', '--max-steps-per-epoch', '2', '--no-tensorboard', '--no-progress',
                 '--json']) == 0
    _, err = _last_json(capsys)
    cfg = json.loads((out / 'train_config.json').read_text())
    assert cfg['recipe'] == 'short' and cfg['batch_size'] == 8   # the explicit flag wins over the recipe
    assert (cfg['lr'], cfg['warmup_epochs'], cfg['mix'], cfg['drop_path'], cfg['aug']) == (5e-4, 0.5, 'none', 0.0,
                                                                                             'none')
    assert 'too short' not in err and 'recipe short' in err and 'mix: none' in err


def test_eval_on_a_folder_uses_the_model_size(run_dir, folder, capsys):
    assert main(['eval', '--model', run_dir, '--data', folder, '--json']) == 0
    res, err = _last_json(capsys)
    assert res['input'] == [3, 32, 32] and res['count'] == 8
    assert err.count(RESIZED) == 1


def test_prune_on_a_folder_uses_the_model_size(tmp_path, run_dir, folder, capsys):
    out = tmp_path / 'nvit'
    assert main(['prune', 'nvit', '--model', run_dir, '--data', folder, '--out', str(out), '--target-gmacs', '0.6',
                 '--interval', '2', '--prune-steps', '4', '--total-steps', '6', '--batch-size', '8', '--lam', '0',
                 '--no-measure', '--val-batches', '1', '--group-sizes', 'mlp=16', '--no-progress',
                 '--json']) == 0
    _, err = _last_json(capsys)
    assert model_input(create(str(out))) == (3, 32)
    assert RESIZED in err   # once for pruning, once for the fine-tuning run


def test_fuse_on_a_folder_uses_the_model_size(run_dir, folder, capsys):
    assert main(['fuse', 'tome', '--model', run_dir, '--r', '2', '--data', folder, '--no-measure', '--json']) == 0
    res, err = _last_json(capsys)
    assert res['tokens'][0] == 65   # 8x8 patches of 32 px + the class token
    assert all(0 <= row['top1'] <= 100 for row in res['rows'])
    assert err.count(RESIZED) == 1
