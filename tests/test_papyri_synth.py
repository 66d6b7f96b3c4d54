"""deitlab.papyri: the 24-letter alphabet, the competition's COCO schema and the synthetic pages
(``deitlab papyri synth``). Tiny pages; exact properties of the boxes, BaseTypes and files."""
import json
from pathlib import Path

import numpy as np
import pytest

from deitlab.cli import main
from deitlab.papyri.alphabet import (CANDIDATES, CATEGORY_IDS, LETTERS, NAMES, NUM_CLASSES, UNICODE_NAMES,
                                     choose_code_points, class_of, font_code_points, is_letter)
from deitlab.papyri.coco import CocoDataset, CocoError, read_coco, write_coco
from deitlab.papyri.config import PapyriError, SynthConfig
from deitlab.papyri.synth import INK_LEVEL, MIN_SURVIVING, base_type, make_page, resolve_fonts, synthesize

SMALL = dict(size=(192, 144), lines=4, letters=12)
SMALL_FLAGS = ['--size', '192x144', '--lines', '4', '--letters', '12']


@pytest.fixture(scope='module')
def fonts():
    return resolve_fonts('bundled')


@pytest.fixture(scope='module')
def stix(fonts):
    return next(f for f in fonts if Path(f).name == 'STIXGeneral.ttf')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'pages'
    res = synthesize(SynthConfig(pages=3, out=str(out), seed=0, size='192x144', lines=4, letters=12, progress=False))
    return out, res


# ------------------------------------------------------------------------------------------ alphabet
def test_the_24_classes_and_their_competition_ids():
    assert NUM_CLASSES == len(LETTERS) == len(set(CATEGORY_IDS)) == 24
    assert LETTERS[17] == '\u03f9' and NAMES[17] == 'sigma'
    assert UNICODE_NAMES[17] == 'GREEK CAPITAL LUNATE SIGMA SYMBOL'
    assert (NAMES[0], NAMES[-1]) == ('alpha', 'omega')
    table = {7: 'Θ', 8: 'Α', 9: 'Β', 14: 'Τ', 17: 'Ξ', 23: 'Ε', 33: 'Κ', 45: 'Ω', 59: 'Μ', 77: 'Φ', 100: 'Ρ',
             107: 'Π', 111: 'Γ', 119: 'Ν', 120: 'Λ', 144: 'Ζ', 150: 'Η', 161: 'Υ', 169: 'Ψ', 177: 'Χ', 186: 'Δ',
             201: 'Ο', 212: 'Ι', 225: 'Ϲ'}
    assert {cid: LETTERS[class_of(cid)] for cid in table} == table
    assert [CATEGORY_IDS[class_of(cid)] for cid in table] == list(table)
    assert not is_letter(142)   # the plain Σ of the competition's table is not scored
    with pytest.raises(PapyriError, match=r'category id 142 is not one of the 24 letters'):
        class_of(142)


def test_choice_of_code_points_falls_back_in_order():
    flat = [c for cands in CANDIDATES for c in cands]

    def drawn(*lacking):
        return [None if c in lacking else True for c in flat]
    assert choose_code_points(drawn())[17] == '\u03f9'
    assert choose_code_points(drawn('\u03f9'))[17] == '\u03f2'
    assert choose_code_points(drawn('\u03f9', '\u03f2'))[17] == 'C'
    assert choose_code_points(drawn('\u03f9', '\u03f2', 'C'))[17] == 'Σ'
    assert choose_code_points(drawn('\u03f9', '\u03f2', 'C', 'Σ'))[17] is None
    assert choose_code_points(drawn('\u03f9'))[:17] == tuple(LETTERS[:17])


def test_a_font_without_lunate_sigma_draws_its_fallback(fonts, stix):
    dejavu = next(f for f in fonts if Path(f).name == 'DejaVuSans.ttf')
    assert font_code_points(dejavu) == LETTERS
    chars = font_code_points(stix)   # STIX has neither U+03F9 nor U+03F2
    assert chars[17] == 'C' and chars[:17] + chars[18:] == LETTERS[:17] + LETTERS[18:]
    page = make_page(1, 0, (stix,), damage=0.0, **SMALL)
    sigmas = [g for g in page.glyphs if g.cls == 17]
    assert sigmas and {g.code_point for g in sigmas} == {'C'}


# ---------------------------------------------------------------------------------------------- pages
def test_every_box_is_the_tight_box_of_its_glyphs_ink(dataset, fonts):
    out, _ = dataset
    coco = read_coco(out / 'annotations.json', check_files=True)
    checked = 0
    for image in coco.images:
        page = make_page(0, image.id - 1, fonts, **SMALL)
        assert [a.bbox for a in coco.annotations_of(image.id)] == [g.box for g in page.glyphs]
        for g in page.glyphs:
            rows, cols = np.nonzero(g.mask >= INK_LEVEL)
            ys, xs = rows + g.origin[1], cols + g.origin[0]
            x, y, w, h = g.box
            assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h   # encloses
            assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1                # tight
            assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
            assert 0 <= x and x + w <= image.width and 0 <= y and y + h <= image.height
            checked += 1
    assert checked > 60


def test_boxes_hold_ink_in_the_image(fonts):
    page = make_page(2, 0, fonts, damage=0.0, **SMALL)
    grey = page.image.astype(np.float32).mean(2)
    paper = np.median(grey)
    for g in page.glyphs:
        x, y, w, h = g.box
        assert grey[y:y + h, x:x + w].min() < paper - 40, g.box


def test_damage_sets_the_base_type_from_the_ink_left(dataset, fonts):
    assert [base_type(f) for f in (1.0, 0.9, 0.89, 0.5, 0.49, 0.1)] == ['bt1', 'bt1', 'bt2', 'bt2', 'bt3', 'bt3']
    seen, erased = set(), 0
    for index in range(3):
        page = make_page(0, index, fonts, **SMALL)
        for g in page.glyphs:
            x0, y0 = g.origin
            region = page.intact[y0:y0 + g.mask.shape[0], x0:x0 + g.mask.shape[1]]
            left = float((g.mask.astype(np.float64) * region).sum() / g.mask.astype(np.float64).sum())
            assert left == pytest.approx(g.surviving) and left >= MIN_SURVIVING
            assert g.base_type == base_type(left)
            if left < 0.5:   # mostly erased
                assert g.base_type == 'bt3'
                erased += 1
            seen.add(g.base_type)
    assert seen == {'bt1', 'bt2', 'bt3'} and erased >= 1
    intact = make_page(0, 0, fonts, damage=0.0, **SMALL)
    assert intact.intact.min() == 1.0 and {g.base_type for g in intact.glyphs} == {'bt1'} and not intact.dropped


def test_same_seed_same_bytes_another_seed_differs(dataset, tmp_path):
    out, _ = dataset

    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob('*')) if p.is_file()}
    again = tmp_path / 'again'
    synthesize(SynthConfig(pages=3, out=str(again), seed=0, size='192x144', lines=4, letters=12, progress=False))
    assert files(again) == files(out)
    other = tmp_path / 'other'
    synthesize(SynthConfig(pages=3, out=str(other), seed=1, size='192x144', lines=4, letters=12, progress=False))
    a, b = files(out), files(other)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_only_letter_ids_and_the_competition_schema(dataset):
    out, res = dataset
    raw = json.loads((out / 'annotations.json').read_text(encoding='utf-8'))
    assert [c['id'] for c in raw['categories']] == list(CATEGORY_IDS)
    assert {a['category_id'] for a in raw['annotations']} <= set(CATEGORY_IDS)
    assert len(raw['annotations']) == res['glyphs'] and sum(res['base_types'].values()) == res['glyphs']
    a = raw['annotations'][0]
    assert set(a) == {'id', 'image_id', 'bbox', 'category_id', 'area', 'iscrowd', 'tags'}
    assert a['tags']['BaseType'][0] in ('bt1', 'bt2', 'bt3') and a['area'] == a['bbox'][2] * a['bbox'][3]
    assert raw['images'][0] == {'id': 1, 'file_name': 'images/page_0000.png', 'width': 192, 'height': 144}


def test_the_output_directory_is_refused_replaced_or_left_alone(dataset, tmp_path, monkeypatch):
    out = tmp_path / 'o'
    cfg = dict(pages=1, out=str(out), size='128x96', lines=3, letters=8, progress=False)
    synthesize(SynthConfig(**cfg))
    before = (out / 'annotations.json').read_bytes()
    synthesize(SynthConfig(**cfg))   # the same settings: the same files again
    assert (out / 'annotations.json').read_bytes() == before
    with pytest.raises(PapyriError, match=r'already holds pages made with other settings \(seed 0 vs now 5\); '
                                          r'pass --overwrite'):
        synthesize(SynthConfig(**cfg, seed=5))
    synthesize(SynthConfig(**cfg, seed=5, overwrite=True))
    assert (out / 'annotations.json').read_bytes() != before
    # an error half-way leaves nothing behind: neither the new directory nor a partial one
    import deitlab.papyri.synth as synth

    def fail(seed, index, *a, **k):
        if index == 1:
            raise RuntimeError('disk on fire')
        return real(seed, index, *a, **k)
    real = synth.make_page
    monkeypatch.setattr(synth, 'make_page', fail)
    with pytest.raises(RuntimeError):
        synthesize(SynthConfig(**dict(cfg, out=str(tmp_path / 'new'), pages=2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['o']


# ----------------------------------------------------------------------------------------------- COCO
def _write(tmp_path, obj, name='a.json'):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _coco(**change):
    obj = {'images': [{'id': 1, 'file_name': 'p.png', 'width': 256, 'height': 192, 'bln_id': 7,
                       'img_url': 'https://example.org/p.png'}],
           'annotations': [{'id': 1, 'image_id': 1, 'bbox': [10, 10, 20, 12], 'category_id': 225, 'area': 240,
                            'iscrowd': 0, 'tags': {'BaseType': ['bt2']}}],
           'categories': [{'id': 225, 'name': 'Ϲ'}, {'id': 142, 'name': 'Σ'}]}
    obj['annotations'][0].update(change)
    return obj


def test_coco_reads_the_competition_schema_with_extra_fields(tmp_path):
    ds = read_coco(_write(tmp_path, _coco()))
    (im,), (a,) = ds.images, ds.annotations
    assert im.extra == {'bln_id': 7, 'img_url': 'https://example.org/p.png'}
    assert (a.letter, a.base_type, a.bbox) == (17, 'bt2', (10, 10, 20, 12))
    write_coco(ds, tmp_path / 'b.json')
    assert json.loads((tmp_path / 'b.json').read_text()) == _coco()


def test_coco_errors_name_the_problem(tmp_path):
    with pytest.raises(CocoError, match=r'category ids that are not letters: 142 \(1 annotation, first id 1\); only '
                                        r'the 24 letter ids \(7, 8, 9, .*225\) are used: read with '
                                        r'drop_other_categories=True'):
        read_coco(_write(tmp_path, _coco(category_id=142)))
    ds = read_coco(_write(tmp_path, _coco(category_id=142)), drop_other_categories=True)
    assert ds.annotations == [] and [c['id'] for c in ds.categories] == [225]
    with pytest.raises(CocoError, match=r'annotation 1 \(image 1, p.png, 256x192\): bbox \[250, 10, 20, 12\] is '
                                        r'outside the image \(x \+ w = 270 > width 256\)'):
        read_coco(_write(tmp_path, _coco(bbox=[250, 10, 20, 12])))
    assert read_coco(_write(tmp_path, _coco(bbox=[250, 10, 20, 12])), clip_boxes=True).annotations[0].bbox == \
        (250, 10, 6, 12)
    with pytest.raises(CocoError, match=r'annotation 1 refers to image 9, which is not among the file\'s 1 images'):
        read_coco(_write(tmp_path, _coco(image_id=9)))
    with pytest.raises(CocoError, match=r'a.json is not valid JSON \(line 1, column 2'):
        read_coco(_write(tmp_path, '{images: []}'))
    with pytest.raises(CocoError, match=r'tags.BaseType must be one of'):
        read_coco(_write(tmp_path, _coco(tags={'BaseType': ['bt4']})))
    with pytest.raises(CocoError, match=r'image 1: file p.png not found under'):
        read_coco(_write(tmp_path, _coco()), check_files=True)
    with pytest.raises(CocoError, match=r'annotation file does not exist'):
        read_coco(tmp_path / 'nothing.json')
    bad = read_coco(_write(tmp_path, _coco()))
    bad.annotations[0].bbox = (-1, 0, 5, 5)
    with pytest.raises(CocoError, match=r'outside the image \(x = -1 < 0\)'):
        write_coco(bad, tmp_path / 'never.json')
    assert not (tmp_path / 'never.json').exists()


def test_coco_dataset_defaults_to_the_letter_categories():
    assert [c['id'] for c in CocoDataset([], []).categories] == list(CATEGORY_IDS)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_papyri_synth_json(tmp_path, capsys):
    out = tmp_path / 'cli'
    assert main(['papyri', 'synth', '--pages', '2', '--out', str(out), '--seed', '4', *SMALL_FLAGS, '--json']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    coco = read_coco(out / 'annotations.json', check_files=True)
    assert res['pages'] == len(coco.images) == 2 and res['glyphs'] == len(coco.annotations) > 0
    assert sorted(p.name for p in (out / 'images').iterdir()) == ['page_0000.png', 'page_0001.png']
    assert main(['papyri', 'synth', '--pages', '2', '--out', str(out), '--seed', '5', *SMALL_FLAGS, '--json']) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['type'] == 'PapyriError'
