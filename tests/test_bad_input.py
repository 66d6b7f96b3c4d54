"""Bad input at the command line: one row per case. Each must end with exit code 2 (argparse's or
deitlab's), one ``deitlab...: error:`` line on stderr naming the problem, no traceback, and the
files already in an output directory unchanged."""
import hashlib
import json

import pytest
import torch
from PIL import Image

from _bad_input_cases import CASES, GLYPHS, PICO, PIPELINES, TRAIN
from deitlab.cli import main
from deitlab.rundir import save_run_dir


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A run directory with label names, an image folder with two classes and one with one class,
    a pruning output directory, a plain file, an image file and YAML files."""
    import timm
    root = tmp_path_factory.mktemp('bad')
    torch.manual_seed(0)
    save_run_dir(timm.create_model(PICO, num_classes=2), root / 'run', label_names=['cat', 'dog'])
    for split in ('train', 'val'):
        for cls, shade in (('ant', 40), ('bee', 200)):
            d = root / 'folder' / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.new('RGB', (32, 32), (shade + i, shade, shade)).save(d / f'{i}.png')
        d = root / 'one' / split / 'ant'
        d.mkdir(parents=True)
        Image.new('RGB', (32, 32), (9, 9, 9)).save(d / '0.png')
    save_run_dir(timm.create_model(PICO, num_classes=2), root / 'pruned-out')   # e.g. what prune/fuse wrote
    save_run_dir(timm.create_model('deitlab_poolformer_pico_32', num_classes=2), root / 'pool')
    (root / 'a-file').write_text('not a directory\n')
    (root / 'config-only').mkdir()   # a folder with a model's config.json but no weights
    (root / 'config-only' / 'config.json').write_text((root / 'run' / 'config.json').read_text())
    (root / 'no-cfg').mkdir()   # config.json without what the Hub layout needs
    (root / 'no-cfg' / 'config.json').write_text(json.dumps(dict(architecture=PICO, num_classes=2)))
    (root / 'no-cfg' / 'model.safetensors').write_bytes((root / 'run' / 'model.safetensors').read_bytes())
    (root / 'plain').mkdir()   # a directory, not a run directory
    (root / 'plain' / 'notes.txt').write_text('nothing here\n')
    Image.new('RGB', (40, 24), (90, 160, 30)).save(root / 'picture.png')
    save_run_dir(timm.create_model(PICO, num_classes=24), root / 'truncated')   # cut in half, as a failed copy
    w = root / 'truncated' / 'model.safetensors'
    w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
    for name in ('damaged-train', 'damaged-prune'):
        (root / name).mkdir()
    (root / 'damaged-train' / 'checkpoint.pt').write_bytes(b'PK\x03\x04 not a checkpoint')
    (root / 'damaged-prune' / 'prune_checkpoint.pt').write_bytes(b'\x80\x02 cut short')
    (root / 'nas-other').mkdir()   # a supernet checkpoint of another search space
    torch.save({'space': 'mu_distilled', 'epoch': 0}, root / 'nas-other' / 'supernet_checkpoint.pt')
    from deitlab.nas import SPACES, Supernet   # a supernet directory as train-supernet writes it (untrained)
    from deitlab.nas.train import save_weights
    (root / 'supernet').mkdir()
    save_weights(Supernet(SPACES['mu']), root / 'supernet' / 'supernet.safetensors')
    (root / 'supernet' / 'space.json').write_text(json.dumps(dict(name='mu', space=SPACES['mu'].to_dict())))
    (root / 'supernet' / 'holdout.json').write_text(json.dumps(dict(data=GLYPHS, split='train', indices=[])))
    (root / 'other-space-arch.json').write_text(json.dumps(dict(
        widths=[40, 128, 256], heads=[2] * 9, mlp_hidden=[128, 384, 768] * 3, keep=[True] * 9)))
    (root / 'mu-arch.json').write_text(json.dumps(SPACES['mu'].smallest().to_dict()))
    (root / 'types.yaml').write_text('# a learning rate\nlr: fast\n')
    (root / 'bool.yaml').write_text('drop_path: true\n')
    (root / 'syntax.yaml').write_text('lr: [1,\n')
    (root / 'unknown.yaml').write_text('banana: 1\n')
    (root / 'papyri-gt.json').write_text(json.dumps(dict(   # competition-schema ground truth, one glyph
        images=[dict(id=1, file_name='page.jpg')], categories=[dict(id=8, name='A')],
        annotations=[dict(id=1, image_id=1, category_id=8, bbox=[10, 10, 20, 30], tags=dict(BaseType=['bt1']))])))
    pages = root / 'papyri-pages'   # a one-page dataset in the competition's schema
    (pages / 'images').mkdir(parents=True)
    Image.new('RGB', (48, 40), (200, 180, 140)).save(pages / 'images' / 'p.png')
    (pages / 'annotations.json').write_text(json.dumps(dict(
        images=[dict(id=1, file_name='images/p.png', width=48, height=40)], categories=[dict(id=8, name='A')],
        annotations=[dict(id=1, image_id=1, category_id=8, bbox=[10, 10, 12, 16], tags=dict(BaseType=['bt1']))])))
    (root / 'papyri-pred-image-99.json').write_text(json.dumps([dict(image_id=99, category_id=8, bbox=[10, 10, 20, 30],
                                                                      score=0.9)]))
    assert main(TRAIN + ['--out', str(root / 'resumable'), '--recipe', 'short']) == 0   # has checkpoint.pt
    for name, text in PIPELINES.items():   # pipeline files, each with one problem (their out: is root/pipe-out)
        (root / f'pipe-{name}.yaml').write_text(text.replace('{root}', str(root)))
    return root


def _digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob('*')) if p.is_file()} if path.is_dir() else None


# (id, argv with {root} for the fixture directory, a regular expression the error line must match)


@pytest.mark.parametrize('argv, pattern', [pytest.param(*c[1:3], marks=c[3:]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, argv, pattern, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants   # push and pull: the Hub offline, its cache empty, no token
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    monkeypatch.setattr('huggingface_hub.get_token', lambda: None)
    argv = [a.replace('{root}', str(files)) for a in argv]
    outs = [files / name for name in ('pruned-out', 'run', 'folder', 'plain', 'truncated', 'damaged-train',
                                      'damaged-prune', 'resumable', 'pool', 'nas-other', 'supernet')]
    before = [_digest(p) for p in outs]
    try:
        code = main(argv)
    except SystemExit as e:   # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if 'error:' in line]
    assert code == 2, err
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert __import__('re').search(pattern, lines[0]), lines[0]
    assert [_digest(p) for p in outs] == before
    assert not list(files.glob('*.onnx*')) and not list(files.glob('.*.tmp'))   # export: nothing partial written
    assert not (files / 'report.html').exists()   # report: nothing written
    assert not (files / 'pulled').exists() and not list(files.glob('.pulled.pull-*'))   # pull: nor here
    assert not (files / 'pipe-out').exists()   # pipeline: no step ran


def test_the_table_is_large_and_its_ids_unique():
    assert len({c[0] for c in CASES}) == len(CASES) >= 60


def test_json_mode_reports_the_error_as_the_last_line(files, capsys):
    code = main(TRAIN + ['--out', str(files / 'o'), '--lr', '0', '--json'])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 2 and json.loads(out) == {'error': 'lr must be > 0, got 0.0', 'type': 'ConfigError'}


def test_overwrite_trains_into_a_foreign_directory(files, tmp_path, capsys):
    import shutil
    out = tmp_path / 'reuse'
    shutil.copytree(files / 'pruned-out', out)
    assert main(TRAIN + ['--out', str(out), '--overwrite']) == 0
    assert json.loads((out / 'config.json').read_text())['num_classes'] == 24   # glyphs' classes, not the old 2


def test_a_split_without_some_class_trains_with_a_warning(files, tmp_path, capsys):
    import shutil
    data = tmp_path / 'gap'
    shutil.copytree(files / 'folder', data)
    shutil.rmtree(data / 'val' / 'bee')
    assert main(TRAIN + ['--out', str(tmp_path / 'o'), '--data', f'folder:{data}', '--batch-size', '4']) == 0
    err = capsys.readouterr().err
    assert 'warning: the val split of' in err and 'has no images of 1 class(es): bee' in err
