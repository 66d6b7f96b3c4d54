"""Tests of the generated datasets for DCAL: ``glyphs-fine`` (class = letter x font) and
``glyphs-reid`` (writers with persistent hands, in views; train / val / query / gallery)."""
import pytest
import torch
from torch.utils.data import DataLoader

from deitlab.data import DataError, ReidImageDataset, build_dataset, dataset_info
from deitlab.data import glyphs, glyphs_fine, glyphs_reid

FINE = 'glyphs-fine:train=64,val=32,letters=2,size=16'
REID = 'glyphs-reid:ids=4,test_ids=3,per_id=6,views=3,val_per_id=2,size=16'


# ------------------------------------------------------------------------------------- glyphs-fine
def test_fine_builds_balanced_with_letters_x_fonts_classes():
    fonts = glyphs.find_fonts('bundled')
    info = dataset_info(FINE)
    assert info.num_classes == 2 * len(fonts)
    assert (info.img_size, info.in_chans, info.default_hflip) == (16, 3, 0.0)
    tr, va = build_dataset(FINE, 'train'), build_dataset(FINE, 'val')
    assert len(tr) == 64 and len(va) == 32 and tr.num_classes == info.num_classes
    assert tuple(tr.classes) == info.classes
    assert torch.bincount(tr.targets, minlength=tr.num_classes).tolist() == [2] * tr.num_classes
    assert torch.bincount(va.targets, minlength=va.num_classes).tolist() == [1] * va.num_classes
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < tr.num_classes
    assert dataset_info('glyphs-fine').num_classes == 8 * len(fonts)


def test_fine_class_names_are_letter_and_font():
    fonts = glyphs.find_fonts('bundled')
    classes = dataset_info('glyphs-fine').classes
    assert 'alpha/DejaVu Sans Bold' in classes and 'eta/STIXGeneral' in classes
    names = [glyphs_fine.font_name(p) for p in fonts]
    assert len(set(names)) == len(fonts)  # every font is a class of its own
    for label, name in enumerate(classes):  # letter-major: label = letter * num_fonts + font
        letter, font = name.split('/')
        assert letter == glyphs_fine.FINE_LETTERS[label // len(fonts)]
        assert font == names[label % len(fonts)]
    # the images of one class share the font: labels that agree modulo the font count name one font
    ds = build_dataset(FINE, 'train')
    by_font = {}
    for label in ds.targets.tolist():
        by_font.setdefault(label % len(fonts), set()).add(ds.classes[label].split('/')[1])
    assert all(len(v) == 1 for v in by_font.values()) and len(by_font) == len(fonts)


def test_fine_reproducible_per_seed_and_split():
    a, la = glyphs_fine.generate_fine_glyphs(40, 16, seed=3, split='train', letters=2)
    b, lb = glyphs_fine.generate_fine_glyphs(40, 16, seed=3, split='train', letters=2)
    c, _ = glyphs_fine.generate_fine_glyphs(40, 16, seed=4, split='train', letters=2)
    v, _ = glyphs_fine.generate_fine_glyphs(40, 16, seed=3, split='val', letters=2)
    assert a.dtype == torch.uint8 and a.shape == (40, 3, 16, 16)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c) and not torch.equal(a, v)
    s = build_dataset(FINE + ',seed=5', 'train')
    t = build_dataset(FINE, 'train', seed=5)
    assert torch.equal(s.images, t.images)


def test_fine_bad_options():
    with pytest.raises(DataError, match='glyphs-fine: option letters must be >= 2'):
        dataset_info('glyphs-fine:letters=1')
    with pytest.raises(DataError, match=r'letters must be in 2\.\.24'):
        dataset_info('glyphs-fine:letters=25')
    with pytest.raises(DataError, match=r'train=10 gives some of the 32 classes.*no image'):
        build_dataset('glyphs-fine:train=10,letters=2', 'train')
    with pytest.raises(DataError, match=r"glyphs-fine: bad option 'colour=red'.*letters, fonts"):
        dataset_info('glyphs-fine:colour=red')
    with pytest.raises(DataError, match=r"unknown split 'query'"):
        build_dataset(FINE, 'query')


# ------------------------------------------------------------------------------------- glyphs-reid
def test_reid_splits_build():
    info = dataset_info(REID)
    assert (info.num_classes, info.img_size, info.in_chans, info.default_hflip) == (4, 16, 3, 0.0)
    assert info.classes == ('writer-0000', 'writer-0001', 'writer-0002', 'writer-0003')
    tr, va = build_dataset(REID, 'train'), build_dataset(REID, 'val')
    q, g = build_dataset(REID, 'query'), build_dataset(REID, 'gallery')
    assert all(isinstance(d, ReidImageDataset) for d in (tr, va, q, g))
    assert (len(tr), len(va), len(q), len(g)) == (24, 8, 9, 9)
    assert tr.num_classes == va.num_classes == 4 and tuple(tr.classes) == info.classes
    assert torch.bincount(tr.targets).tolist() == [6] * 4 and torch.bincount(va.targets).tolist() == [2] * 4
    assert torch.equal(tr.identities, tr.targets)
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and isinstance(y, int)
    x, identity, view = q[0]
    assert x.shape == (3, 16, 16) and identity == int(q.identities[0]) and view == int(q.views[0])
    assert q.identities.dtype == torch.long and g.views.dtype == torch.long
    assert q.classes == g.classes == ['writer-0004', 'writer-0005', 'writer-0006']
    assert torch.equal(q.targets + 4, q.identities)
    xb, ib, vb = next(iter(DataLoader(g, batch_size=5)))
    assert xb.shape == (5, 3, 16, 16) and torch.equal(ib, g.identities[:5]) and torch.equal(vb, g.views[:5])
    assert build_dataset(REID, 'query', in_chans=1, img_size=24)[0][0].shape == (1, 24, 24)
    # the train images are not the held-out val images of the same writers
    seen = {x.numpy().tobytes() for x in tr.images}
    assert not any(x.numpy().tobytes() in seen for x in va.images)


def test_reid_test_writers_disjoint_one_query_per_view():
    tr, va = build_dataset(REID, 'train'), build_dataset(REID, 'val')
    q, g = build_dataset(REID, 'query'), build_dataset(REID, 'gallery')
    train_ids = set(tr.identities.tolist())
    assert train_ids == set(va.identities.tolist()) == {0, 1, 2, 3}
    assert set(q.identities.tolist()) == set(g.identities.tolist()) == {4, 5, 6}
    for w in (4, 5, 6):
        assert sorted(q.views[q.identities == w].tolist()) == [0, 1, 2]   # one query per view
        assert int((g.identities == w).sum()) == 6 - 3                    # the rest in the gallery
        # Market-1501: every query keeps a gallery match in another view
        for v in range(3):
            assert bool(((g.identities == w) & (g.views != v)).any())
    # views go round for training too
    assert sorted(tr.views[tr.identities == 0].tolist()) == [0, 0, 1, 1, 2, 2]
    seen = {x.numpy().tobytes() for x in g.images}
    assert not any(x.numpy().tobytes() in seen for x in q.images)


def test_reid_reproducible_per_seed():
    args = (4, 3, 6, 3, 2, 16)
    a = glyphs_reid.generate_reid('test', *args, seed=2)
    b = glyphs_reid.generate_reid('test', *args, seed=2)
    c = glyphs_reid.generate_reid('test', *args, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    s = build_dataset(REID + ',seed=7', 'gallery')
    t = build_dataset(REID, 'gallery', seed=7)
    assert torch.equal(s.images, t.images) and torch.equal(s.identities, t.identities)
    assert not torch.equal(s.images, build_dataset(REID, 'gallery').images)


def test_reid_hands_persistent():
    nf = len(glyphs.find_fonts('bundled'))
    # a writer's hand is drawn from its own generator: the same whatever the other writers
    one, many = glyphs_reid.writer_hands([3], 0, nf), glyphs_reid.writer_hands(range(6), 0, nf)
    for field in ('font', 'weight', 'slant', 'ink', 'letters', 'paper', 'spots'):
        assert torch.equal(getattr(one, field)[0], getattr(many, field)[3]), field
    assert not torch.equal(many.spots[0], many.spots[1])
    # the mean of half of a writer's images is nearer the mean of its other half than any other writer's
    for seed in (0, 1):
        x, ident, _, _ = glyphs_reid.generate_reid('train', 6, 2, 16, 4, 1, 32, seed)
        x = x.float().view(6, 16, -1)
        d = torch.cdist(x[:, :8].mean(1), x[:, 8:].mean(1))
        nearest_other = (d + torch.eye(6) * 1e9).min(1).values
        assert (d.diag() < 0.9 * nearest_other).all(), (seed, d)


def test_reid_bad_options():
    with pytest.raises(DataError, match='glyphs-reid: option ids must be >= 2, got 1'):
        build_dataset('glyphs-reid:ids=1', 'train')
    with pytest.raises(DataError, match=r'per_id=3 is too small for views=4.*per_id >= 6'):
        dataset_info('glyphs-reid:per_id=3')
    with pytest.raises(DataError, match=r"glyphs-reid: bad option 'colour=red'.*ids, test_ids, per_id, views"):
        build_dataset('glyphs-reid:colour=red', 'query')
    with pytest.raises(DataError, match='option views must be >= 2'):
        dataset_info('glyphs-reid:views=1')
    with pytest.raises(DataError, match="unknown split 'test'.*'train', 'val', 'query', 'gallery'"):
        build_dataset(REID, 'test')


def test_spec_grammar_names_the_new_datasets():
    with pytest.raises(DataError, match=r'glyphs-fine, glyphs-reid.*glyphs-fine\[:k=v,\.\.\.\] \| glyphs-reid'):
        build_dataset('imagenet', 'train')
