"""Tests for run directories (config.json + model.safetensors) and checkpoint loading."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
from deitlab.rundir import (
    CONFIG_NAME, WEIGHTS_NAME, ModelLoadError, atomic_torch_save, check_state_dict, create,
    load_state_dict_file, save_run_dir,
)

NANO = 'deitlab_deit_nano_patch4_32'
NANO_DIST = 'deitlab_deit_nano_distilled_patch4_32'
PICO = 'deitlab_deit_pico_patch4_32'

GRAY28 = dict(img_size=28, in_chans=1)
NONUNIFORM = dict(
    GRAY28,
    num_heads=[3, 2, 3, 1, 3, 3],
    qk_dim=[8, 16, 32, 32, 32, 32],
    v_dim=[32, 8, 16, 32, 32, 32],
    mlp_hidden=[10, 20, 30, 40, 50, 60],
    attn_scale=[0.25, None, None, 0.1, None, None],
)
LABELS = ['T-shirt', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Boot']
WIDTH_KEYS = ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden', 'attn_scale')


def _build(arch=NANO, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(arch, **kw).eval()


def _x(batch=2, chans=1, size=28, seed=0):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# 1. Save and reload
# ---------------------------------------------------------------------------------------------

RUN_CASES = {
    'uniform': (NANO, GRAY28),
    'nonuniform': (NANO, NONUNIFORM),
    'distilled_uniform': (NANO_DIST, GRAY28),
    'distilled_nonuniform': (NANO_DIST, NONUNIFORM),
}


@pytest.mark.parametrize('case', list(RUN_CASES))
def test_save_and_reload_run_dir(tmp_path, case):
    arch, kw = RUN_CASES[case]
    model = _build(arch, **kw)
    x = _x()
    ref = _logits(model, x)
    run = tmp_path / 'run'
    assert save_run_dir(model, run, label_names=LABELS) == run
    assert sorted(os.listdir(run)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left

    config = json.loads((run / CONFIG_NAME).read_text())
    assert config['architecture'] == arch
    assert config['num_classes'] == 10
    assert config['label_names'] == LABELS
    args = config['model_args']
    assert args['in_chans'] == 1
    assert args['img_size'] == [28, 28]
    assert args['embed_dim'] == 96 and args['depth'] == 6
    for k in WIDTH_KEYS:
        assert args[k] == model.block_widths[k]
        assert isinstance(args[k], list) and len(args[k]) == 6
    if kw is NONUNIFORM:
        for k in ('num_heads', 'qk_dim', 'v_dim', 'mlp_hidden'):
            assert args[k] == NONUNIFORM[k]
        assert args['attn_scale'][0] == 0.25 and args['attn_scale'][3] == 0.1
        assert args['attn_scale'][1] == 16 ** -0.5
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 28, 28]
    assert len(cfg['mean']) == len(cfg['std']) == 1
    assert cfg['num_classes'] == 10
    for k in ('file', 'source', 'hf_hub_id', 'url'):
        assert k not in cfg

    # the safetensors file holds exactly the model's tensors
    saved = load_file(str(run / WEIGHTS_NAME))
    own = model.state_dict()
    assert set(saved) == set(own)
    assert all(torch.equal(saved[k], own[k]) for k in own)

    fresh = _build(arch, seed=1, **kw)
    assert not torch.allclose(_logits(fresh, x), ref)  # a new random model is different

    via_timm = timm.create_model(f'local-dir:{run}', pretrained=True)
    via_create = create(run)
    via_create_str = create(f'local-dir:{run}')
    for loaded in (via_timm, via_create, via_create_str):
        assert type(loaded) is type(model)
        _assert_same_weights(loaded, model)
        assert torch.equal(_logits(loaded, x), ref)
        assert loaded.block_widths == model.block_widths
        assert tuple(loaded.pretrained_cfg['input_size']) == (1, 28, 28)
        assert loaded.pretrained_cfg['architecture'] == arch
        assert list(loaded.pretrained_cfg['label_names']) == LABELS
        assert loaded.num_classes == 10


def test_resave_loaded_run_dir(tmp_path):
    model = _build(NANO_DIST, **NONUNIFORM)
    x = _x()
    save_run_dir(model, tmp_path / 'a', label_names=LABELS)
    loaded = timm.create_model(f'local-dir:{tmp_path / "a"}', pretrained=True)
    save_run_dir(loaded, tmp_path / 'b')
    cfg = json.loads((tmp_path / 'b' / CONFIG_NAME).read_text())['pretrained_cfg']
    assert 'file' not in cfg and 'source' not in cfg  # no pointer back to the first directory
    again = create(tmp_path / 'b')
    assert torch.equal(_logits(again, x), _logits(model, x))
    assert again.block_widths == model.block_widths


def test_run_dir_after_reset_classifier(tmp_path):
    model = _build(NANO, **NONUNIFORM)
    model.reset_classifier(4)
    save_run_dir(model, tmp_path / 'run', label_names=['a', 'b', 'c', 'd'])
    config = json.loads((tmp_path / 'run' / CONFIG_NAME).read_text())
    assert config['num_classes'] == 4
    x = _x()
    for loaded in (create(tmp_path / 'run'), timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True)):
        assert loaded.head.out_features == 4
        assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_save_run_dir_unwraps_module_attribute(tmp_path):
    model = _build(PICO)
    wrapped = nn.DataParallel(model)  # a CPU DataParallel keeps the model under .module
    save_run_dir(wrapped, tmp_path / 'run')
    loaded = create(tmp_path / 'run')
    _assert_same_weights(loaded, model)


def test_save_run_dir_needs_architecture(tmp_path):
    with pytest.raises(ModelLoadError, match='no pretrained_cfg'):
        save_run_dir(nn.Linear(2, 2), tmp_path / 'run')


def test_create_plain_name_passes_kwargs():
    model = create(PICO, num_classes=3, in_chans=1, img_size=28)
    assert model.num_classes == 3
    assert model.patch_embed.proj.in_channels == 1
    assert _logits(model, _x()).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# 2. Errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path):
    return save_run_dir(_build(NANO, **NONUNIFORM), tmp_path / 'run', label_names=LABELS)


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match=r"unknown model name 'deitlab_deit_enormous_patch4_32'"):
        create('deitlab_deit_enormous_patch4_32')
    with pytest.raises(ModelLoadError, match=r'similar names: .*deitlab_deit_'):
        create('deitlab_deit_enormous_patch4_32')


@pytest.mark.parametrize('prefix', ['', 'local-dir:'])
def test_missing_path(tmp_path, prefix):
    missing = tmp_path / 'does' / 'not' / 'exist'
    with pytest.raises(ModelLoadError, match='model path does not exist'):
        create(f'{prefix}{missing}')


def test_existing_file_is_not_reported_missing(tmp_path):
    path = tmp_path / 'weights.safetensors'
    save_file({'w': torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError) as info:
        create(path)
    assert 'does not exist' not in str(info.value)
    assert str(path) in str(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ModelLoadError, match=r'is a directory but not a run directory \(no config.json\)'):
        create(tmp_path / 'empty')


def test_run_dir_without_weights(run_dir):
    (run_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelLoadError, match='has no model.safetensors'):
        create(run_dir)


def test_run_dir_other_num_classes(run_dir):
    with pytest.raises(ModelLoadError, match=r'saved with 10 classes, not 7.*reset_classifier\(7\)'):
        create(run_dir, num_classes=7)
    assert create(run_dir, num_classes=10).num_classes == 10  # the saved count is accepted


def test_run_dir_unknown_architecture(run_dir):
    cfg_path = run_dir / CONFIG_NAME
    config = json.loads(cfg_path.read_text())
    config['architecture'] = 'deitlab_no_such_model'
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unknown architecture 'deitlab_no_such_model'"):
        create(run_dir)


def test_run_dir_invalid_json(run_dir):
    (run_dir / CONFIG_NAME).write_text('{"architecture": ')
    with pytest.raises(ModelLoadError, match='is not valid JSON'):
        create(run_dir)


def test_run_dir_weights_of_other_widths(run_dir):
    other = _build(NANO, **GRAY28)  # same names, uniform widths
    save_file(other.state_dict(), str(run_dir / WEIGHTS_NAME))
    with pytest.raises(ModelLoadError, match=r'model\.safetensors: blocks\.0\.attn\.qkv\.\w+ has shape .*different widths'):
        create(run_dir)


def test_check_state_dict_accepts_own_weights():
    model = _build(NANO_DIST, **NONUNIFORM)
    assert check_state_dict(model, model.state_dict(), 'self') is None


def test_check_state_dict_other_architecture():
    plain = _build(NANO, **GRAY28)
    dist = _build(NANO_DIST, **GRAY28)
    with pytest.raises(ModelLoadError, match=(
            r"src does not match the architecture deitlab_deit_nano_distilled_patch4_32: "
            r"3 missing keys \(e\.g\. \['dist_token', 'head_dist\.bias', 'head_dist\.weight'\]\), 0 unexpected")):
        check_state_dict(dist, plain.state_dict(), 'src')
    with pytest.raises(ModelLoadError, match=r"0 missing keys .*3 unexpected \(e\.g\. \['dist_token'"):
        check_state_dict(plain, dist.state_dict(), 'src')


def test_check_state_dict_other_class_count():
    for arch in (NANO, NANO_DIST):
        ten = _build(arch, **GRAY28)
        five = _build(arch, num_classes=5, **GRAY28)
        with pytest.raises(ModelLoadError, match=r'src has 5 classes but the model has 10 .*num_classes'):
            check_state_dict(ten, five.state_dict(), 'src')


def test_check_state_dict_other_widths():
    with pytest.raises(ModelLoadError, match=r'different widths: not the same architecture'):
        check_state_dict(_build(NANO, **NONUNIFORM), _build(NANO, **GRAY28).state_dict(), 'src')


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return 'executed'


class Payload:
    """An arbitrary object: unpickling it would run code (here: record that it happened)."""

    def __reduce__(self):
        return _record_unpickling, ()


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'obj': Payload()}, path)
    _UNPICKLED.clear()
    with pytest.raises(ModelLoadError, match=r'cannot read .*evil\.pth as a weights-only checkpoint'):
        load_state_dict_file(path)
    assert _UNPICKLED == []


def test_junk_pth_is_refused(tmp_path):
    path = tmp_path / 'junk.pth'
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ModelLoadError, match='as a weights-only checkpoint'):
        load_state_dict_file(path)


def test_pth_without_state_dict_is_refused(tmp_path):
    path = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelLoadError, match='does not hold a state dict of tensors'):
        load_state_dict_file(path)
    torch.save({'model': {'w': torch.zeros(1), 'step': 3}}, path)
    with pytest.raises(ModelLoadError, match='does not hold a state dict of tensors'):
        load_state_dict_file(path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelLoadError, match='checkpoint file does not exist'):
        load_state_dict_file(tmp_path / 'nothing.pth')


@pytest.mark.parametrize('layout', ['model', 'state_dict', 'state_dict_ema', 'bare', 'safetensors'])
def test_state_dict_is_unwrapped(tmp_path, layout):
    model = _build(PICO)
    sd = {f'module.{k}': v for k, v in model.state_dict().items()}  # as saved from DDP
    if layout == 'safetensors':
        path = tmp_path / 'w.safetensors'
        save_file(sd, str(path))
    else:
        path = tmp_path / 'w.pth'
        obj = sd if layout == 'bare' else {layout: sd, 'epoch': 3}
        torch.save(obj, path)
    loaded = load_state_dict_file(path)
    own = model.state_dict()
    assert set(loaded) == set(own)
    assert all(torch.equal(loaded[k], own[k]) for k in own)
    fresh = _build(PICO, seed=1)
    fresh.load_state_dict(loaded, strict=True)
    _assert_same_weights(fresh, model)


# ---------------------------------------------------------------------------------------------
# 3. atomic_torch_save
# ---------------------------------------------------------------------------------------------

def test_atomic_torch_save(tmp_path):
    path = tmp_path / 'ckpt.pth'
    first = {'model': {'w': torch.arange(4.)}, 'epoch': 1}
    atomic_torch_save(first, path)
    assert os.listdir(tmp_path) == ['ckpt.pth']
    loaded = torch.load(path, weights_only=True)
    assert loaded['epoch'] == 1 and torch.equal(loaded['model']['w'], torch.arange(4.))
    # overwrite in place
    atomic_torch_save({'model': {'w': torch.ones(2)}, 'epoch': 2}, str(path))
    assert os.listdir(tmp_path) == ['ckpt.pth']
    loaded = torch.load(path, weights_only=True)
    assert loaded['epoch'] == 2 and torch.equal(loaded['model']['w'], torch.ones(2))


def test_failed_atomic_save_keeps_previous_file(tmp_path):
    path = tmp_path / 'ckpt.pth'
    atomic_torch_save({'w': torch.arange(3.)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({'w': torch.zeros(3), 'fn': lambda: None}, path)  # lambdas cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)['w'], torch.arange(3.))


def test_failed_atomic_save_leaves_no_tmp(tmp_path):
    path = tmp_path / 'ckpt.pth'
    atomic_torch_save({'w': torch.arange(3.)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({'w': torch.zeros(3), 'fn': lambda: None}, path)
    assert os.listdir(tmp_path) == ['ckpt.pth']


def test_saved_files_get_the_default_permissions(tmp_path):
    """safetensors writes 0600; the run directory's files get 0666 less the umask, as any new file."""
    import os
    import timm
    from deitlab.rundir import save_run_dir
    mask = os.umask(0o022)
    try:
        out = save_run_dir(timm.create_model('deitlab_deit_pico_patch4_32'), tmp_path / 'run')
    finally:
        os.umask(mask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        'model.safetensors': '0o644', 'config.json': '0o644'}
