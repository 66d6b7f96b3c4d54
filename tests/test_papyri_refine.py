"""deitlab.papyri crops, refiners and the vote: the crop window exactly, the crops dataset (its 24
folders, its declaration read by the folder data, training and inference crops the same pixels), the
vote's hand cases, refiners loaded from run directories of deitlab train (classes mapped to letters,
the crop policy of their crops, wrong directories refused), and the whole pipeline on two tiny pages
from the command line, its COCO output passing the metric's checks."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from deitlab.cli import main
from deitlab.papyri.alphabet import LETTERS, NUM_CLASSES
from deitlab.papyri.config import PapyriError, PredictConfig, SynthConfig
from deitlab.papyri.crops import CropPolicy, class_folder, crop_glyph, letter_of_folder, write_crops
from deitlab.papyri.fusion import Detections
from deitlab.papyri.predict import PagePrediction
from deitlab.papyri.refine import Refiner, load_refiner, refine_pages
from deitlab.papyri.refine_config import CropsConfig
from deitlab.papyri.synth import synthesize
from deitlab.papyri.vote import VoteConfig, vote

TINY = dict(size='128x96', lines=3, letters=8)
QUIET = ['--no-progress', '--json']


@pytest.fixture(scope='module')
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp('refine')
    synthesize(SynthConfig(pages=2, out=str(root / 'pages'), seed=3, progress=False, **TINY))
    synthesize(SynthConfig(pages=1, out=str(root / 'other'), seed=9, progress=False, **TINY))
    return root


# ------------------------------------------------------------------------------------------ crops
def test_the_crop_window_is_a_square_with_the_margin_around_the_box():
    policy = CropPolicy(margin=0.15, size=16)
    # a 20 x 40 box: side 40 x 1.3 = 52 around the centre (20, 40)
    assert policy.window((10, 20, 30, 60)) == pytest.approx((-6, 14, 46, 66))
    page = Image.fromarray(np.full((80, 100, 3), 200, np.uint8))
    crop = np.array(crop_glyph(page, (10, 20, 30, 60), policy))
    assert crop.shape == (16, 16, 3)
    assert (crop[:, 0] < 200).all() and (crop[:, -1] == 200).all()   # 6 of 52 px off the page, black, on the left
    assert (crop[:, 3:] == 200).all()
    assert CropPolicy(0.0, 8).window((0, 0, 10, 4)) == pytest.approx((0, -3, 10, 7))   # longer side: no stretching


def test_letter_folders_are_in_letter_order():
    folders = [class_folder(k) for k in range(NUM_CLASSES)]
    assert folders == sorted(folders) and folders[0] == '00-alpha' and folders[17] == '17-sigma'
    assert [letter_of_folder(f) for f in folders] == list(range(NUM_CLASSES))
    assert letter_of_folder('omega') == 23 and letter_of_folder(LETTERS[17]) == 17 and letter_of_folder('cat') is None
    assert letter_of_folder('lambda') == letter_of_folder('lamda') == 10   # the glyphs dataset's spelling


def test_crops_make_a_folder_dataset_of_the_24_letters(pages, tmp_path):
    from deitlab.data import build_dataset, dataset_info
    from deitlab.papyri.detect_data import read_pages
    out = tmp_path / 'crops'
    summary = write_crops(CropsConfig(data=str(pages / 'pages'), out=str(out), size=24, progress=False))
    assert sorted(p.name for p in out.iterdir()) == ['manifest.json', 'train', 'val']
    assert [p.name for p in sorted((out / 'train').iterdir())] == [class_folder(k) for k in range(NUM_CLASSES)]
    manifest = json.loads((out / 'manifest.json').read_text(encoding='utf-8'))
    assert manifest['folder'] == {'classes': [class_folder(k) for k in range(24)], 'hflip': 0.0}
    assert manifest['crop'] == {'margin': 0.15, 'size': 24} and manifest['base_types'] == ['bt1', 'bt2']
    coco = read_pages(pages / 'pages').coco
    kept = [a for a in coco.annotations if a.base_type != 'bt3']
    assert summary['train'] + summary['val'] == len(kept) and summary['val'] == round(0.1 * len(kept))
    # deitlab train reads it: 24 classes in letter order, no flips by default, even letters it lacks
    info = dataset_info(f'folder:{out}')
    assert info.classes == tuple(class_folder(k) for k in range(24)) and info.default_hflip == 0.0
    ds = build_dataset(f'folder:{out}', 'train', img_size=24)
    assert ds.num_classes == 24 and len(ds) == summary['train']
    # each file is the crop the refiners cut at inference: the same pixels
    by_id = {a.id: a for a in coco.annotations}
    page_of = {im.id: im for im in coco.images}
    for f in sorted((out / 'train').rglob('*.png'))[:5]:
        a = by_id[int(f.stem.rsplit('_', 1)[1])]
        x, y, w, h = a.bbox
        page = Image.open(pages / 'pages' / page_of[a.image_id].file_name).convert('RGB')
        assert f.parent.name == class_folder(a.letter)
        assert np.array_equal(np.array(Image.open(f)), np.array(crop_glyph(page, (x, y, x + w, y + h),
                                                                          CropPolicy(0.15, 24))))


def test_crops_options_val_pages_base_types_and_label_fraction(pages, tmp_path):
    from deitlab.papyri.detect_data import read_pages
    full = write_crops(CropsConfig(data=str(pages / 'pages'), out=str(tmp_path / 'all'), val=str(pages / 'other'),
                                   base_types=('bt1', 'bt2', 'bt3'), size=16, progress=False))
    assert full['train'] == len(read_pages(pages / 'pages').coco.annotations)
    assert full['val'] == len(read_pages(pages / 'other').coco.annotations)
    few = write_crops(CropsConfig(data=str(pages / 'pages'), out=str(tmp_path / 'few'), val=str(pages / 'other'),
                                  base_types=('bt1', 'bt2', 'bt3'), size=16, label_fraction=0.1, progress=False))
    counts = json.loads((tmp_path / 'all' / 'manifest.json').read_text(encoding='utf-8'))['counts']['train']
    kept = json.loads((tmp_path / 'few' / 'manifest.json').read_text(encoding='utf-8'))['counts']['train']
    assert kept == {k: int(np.ceil(0.1 * n)) for k, n in counts.items()}   # every letter keeps at least one
    assert few['train'] == sum(kept.values())
    with pytest.raises(PapyriError, match=r'already holds crops; pass --overwrite'):
        write_crops(CropsConfig(data=str(pages / 'pages'), out=str(tmp_path / 'all'), progress=False))
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('x')
    with pytest.raises(PapyriError, match=r'mine is not empty \(notes.txt\) and holds no crops written by'):
        write_crops(CropsConfig(data=str(pages / 'pages'), out=str(tmp_path / 'mine'), overwrite=True, progress=False))
    with pytest.raises(PapyriError, match=r'base_types must be among bt1, bt2, bt3, got bt4'):
        CropsConfig(data=str(pages / 'pages'), out='o', base_types=('bt4',)).validate()


# ------------------------------------------------------------------------------------------ the vote
def _probs(*pairs):
    """One row per box: probability p on letter k, the rest spread evenly."""
    rows = []
    for k, p in pairs:
        row = np.full(NUM_CLASSES, (1 - p) / (NUM_CLASSES - 1))
        row[k] = p
        rows.append(row)
    return np.array(rows)


def test_the_vote_by_hand():
    det_labels, det_scores = [3, 3, 3, 3, 3], [0.8, 0.8, 0.5, 0.95, 0.6]
    deit = _probs((3, 0.9), (5, 0.7), (5, 0.6), (5, 0.6), (3, 0.2))
    simclr = _probs((3, 0.6), (5, 0.8), (7, 0.9), (7, 0.9), (9, 0.3))
    r = vote(det_labels, det_scores, [deit, simclr])
    # 1: all three agree: the detector's score times (1 + 0.9 + 0.6) / 3
    # 2: two of three name 5: it wins, the score is 0.8 * (0.7 + 0.8) / 3
    # 3: all differ: the most confident member (SimCLR, 0.9) decides, score 0.5 * 0.9 / 3
    # 4: all differ and the detector is the most confident (0.95): its letter, 0.95 * 1 / 3
    # 5: the detector and DeiT agree on 3 (DeiT's row argmax is 3 only if 0.2 beats the rest: it does)
    assert r.labels.tolist() == [3, 5, 7, 3, 3]
    assert r.scores == pytest.approx([0.8 * 2.5 / 3, 0.8 * 1.5 / 3, 0.5 * 0.9 / 3, 0.95 / 3, 0.6 * 1.2 / 3])
    assert r.agree.tolist() == [3, 2, 1, 1, 2]
    assert r.member_labels.tolist() == [[3] * 5, [3, 5, 5, 5, 3], [3, 5, 7, 7, 9]]
    kept = vote(det_labels, det_scores, [deit, simclr], VoteConfig(score='detector'))
    assert kept.labels.tolist() == r.labels.tolist() and kept.scores.tolist() == det_scores


def test_two_voters_tie_to_the_more_confident_and_no_refiner_changes_nothing():
    r = vote([4, 4], [0.7, 0.3], [_probs((6, 0.5), (6, 0.5))])
    assert r.labels.tolist() == [4, 6] and r.scores == pytest.approx([0.7 / 2, 0.3 * 0.5 / 2])
    same = vote([4, 9], [0.7, 0.3])
    assert same.labels.tolist() == [4, 9] and same.scores.tolist() == [0.7, 0.3]
    assert len(vote([], [], [np.zeros((0, 24))]).labels) == 0
    # weights: a detector of weight 3 outvotes two refiners agreeing with each other
    w = vote([4], [0.9], [_probs((6, 0.9)), _probs((6, 0.9))], VoteConfig(weights=(3, 1, 1)))
    assert w.labels.tolist() == [4] and w.scores == pytest.approx([0.9 * 3 / 5])


def test_score_averaging():
    # mean of onehot(3), p1, p2: letter 5 gets (0 + 0.7 + 0.8) / 3 = 0.5 > letter 3's (1 + 2 * 0.3 / 23) / 3
    r = vote([3], [0.6], [_probs((5, 0.7)), _probs((5, 0.8))], VoteConfig(rule='average'))
    assert r.labels.tolist() == [5] and r.scores == pytest.approx([0.6 * 1.5 / 3])
    r = vote([3], [0.6], [_probs((5, 0.4)), _probs((7, 0.4))], VoteConfig(rule='average'))
    assert r.labels.tolist() == [3]   # the detector's one-hot vote outweighs two split refiners
    with pytest.raises(PapyriError, match=r'vote must be one of majority, average'):
        vote([3], [0.6], [], VoteConfig(rule='unanimous'))
    with pytest.raises(PapyriError, match=r'vote_weights: 1 weight\(s\) for 2 members'):
        vote([3], [0.6], [_probs((5, 0.4))], VoteConfig(weights=(1,)))


class _Fixed:
    """A refiner that names letter ``k`` for every box, with probability ``p``."""
    def __init__(self, name, k, p):
        self.name, self.k, self.p = name, k, p

    def classify(self, page, boxes):
        return _probs(*[(self.k, self.p)] * len(boxes))


def test_refine_pages_relabels_rescores_and_keeps_every_members_letter(pages):
    path = pages / 'pages' / 'images' / 'page_0000.png'
    from deitlab.papyri.coco import CocoImage
    page = PagePrediction(CocoImage(1, 'page_0000.png', 128, 96), path,
                          Detections([[1, 1, 11, 11], [20, 20, 30, 30]], [0.9, 0.4], [2, 8]))
    out, = refine_pages([page], [_Fixed('a', 8, 1.0), _Fixed('b', 8, 1.0)])
    # box 1: the refiners outvote the detector's Γ (0.9 x 2/3); box 2: all three name Ι (0.4 x 3/3)
    assert out.detections.labels.tolist() == [8, 8] and out.detections.scores == pytest.approx([0.6, 0.4])
    assert out.detections.boxes[0].tolist() == [1, 1, 11, 11]   # best score first
    assert out.votes == {'detector': ['Γ', 'Ι'], 'a': ['Ι', 'Ι'], 'b': ['Ι', 'Ι']}
    assert page.detections.labels.tolist() == [2, 8]   # the input is left as it was


# ------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope='module')
def runs(pages, tmp_path_factory):
    """A detector, a DeiT refiner and a SimCLR refiner (pretrained, fine-tuned), each barely trained,
    through the command line."""
    root = tmp_path_factory.mktemp('runs')
    torch.set_num_threads(1)
    data = str(pages / 'pages')
    assert main(['papyri', 'train-detector', '--data', data, '--out', str(root / 'det'), '--tile', '64', '--overlap',
                 '16', '--epochs', '1', '--steps', '2', '--batch-size', '2', '--detections', '50', *QUIET]) == 0
    assert main(['papyri', 'crops', '--data', data, '--out', str(root / 'crops'), '--size', '32', *QUIET]) == 0
    train = ['train', '--data', f'folder:{root / "crops"}', '--recipe', 'short', '--epochs', '1', '--batch-size', '8',
             '--no-tensorboard', *QUIET]
    assert main(train + ['--model', 'deitlab_deit_pico_patch4_32', '--out', str(root / 'deit')]) == 0
    assert main(['papyri', 'pretrain-simclr', '--images', str(pages / 'pages' / 'images'), '--out',
                 str(root / 'simclr'), '--model', 'resnet18', '--model-kwargs', 'channels=[8,16,32,64]', '--img-size',
                 '32', '--window', '16,32', '--epochs', '1', '--steps', '2', '--batch-size', '8', *QUIET]) == 0
    assert main(train + ['--model', str(root / 'simclr'), '--out', str(root / 'simclr-ft')]) == 0
    return root


def test_the_pipeline_end_to_end_writes_coco_that_the_metric_accepts(pages, runs, tmp_path, capsys):
    from deitlab.papyri.coco import read_coco
    from deitlab.papyri.metric import check_predictions, evaluate, prepare_ground_truth
    capsys.readouterr()
    gt_file = pages / 'pages' / 'annotations.json'
    out = tmp_path / 'pred'
    assert main(['papyri', 'predict', str(pages / 'pages' / 'images'), '--detector', str(runs / 'det'), '--refiners',
                 f'deit={runs / "deit"},simclr={runs / "simclr-ft"}', '--ids-from', str(gt_file), '--out', str(out),
                 *QUIET]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['refiners'] == {'deit': str(runs / 'deit'), 'simclr': str(runs / 'simclr-ft')}
    assert result['vote'] == {'rule': 'majority', 'score': 'agree', 'weights': None} and result['boxes'] > 0
    coco = read_coco(out / 'predictions.json')   # the competition's schema, checked
    assert coco.info['refiners'] and all(set(a.extra['votes']) == {'detector', 'deit', 'simclr'}
                                         for a in coco.annotations)
    gt = json.loads(gt_file.read_text(encoding='utf-8'))
    results = json.loads((out / 'results.json').read_text(encoding='utf-8'))
    scored, _ = prepare_ground_truth(gt)
    assert len(check_predictions(results, scored)) == result['boxes']
    scores = evaluate(gt, results)
    assert 0 <= scores['recognition']['mAP'] <= scores['recognition']['mAP50'] <= 1
    # every box's letter is what most of its three members named (or the most confident one)
    for a in coco.annotations:
        named = list(a.extra['votes'].values())
        top = max(set(named), key=named.count)
        if named.count(top) > 1:
            assert LETTERS[a.letter] == top


def test_a_refiner_classifies_crops_as_deitlab_train_evaluated_them(runs, pages):
    from deitlab.data import build_dataset
    from deitlab.papyri.detect_data import read_pages
    refiner = load_refiner(runs / 'deit', 'deit', device='cpu')
    assert isinstance(refiner, Refiner) and refiner.policy == CropPolicy(0.15, 32) and refiner.size == 32
    assert refiner.letters.tolist() == list(range(24))
    ds = build_dataset(f'folder:{runs / "crops"}', 'val', img_size=32, mean=refiner.mean, std=refiner.std)
    data = read_pages(pages / 'pages')
    by_id = {a.id: a for a in data.coco.annotations}
    files = ds.files[:4]
    boxes, page_index = [], None
    for f in files:
        a = by_id[int(f.stem.rsplit('_', 1)[1])]
        boxes.append([a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]])
    # crops of one page at a time
    page_of = {a.id: a.image_id for a in data.coco.annotations}
    first = page_of[int(files[0].stem.rsplit('_', 1)[1])]
    same = [i for i, f in enumerate(files) if page_of[int(f.stem.rsplit('_', 1)[1])] == first]
    im = next(i for i in data.coco.images if i.id == first)
    page = Image.open(pages / 'pages' / im.file_name).convert('RGB')
    probs = refiner.classify(page, np.array(boxes)[same])
    with torch.no_grad():
        want = torch.softmax(refiner.model(torch.stack([ds[i][0] for i in same])), 1).numpy()
    assert np.allclose(probs, want, atol=1e-6) and np.allclose(probs.sum(1), 1)


def test_wrong_run_directories_are_refused_as_refiners(runs, tmp_path):
    import timm
    from deitlab.rundir import save_run_dir
    with pytest.raises(PapyriError, match=r'refiner d: .*det is a detector run directory, not a crop classifier'):
        load_refiner(runs / 'det', 'd')
    with pytest.raises(PapyriError, match=r'refiner s: .*simclr has no classifier \(num_classes 0\), e.g. a SimCLR '
                                          r'backbone: fine-tune it first with deitlab train'):
        load_refiner(runs / 'simclr', 's')
    save_run_dir(timm.create_model('deitlab_deit_pico_patch4_32', num_classes=2), tmp_path / 'pets',
                 label_names=['cat', 'dog'])
    with pytest.raises(PapyriError, match=r'pets classifies cat, dog, not letters'):
        load_refiner(tmp_path / 'pets', 'p')
    with pytest.raises(PapyriError, match=r'refiner x: .*nothing does not exist'):
        load_refiner(tmp_path / 'nothing', 'x')
    # a classifier of some letters, in another order, trained elsewhere: mapped, with the default crops
    save_run_dir(timm.create_model('deitlab_deit_pico_patch4_32', num_classes=2), tmp_path / 'two',
                 label_names=['omega', 'alpha'])
    two = load_refiner(tmp_path / 'two', 'two')
    assert two.letters.tolist() == [23, 0] and two.policy == CropPolicy()
    probs = two.classify(Image.new('RGB', (40, 40)), np.array([[5, 5, 20, 25]]))
    assert probs.shape == (1, 24) and probs[0, [0, 23]].sum() == pytest.approx(1) and probs[0, 1:23].sum() == 0


def test_refiner_settings_are_checked_before_any_model_is_loaded(tmp_path):
    cfg = PredictConfig(detector=('d',), out='o', images=('p.png',), refiners=('deit=a', 'b/simclr'))
    assert cfg.validate().refiner_pairs() == (('deit', 'a'), ('simclr', 'b/simclr'))
    with pytest.raises(PapyriError, match=r'refiners: each needs its own name, not detector; x is taken'):
        PredictConfig(detector=('d',), out='o', images=('p.png',), refiners=('x=a', 'x=b')).validate()
    with pytest.raises(PapyriError, match=r'refiners: each needs its own name, not detector; detector is taken'):
        PredictConfig(detector=('d',), out='o', images=('p.png',), refiners=('detector=a',)).validate()
    with pytest.raises(PapyriError, match=r"vote_score must be one of agree, detector, got 'max'"):
        PredictConfig(detector=('d',), out='o', images=('p.png',), refiners=('a',), vote_score='max').validate()


@pytest.mark.slow
def test_the_quick_demo_runs_every_step_and_prints_the_table(tmp_path, capsys):
    from deitlab.papyri.demo import VARIANTS
    assert main(['papyri', 'demo', '--quick', '--out', str(tmp_path / 'demo')]) == 0
    out = capsys.readouterr().out
    assert all(label in out for _, label, _ in VARIANTS) and 'CPU minutes' in out
    res = json.loads((tmp_path / 'demo' / 'results.json').read_text(encoding='utf-8'))
    assert [r['variant'] for r in res['rows']] == [label for _, label, _ in VARIANTS] and res['cpu_s'] < 120
    assert sorted(p.name for p in (tmp_path / 'demo' / 'predictions' / 'vote' / 'overlays').iterdir())
