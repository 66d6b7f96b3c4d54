"""deitlab.papyri.detect: the glyph detectors behind one interface (build, predict a page through
its tiles), ``train_detector``'s run directory (round trip through ``load_detector``, resume to
the same weights), the refusals of bad input, the YOLOv8 adapter (its export always; its training,
slow, when ultralytics is installed), and (slow) the default detector learning a page."""
import json
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from deitlab.cli import main
from deitlab.papyri.config import DetectorConfig, PapyriError, SynthConfig
from deitlab.papyri.detect import (KIND, Detector, TorchvisionDetector, build_detector_model, evaluate_detector,
                                   load_detector, to_coco_results, train_detector)
from deitlab.papyri.detect_data import PageCrops, collate_crops, load_page, page_tensor, read_pages, unpack_targets
from deitlab.papyri.fusion import Detections
from deitlab.papyri.synth import synthesize
from deitlab.papyri.tiling import tile_grid
from deitlab.registry import DETECTORS
from deitlab.train.loop import Hooks

TINY = dict(size='128x96', lines=3, letters=8)   # 13 px letters, about 20 a page


@pytest.fixture(scope='module')
def pages(tmp_path_factory):
    """Two tiny synthetic pages in the competition's schema."""
    out = tmp_path_factory.mktemp('detect') / 'pages'
    synthesize(SynthConfig(pages=2, out=str(out), seed=3, progress=False, **TINY))
    return out


def _config(data, out, **kw):
    """Two epochs of two updates; 50 detections per tile (a barely trained detector scores everything alike)."""
    base = dict(data=str(data), out=str(out), tile=64, overlap=16, epochs=2, steps=2, batch_size=2, detections=50,
                progress=False)
    return DetectorConfig(**{**base, **kw})


@pytest.mark.parametrize('name', DETECTORS.names(backend='torchvision'))
def test_build_forward_and_predict_a_tiny_page(name, one_thread):
    torch.manual_seed(0)
    # untrained, every score is about the prior (0.01): keep the 50 best of a tile
    model = build_detector_model(name, {'score_thresh': 0.001, 'detections': 50})
    x = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{'boxes': torch.tensor([[5., 6., 20., 24.]]), 'labels': torch.tensor([17])},
               {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.long)}]   # a crop without glyphs
    losses = model.train()(x, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    page = torch.rand(3, 50, 70)
    dets = TorchvisionDetector(name, model, tile=64, overlap=16).predict(page)
    assert isinstance(dets, Detections) and len(dets) > 0 and model.training   # the mode is restored
    assert ((dets.labels >= 0) & (dets.labels < 24)).all()
    b = dets.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 70).all() and (b[:, 3] <= 50).all()
    assert (b[:, 2:] >= b[:, :2]).all()


def test_the_detectors_are_registered_and_build_without_downloading(monkeypatch):
    def no_download(*a, **k):
        raise AssertionError('a download was attempted')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)
    for entry in DETECTORS:
        assert entry.help and entry['backend'] in ('torchvision', 'ultralytics') and entry.load()
        if entry['backend'] == 'torchvision':
            model = entry.load()()
            assert model.detector_args['num_classes'] == 24
            # trainable BatchNorm in the backbone (torchvision's detection default is frozen, the identity untrained)
            assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())


class _Fake(nn.Module):
    """A stand-in torchvision model: records each input's shape, returns one box at (10, 10, 30, 30)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, images):
        out = []
        for im in images:
            self.seen.append(tuple(im.shape))
            out.append({'boxes': torch.tensor([[10., 10., 30., 30.]]), 'scores': torch.tensor([0.9]),
                        'labels': torch.tensor([len(self.seen) % 24])})
        return out


def test_a_large_page_is_predicted_tile_by_tile_in_page_coordinates():
    fake = _Fake()
    det = TorchvisionDetector('fake', fake, tile=128, overlap=32)
    dets = det.predict(torch.rand(3, 200, 300))
    grid = tile_grid(200, 300, 128, 32)
    assert len(grid) == 6 and fake.seen == [(3, t.y1 - t.y0, t.x1 - t.x0) for t in grid]
    expected = {(t.x0 + 10, t.y0 + 10, t.x0 + 30, t.y0 + 30) for t in grid}
    assert {tuple(np.round(b).astype(int)) for b in dets.boxes} == expected
    fake.seen.clear()
    assert len(det.predict(torch.rand(3, 100, 90))) == 1 and fake.seen == [(3, 100, 90)]   # one tile: as predicted


def test_page_tensor_reads_every_form(tmp_path):
    from PIL import Image
    rgb = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    Image.fromarray(rgb).save(tmp_path / 'p.png')
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for form in (tmp_path / 'p.png', str(tmp_path / 'p.png'), Image.fromarray(rgb), rgb,
                 torch.from_numpy(rgb).permute(2, 0, 1), want):
        assert torch.equal(page_tensor(form), want)
    assert page_tensor(torch.rand(5, 6)).shape == (3, 5, 6)
    with pytest.raises(PapyriError, match=r'a page tensor must be \(C, H, W\) with 1 or 3 channels'):
        page_tensor(torch.rand(2, 5, 6))


def test_crops_keep_their_boxes_and_never_flip(pages):
    data = read_pages(pages)
    crops = PageCrops(data, tile=64, length=6, seed=1, jitter=0.0, min_visible=0.5)
    page = load_page(data, 0).float() / 255
    x, y = collate_crops([crops[i] for i in range(6)])
    assert x.shape == (6, 3, 64, 64) and y.shape[0] == 6 and y.shape[2] == 5
    assert torch.equal(collate_crops([crops[i] for i in range(6)])[0], x)   # same (seed, epoch, index): same crop
    for target in unpack_targets(y):
        b = target['boxes']
        assert ((b >= 0) & (b <= 64)).all() and (b[:, 2:] > b[:, :2]).all() and (target['labels'] < 24).all()
    # without jitter a crop is a window of its page, unflipped: find it on page 0 or 1
    pages_t = [page, load_page(data, 1).float() / 255]
    for crop in x:
        assert any((crop == p[:, y0:y0 + 64, x0:x0 + 64]).all() for p in pages_t
                   for y0 in range(p.shape[1] - 63) for x0 in range(p.shape[2] - 63))
    crops.set_epoch(1)
    assert not torch.equal(collate_crops([crops[i] for i in range(6)])[0], x)


class _Keep(Hooks):
    """A hook keeping the trainer's model."""
    def after_epoch(self, epoch, row):
        self.model = self.trainer.model


class _Interrupt(Hooks):
    """A hook interrupting training after epoch ``n`` (after the checkpoint is written)."""
    def __init__(self, n):
        self.n = n

    def after_epoch(self, epoch, row):
        if epoch + 1 == self.n:
            raise KeyboardInterrupt


def test_train_writes_a_run_directory_that_loads_to_the_same_predictions(pages, tmp_path, one_thread):
    out = tmp_path / 'run'
    keep = _Keep()
    summary = train_detector(_config(pages, out, val=str(pages)), hooks=[keep])
    assert {p.name for p in out.iterdir()} == {'config.json', 'model.safetensors', 'metrics.jsonl', 'summary.json',
                                              'checkpoint.pt'}
    config = json.loads((out / 'config.json').read_text(encoding='utf-8'))
    assert config['kind'] == KIND and config['detector'] == 'fcos-r18' and config['backend'] == 'torchvision'
    assert (config['tile'], config['overlap']) == (64, 16) and config['classes']['letters'][17] == '\u03f9'
    assert config['args']['levels'] == [1, 2, 3] and config['args']['detections'] == 50
    assert config['input']['mean'] == config['args']['image_mean'] and config['input']['rescale'] is None
    assert config['data']['train']['images'] == 2 and len(config['data']['train']['sha256']) == 64
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    for r in rows:
        assert {'loss_classification', 'loss_bbox_regression', 'loss_bbox_ctrness', 'val_detection_mAP50',
                'val_detection_mAP', 'val_recognition_mAP50', 'val_recognition_mAP'} <= set(r)
    assert summary['updates'] == 4 and json.loads((out / 'summary.json').read_text()) == summary

    loaded = load_detector(out, device='cpu')
    assert isinstance(loaded, Detector) and loaded.name == 'fcos-r18' and loaded.run_dir == out
    assert not loaded.model.training
    fresh = TorchvisionDetector('fcos-r18', keep.model, 64, 16)
    page = load_page(read_pages(pages), 0)
    a, b = loaded.predict(page), fresh.predict(page)
    assert len(a) > 0 and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.labels, b.labels)
    assert [len(d) for d in loaded.predict_many([page, page])] == [len(a)] * 2
    # the run's last validation mAP is what the loaded detector scores
    res = evaluate_detector(loaded, read_pages(pages))
    assert res['detection']['mAP50'] == pytest.approx(rows[-1]['val_detection_mAP50'])


def test_resume_continues_to_the_weights_of_an_unbroken_run(pages, tmp_path, one_thread):
    from safetensors.torch import load_file
    train_detector(_config(pages, tmp_path / 'whole', epochs=3))
    with pytest.raises(KeyboardInterrupt):
        train_detector(_config(pages, tmp_path / 'part', epochs=3), hooks=[_Interrupt(2)])
    with pytest.raises(PapyriError, match=r'already holds a detector checkpoint; pass --resume'):
        train_detector(_config(pages, tmp_path / 'part', epochs=3))
    with pytest.raises(Exception, match=r'cannot resume .*lr: saved 0.002 vs now 0.1'):
        train_detector(_config(pages, tmp_path / 'part', epochs=3, lr=0.1, resume=True))
    summary = train_detector(_config(pages, tmp_path / 'part', epochs=3, resume=True))
    whole, part = load_file(str(tmp_path / 'whole' / 'model.safetensors')), load_file(str(tmp_path / 'part' /
                                                                                          'model.safetensors'))
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    rows = [json.loads(line) for line in (tmp_path / 'part' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2, 3] and summary['updates'] == 6


def test_coco_results_use_competition_ids_and_skip_empty_boxes():
    dets = Detections([[1, 2, 11, 22], [5, 5, 5, 9]], [0.9, 0.8], [17, 0])
    assert to_coco_results(dets, 7) == [{'image_id': 7, 'category_id': 225, 'bbox': [1.0, 2.0, 10.0, 20.0],
                                         'score': 0.9}]


def test_cli_trains_and_prints_json(pages, tmp_path, capsys, one_thread):
    out = tmp_path / 'cli'
    assert main(['papyri', 'train-detector', '--data', str(pages), '--out', str(out), '--tile', '64', '--epochs', '1',
                 '--steps', '1', '--batch-size', '1', '--json']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['run_dir'] == str(out) and result['updates'] == 1 and (out / 'model.safetensors').is_file()


# ------------------------------------------------------------------------------------------ bad input
def test_a_classification_run_directory_is_not_a_detector(tmp_path):
    import timm
    from deitlab.rundir import save_run_dir
    save_run_dir(timm.create_model('deitlab_deit_pico_patch4_32', num_classes=2), tmp_path / 'cls')
    with pytest.raises(PapyriError, match=r"cls is a classification run directory \(its config.json names the "
                                          r"architecture 'deitlab_deit_pico_patch4_32', as deitlab train writes\), "
                                          r'not a detector run directory: train one with deitlab papyri '
                                          r'train-detector'):
        load_detector(tmp_path / 'cls')
    with pytest.raises(PapyriError, match=r'detector run directory does not exist: .*nothing'):
        load_detector(tmp_path / 'nothing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(PapyriError, match=r'empty is not a detector run directory \(no config.json\)'):
        load_detector(tmp_path / 'empty')
    (tmp_path / 'half').mkdir()
    (tmp_path / 'half' / 'config.json').write_text(json.dumps({'kind': KIND, 'detector': 'fcos-r18'}))
    with pytest.raises(PapyriError, match=r'half has no model.safetensors yet'):
        load_detector(tmp_path / 'half')


def test_bad_settings_are_refused_with_the_reason(pages, tmp_path):
    (tmp_path / 'bare').mkdir()
    with pytest.raises(PapyriError, match=r'data directory .*bare has no annotations.json: give a directory '
                                          r'written by deitlab papyri synth'):
        _config(tmp_path / 'bare', tmp_path / 'o').validate()
    with pytest.raises(PapyriError, match=r"detector must be one of fcos-r18, retinanet-r18.*; got 'yolo9000'"):
        _config(pages, tmp_path / 'o', detector='yolo9000').validate()
    with pytest.raises(PapyriError, match=r'val directory does not exist: .*nowhere'):
        _config(pages, tmp_path / 'o', val=str(tmp_path / 'nowhere')).validate()
    with pytest.raises(PapyriError, match=r'min_size and max_size go together'):
        _config(pages, tmp_path / 'o', min_size=100).validate()
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'notes.txt').write_text('mine')
    with pytest.raises(PapyriError, match=r'foreign is not empty \(notes.txt\) and holds no detector checkpoint'):
        train_detector(_config(pages, tmp_path / 'foreign'))
    assert (tmp_path / 'foreign' / 'notes.txt').read_text() == 'mine'


# ------------------------------------------------------------------------------------------ YOLO (optional)
HAVE_ULTRALYTICS = __import__('importlib').util.find_spec('ultralytics') is not None


def test_yolo_export_cuts_pages_into_tiles_with_normalised_labels(pages, tmp_path):
    from deitlab.papyri.yolo import export_yolo
    data = read_pages(pages)
    n = export_yolo(data, tmp_path, 'train', tile=64, overlap=16, min_visible=0.5)
    grid = tile_grid(96, 128, 64, 16)
    assert n == 2 * len(grid) == len(list((tmp_path / 'images' / 'train').glob('*.png')))
    t = grid[-1]   # the last tile of page 1, in pixels
    rows = np.loadtxt(tmp_path / 'labels' / 'train' / f'00001_{t.y0}_{t.x0}.txt', ndmin=2)
    cx, cy, w, h = (rows[:, 1:] * [64, 64, 64, 64]).T
    got = sorted(zip(rows[:, 0].astype(int), np.round(cx - w / 2 + t.x0, 3), np.round(cy - h / 2 + t.y0, 3)))
    b, c = data.boxes[1], data.labels[1]
    inside = (b[:, 0] >= t.x0) & (b[:, 1] >= t.y0) & (b[:, 2] <= t.x1) & (b[:, 3] <= t.y1)
    want = sorted(zip(c[inside], np.round(b[inside, 0], 3), np.round(b[inside, 1], 3)))
    assert len(want) and set(want) <= set(got)   # every glyph whole in the tile, at its place, with its letter


@pytest.mark.skipif(HAVE_ULTRALYTICS, reason='ultralytics is installed')
def test_yolo_without_ultralytics_names_the_extra(pages, tmp_path):
    with pytest.raises(PapyriError, match=r"the YOLO detectors need ultralytics \(AGPL-3.0\), which is not installed: "
                                          r"pip install 'deitlab\[yolo\]'"):
        train_detector(_config(pages, tmp_path / 'y', detector='yolov8n', steps=0))
    assert not (tmp_path / 'y').exists()


def test_yolo_settings_are_checked_before_ultralytics_is_needed(pages, tmp_path):
    with pytest.raises(PapyriError, match=r'yolov8n: --tile must be a multiple of 32 for YOLO'):
        train_detector(_config(pages, tmp_path / 'y', detector='yolov8n', tile=48, steps=0))
    with pytest.raises(PapyriError, match=r'yolov8n: YOLO trains whole epochs over the tiles: leave --steps at 0'):
        train_detector(_config(pages, tmp_path / 'y', detector='yolov8n'))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ULTRALYTICS, reason='ultralytics (the yolo extra) is not installed')
def test_yolo_trains_offline_into_a_run_directory_and_loads(pages, tmp_path, capsys):
    import os
    out = tmp_path / 'yolo'
    summary = train_detector(_config(pages, out, detector='yolov8n', steps=0, epochs=1, val=str(pages)))
    assert os.environ['YOLO_OFFLINE'] == '1' and os.environ['YOLO_AUTOINSTALL'] == 'false'
    config_dir = os.environ['YOLO_CONFIG_DIR']
    assert (tmp_path / 'yolo' / 'model.safetensors').is_file() and os.path.isfile(f'{config_dir}/Arial.Unicode.ttf')
    assert summary['train_tiles'] == 2 * len(tile_grid(96, 128, 64, 16)) and 'val_detection_mAP50' in summary
    config = json.loads((out / 'config.json').read_text(encoding='utf-8'))
    assert config['backend'] == 'ultralytics' and config['args']['names'][17] == 'sigma'
    assert (out / 'metrics.jsonl').read_text().strip()
    loaded = load_detector(out, device='cpu')
    assert loaded.name == 'yolov8n' and loaded.run_dir == out
    dets = loaded.predict(load_page(read_pages(pages), 0))
    assert isinstance(dets, Detections) and ((dets.labels >= 0) & (dets.labels < 24)).all()
    assert not capsys.readouterr().out.strip()   # ultralytics' lines went to stderr


# ------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_the_default_detector_learns_one_page(tmp_path, capsys):
    """The defaults work: fcos-r18 from scratch overfits one small synthetic page (46 glyphs of about
    18 px) in 120 updates, well within a minute of one CPU core."""
    data = tmp_path / 'page'
    synthesize(SynthConfig(pages=1, out=str(data), seed=0, size='256x192', lines=4, letters=12, progress=False))
    t0 = time.process_time()
    summary = train_detector(DetectorConfig(data=str(data), out=str(tmp_path / 'run'), val=str(data), epochs=1,
                                            steps=120, progress=False))
    cpu = time.process_time() - t0
    with capsys.disabled():
        print(f'\nfcos-r18 on one page: detection mAP@.5 {summary["val_detection_mAP50"]:.3f}, mAP@[.5:.95] '
              f'{summary["val_detection_mAP"]:.3f}, recognition mAP@.5 {summary["val_recognition_mAP50"]:.3f}; '
              f'training {summary["train_cpu_s"]:.1f} CPU-s, all {cpu:.1f} CPU-s')
    assert summary['val_detection_mAP50'] > 0.5
