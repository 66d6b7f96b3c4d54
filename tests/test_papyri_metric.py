"""The papyri competition's metric (papyri/metric.py), box fusion (papyri/fusion.py) and tiling
(papyri/tiling.py): exact properties on small hand-made cases, and the metric equal to pycocotools
on a random one."""
import contextlib
import copy
import io
import json
import sys
from importlib.util import find_spec

import numpy as np
import pytest

from deitlab.cli import main
from deitlab.papyri.fusion import Detections, FusionConfig, FusionError, fuse
from deitlab.papyri.metric import (EvaluateConfig, EvaluationError, check_predictions, evaluate, evaluate_files,
                                   prepare_ground_truth, read_out)
from deitlab.papyri.tiling import MERGE, Tile, drop_cut_boxes, tile_grid, tile_predict, to_page

needs_metric = pytest.mark.skipif(find_spec('faster_coco_eval') is None,
                                  reason="faster-coco-eval is not installed (pip install 'deitlab[papyri]')")
KEYS = ('mAP', 'mAP50', 'mAP75', 'mAR', 'AR50')


# --- the metric ---

def _gt(glyphs, images=(1, 2), categories=(7, 8, 9)):
    """A competition-schema COCO dict; ``glyphs``: (image_id, category_id, [x, y, w, h], base type)."""
    return {'images': [{'id': i, 'file_name': f'{i}.jpg'} for i in images],
            'categories': [{'id': c, 'name': f'c{c}'} for c in categories],
            'annotations': [{'id': n, 'image_id': i, 'category_id': c, 'bbox': list(b), 'tags': {'BaseType': [t]}}
                            for n, (i, c, b, t) in enumerate(glyphs)]}


def _pred(image_id, category_id, bbox, score):
    return {'image_id': image_id, 'category_id': category_id, 'bbox': list(bbox), 'score': score}


GLYPHS = [(1, 7, [10, 10, 20, 30], 'bt1'), (1, 8, [40, 12, 18, 28], 'bt2'), (1, 9, [70, 8, 22, 31], 'bt1'),
          (1, 7, [100, 11, 19, 29], 'bt3'), (2, 7, [5, 50, 25, 25], 'bt1'), (2, 9, [40, 52, 20, 26], 'bt2')]


@needs_metric
def test_perfect_predictions_score_one_in_both_tasks():
    preds = [_pred(i, c, b, 0.9 - 0.1 * n) for n, (i, c, b, t) in enumerate(GLYPHS) if t != 'bt3']
    result = evaluate(_gt(GLYPHS), preds)
    assert (result['ground_truth'], result['removed'], result['predictions']) == (5, 1, 5)
    for task in ('recognition', 'detection'):
        assert [result[task][k] for k in KEYS] == [1.0] * 5, task
    assert result['recognition']['per_class_AP'] == {7: 1.0, 8: 1.0, 9: 1.0}


@needs_metric
def test_a_detection_on_a_removed_bt3_glyph_is_a_false_positive():
    """bt3 ground truth is removed, not ignored: the detection on it ranks first and matches nothing,
    so precision at full recall is 1/2 (AP exactly 0.5); the glyph itself is no miss (mAR 1)."""
    glyphs = [(1, 7, [10, 10, 20, 30], 'bt1'), (1, 7, [50, 10, 20, 30], 'bt3')]
    hit, on_bt3 = _pred(1, 7, [10, 10, 20, 30], 0.5), _pred(1, 7, [50, 10, 20, 30], 0.9)
    result = evaluate(_gt(glyphs), [hit, on_bt3])
    for task in ('recognition', 'detection'):
        assert result[task]['mAP'] == pytest.approx(0.5, abs=1e-12) and result[task]['mAR'] == 1.0
    assert evaluate(_gt(glyphs), [hit])['recognition']['mAP'] == 1.0
    assert evaluate(_gt(glyphs), [hit, on_bt3], ignore_base_types=())['recognition']['mAP'] == 1.0   # scored


@needs_metric
def test_a_box_at_iou_072_passes_five_of_ten_thresholds():
    """A 43 px wide box shifted by 7 px: IoU 36/50 = 0.72 passes .50, .55, .60, .65, .70 only."""
    result = evaluate(_gt([(1, 8, [0, 0, 43, 20], 'bt1')]), [_pred(1, 8, [7, 0, 43, 20], 0.8)])
    for task in ('recognition', 'detection'):
        m = result[task]
        assert (m['mAP'], m['mAP50'], m['mAP75'], m['mAR'], m['AR50']) == pytest.approx((0.5, 1, 0, 0.5, 1), abs=1e-12)


@needs_metric
def test_a_label_swap_scores_zero_in_recognition_and_one_in_detection():
    glyphs = [(1, 7, [10, 10, 20, 30], 'bt1'), (1, 8, [40, 10, 20, 30], 'bt1')]
    preds = [_pred(1, 8, [10, 10, 20, 30], 0.9), _pred(1, 7, [40, 10, 20, 30], 0.8)]
    result = evaluate(_gt(glyphs), preds)
    assert [result['recognition'][k] for k in KEYS] == [0.0] * 5
    assert result['recognition']['per_class_AP'] == {7: 0.0, 8: 0.0}   # 9 has no ground truth: left out
    assert [result['detection'][k] for k in KEYS] == [1.0] * 5


@needs_metric
def test_more_than_300_boxes_on_one_image_are_not_truncated():
    glyphs = [(1, 7, [12 * (n % 20), 12 * (n // 20), 10, 10], 'bt1') for n in range(400)]
    preds = [_pred(1, 7, b, 1 - n / 1000) for n, (_, _, b, _) in enumerate(glyphs)]
    result = evaluate(_gt(glyphs), preds)
    assert result['recognition']['mAP'] == 1.0 and result['detection']['mAR'] == 1.0
    assert evaluate(_gt(glyphs), preds, max_dets=100)['recognition']['mAR'] == 0.25   # what COCO's 100 would do


def _random_case(seed=0):
    rng = np.random.default_rng(seed)
    glyphs, preds = [], []
    for image in (1, 2, 3):
        for _ in range(15):
            x, y = rng.uniform(0, 200, 2)
            box = [float(x), float(y), float(rng.uniform(6, 40)), float(rng.uniform(6, 40))]
            cat = int(rng.choice([7, 8, 9, 14]))
            glyphs.append((image, cat, box, str(rng.choice(['bt1', 'bt2', 'bt3'], p=[0.5, 0.3, 0.2]))))
            if rng.random() < 0.8:
                jittered = [box[0] + rng.uniform(-3, 3), box[1] + rng.uniform(-3, 3), box[2] * rng.uniform(0.85, 1.15),
                            box[3] * rng.uniform(0.85, 1.15)]
                label = cat if rng.random() < 0.8 else int(rng.choice([7, 8, 9, 14]))
                preds.append(_pred(image, label, [float(v) for v in jittered], float(rng.random())))
        for _ in range(8):   # false positives
            box = [float(v) for v in (*rng.uniform(0, 200, 2), *rng.uniform(6, 40, 2))]
            preds.append(_pred(image, int(rng.choice([7, 8, 9, 14])), box, float(rng.random())))
    return _gt(glyphs, images=(1, 2, 3), categories=(7, 8, 9, 14)), preds


@needs_metric
def test_equal_to_pycocotools_on_a_random_case():
    """The same arrays from pycocotools (maxDets [10000], useCats on / off) read the same way give the
    same numbers to 1e-6."""
    pytest.importorskip('pycocotools')
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt, preds = _random_case()
    ours = evaluate(gt, preds)
    scored, removed = prepare_ground_truth(gt)
    checked = check_predictions(preds, scored)
    assert removed > 0
    for task in ('recognition', 'detection'):
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress
            coco = COCO()
            coco.dataset = copy.deepcopy(scored)
            coco.createIndex()
            ev = COCOeval(coco, coco.loadRes(copy.deepcopy(checked)), 'bbox')
            ev.params.maxDets = [10000]
            ev.params.useCats = int(task == 'recognition')
            ev.evaluate()
            ev.accumulate()
        ref = read_out(ev.eval['precision'], ev.eval['recall'], ev.params.iouThrs, ev.params.areaRngLbl.index('all'),
                       cat_ids=ev.params.catIds if task == 'recognition' else None)
        assert 0.05 < ours[task]['mAP'] < 0.95, ours[task]   # not a trivial case
        for key in KEYS:
            assert ours[task][key] == pytest.approx(ref[key], abs=1e-6), (task, key)
        if task == 'recognition':
            assert set(ours[task]['per_class_AP']) == set(ref['per_class_AP']) == {7, 8, 9, 14}
            for c, ap in ref['per_class_AP'].items():
                assert ours[task]['per_class_AP'][c] == pytest.approx(ap, abs=1e-6), c


def _bad(preds=None, gt=None, **kwargs):
    base = [_pred(1, 7, [10, 10, 20, 30], 0.9)]
    return evaluate(_gt(GLYPHS) if gt is None else gt, base if preds is None else preds, **kwargs)


@needs_metric
@pytest.mark.parametrize('entry, message', [
    (dict(image_id=99), r'prediction 0 names image_id 99, which is not an image of the ground truth'),
    (dict(image_id='1'), r"prediction 0 names image_id '1', which is not an image"),
    (dict(category_id=42), r'prediction 0 has category_id 42, which is not a category of the ground truth'),
    (dict(bbox=[1, 2, 3]), r'prediction 0: bbox must be \[x, y, w, h\], four finite numbers; got \[1, 2, 3\]'),
    (dict(bbox=[1, 2, 0, 10]), r'prediction 0: bbox \[x, y, w, h\] needs a width and height > 0, got w=0, h=10'),
    (dict(bbox=[1, 2, 10, -5]), r'needs a width and height > 0, got w=10, h=-5'),
    (dict(bbox=[1, 2, float('nan'), 5]), r'four finite numbers'),
    (dict(score='high'), r"prediction 0: score must be a finite number, got 'high'"),
    (dict(score=float('inf')), r'score must be a finite number, got inf'),
    (dict(score=True), r'score must be a finite number, got True'),
])
def test_bad_prediction_entries_are_named(entry, message):
    with pytest.raises(EvaluationError, match=message):
        _bad([{**_pred(1, 7, [10, 10, 20, 30], 0.9), **entry}])


@needs_metric
def test_bad_predictions_and_ground_truth():
    with pytest.raises(EvaluationError, match=r'prediction 1 has no bbox'):
        _bad([_pred(1, 7, [10, 10, 20, 30], 0.9), {'image_id': 1, 'category_id': 7, 'score': 0.5}])
    with pytest.raises(EvaluationError, match=r'prediction 0 must be an object'):
        _bad([[1, 7, 10, 10, 20, 30, 0.9]])
    with pytest.raises(EvaluationError, match=r'predicted annotation 0 has no score: a COCO dataset of predictions'):
        _bad(_gt(GLYPHS))   # a ground-truth file given as the predictions
    with pytest.raises(EvaluationError, match=r'must be a COCO results list .* got a JSON object without annotations'):
        _bad({'images': []})
    bad_gt = _gt([(1, 5, [10, 10, 20, 30], 'bt1')])
    with pytest.raises(EvaluationError, match=r'ground truth annotation 0 \(id 0\): category_id 5 is not a category'):
        _bad(gt=bad_gt)
    with pytest.raises(EvaluationError, match=r'ground truth annotation 0 \(id 0\): bbox .* got w=20, h=0'):
        _bad(gt=_gt([(1, 7, [10, 10, 20, 0], 'bt1')]))
    with pytest.raises(EvaluationError, match=r"ground truth: 'images' must be a list of objects"):
        _bad(gt={'annotations': [], 'categories': []})
    with pytest.raises(EvaluationError, match=r'ground truth: image id 1 appears more than once'):
        _bad(gt=_gt([], images=(1, 1)))
    # the detection task alone does not read category_id
    assert _bad([_pred(1, 42, [10, 10, 20, 30], 0.9)], tasks=['detection'])['detection']['mAP'] < 1


def test_bad_files_and_settings(tmp_path):
    (tmp_path / 'gt.json').write_text(json.dumps(_gt(GLYPHS)))
    (tmp_path / 'broken.json').write_text('[{"image_id": 1,')
    (tmp_path / 'latin1.json').write_bytes(b'\xff\xfe not text')
    cases = [(tmp_path / 'nothing.json', r'predictions file does not exist: .*nothing.json'),
             (tmp_path / 'broken.json', r'predictions file .*broken.json is not JSON \(Expecting .*line 1, column'),
             (tmp_path / 'latin1.json', r'is not JSON \(not UTF-8 text\)'),
             (tmp_path, r'predictions file .* is a directory')]
    for path, message in cases:
        with pytest.raises(EvaluationError, match=message):
            evaluate_files(EvaluateConfig(pred=str(path), gt=str(tmp_path / 'gt.json')))
    from deitlab.train.config import ConfigError
    with pytest.raises(ConfigError, match=r"task must be one of recognition, detection, both; got 'all'"):
        EvaluateConfig(pred='p', gt='g', task='all').validate()
    with pytest.raises(ConfigError, match=r'max_dets must be >= 1, got 0'):
        EvaluateConfig(pred='p', gt='g', max_dets=0).validate()


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'faster_coco_eval', None)   # as if not installed
    with pytest.raises(EvaluationError, match=r"needs faster-coco-eval, which is not installed: "
                                              r"pip install 'deitlab\[papyri\]'"):
        _bad()


@needs_metric
def test_cli_evaluate(tmp_path, capsys):
    preds = [_pred(i, c, b, 0.5) for i, c, b, t in GLYPHS if t != 'bt3']
    (tmp_path / 'gt.json').write_text(json.dumps(_gt(GLYPHS)))
    (tmp_path / 'pred.json').write_text(json.dumps(preds))
    argv = ['papyri', 'evaluate', '--pred', str(tmp_path / 'pred.json'), '--gt', str(tmp_path / 'gt.json')]
    assert main(argv + ['--json', '--task', 'detection']) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out['detection']['mAP'] == 1.0 and 'recognition' not in out and out['removed'] == 1
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert 'recognition: mAP@[.5:.95] 1.0000  mAP@.5 1.0000' in text and 'AP per category: 7: 1.0000' in text


# --- box fusion ---

needs_fusion = pytest.mark.skipif(find_spec('ensemble_boxes') is None,
                                  reason="ensemble-boxes is not installed (pip install 'deitlab[papyri]')")
BOX = [100, 50, 140, 110]
PAGE = (200, 300)   # height, width


def _dets(*rows):
    """Detections from (box, score, label) rows."""
    return Detections([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


@needs_fusion
def test_wbf_of_identical_boxes_returns_the_box_with_the_conf_type_score():
    two = [_dets((BOX, 0.9, 3)), _dets((BOX, 0.7, 3))]
    for config, score in ((FusionConfig(), 0.8), (FusionConfig(conf_type='max'), 0.9),
                          (FusionConfig(weights=(2, 1)), (2 * 0.9 + 0.7) / 3)):   # the weighted mean
        out = fuse(two, PAGE, config)
        assert len(out) == 1 and out.labels.tolist() == [3]
        np.testing.assert_allclose(out.boxes, [BOX], atol=1e-4)   # float32 inside ensemble-boxes
        assert out.scores[0] == pytest.approx(score, abs=1e-6), config


@needs_fusion
def test_wbf_passes_disjoint_boxes_through():
    """Each box found by one of two detectors: coordinates unchanged, score halved (WBF's ``avg``)."""
    out = fuse([_dets((BOX, 0.9, 3)), _dets(([10, 10, 30, 30], 0.8, 5))], PAGE)
    np.testing.assert_allclose(out.boxes, [BOX, [10, 10, 30, 30]], atol=1e-4)
    np.testing.assert_allclose(out.scores, [0.45, 0.4])
    assert out.labels.tolist() == [3, 5]


@needs_fusion
def test_class_aware_and_agnostic_fusion_differ_as_designed():
    """Detectors disagreeing on the letter: class-aware keeps one box per label; agnostic fuses one
    box and picks the label by the score-weighted vote (``vote``) or the best box (``top``)."""
    dets = [_dets((BOX, 0.9, 3)), _dets((BOX, 0.6, 5)), _dets(([101, 50, 140, 111], 0.5, 5))]
    aware = fuse(dets, PAGE)
    assert sorted(aware.labels.tolist()) == [3, 5] and len(aware) == 2
    vote = fuse(dets, PAGE, FusionConfig(class_aware=False))
    top = fuse(dets, PAGE, FusionConfig(class_aware=False, label_rule='top'))
    assert len(vote) == len(top) == 1
    assert vote.labels.tolist() == [5] and top.labels.tolist() == [3]   # 0.6 + 0.5 > 0.9 > 0.6, 0.5
    assert fuse(dets[:2], PAGE, FusionConfig(class_aware=False)).labels.tolist() == [3]   # 0.9 > 0.6


@needs_fusion
def test_nms_keeps_the_higher_score_box_and_soft_nms_keeps_both():
    other = [104, 50, 144, 110]   # IoU 36/44 with BOX
    dets = [_dets((BOX, 0.6, 3), (other, 0.8, 3))]
    out = fuse(dets, PAGE, FusionConfig(method='nms'))
    np.testing.assert_allclose(out.boxes, [other], atol=1e-9)
    assert out.scores.tolist() == [0.8] and out.labels.tolist() == [3]
    soft = fuse(dets, PAGE, FusionConfig(method='soft-nms'))
    np.testing.assert_allclose(soft.boxes, [other, BOX], atol=1e-9)


@needs_fusion
def test_fusion_clips_to_the_image_and_checks_its_input():
    out = fuse([_dets(([-10, 190, 40, 230], 0.9, 1), ([400, 0, 420, 10], 0.9, 1))], PAGE)
    np.testing.assert_allclose(out.boxes, [[0, 190, 40, 200]], atol=1e-4)   # the second lies outside
    assert len(fuse([Detections.empty(), Detections.empty()], PAGE)) == 0
    with pytest.raises(FusionError, match=r'3 weights for 2 detectors'):
        fuse([_dets((BOX, 0.9, 3))] * 2, PAGE, FusionConfig(weights=(1, 1, 1)))
    with pytest.raises(FusionError, match=r"method must be one of wbf, nms, soft-nms; got 'mean'"):
        fuse([_dets((BOX, 0.9, 3))], PAGE, FusionConfig(method='mean'))
    with pytest.raises(FusionError, match=r'x1 <= x2 and y1 <= y2'):
        fuse([_dets(([50, 10, 40, 20], 0.9, 3))], PAGE)
    with pytest.raises(FusionError, match=r'2 boxes, 1 scores and 2 labels'):
        Detections([BOX, BOX], [0.9], [1, 2])
    import torch
    from_tensors = Detections(torch.tensor([BOX]), torch.tensor([0.9]), torch.tensor([3.0]))
    assert from_tensors.boxes.dtype == np.float64 and from_tensors.labels.tolist() == [3]



def test_fusion_without_ensemble_boxes_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'ensemble_boxes', None)   # as if not installed
    with pytest.raises(FusionError, match=r"needs ensemble-boxes, which is not installed: "
                                          r"pip install 'deitlab\[papyri\]'"):
        fuse([_dets((BOX, 0.9, 3))], PAGE)


# --- tiling ---

@pytest.mark.parametrize('height, width, tile, overlap', [(200, 200, 120, 40), (1000, 700, 256, 64),
                                                          (50, 300, 128, 32), (128, 128, 128, 0), (129, 257, 128, 16)])
def test_tiles_cover_the_page(height, width, tile, overlap):
    tiles = tile_grid(height, width, tile, overlap)
    covered = np.zeros((height, width), dtype=int)
    for t in tiles:
        assert 0 <= t.x0 < t.x1 <= width and 0 <= t.y0 < t.y1 <= height
        assert (t.x1 - t.x0, t.y1 - t.y0) == (min(tile, width), min(tile, height))
        covered[t.y0:t.y1, t.x0:t.x1] += 1
    assert covered.min() >= 1
    xs = sorted({t.x0 for t in tiles})
    assert all(a + min(tile, width) - b >= overlap for a, b in zip(xs, xs[1:]))   # neighbours overlap enough
    with pytest.raises(ValueError, match=r'overlap in \[0, tile\)'):
        tile_grid(height, width, tile, tile)


def test_tile_boxes_map_back_to_the_page_exactly():
    dets = Detections([[1.5, 2.25, 10, 20], [30, 40, 200, 60]], [0.9, 0.8], [1, 2])
    page = to_page(dets, Tile(80, 40, 200, 160))   # a 120 x 120 tile
    assert page.boxes.tolist() == [[81.5, 42.25, 90.0, 60.0], [110.0, 80.0, 200.0, 100.0]]   # the second clipped
    assert page.scores.tolist() == [0.9, 0.8] and page.labels.tolist() == [1, 2]


# glyphs as (x0, y0, x1, y1) on a 200 x 200 page cut in 120 px tiles overlapping by 40 (borders at 80 and 120)
GLYPH_BOXES = [(115, 10, 135, 40),    # crosses x = 120: a 5 px sliver in the left tiles, whole in the right ones
               (85, 150, 110, 180),   # whole in the overlap: seen whole by two tiles
               (20, 20, 50, 50),      # in one tile only
               (110, 105, 135, 135),  # crosses both borders at a corner: whole only in the bottom-right tile
               (180, 60, 200, 90)]    # on the page's right edge, crossing y = 80


def _page():
    page = np.zeros((1, 200, 200), dtype=np.int64)
    for n, (x0, y0, x1, y1) in enumerate(GLYPH_BOXES):
        page[0, y0:y1, x0:x1] = n + 1
    return page


def _glyph_detector(crop):
    """A detector that sees the visible part of every glyph in a tile (pixel value = glyph number)."""
    crop = np.asarray(crop)[0]
    ids = [v for v in np.unique(crop) if v > 0]
    boxes = []
    for v in ids:
        ys, xs = np.nonzero(crop == v)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return Detections(np.array(boxes, dtype=float).reshape(-1, 4), [0.9] * len(ids), [v - 1 for v in ids])


@needs_fusion
def test_a_glyph_cut_by_a_tile_border_is_recovered_once():
    import torch
    for page in (_page(), torch.from_numpy(_page())):
        out = tile_predict(page, _glyph_detector, tile=120, overlap=40)
        order = np.argsort(out.labels)
        assert out.labels[order].tolist() == list(range(len(GLYPH_BOXES)))
        np.testing.assert_allclose(out.boxes[order], GLYPH_BOXES, atol=1e-9)
    # without dropping the cut boxes the sliver of glyph 0 (IoU 0.25 with the whole) survives the NMS
    tiles = tile_grid(200, 200, 120, 40)
    found = [to_page(_glyph_detector(_page()[:, t.y0:t.y1, t.x0:t.x1]), t) for t in tiles]
    merged = fuse([Detections.concat(found)], (200, 200), MERGE)
    assert len(merged) > len(GLYPH_BOXES)
    kept = drop_cut_boxes(tiles, found, (200, 200))
    assert sum(len(k) for k in kept) == len(GLYPH_BOXES) + 1   # glyph 1, whole in two tiles, until the NMS
