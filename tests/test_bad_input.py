"""Bad input at the command line: one row per case. Each must end with exit code 2 (argparse's or
deitlab's), one ``deitlab...: error:`` line on stderr naming the problem, no traceback, and the
files already in an output directory unchanged."""
import hashlib
import json

import pytest
import torch
from PIL import Image

from deitlab.cli import main
from deitlab.rundir import save_run_dir

PICO = 'deitlab_deit_pico_patch4_32'
GLYPHS = 'glyphs:train=64,val=32,size=32'
TRAIN = ['train', '--model', PICO, '--data', GLYPHS, '--epochs', '1', '--batch-size', '16', '--no-progress',
         '--no-tensorboard', '--max-steps-per-epoch', '1']
TRAIN_O = TRAIN + ['--out', '{root}/o']   # a training run into a new directory under the fixture
NAS = ['nas', 'train-supernet', '--data', GLYPHS, '--out', '{root}/n', '--batch-size', '8', '--ex-per-arch', '2',
       '--holdout', '1', '--epochs', '1', '--no-progress']
OFB = ['prune', 'ofb', '--model', '{root}/run', '--data', 'folder:{root}/folder', '--out', '{root}/p']
SEARCH = ['nas', 'search', '--supernet', '{root}/supernet', '--out', '{root}/s']
PAPYRI = ['papyri', 'evaluate', '--gt', '{root}/papyri-gt.json']
SYNTH = ['papyri', 'synth', '--pages', '1', '--out', '{root}/pages', '--size', '128x96', '--lines', '3',
         '--letters', '8']
PREDICT = ['papyri', 'predict', '--detector', '{root}/run', '--out', '{root}/predicted', '{root}/picture.png']
DETECT = ['papyri', 'train-detector', '--data', '{root}/papyri-pages', '--out', '{root}/det', '--tile', '32',
          '--overlap', '8', '--epochs', '1', '--steps', '1', '--batch-size', '1']
CROPS = ['papyri', 'crops', '--data', '{root}/papyri-pages', '--out', '{root}/crops']
SIMCLR = ['papyri', 'pretrain-simclr', '--images', '{root}/papyri-pages/images', '--out', '{root}/simclr',
          '--epochs', '1', '--steps', '1', '--batch-size', '2']
EXPORT = ['export', '--model', PICO, '--out', '{root}/m.onnx', '--no-measure']
REPORT = ['report', '--out', '{root}/report.html']
PUSH = ['push', '{root}/run', 'alice/pico']   # no token: the tests' Hub has none, and is offline
PULL = ['pull', 'alice/pico', '--out', '{root}/pulled']
PIPE_HEAD = 'out: {root}/pipe-out\ndata: ' + GLYPHS + '\nsteps:\n'
PIPELINES = {   # name -> the file's text
    'ok': PIPE_HEAD + f'  - train: {{model: {PICO}, epochs: 1}}\n',
    'kind': PIPE_HEAD + f'  - trian: {{model: {PICO}}}\n',
    'option': PIPE_HEAD + f'  - train: {{model: {PICO}, epoch: 2}}\n',
    'value': PIPE_HEAD + f'  - train: {{model: {PICO}, epochs: many}}\n',
    'setting': PIPE_HEAD + f'  - train: {{model: {PICO}, lr: -1}}\n',
    'no-model': PIPE_HEAD + '  - prune: {method: nvit, target-gmacs: 0.5}\n',
    'method': PIPE_HEAD + f'  - train: {{model: {PICO}}}\n  - prune: {{method: nvt, target-gmacs: 0.5}}\n',
    'target': PIPE_HEAD + f'  - train: {{model: {PICO}}}\n  - prune: {{method: nvit}}\n',
    'out': PIPE_HEAD + f'  - train: {{model: {PICO}, out: elsewhere}}\n',
    'top-key': 'outt: {root}/pipe-out\nsteps:\n  - train: {model: x}\n',
    'no-out': 'steps:\n  - train: {model: x}\n',
    'no-steps': 'out: {root}/pipe-out\n',
    'list': '- train\n',
    'report-dir': 'out: {root}/pipe-out\nreport: {root}/nothing/r.html\nsteps:\n' + f'  - train: {{model: {PICO}}}\n',
}
NO_ORT = pytest.mark.skipif(any(__import__('importlib').util.find_spec(p) is None
                                for p in ('onnx', 'onnxruntime', 'onnxscript')),
                            reason="the export extra is not installed: the export stops there")
NO_PYMOO = pytest.mark.skipif(__import__('importlib').util.find_spec('pymoo') is not None,
                              reason='pymoo is installed: NSGA-II runs')


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
CASES = [
    # train: numbers out of range
    ('train-lr-zero', TRAIN_O + ['--lr', '0'], r'lr must be > 0, got 0'),
    ('train-lr-negative', TRAIN_O + ['--lr', '-1'], r'lr must be > 0, got -1'),
    ('train-min-lr-negative', TRAIN_O + ['--min-lr', '-1'], r'min_lr must be >= 0'),
    ('train-batch-zero', TRAIN_O + ['--batch-size', '0'], r'batch_size must be >= 1, got 0'),
    ('train-epochs-zero', TRAIN_O + ['--epochs', '0'], r'epochs must be >= 1, got 0'),
    ('train-drop-path', TRAIN_O + ['--drop-path', '1.5'], r'drop_path must be in \[0, 1\), got 1.5'),
    ('train-smoothing', TRAIN_O + ['--smoothing', '1'], r'smoothing must be in \[0, 1\)'),
    ('train-ema-decay', TRAIN_O + ['--ema-decay', '2'], r'ema_decay must be in \(0, 1\)'),
    ('train-weight-decay', TRAIN_O + ['--weight-decay', '-0.1'], r'weight_decay must be >= 0'),
    ('train-mixup-prob', TRAIN_O + ['--mixup-prob', '1.5'], r'mixup_prob must be in \[0, 1\]'),
    ('train-warmup-negative', TRAIN_O + ['--warmup-epochs', '-1'], r'warmup_epochs must be >= 0'),
    ('train-lr-not-a-number', TRAIN_O + ['--lr', 'fast'], r"argument --lr: invalid float value"),
    # train: multi-level V-cycles
    ('train-multilevel-budget', TRAIN_O + ['--multilevel', 'levels=2,down=1,small=1,up=1'],
     r'--multilevel budgets add up to 3 epochs .* but --epochs is 1'),
    ('train-multilevel-alpha', TRAIN_O + ['--epochs', '3', '--multilevel', 'levels=2,down=1,small=1,up=1,alpha=2'],
     r'--multilevel alpha must be in \[0, 1\], got 2.0'),
    ('train-multilevel-key', TRAIN_O + ['--multilevel', 'levels=2,smal=1'], r"--multilevel: unknown key 'smal'"),
    ('train-multilevel-halve', TRAIN_O + ['--epochs', '5', '--multilevel', 'levels=3,down=1,small=1,up=1'],
     r'level 3 halves the level-2 model, but block 0 has 1 head, which cannot be halved'),
    ('train-multilevel-odd-depth', TRAIN_O + ['--epochs', '3', '--multilevel', 'levels=2,down=1,small=1,up=1',
                                              '--model-kwargs', 'depth=3'],
     r'depth 3 cannot be halved'),
    # train: DCAL, P x K batches
    ('train-dcal-ratio', TRAIN_O + ['--dcal', '--mix', 'none', '--dcal-ratio', '1.5'],
     r'dcal_ratio \(--dcal-ratio\) is a fraction of the patch tokens in \(0, 1\], got 1.5'),
    ('train-dcal-poolformer', TRAIN_O + ['--dcal', '--mix', 'none', '--model', 'deitlab_poolformer_pico_32'],
     r'--dcal: deitlab_poolformer_pico_32: PoolFormer has no self-attention blocks'),
    ('train-dcal-mixing', TRAIN_O + ['--dcal'], r'--dcal with batch mixing \(--mix mixup-cutmix\) is not supported'),
    ('train-dcal-option-alone', TRAIN_O + ['--dcal-no-pwca'], r'--dcal-no-pwca is an option of DCAL training: add --dcal'),
    ('train-triplet-mixing', TRAIN_O + ['--triplet'], r'--triplet with batch mixing \(--mix mixup-cutmix\).*--mix none'),
    ('train-triplet-distilled', TRAIN_O + ['--triplet', '--mix', 'none', '--model', 'deitlab_deit_pico_distilled_patch4_32'],
     r'--triplet needs a model with one head.*is a distilled architecture'),
    ('train-pk-batch', TRAIN_O + ['--pk', '4,2'], r'--pk 4,2 makes batches of 4 x 2 = 8 images but --batch-size is 16'),
    # train: devices, models, model arguments
    ('train-device-banana', TRAIN_O + ['--device', 'banana'], r"unknown device 'banana'"),
    ('train-device-missing', TRAIN_O + ['--device', 'cuda:7'],
     r"device 'cuda:7' is not on this machine"),
    ('train-model-empty', ['train', '--model', '', '--data', GLYPHS, '--out', '{root}/o'], r'model is empty'),
    ('train-model-unknown', ['train', '--model', 'deit_pico_nonexistent', '--data', GLYPHS, '--out', '{root}/o',
                             '--epochs', '1'], r"unknown model name 'deit_pico_nonexistent'"),
    ('train-model-kwargs', TRAIN_O + ['--model-kwargs', 'depth=banana'],
     r"cannot build deitlab_deit_pico_patch4_32 with depth='banana'"),
    ('train-model-kwargs-no-value', TRAIN_O + ['--model-kwargs', 'depth'],
     r"--model-kwargs takes K=V pairs \(e.g. depth=6\), got 'depth'"),
    ('train-recipe-unknown', TRAIN_O + ['--recipe', 'banana'], r"unknown recipe 'banana'"),
    ('train-mix-unknown', TRAIN_O + ['--mix', 'banana'], r'mix must be one of none, mixup'),
    ('train-patchmix-no-patch-head', TRAIN_O + ['--mix', 'patchmix'],
     r"--mix patchmix trains an auxiliary head on the last stage's patch tokens, and DeiT has none: build a ViT-Res "
     r"with a patch head \(--model-kwargs patch_head=true\)"),
    ('train-patch-loss-weight', TRAIN_O + ['--mix', 'patchmix', '--patch-loss-weight', '-1'],
     r'patch_loss_weight must be >= 0, got -1'),
    ('train-distill-no-teacher', TRAIN_O + ['--distill', 'soft'],
     r'--distill soft needs --teacher'),
    # train: resuming (the run in {root}/resumable: 1 epoch, recipe short)
    ('train-resume-changed-lr', TRAIN + ['--out', '{root}/resumable', '--recipe', 'short', '--resume', '--lr', '0.5'],
     r'cannot resume .*lr: saved .* vs now 0.5'),
    ('train-resume-changed-epochs', TRAIN + ['--out', '{root}/resumable', '--recipe', 'short', '--resume',
                                             '--epochs', '3'],
     r'cannot resume .*epochs: saved 1 vs now 3'),
    ('train-checkpoint-without-resume', TRAIN + ['--out', '{root}/resumable', '--recipe', 'short'],
     r'already holds a training checkpoint; pass --resume'),
    # train: output directories
    ('train-out-foreign', TRAIN + ['--out', '{root}/pruned-out'],
     r'pruned-out is not empty \(config.json, model.safetensors\) and holds no checkpoint'),
    ('train-out-file', TRAIN + ['--out', '{root}/a-file'], r'a-file is a file, not a directory'),
    ('train-out-under-file', TRAIN + ['--out', '{root}/a-file/sub'], r'Not a directory: .*a-file/sub \(the file system'),
    ('prune-out-under-file', ['prune', 'nvit', '--model', '{root}/run', '--data', 'folder:{root}/folder', '--out',
                              '{root}/a-file/p', '--target-gmacs', '0.5'], r'Not a directory: .*a-file/p'),
    ('unlearnable-out-under-file', ['unlearnable', 'make', '--data', GLYPHS, '--out', '{root}/a-file/u',
                                    '--key', 'a long enough key'], r'a-file/u'),
    # train: data
    ('train-one-class', TRAIN_O + ['--data', 'folder:{root}/one'],
     r'has one class \(ant\); a classifier needs at least two'),
    ('train-data-missing', TRAIN_O + ['--data', 'folder:{root}/nothing'],
     r'dataset path does not exist'),
    ('train-data-unknown', TRAIN_O + ['--data', 'imagenet-banana'], r'unknown dataset'),
    # --config files
    ('train-yaml-type', ['train', '--config', '{root}/types.yaml', '--model', PICO, '--data', GLYPHS, '--out',
                         '{root}/o'], r"types.yaml, line 2: lr must be float, got 'fast'"),
    ('train-yaml-bool', ['train', '--config', '{root}/bool.yaml', '--model', PICO, '--data', GLYPHS, '--out',
                         '{root}/o'], r'bool.yaml, line 1: drop_path must be float, got True'),
    ('train-yaml-syntax', ['train', '--config', '{root}/syntax.yaml', '--model', PICO, '--data', GLYPHS, '--out',
                           '{root}/o'], r'syntax.yaml is not valid YAML \(line 2, column 1\)'),
    ('train-yaml-unknown-key', ['train', '--config', '{root}/unknown.yaml', '--model', PICO, '--data', GLYPHS,
                                '--out', '{root}/o'], r"unknown.yaml, line 1: unknown option 'banana'"),
    ('train-yaml-missing', ['train', '--config', '{root}/nope.yaml', '--model', PICO, '--data', GLYPHS, '--out',
                            '{root}/o'], r'config file does not exist'),
    # damaged files
    ('eval-truncated-weights', ['eval', '--model', '{root}/truncated', '--data', GLYPHS],
     r'truncated/model.safetensors is damaged \(truncated or not a safetensors file'),
    ('train-from-truncated', TRAIN_O + ['--model', '{root}/truncated'],
     r'model.safetensors is damaged'),
    ('train-resume-damaged', TRAIN + ['--out', '{root}/damaged-train', '--resume'],
     r'damaged-train/checkpoint.pt is damaged .*cannot be resumed'),
    ('prune-resume-damaged', ['prune', 'nvit', '--model', '{root}/run', '--data', 'folder:{root}/folder',
                              '--out', '{root}/damaged-prune', '--target-gmacs', '0.5', '--resume'],
     r'damaged-prune/prune_checkpoint.pt is damaged'),
    # eval
    ('eval-label-names', ['eval', '--model', '{root}/run', '--data', 'folder:{root}/folder'],
     r"trained on the classes \[cat, dog\] but folder:.* has \[ant, bee\] \(other names\)"),
    ('eval-batch-zero', ['eval', '--model', '{root}/run', '--data', GLYPHS, '--batch-size', '0'],
     r'argument --batch-size: must be at least 1, got 0'),
    ('eval-workers-negative', ['eval', '--model', '{root}/run', '--data', GLYPHS, '--workers', '-1'],
     r'argument --workers: must be at least 0, got -1'),
    ('eval-model-missing', ['eval', '--model', '{root}/nothing', '--data', GLYPHS],
     r'model path does not exist: .*nothing'),
    ('eval-split-unknown', ['eval', '--model', '{root}/run', '--data', GLYPHS, '--split', 'banana'],
     r"argument --split: invalid choice: 'banana'"),
    ('eval-retrieval-no-query', ['eval', '--model', '{root}/run', '--data', GLYPHS, '--retrieval'],
     r'--retrieval ranks a gallery for each query: .* no query and gallery; use a re-ID spec'),
    ('eval-device-banana', ['eval', '--model', '{root}/run', '--data', GLYPHS, '--device', 'banana'],
     r"unknown device 'banana'"),
    # explain
    ('explain-image-missing', ['explain', '--model', '{root}/run', '--image', '{root}/nothing.png'],
     r'image file does not exist: .*nothing.png'),
    ('explain-image-unreadable', ['explain', '--model', '{root}/run', '--image', '{root}/a-file'],
     r'cannot read .*a-file as an image'),
    ('explain-poolformer', ['explain', '--model', '{root}/pool', '--image', '{root}/picture.png'],
     r'pool: PoolFormer has no self-attention blocks'),
    ('explain-start-layer', ['explain', '--model', '{root}/run', '--image', '{root}/picture.png', '--start-layer', '4'],
     r'start layer 4 is out of range: the model has 4 blocks \(0..3\)'),
    ('explain-head-fusion', ['explain', '--model', '{root}/run', '--image', '{root}/picture.png', '--head-fusion',
                             'median'], r"argument --head-fusion: invalid choice: 'median'"),
    # bench
    ('bench-img-size-zero', ['bench', '--model', PICO, '--img-size', '0'], r'argument --img-size: must be at least 1'),
    ('bench-batch-zero', ['bench', '--model', PICO, '--batch-size', '0'], r'argument --batch-size: must be at least 1'),
    ('bench-model-unknown', ['bench', '--model', 'no_such_model'], r"unknown model name 'no_such_model'"),
    ('bench-device', ['bench', '--model', PICO, '--device', 'banana'], r"unknown device 'banana'"),
    # fuse
    ('fuse-r-fraction-above-one', ['fuse', 'tome', '--model', PICO, '--r', '1.5'],
     r'r is a number of tokens \(an integer\) or a fraction of the tokens in \[0, 1\), got 1.5'),
    ('fuse-r-too-large', ['fuse', 'tome', '--model', PICO, '--r', '1000'],
     r'r = 1000 is more than a block can merge: at most 32'),
    ('fuse-r-negative', ['fuse', 'mctf', '--model', PICO, '--r', '-2'], r'r must be >= 0, got -2'),
    ('fuse-r-text', ['fuse', 'mctf', '--model', PICO, '--r', 'many'], r'r must be a number'),
    ('fuse-pooling', ['fuse', 'mctf', '--model', PICO, '--pooling', 'median'], r'pooling must be one of'),
    ('fuse-device', ['fuse', 'tome', '--model', PICO, '--device', 'banana'], r"unknown device 'banana'"),
    ('fuse-layers-out-of-range', ['fuse', 'tome', '--model', PICO, '--layers', '99'],
     r'active layers \[99\] are out of range for a model with 4 blocks'),
    ('fuse-split-unknown', ['fuse', 'tome', '--model', PICO, '--data', GLYPHS, '--split', 'banana'],
     r"unknown split 'banana'"),
    ('fuse-model-unknown', ['fuse', 'tome', '--model', 'no_such_vit'], r"unknown model name 'no_such_vit'"),
    # prune
    ('prune-no-target', ['prune', 'nvit', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/p'],
     r'exactly one pruning target'),
    ('prune-two-targets', ['prune', 'nvit', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/p',
                           '--target-gmacs', '0.5', '--target-latency', '0.5'], r"exactly one pruning target.*got \["),
    ('prune-target-above-one', ['prune', 'nvit', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/p',
                                '--target-latency', '1.5'], r'latency target is a fraction .* in \(0, 1\], got 1.5'),
    ('prune-target-negative', ['prune', 'nvit', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/p',
                               '--target-gmacs', '-1'], r'gmacs target is a fraction .* got -1'),
    ('prune-resume-nothing', ['prune', 'nvit', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/p',
                              '--target-gmacs', '0.5', '--resume'], r'has no prune_checkpoint.pt to resume from'),
    ('prune-criterion', ['prune', 'nvit', '--model', '{root}/run', '--data', 'folder:{root}/folder', '--out', '{root}/p',
                         '--target-gmacs', '0.5', '--criterion', 'hessian'], r"unknown saliency criterion 'hessian'"),
    ('prune-existing-run', ['prune', 'nvit', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/pruned-out',
                            '--target-gmacs', '0.5'], r'already holds a pruning run'),
    # prune ofb
    *[(f'ofb-target-{v}', OFB + ['--target-gmacs', v], rf'strictly between 0 and 1; got --target-gmacs {v}')
      for v in ('0', '1', '-0.5', '1.5')],
    ('ofb-no-target', OFB, r'give exactly one OFB target, --target-gmacs or --target-latency'),
    ('ofb-two-targets', OFB + ['--target-gmacs', '0.5', '--target-latency', '0.5'],
     r"exactly one OFB target.*got \['target_gmacs', 'target_latency'\]"),
    ('ofb-latency-target-above-one', OFB + ['--target-latency', '1.2'],
     r'strictly between 0 and 1; got --target-latency 1.2'),
    ('ofb-target-below-the-space', OFB + ['--target-gmacs', '0.01'],
     r'target 0.01 is below the smallest network the OFB search space holds \(0\.\d+ of the dense MACs\)'),
    ('ofb-poolformer', ['prune', 'ofb', '--model', '{root}/pool', '--data', 'folder:{root}/folder', '--out', '{root}/p',
                        '--target-gmacs', '0.5'],
     r'OFB searches the widths of DeiT-family models; .*pool is a PoolFormer'),
    ('ofb-existing-run', ['prune', 'ofb', '--model', '{root}/run', '--data', GLYPHS, '--out', '{root}/pruned-out',
                          '--target-gmacs', '0.5'], r'pruned-out already holds a run; choose another --out'),
    ('ofb-resume-nothing', OFB + ['--target-gmacs', '0.5', '--resume'],
     r'has no ofb_checkpoint.pt to resume from \(it is written at every elimination event\)'),
    ('ofb-grid', OFB + ['--target-gmacs', '0.5', '--grid', 'banana'], r"--grid must be ours or paper, got 'banana'"),
    ('ofb-search-steps-zero', OFB + ['--target-gmacs', '0.5', '--search-steps', '0'],
     r'search_steps must be >= 1, got 0'),
    ('ofb-warmup', OFB + ['--target-gmacs', '0.5', '--warmup', '1.5'], r'warmup is a fraction of the search in \(0, 1\]'),
    # unlearnable
    ('unlearnable-key-short', ['unlearnable', 'make', '--data', GLYPHS, '--out', '{root}/u', '--key', 'ab'],
     r'the key is too short: a key needs at least 8 characters'),
    ('unlearnable-fraction', ['unlearnable', 'make', '--data', GLYPHS, '--out', '{root}/u', '--key',
                              'a long enough key', '--fraction', '1.5'], r'fraction must be a number in \[0, 1\]'),
    ('unlearnable-img-size-zero', ['unlearnable', 'make', '--data', GLYPHS, '--out', '{root}/u', '--key',
                                   'a long enough key', '--img-size', '0'], r'argument --img-size: must be at least 1'),
    # nas
    ('nas-unknown-space', NAS + ['--space', 'huge'], r"unknown search space 'huge'; known spaces: mu, mu_distilled"),
    ('nas-batch-not-divisible', NAS + ['--batch-size', '20', '--ex-per-arch', '8'],
     r'batch_size 20 is not divisible by ex_per_arch 8'),
    ('nas-resume-other-space', NAS + ['--out', '{root}/nas-other', '--resume'],
     r"nas-other/supernet_checkpoint.pt: it holds a supernet of search space 'mu_distilled', but --space is 'mu'"),
    ('nas-search-budget-below-smallest', SEARCH + ['--macs', '1e6'],
     r"the smallest network of space 'mu' has 5.739M MACs \(5739328\), above the budget of 1.000M MACs"),
    ('nas-search-no-budget', SEARCH, r'give a budget: --macs C \(MACs per image\) and / or --latency L'),
    ('nas-search-not-a-supernet', SEARCH + ['--supernet', '{root}/run', '--macs', '2e7'],
     r'run is not a supernet directory \(no space.json\); give a directory written by deitlab nas train-supernet'),
    ('nas-search-nsga2-without-pymoo', SEARCH + ['--macs', '2e7', '--nsga2'],
     r'NSGA-II needs pymoo, which is not installed: pip install pymoo', NO_PYMOO),
    ('nas-export-other-space', ['nas', 'export', '--arch', '{root}/other-space-arch.json', '--out', '{root}/x'],
     r'stage 0 width 40 is not in the search space; choices: \[48, 56, 64\]'),
    ('nas-export-over-a-model', ['nas', 'export', '--arch', '{root}/mu-arch.json', '--out', '{root}/run'],
     r'run already holds a model \(config.json, model.safetensors\); pass --overwrite'),
    # papyri evaluate
    ('papyri-evaluate-missing-file', PAPYRI + ['--pred', '{root}/nothing.json'],
     r'predictions file does not exist: .*nothing.json'),
    ('papyri-evaluate-unknown-image', PAPYRI + ['--pred', '{root}/papyri-pred-image-99.json'],
     r'prediction 0 names image_id 99, which is not an image of the ground truth'),
    ('papyri-evaluate-not-json', PAPYRI + ['--pred', '{root}/a-file'],
     r'predictions file .*a-file is not JSON \(Expecting value: line 1, column 1\)'),
    ('papyri-evaluate-gt-not-coco', ['papyri', 'evaluate', '--gt', '{root}/papyri-pred-image-99.json', '--pred',
                                     '{root}/papyri-pred-image-99.json'],
     r'ground truth must be a COCO object with images, annotations and categories, got a JSON list'),
    ('papyri-evaluate-max-dets', PAPYRI + ['--pred', '{root}/papyri-pred-image-99.json', '--max-dets', '0'],
     r'max_dets must be >= 1, got 0'),
    # papyri synth
    ('papyri-synth-pages-zero', SYNTH + ['--pages', '0'], r'pages must be >= 1, got 0'),
    ('papyri-synth-fonts-unknown', SYNTH + ['--fonts', 'fancy'],
     r"fonts must be 'bundled' or 'system' or font files; 'fancy' is neither \(no such file\)"),
    ('papyri-synth-font-missing', SYNTH + ['--fonts', '{root}/nothing.ttf'],
     r'font file does not exist: .*nothing.ttf'),
    ('papyri-synth-font-not-a-font', SYNTH + ['--fonts', '{root}/a-file'],
     r'a-file is not a font file that can be read'),
    ('papyri-synth-size-malformed', SYNTH + ['--size', '512'],
     r"size must be WIDTHxHEIGHT in pixels, e.g. 512x384; got '512'"),
    ('papyri-synth-size-tiny', SYNTH + ['--size', '16x16'], r'size 16x16: each side must be in \[32, 8192\] pixels'),
    ('papyri-synth-letters-too-many', SYNTH + ['--letters', '100'],
     r'3 lines of 100 letters on a 128x96 page leave letters 1.4 px high \(at least 6\)'),
    ('papyri-synth-damage', SYNTH + ['--damage', '5'], r'damage must be in \[0, 3\], got 5.0'),
    ('papyri-synth-no-out', ['papyri', 'synth', '--pages', '1'], r'the following arguments are required: --out'),
    ('papyri-synth-out-foreign', SYNTH + ['--out', '{root}/pruned-out'],
     r'pruned-out is not empty \(config.json, model.safetensors\) and holds no pages written by deitlab papyri synth'),
    ('papyri-synth-out-file', SYNTH + ['--out', '{root}/a-file'], r'a-file is a file, not a directory'),
    # papyri predict
    ('papyri-predict-not-an-image', PREDICT + ['{root}/a-file'],
     r'a-file is not an image \(the image library cannot read it\)'),
    ('papyri-predict-image-missing', PREDICT + ['{root}/nothing.png'], r'image file does not exist: .*nothing.png'),
    ('papyri-predict-out-foreign', PREDICT + ['--out', '{root}/pruned-out'],
     r'pruned-out is not empty \(config.json, model.safetensors\) and holds no predictions written by deitlab papyri '
     r'predict; choose another --out'),
    ('papyri-predict-out-foreign-overwrite', PREDICT + ['--out', '{root}/pruned-out', '--overwrite'],
     r'pruned-out is not empty .* \(--overwrite replaces only such predictions\)'),
    ('papyri-predict-detector-classifier', PREDICT,
     r'run is a classification run directory \(its config.json names the '),
    ('papyri-predict-detector-plain-dir', PREDICT + ['--detector', '{root}/plain'],
     r'plain is not a detector run directory \(no config.json\)'),
    ('papyri-predict-weights', PREDICT + ['--detector', '{root}/run,{root}/run', '--weights', '1'],
     r'fusion: 1 weights for 2 detectors: one weight per detector'),
    ('papyri-predict-fusion', PREDICT + ['--fusion', 'vote'],
     r"fusion: method must be one of wbf, nms, soft-nms; got 'vote'"),
    # papyri train-detector
    ('papyri-train-detector-no-annotations', DETECT + ['--data', '{root}/folder'],
     r'data directory .*folder has no annotations.json: give a directory written by deitlab papyri synth'),
    ('papyri-train-detector-no-data', DETECT + ['--data', '{root}/nothing'],
     r'data directory does not exist: .*nothing'),
    ('papyri-train-detector-unknown', DETECT + ['--detector', 'yolo9000'],
     r"detector must be one of fcos-r18, retinanet-r18.*; got 'yolo9000'"),
    ('papyri-train-detector-overlap', DETECT + ['--overlap', '32'], r'overlap must be in \[0, tile\), got 32'),
    ('papyri-train-detector-min-size-alone', DETECT + ['--min-size', '64'], r'min_size and max_size go together'),
    ('papyri-train-detector-val-not-coco', DETECT + ['--val', '{root}/papyri-pred-image-99.json'],
     r"papyri-pred-image-99.json: expected a JSON object with 'images', 'annotations' and 'categories', got list"),
    ('papyri-train-detector-out-foreign', DETECT + ['--out', '{root}/pruned-out'],
     r'pruned-out is not empty \(config.json, model.safetensors\) and holds no detector checkpoint to --resume'),
    ('papyri-train-detector-no-out', ['papyri', 'train-detector', '--data', '{root}/papyri-pages'],
     r'the following arguments are required: --out'),
    # papyri crops
    ('papyri-crops-no-annotations', CROPS + ['--data', '{root}/folder'],
     r'data directory .*folder has no annotations.json: give a directory written by deitlab papyri synth'),
    ('papyri-crops-size', CROPS + ['--size', '4'], r'size must be in \[8, 1024\], got 4'),
    ('papyri-crops-margin', CROPS + ['--margin', '-0.1'], r'margin must be in \[0, 2\], got -0.1'),
    ('papyri-crops-base-types', CROPS + ['--base-types', 'bt1,bt9'], r'base_types must be among bt1, bt2, bt3, got bt1,bt9'),
    ('papyri-crops-label-fraction', CROPS + ['--label-fraction', '0'], r'label_fraction must be in \(0, 1\], got 0.0'),
    ('papyri-crops-out-foreign', CROPS + ['--out', '{root}/pruned-out', '--overwrite'],
     r'pruned-out is not empty \(config.json, model.safetensors\) and holds no crops written by deitlab papyri crops'),
    ('papyri-crops-one-letter', CROPS, r'has 1 letter\(s\): too few to hold some out as the val split \(give --val pages\)'),
    # papyri pretrain-simclr
    ('papyri-simclr-not-resnet', SIMCLR + ['--model', 'vit_tiny_patch16_224'],
     r"model must be a timm ResNet \(resnet18, resnet50, ...\), got 'vit_tiny_patch16_224'"),
    ('papyri-simclr-images-missing', SIMCLR + ['--images', '{root}/nothing'], r'image file does not exist: .*nothing'),
    ('papyri-simclr-not-an-image', SIMCLR + ['--images', '{root}/a-file'], r'a-file is not an image that can be read'),
    ('papyri-simclr-window', SIMCLR + ['--window', '40,20'], r"window: LOW must not exceed HIGH; got '40,20'"),
    ('papyri-simclr-temperature', SIMCLR + ['--temperature', '0'], r'temperature must be > 0, got 0.0'),
    ('papyri-simclr-backend', SIMCLR + ['--backend', 'torch'], r"backend must be one of auto, native, lightly, got 'torch'"),
    ('papyri-simclr-model-kwargs', SIMCLR + ['--model', 'resnet18', '--model-kwargs', 'depth=3'],
     r"cannot build resnet18 with \{'depth': 3\}"),
    ('papyri-simclr-out-foreign', SIMCLR + ['--out', '{root}/pruned-out'],
     r'pruned-out is not empty \(config.json, model.safetensors\) and holds no SimCLR run'),
    # papyri predict --refiners
    ('papyri-predict-refiner-missing', PREDICT + ['--refiners', 'deit={root}/nothing'],
     r'refiner deit: .*nothing does not exist; give a run directory written by deitlab train on crops'),
    ('papyri-predict-refiner-names', PREDICT + ['--refiners', 'a={root}/run,a={root}/pool'],
     r'refiners: each needs its own name, not detector; a is taken'),
    ('papyri-predict-vote', PREDICT + ['--refiners', '{root}/run', '--vote', 'unanimous'],
     r"vote must be one of majority, average, got 'unanimous'"),
    ('papyri-predict-vote-weights', PREDICT + ['--refiners', '{root}/run', '--vote-weights', '1'],
     r'vote_weights: 1 weight\(s\) for 2 members \(the detector, then each refiner\)'),
    # papyri demo
    ('papyri-demo-out-file', ['papyri', 'demo', '--out', '{root}/a-file'], r'--out .*a-file is a file, not a directory'),
    ('papyri-demo-out-foreign', ['papyri', 'demo', '--out', '{root}/plain'],
     r'--out .*plain holds files the demo did not write \(notes.txt\); choose another --out'),
    # export
    ('export-format-unknown', EXPORT + ['--format', 'tflite'], r"unknown format 'tflite'; known: onnx"),
    ('export-out-missing-directory', EXPORT + ['--out', '{root}/nothing/m.onnx'],
     r'the directory of --out does not exist: .*nothing \(create it first\)'),
    ('export-out-exists', EXPORT + ['--out', '{root}/a-file'], r'a-file already exists; pass --overwrite to replace it'),
    ('export-out-directory', EXPORT + ['--out', '{root}/plain'], r'--out .*plain is a directory; give the file to write'),
    ('export-batch-zero', EXPORT + ['--batch-size', '0'], r'batch_size must be >= 1, got 0'),
    ('export-opset-low', EXPORT + ['--opset', '3'], r'opset must be >= 7, got 3'),
    ('export-tolerance-zero', EXPORT + ['--tolerance', '0'], r'tolerance must be > 0, got 0'),
    ('export-fusion-unknown', EXPORT + ['--token-fusion', 'banana'], r"token fusion method must be one of tome, mctf, mctf-fast; got 'banana'"),
    ('export-r-without-fusion', EXPORT + ['--r', '4'],
     r'--r and --fusion-options are settings of token fusion: add --token-fusion METHOD'),
    ('export-model-unknown', EXPORT + ['--model', 'no_such_vit'], r"unknown model name 'no_such_vit'", NO_ORT),
    ('export-fusion-poolformer', EXPORT + ['--model', '{root}/pool', '--token-fusion', 'tome'],
     r'token fusion applies to timm VisionTransformer / deitlab DeiT models, not PoolFormer', NO_ORT),
    ('export-fusion-option-unknown', EXPORT + ['--token-fusion', 'tome', '--fusion-options', 'banana=1'],
     r"--fusion-options \{'banana': 1\}: tome does not take them", NO_ORT),
    ('export-unsupported-operator', EXPORT + ['--token-fusion', 'mctf', '--r', '4', '--fusion-options', 'pooling=max'],
     r'cannot export deitlab_deit_pico_patch4_32 \(DeiT with MCTF token fusion\) to ONNX: its operator '
     r'aten.index_reduce has no ONNX translation', NO_ORT),
    # push and pull (the Hub offline, no token, nothing cached)
    ('push-no-token', PUSH, r'no Hugging Face token: log in with `hf auth login` \(a token with write access, from '
                            r'https://huggingface.co/settings/tokens\), or set the HF_TOKEN environment variable'),
    ('push-not-a-run-dir', ['push', '{root}/plain', 'alice/pico'],
     r'plain is not a run directory \(no config.json\); push a directory written by deitlab train, prune or nas '
     r'export'),
    ('push-run-missing', ['push', '{root}/nothing', 'alice/pico'], r'run directory does not exist: .*nothing'),
    ('push-run-a-file', ['push', '{root}/a-file', 'alice/pico'], r'a-file is a file, not a run directory'),
    ('push-no-weights', ['push', '{root}/config-only', 'alice/pico'],
     r'run directory .*config-only has no model.safetensors'),
    ('push-config-without-pretrained-cfg', ['push', '{root}/no-cfg', 'alice/pico', '--dry-run'],
     r'no-cfg/config.json lacks pretrained_cfg, which the Hub layout needs \(save the model again with '
     r'deitlab.rundir.save_run_dir\)'),
    ('push-weights-truncated', ['push', '{root}/truncated', 'alice/pico', '--dry-run'],
     r'truncated/model.safetensors is damaged \(truncated or not a safetensors file'),
    ('push-repo-id-no-owner', ['push', '{root}/run', 'pico'], r"repository id 'pico' is not OWNER/NAME \(e.g. "
                                                              r"alice/deit-pico-glyphs"),
    ('push-repo-id-spaces', ['push', '{root}/run', 'alice/my model'], r"repository id 'alice/my model' is not "
                                                                      r"OWNER/NAME"),
    ('push-stage-not-empty', PUSH + ['--dry-run', '--stage', '{root}/plain'],
     r'--stage .*plain exists and is not empty; give a new or empty directory'),
    ('push-no-repo-id', ['push', '{root}/run'], r'the following arguments are required: REPO_ID'),
    ('pull-out-not-empty', PULL + ['--out', '{root}/plain'],
     r'--out .*plain exists and is not empty; give a new or empty directory'),
    ('pull-out-a-file', PULL + ['--out', '{root}/a-file'], r'--out .*a-file is a file, not a directory'),
    ('pull-not-cached-offline', PULL, r'cannot fetch alice/pico: offline \(HF_HUB_OFFLINE is set\) and it is not in '
                                      r'the Hugging Face cache'),
    ('pull-repo-id-bad', ['pull', 'alice/pico--v2', '--out', '{root}/pulled'],
     r"repository id 'alice/pico--v2' is not OWNER/NAME"),
    ('pull-folder-missing', ['pull', '{root}/nothing', '--out', '{root}/pulled'], r'folder does not exist: .*nothing'),
    ('pull-folder-no-model', ['pull', '{root}/plain', '--out', '{root}/pulled'],
     r"plain is not a model in the layout timm's hf-hub: loader reads: no config.json and no model.safetensors "
     r'\(it holds notes.txt\)'),
    ('pull-folder-no-weights', ['pull', '{root}/config-only', '--out', '{root}/pulled'],
     r"config-only is not a model in the layout timm's hf-hub: loader reads: no model.safetensors"),
    ('pull-folder-truncated', ['pull', '{root}/truncated', '--out', '{root}/pulled'],
     r'truncated: .*truncated/model.safetensors is damaged'),
    ('pull-revision-of-a-folder', ['pull', '{root}/run', '--out', '{root}/pulled', '--revision', 'v1'],
     r'--revision names a revision on the Hub; .*run is a local folder'),
    ('pull-no-out', ['pull', 'alice/pico'], r'the following arguments are required: --out'),
    # demo
    ('demo-out-file', ['demo', '--out', '{root}/a-file'], r'Not a directory: .*a-file/'),
    # report
    ('report-no-sources', REPORT, r'no runs to report on: give run directories \(or directories holding them\) or '
                                  r'benchmark result files \(benchmarks/results/\*.json\)'),
    ('report-no-runs-in-directory', REPORT + ['{root}/plain'],
     r'plain holds no run directory \(no config.json in it or in the directories inside it\)'),
    ('report-source-missing', REPORT + ['{root}/nothing'], r'source does not exist: .*nothing'),
    ('report-not-json', REPORT + ['{root}/a-file'], r'a-file is not JSON \(Expecting value: line 1, column 1\)'),
    ('report-unknown-json', REPORT + ['{root}/papyri-gt.json'],
     r'papyri-gt.json is not a benchmark result this report reads \(keys images, categories, annotations\); the '
     r'kinds it reads: prune \(nvit_fmnist.json, .*\); tokens'),
    ('report-out-directory', ['report', '{root}/run', '--out', '{root}/plain'],
     r'--out .*plain is a directory; give the HTML file to write'),
    ('report-out-missing-directory', ['report', '{root}/run', '--out', '{root}/nothing/r.html'],
     r'the directory of --out does not exist: .*nothing \(create it first\)'),
    ('report-no-out', ['report', '{root}/run'], r'the following arguments are required: --out'),
    ('report-measure-device', REPORT + ['{root}/run', '--measure', '--device', 'banana'], r"unknown device 'banana'"),
    # pipeline: the file is checked before anything runs (pipe-out is never made)
    ('pipeline-file-missing', ['pipeline', '{root}/nothing.yaml'], r'pipeline file does not exist: .*nothing.yaml'),
    ('pipeline-file-a-directory', ['pipeline', '{root}/plain'], r'plain is not a file: give the pipeline YAML file'),
    ('pipeline-not-yaml', ['pipeline', '{root}/syntax.yaml'], r'syntax.yaml is not valid YAML \(line 2, column 1\)'),
    ('pipeline-not-a-mapping', ['pipeline', '{root}/pipe-list.yaml'],
     r'pipe-list.yaml must hold a mapping with out: and steps:'),
    ('pipeline-unknown-key', ['pipeline', '{root}/pipe-top-key.yaml'],
     r"pipe-top-key.yaml, line 1: unknown key 'outt' \(did you mean 'out'\?\); a pipeline file has out, data, "
     r'measure, report, title, steps'),
    ('pipeline-no-out', ['pipeline', '{root}/pipe-no-out.yaml'], r'give out: the directory every step writes under'),
    ('pipeline-no-steps', ['pipeline', '{root}/pipe-no-steps.yaml'], r'give steps: a list of steps'),
    ('pipeline-unknown-kind', ['pipeline', '{root}/pipe-kind.yaml'],
     r"pipe-kind.yaml, step 1 \(line 4\): unknown step kind 'trian' \(did you mean 'train'\?\); the kinds: train, "
     r'prune, fuse, export'),
    ('pipeline-unknown-option', ['pipeline', '{root}/pipe-option.yaml'],
     r"step 1 \(train, line 4\): unknown option 'epoch' \(did you mean 'epochs'\?\); deitlab train --help lists its "
     r'options'),
    ('pipeline-bad-value', ['pipeline', '{root}/pipe-value.yaml'],
     r"step 1 \(train, line 4\): argument --epochs: invalid int value: 'many'"),
    ('pipeline-setting-refused', ['pipeline', '{root}/pipe-setting.yaml'],
     r'step 1 \(train, line 4\): lr must be > 0, got -1'),
    ('pipeline-prune-without-model', ['pipeline', '{root}/pipe-no-model.yaml'],
     r'step 1 \(prune nvit, line 4\): no model to prune: give model: \(a run directory or a deitlab/timm name\), or '
     r'put a train step before it'),
    ('pipeline-unknown-method', ['pipeline', '{root}/pipe-method.yaml'],
     r"step 2 \(prune, line 5\): unknown method 'nvt' \(did you mean 'nvit'\?\); the methods of prune: nvit, ofb"),
    ('pipeline-prune-no-target', ['pipeline', '{root}/pipe-target.yaml'],
     r'step 2 \(prune nvit, line 5\): give exactly one pruning target'),
    ('pipeline-out-in-a-step', ['pipeline', '{root}/pipe-out.yaml'],
     r'step 1 \(train, line 4\): out is not a step option: the pipeline writes each step to OUT/NN-name'),
    ('pipeline-report-directory-missing', ['pipeline', '{root}/pipe-report-dir.yaml'],
     r'report: the directory of .*nothing/r.html does not exist'),
    ('pipeline-from-past-the-end', ['pipeline', '{root}/pipe-ok.yaml', '--from', '3'],
     r'--from 3: .*pipe-ok.yaml has 1 step \(1-1\)'),
    ('pipeline-from-zero', ['pipeline', '{root}/pipe-ok.yaml', '--from', '0'],
     r'argument --from: steps are numbered from 1, got 0'),
    ('pipeline-no-file', ['pipeline'], r'the following arguments are required: FILE.yaml'),
]


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
