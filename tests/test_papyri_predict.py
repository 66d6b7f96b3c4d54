"""deitlab papyri predict (papyri/predict.py): stand-in detectors (an oracle returning a synthetic
page's ground truth) on tiny pages; the files scored by the organisers' metric, fusion of two
detectors, reading order on hand-made lines, the CSV / text / overlay formats, bad input refused
with nothing written."""
import csv
import json
import math
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deitlab.cli import main
from deitlab.papyri.alphabet import LETTERS, category_id
from deitlab.papyri.coco import CocoAnnotation, CocoDataset, CocoImage, coco_json, read_coco, write_coco
from deitlab.papyri.config import PapyriError, PredictConfig
from deitlab.papyri.fusion import Detections, FusionConfig
from deitlab.papyri.predict import (CSV_COLUMNS, GENERATOR, image_files, load_detectors, number_pages, overlay_font,
                                    page_text, predict_files, predict_pages, reading_lines, write_outputs)
from deitlab.papyri.synth import make_page, resolve_fonts

needs_metric = pytest.mark.skipif(find_spec('faster_coco_eval') is None,
                                  reason="faster-coco-eval is not installed (pip install 'deitlab[papyri]')")
needs_fusion = pytest.mark.skipif(find_spec('ensemble_boxes') is None,
                                  reason="ensemble-boxes is not installed (pip install 'deitlab[papyri]')")
KEYS = ('mAP', 'mAP50', 'mAP75', 'mAR', 'AR50')


class Oracle:
    """A stand-in detector: returns the boxes it was made with, whatever the page."""

    def __init__(self, detections: Detections, name: str = 'oracle'):
        self.detections, self.name, self.run_dir, self.calls = detections, name, None, 0

    def predict(self, image):
        assert isinstance(image, Image.Image) and image.mode == 'RGB'
        self.calls += 1
        return Detections(self.detections.boxes, self.detections.scores, self.detections.labels)


def _truth(glyphs, keep=lambda g: True) -> Detections:
    """The ground truth of ``glyphs`` as detections (xyxy), distinct scores in writing order."""
    chosen = [g for g in glyphs if keep(g)]
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (g.box for g in chosen)]
    return Detections(np.array(boxes, dtype=np.float64).reshape(-1, 4), 0.99 - 0.001 * np.arange(len(chosen)),
                      [g.cls for g in chosen])


@pytest.fixture(scope='module')
def page(tmp_path_factory):
    """One synthetic page (with a bt3 glyph) as images/page_0000.png and its ground truth."""
    root = tmp_path_factory.mktemp('predict')
    made = make_page(0, 0, resolve_fonts('bundled'), size=(160, 96), lines=3, letters=8, hands=1, damage=0.5)
    assert {'bt1', 'bt3'} <= {g.base_type for g in made.glyphs}
    (root / 'images').mkdir()
    Image.fromarray(made.image).save(root / 'images' / 'page_0000.png')
    anns = [CocoAnnotation(k + 1, 1, g.box, category_id(g.cls), g.base_type) for k, g in enumerate(made.glyphs)]
    write_coco(CocoDataset([CocoImage(1, 'images/page_0000.png', 160, 96)], anns), root / 'annotations.json')
    return root, made


# --------------------------------------------------------------------------------- scored files
@needs_metric
def test_the_oracles_files_score_one_with_the_organisers_metric(page, tmp_path):
    """The oracle predicts the glyphs the metric scores, i.e. all but bt3 (removed from the ground truth
    before scoring, so a box on a bt3 glyph would be a false positive): both tasks score exactly 1.
    Predicting every glyph instead scores 1 against the ground truth kept whole (no base type removed),
    and detection below 1 under the removal when the bt3 boxes rank first."""
    from deitlab.papyri.metric import evaluate
    root, made = page
    gt = json.loads((root / 'annotations.json').read_text(encoding='utf-8'))
    image = root / 'images' / 'page_0000.png'
    records = number_pages([image], root / 'annotations.json')
    assert [(r.id, r.file_name, r.width, r.height) for r in records] == [(1, 'images/page_0000.png', 160, 96)]

    oracle = Oracle(_truth(made.glyphs, lambda g: g.base_type != 'bt3'))
    summary = write_outputs(tmp_path / 'a', predict_pages([image], [oracle], records=records))
    results = json.loads((tmp_path / 'a' / 'results.json').read_text(encoding='utf-8'))
    assert summary['boxes'] == len(results) == len(oracle.detections) < len(made.glyphs)
    scored = evaluate(gt, results)
    assert scored['removed'] >= 1
    for task in ('recognition', 'detection'):
        assert [scored[task][k] for k in KEYS] == [1.0] * 5, task
    # predictions.json holds the same boxes, with their scores, in the competition schema
    coco = read_coco(tmp_path / 'a' / 'predictions.json')
    assert coco.info['generator'] == GENERATOR and [im.file_name for im in coco.images] == ['images/page_0000.png']
    assert [(a.image_id, list(a.bbox), a.category_id, a.extra['score']) for a in coco.annotations] == \
        [(r['image_id'], r['bbox'], r['category_id'], r['score']) for r in results]

    every = _truth(made.glyphs)
    pages = predict_pages([image], [Oracle(every)], records=records)
    write_outputs(tmp_path / 'b', pages)
    results = json.loads((tmp_path / 'b' / 'results.json').read_text(encoding='utf-8'))
    whole = evaluate(gt, results, ignore_base_types=())
    assert [whole['recognition'][k] for k in KEYS] == [1.0] * 5
    bt3 = np.array([g.base_type == 'bt3' for g in made.glyphs])
    first = Detections(every.boxes, np.where(bt3, 1.0, every.scores), every.labels)
    write_outputs(tmp_path / 'c', predict_pages([image], [Oracle(first)], records=records))
    results = json.loads((tmp_path / 'c' / 'results.json').read_text(encoding='utf-8'))
    assert evaluate(gt, results)['detection']['mAP'] < 1.0   # (class-aware, a letter without scored glyphs is
    #                                                          left out of the mean)


@needs_fusion
def test_two_detectors_with_the_same_boxes_fuse_to_that_set(page):
    root, made = page
    truth = _truth(made.glyphs)
    image = root / 'images' / 'page_0000.png'
    for config in (None, FusionConfig(weights=(2.0, 1.0)), FusionConfig(class_aware=False)):
        (fused,) = predict_pages([image], [Oracle(truth), Oracle(truth)], config)
        assert fused.found == (len(truth), len(truth))
        d = fused.detections
        assert len(d) == len(truth)
        np.testing.assert_allclose(d.boxes, truth.boxes, atol=1e-3)   # ensemble-boxes computes in float32
        np.testing.assert_allclose(d.scores, truth.scores, atol=1e-6)
        assert d.labels.tolist() == truth.labels.tolist()


# ---------------------------------------------------------------------------------- reading order
TOP, BOTTOM = 'ΑΒΓΔΕΦΗΘΙΚΛΟΜ', 'ΝΞΟΠΡϹΤΥΨΧΩΑΒ'


def _written(lines):
    """Boxes of hand-made lines: (text, baseline y, letter height, advance, wobble amplitude, wave
    length). Φ and Ψ are taller, Ο smaller and sitting on the baseline."""
    boxes, labels = [], []
    for text, y0, h, advance, amp, wave in lines:
        for k, ch in enumerate(text):
            x = 10 + k * advance
            base = y0 + amp * math.sin(x / wave)
            hh = h * (1.4 if ch in 'ΦΨ' else 0.8 if ch == 'Ο' else 1.0)
            cy = base - h / 2 + (h - hh) / 2 * (ch == 'Ο')
            boxes.append([x - 0.4 * h, cy - hh / 2, x + 0.4 * h, cy + hh / 2])
            labels.append(LETTERS.index(ch))
    return np.array(boxes), np.array(labels)


def _turned(boxes, degrees, centre=(120, 60)):
    """The boxes of a page turned by ``degrees`` about ``centre``: centres rotated, sizes kept."""
    t = math.radians(degrees)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 - centre[0], (boxes[:, 1] + boxes[:, 3]) / 2 - centre[1]
    x, y = centre[0] + cx * math.cos(t) - cy * math.sin(t), centre[1] + cx * math.sin(t) + cy * math.cos(t)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)


def _two_lines(degrees=0.0, seed=0):
    """Two wobbling lines, large letters over small ones, in random order with random scores above
    0.5, and two low-scored boxes between the lines."""
    boxes, labels = _written([(TOP, 40, 20, 17, 3, 25), (BOTTOM, 80, 12, 10, 2, 17)])
    boxes = _turned(boxes, degrees)
    rng = np.random.default_rng(seed)
    junk = np.array([[60, 52, 72, 64], [150, 50, 160, 62]], dtype=np.float64)
    order = rng.permutation(len(labels) + 2)
    return Detections(np.concatenate([boxes, junk])[order],
                      np.concatenate([rng.uniform(0.5, 1.0, len(labels)), [0.2, 0.29]])[order],
                      np.concatenate([labels, [0, 1]])[order])


@pytest.mark.parametrize('degrees', [0, 3, -3, 8, -8])
def test_reading_order_of_two_wobbling_lines_of_two_sizes(degrees):
    d = _two_lines(degrees, seed=degrees + 10)
    assert page_text(d) == f'{TOP}\n{BOTTOM}\n'
    lines = reading_lines(d)
    assert [len(line) for line in lines] == [len(TOP), len(BOTTOM)]
    assert all(np.all(np.diff(d.boxes[line, 0]) > 0) for line in lines)   # left to right
    everything = page_text(d, score_thr=0.0)   # the two low-scored boxes enter too
    assert len(everything.replace('\n', '')) == len(TOP + BOTTOM) + 2


def test_reading_order_of_a_synthetic_page_is_its_writing_order(page):
    """The page's glyphs (listed in writing order) read back line by line in that order, whatever order
    the boxes come in."""
    _, made = page
    truth = _truth(made.glyphs)
    shuffled = truth.select(np.random.default_rng(0).permutation(len(truth)))
    text = page_text(shuffled)
    assert text.replace('\n', '') == ''.join(LETTERS[g.cls] for g in made.glyphs)
    assert text.count('\n') == 3   # the page's three lines


def test_reading_order_thresholds_and_duplicates():
    boxes = np.array([[0, 0, 10, 20], [12, 0, 22, 20], [12.5, 0.5, 22, 20], [24, 1, 34, 21]], dtype=np.float64)
    d = Detections(boxes, [0.9, 0.8, 0.6, 0.2], [0, 1, 2, 3])
    assert page_text(d) == 'ΑΒ\n'                       # Γ overlaps Β (IoU > 0.5), Δ is under the threshold
    assert page_text(d, score_thr=0.1) == 'ΑΒΔ\n'
    assert page_text(d, score_thr=0.95) == '' and reading_lines(Detections.empty()) == []


# -------------------------------------------------------------------------------- files and formats
def _blank_page(path, size=(64, 48)):
    Image.new('RGB', size, (200, 180, 140)).save(path)
    return path


def test_csv_text_and_overlay_formats(tmp_path):
    """A hand-made page with the lunate sigma: the CSV's columns and values, the text in UTF-8, the
    overlay the page's size; a blank page gets a warning, no boxes and an empty text, without a call
    to the detector."""
    written = np.full((120, 240, 3), 215, np.uint8)
    written[::7] = 190   # something other than one colour
    Image.fromarray(written).save(tmp_path / 'scroll.png')
    d = _two_lines()
    oracle = Oracle(d)
    pages = predict_pages([tmp_path / 'scroll.png', _blank_page(tmp_path / 'empty.png')], [oracle])
    assert oracle.calls == 1 and [p.blank for p in pages] == [False, True] and len(pages[1].detections) == 0
    summary = write_outputs(tmp_path / 'out', pages)
    out = tmp_path / 'out'
    assert sorted(p.name for p in out.iterdir()) == ['overlays', 'predictions.csv', 'predictions.json', 'results.json',
                                                     'text']
    assert summary['boxes'] == len(d) and summary['in_text'] == len(TOP + BOTTOM)

    text = (out / 'text' / 'scroll.txt').read_bytes()
    assert text.decode('utf-8') == f'{TOP}\n{BOTTOM}\n' and '\u03f9'.encode('utf-8') in text
    assert (out / 'text' / 'empty.txt').read_bytes() == b''

    with open(out / 'predictions.csv', encoding='utf-8', newline='') as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(d) + 1
    results = json.loads((out / 'results.json').read_text(encoding='utf-8'))
    for row, r in zip(rows[1:], results):
        letter = row[5]
        assert row[0] == 'scroll.png' and [float(v) for v in row[1:5]] == r['bbox']
        assert category_id(LETTERS.index(letter)) == int(row[7]) == r['category_id']
        assert row[6] == f'U+{ord(letter):04X}' and float(row[8]) == r['score']
    sigma = next(row for row in rows[1:] if row[5] == '\u03f9')
    assert sigma[6:8] == ['U+03F9', '225']
    k = int(np.argmax(d.scores))   # the best box comes first, its coordinates rounded to 1/1000 px
    x0, y0, x1, y1 = np.round(d.boxes[k], 3)
    assert [float(v) for v in rows[1][1:5]] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-9)

    with Image.open(out / 'overlays' / 'scroll.png') as im:
        assert im.size == (240, 120) and im.mode == 'RGB'
        assert (np.asarray(im) != written).any()
    with Image.open(out / 'overlays' / 'empty.png') as im:
        assert im.size == (64, 48)
    assert Path(overlay_font()).name == 'DejaVuSans.ttf'


def test_the_overlay_draws_only_the_boxes_at_the_score_threshold():
    """Boxes below --score-thr stay off the picture; one at it is outlined, inside its box only."""
    from deitlab.papyri.predict import draw_overlay
    page = Image.new('RGB', (80, 60), (200, 180, 140))
    low = Detections(boxes=[[10, 10, 30, 40]], scores=[0.29], labels=[0])
    assert (np.asarray(draw_overlay(page, low, score_thr=0.3)) == np.asarray(page)).all()
    both = Detections(boxes=[[10, 10, 30, 40], [50, 20, 70, 50]], scores=[0.29, 0.3], labels=[0, 1])
    changed = (np.asarray(draw_overlay(page, both, score_thr=0.3)) != np.asarray(page)).any(-1)
    ys, xs = np.nonzero(changed)
    assert xs.min() >= 50 - 1 and changed[20:50, 50].all()   # the kept box's left edge; the low one's pixels intact
    assert not changed[10:40, 10:30].any()


def test_a_blank_page_is_named_in_a_warning(tmp_path, capsys):
    (blank,) = predict_pages([_blank_page(tmp_path / 'blank.png')], [Oracle(_two_lines())])
    assert blank.blank and blank.found == (0,)
    assert f'warning: {tmp_path / "blank.png"} is blank (one colour): no letters predicted on it' in \
        capsys.readouterr().err


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_written(page, tmp_path):
    root, made = page
    image = root / 'images' / 'page_0000.png'
    (tmp_path / 'notes.png').write_text('not an image')
    with pytest.raises(PapyriError, match=r'notes.png is not an image \(the image library cannot read it\)'):
        number_pages(image_files([tmp_path / 'notes.png']))
    with pytest.raises(PapyriError, match=r'image file does not exist: .*missing.png'):
        image_files([tmp_path / 'missing.png'])
    (tmp_path / 'empty-dir').mkdir()
    with pytest.raises(PapyriError, match=r'empty-dir holds no image files'):
        image_files([tmp_path / 'empty-dir'])
    (tmp_path / 'other').mkdir()
    Image.fromarray(made.image).save(tmp_path / 'other' / 'page_0000.jpg')
    with pytest.raises(PapyriError, match=r'two pages are named page_0000'):
        number_pages([image, tmp_path / 'other' / 'page_0000.jpg'])
    Image.new('RGB', (50, 40)).save(tmp_path / 'stranger.png')
    with pytest.raises(PapyriError, match=r'stranger.png is not among the images of .*annotations.json'):
        number_pages([tmp_path / 'stranger.png'], root / 'annotations.json')
    Image.new('RGB', (50, 40)).save(tmp_path / 'other' / 'page_0000.png')
    with pytest.raises(PapyriError, match=r'page_0000.png is 50x40 pixels but its entry .* is 160x96'):
        number_pages([tmp_path / 'other' / 'page_0000.png'], root / 'annotations.json')
    (tmp_path / 'plain').mkdir()
    with pytest.raises(PapyriError, match=r'plain is not a detector run directory \(no config.json\)'):
        load_detectors([tmp_path / 'plain'], loader=lambda p: pytest.fail('loaded'))
    with pytest.raises(PapyriError, match=r'detector run directory does not exist'):
        load_detectors([tmp_path / 'nowhere'])
    wrong = Oracle(Detections([[0, 0, 5, 5]], [0.9], [24]), name='wrong')
    with pytest.raises(PapyriError, match=r'wrong returned label 24: the letters are 0..23'):
        predict_pages([image], [wrong])
    with pytest.raises(PapyriError, match=r'fusion: 1 weights for 2 detectors'):
        PredictConfig(detector=('a', 'b'), out='o', images=('x',), weights=('1',)).validate()
    with pytest.raises(PapyriError, match=r'score_thr must be in \[0, 1\], got 2'):
        PredictConfig(detector=('a',), out='o', images=('x',), score_thr=2).validate()


def test_the_output_directory_is_refused_replaced_or_left_alone(page, tmp_path, monkeypatch):
    root, made = page
    pages = predict_pages([root / 'images' / 'page_0000.png'], [Oracle(_truth(made.glyphs))])
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'keep.txt').write_text('mine')
    for overwrite in (False, True):
        with pytest.raises(PapyriError, match=r'foreign is not empty \(keep.txt\) and holds no predictions written by '
                                              r'deitlab papyri predict'):
            write_outputs(foreign, pages, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ['keep.txt']

    out = tmp_path / 'out'
    write_outputs(out, pages)
    with pytest.raises(PapyriError, match=r'out already holds predictions; pass --overwrite'):
        write_outputs(out, pages)
    write_outputs(out, [], overwrite=True)
    assert json.loads((out / 'results.json').read_text()) == [] and not list((out / 'text').iterdir())

    def fail(*args, **kwargs):
        raise RuntimeError('drawing failed')
    monkeypatch.setattr('deitlab.papyri.predict.draw_overlay', fail)
    with pytest.raises(RuntimeError, match='drawing failed'):
        write_outputs(tmp_path / 'new', pages)
    with pytest.raises(RuntimeError, match='drawing failed'):
        write_outputs(out, pages, overwrite=True)
    assert json.loads((out / 'results.json').read_text()) == []   # the earlier output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ['foreign', 'out']   # no partial directory left


# -------------------------------------------------------------------------------------------- CLI
@needs_metric
@needs_fusion
def test_cli_two_detectors_then_evaluate(page, tmp_path, monkeypatch, capsys):
    """deitlab papyri predict with two run directories (loaded by a stand-in detect module that reads the
    boxes a run directory holds), then deitlab papyri evaluate on its results.json."""
    root, made = page
    truth = _truth(made.glyphs, lambda g: g.base_type != 'bt3')
    runs = []
    for name in ('det-a', 'det-b'):
        run = tmp_path / name
        run.mkdir()
        (run / 'config.json').write_text('{}')
        np.save(run / 'boxes.npy', np.concatenate([truth.boxes, truth.scores[:, None], truth.labels[:, None]], 1))
        runs.append(str(run))

    def load_detector(run_dir):
        a = np.load(Path(run_dir) / 'boxes.npy')
        return Oracle(Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64)), name=Path(run_dir).name)
    monkeypatch.setitem(sys.modules, 'deitlab.papyri.detect', types.SimpleNamespace(load_detector=load_detector))

    out = tmp_path / 'predicted'
    argv = ['papyri', 'predict', '--detector', ','.join(runs), str(root / 'images'), '--out', str(out),
            '--ids-from', str(root / 'annotations.json'), '--weights', '2,1', '--json']
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result['pages'], result['boxes'], result['fusion'], result['blank']) == (1, len(truth), 'wbf', [])
    assert result['detectors'] == ['det-a', 'det-b'] and Path(result['files']['results.json']).is_file()
    info = json.loads((out / 'predictions.json').read_text(encoding='utf-8'))['info']
    assert info['fusion']['weights'] == [2.0, 1.0] and info['score_thr'] == 0.3

    assert main(['papyri', 'evaluate', '--pred', str(out / 'results.json'), '--gt', str(root / 'annotations.json'),
                 '--json']) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored['recognition']['mAP'] == scored['detection']['mAP'] == 1.0
    # predictions.json (a COCO dataset with scores) scores the same; its pages meet the truth by file name
    assert main(['papyri', 'evaluate', '--pred', str(out / 'predictions.json'), '--gt', str(root / 'annotations.json'),
                 '--json']) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again['recognition'] == scored['recognition'] and again['detection'] == scored['detection']

    assert main(argv) == 2   # the same command again: the earlier predictions are not replaced silently
    assert 'already holds predictions; pass --overwrite' in capsys.readouterr().err
    assert main(argv + ['--overwrite']) == 0


def test_predict_files_checks_images_and_out_before_loading(page, tmp_path):
    root, _ = page
    config = PredictConfig(detector=(str(tmp_path),), out=str(tmp_path / 'o'), images=(str(tmp_path / 'nope.png'),))
    with pytest.raises(PapyriError, match=r'image file does not exist'):
        predict_files(config, loader=lambda p: pytest.fail('loaded'))
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'x').write_text('')
    config = PredictConfig(detector=(str(tmp_path),), out=str(foreign), images=(str(root / 'images'),))
    with pytest.raises(PapyriError, match=r'foreign is not empty'):
        predict_files(config, loader=lambda p: pytest.fail('loaded'))


def test_the_ground_truth_round_trips_as_predictions(page, tmp_path):
    """coco_json of the written predictions is what write_outputs wrote (nothing lost in the reader)."""
    root, made = page
    pages = predict_pages([root / 'images' / 'page_0000.png'], [Oracle(_truth(made.glyphs))],
                          records=number_pages([root / 'images' / 'page_0000.png'], root / 'annotations.json'))
    write_outputs(tmp_path / 'o', pages)
    written = json.loads((tmp_path / 'o' / 'predictions.json').read_text(encoding='utf-8'))
    assert coco_json(read_coco(tmp_path / 'o' / 'predictions.json')) == written
    gt = read_coco(root / 'annotations.json')
    assert sorted(tuple(a.bbox) for a in gt.annotations) == sorted(tuple(a['bbox']) for a in written['annotations'])
