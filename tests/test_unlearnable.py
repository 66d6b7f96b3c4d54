"""CUDA unlearnable datasets: key-derived filters, poisoning, fraction, ImageFolder output, CLI."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deitlab.cli import main
from deitlab.data import build_dataset
from deitlab.data.folder import load_image
from deitlab.data.transforms import pil_to_tensor
from deitlab.unlearnable import (CUDATransform, PoisonedDataset, UnlearnableError, apply_filters, class_filters,
                                 key_fingerprint, make_unlearnable, poison_mask)

KEY = 'correct horse battery'
SPEC = 'glyphs:train=240,val=48,size=16,seed=1'   # 24 classes, 10 train / 2 val images each


def _read(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return pil_to_tensor(img)


def _stored(root: Path):
    """{(split, index): (folder name, uint8 image)} of an output tree."""
    out = {}
    for split in ('train', 'val'):
        for f in sorted((root / split).glob('*/*.png')):
            out[split, int(f.stem)] = (f.parent.name, _read(f))
    return out


@pytest.fixture(scope='module')
def poisoned_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp('cuda') / 'out'
    info = make_unlearnable(SPEC, KEY, out, fraction=0.3, progress=False)
    return out, info


# ------------------------------------------------------------------------------------------ filters
def test_same_key_same_filters_other_key_other_filters():
    a = class_filters(KEY, 10)
    assert a.shape == (10, 3, 3) and a.dtype == torch.float32
    assert torch.equal(a, class_filters(KEY, 10))
    assert not torch.equal(a, class_filters(KEY + '!', 10))
    assert torch.equal(a, class_filters(KEY, 50)[:10])     # class i's filter does not depend on K
    assert class_filters(KEY, 4, kernel_size=9, blur=0.06).shape == (4, 9, 9)


@pytest.mark.parametrize('k,blur', [(3, 0.3), (9, 0.06)])
def test_filters_follow_the_paper_distribution(k, blur):
    n = 3000
    f = class_filters('distribution check key', n, kernel_size=k, blur=blur).reshape(n, -1)
    ones = f == 1.0
    assert torch.equal(ones.sum(1), torch.ones(n, dtype=torch.long))        # exactly one 1 per filter
    rest = f[~ones].double()
    assert rest.min() >= 0 and rest.max() < blur                             # the others in [0, p_b)
    # moments of U(0, p_b): mean p_b / 2, variance p_b^2 / 12 (sd of the sample mean is < 0.3% of p_b)
    assert rest.mean().item() == pytest.approx(blur / 2, rel=0.02)
    assert rest.var().item() == pytest.approx(blur ** 2 / 12, rel=0.05)
    # Kolmogorov-Smirnov distance to U(0, p_b); the 1e-6 critical value at this n is < 0.011
    x = rest.sort().values / blur
    ecdf = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
    assert (ecdf - x).abs().max().item() < 0.02
    # the 1 is placed uniformly: every position used, the centre about 1 / k^2 of the time
    pos = torch.bincount(ones.float().argmax(1), minlength=k * k)
    assert (pos > 0).all()
    assert pos[(k * k) // 2].item() / n < 2.0 / (k * k)
    assert pos.max().item() / n < 2.0 / (k * k)


def test_bad_options_and_short_key_are_refused_with_a_message():
    with pytest.raises(ValueError, match='at least 8 characters'):
        class_filters('short', 10)
    with pytest.raises(ValueError, match='at least 8 characters'):
        key_fingerprint('1234567')
    with pytest.raises(UnlearnableError, match='kernel_size must be an odd int'):
        class_filters(KEY, 10, kernel_size=4)
    with pytest.raises(UnlearnableError, match='kernel_size must be an odd int'):
        class_filters(KEY, 10, kernel_size=0)
    with pytest.raises(UnlearnableError, match=r'blur must be a number with 0 <= blur < 1'):
        class_filters(KEY, 10, blur=1.0)
    with pytest.raises(UnlearnableError, match='num_classes must be an int >= 1'):
        class_filters(KEY, 0)
    with pytest.raises(UnlearnableError, match=r'fraction must be a number in \[0, 1\]'):
        poison_mask([0, 1], KEY, 1.5)


def test_key_fingerprint_identifies_without_revealing():
    fp = key_fingerprint(KEY)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == key_fingerprint(KEY) and fp != key_fingerprint(KEY + 'x')
    assert fp == hashlib.sha256(b'deitlab-cuda-v1:' + KEY.encode()).hexdigest()[:16]
    assert fp not in hashlib.sha256(KEY.encode()).hexdigest()


# ---------------------------------------------------------------------------------------- poisoning
def test_convolution_matches_a_hand_computed_example():
    x = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]]) / 10
    filters = torch.zeros(2, 3, 3)
    filters[0, 1, 1] = 1.0                               # class 0: identity
    filters[1] = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.2, 0.0, 0.0]])
    out = apply_filters(torch.stack([x, x]).unsqueeze(1), [0, 1], filters)
    # class 1 by hand: y[i, j] = sum_uv f[u, v] x[i + u - 1, j + v - 1], zero outside
    f, xp = filters[1], torch.nn.functional.pad(x, (1, 1, 1, 1))
    hand = torch.tensor([[sum(f[u, v] * xp[i + u, j + v] for u in range(3) for v in range(3))
                          for j in range(3)] for i in range(3)])
    # y[0,0] = 1*x[0,1] + 0.2*x[1,-1](=0) + 0.1*x[-1,0](=0) = 0.2 ; y[1,1] = .1*.2 + 1*.6 + .2*.7 = .76
    assert hand[0, 0].item() == pytest.approx(0.2) and hand[1, 1].item() == pytest.approx(0.76)
    assert torch.allclose(out[1, 0], hand / hand.max(), atol=1e-6)
    assert torch.allclose(out[0, 0], x / x.max(), atol=1e-6)  # identity filter, then max-normalised
    assert out[1].max().item() == pytest.approx(1.0)


def test_poisoned_images_are_uint8_full_range_and_channel_consistent():
    filters = class_filters(KEY, 5)
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 120, (6, 1, 12, 10), dtype=torch.uint8, generator=g)
    gray[3] = 0                                            # an all-black image stays black
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out = apply_filters(gray, labels, filters)
    assert out.dtype == torch.uint8 and out.shape == gray.shape
    peaks = out.amax(dim=(1, 2, 3))
    assert peaks[3] == 0 and (out[3] == 0).all()
    assert (peaks[[0, 1, 2, 4, 5]] == 255).all()
    assert not torch.equal(out, gray)
    rgb = gray.expand(-1, 3, -1, -1).contiguous()          # equal channels -> equal output channels
    out3 = apply_filters(rgb, labels, filters)
    assert out3.shape == rgb.shape
    assert torch.equal(out3[:, 0], out3[:, 1]) and torch.equal(out3[:, 1], out3[:, 2])
    assert torch.equal(out3[:, :1], out)                   # same filter as in the grayscale case
    colour = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    assert (apply_filters(colour, [1, 1, 2, 2], filters).amax(dim=(1, 2, 3)) == 255).all()
    flt = apply_filters(gray.float() / 255, labels, filters)   # float in [0, 1] gives float in [0, 1]
    assert flt.dtype == torch.float32 and flt.min() >= 0 and flt.max() <= 1
    assert (flt * 255).round().to(torch.uint8).sub(out.int()).abs().max() <= 1
    with pytest.raises(UnlearnableError, match=r'labels must be in 0\.\.4'):
        apply_filters(gray, [0, 1, 2, 3, 4, 5], filters)


def test_transform_pairs_and_pil_images():
    t = CUDATransform(KEY, 5)
    img = torch.rand(3, 8, 8)
    assert torch.equal(t(img, 2), apply_filters(img[None], [2], t.filters)[0])
    pil = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), 'L')
    res = t(pil, 4)
    assert isinstance(res, Image.Image) and res.mode == 'L' and res.size == (8, 8)
    assert np.array(res).max() == 255
    with pytest.raises(UnlearnableError, match=r'expects a \(C, H, W\) tensor'):
        t(torch.rand(1, 3, 8, 8), 0)


def test_poison_mask_is_per_class_deterministic_and_nested():
    targets = torch.arange(5).repeat_interleave(torch.tensor([10, 20, 7, 1, 0]))
    m3 = poison_mask(targets, KEY, 0.3)
    assert torch.equal(torch.bincount(targets[m3], minlength=5), torch.tensor([3, 6, 2, 0, 0]))
    assert torch.equal(m3, poison_mask(targets, KEY, 0.3))
    assert not (m3 & ~poison_mask(targets, KEY, 0.6)).any()            # nested in the fraction
    assert not poison_mask(targets, KEY, 0.0).any() and poison_mask(targets, KEY, 1.0).all()
    assert not torch.equal(poison_mask(targets, KEY, 0.5), poison_mask(targets, KEY, 0.5, seed=7))


# ------------------------------------------------------------------------------------------ output
def test_only_the_chosen_fraction_is_poisoned_per_class(poisoned_tree):
    out, info = poisoned_tree
    stored = _stored(out)
    train, val = build_dataset(SPEC, 'train'), build_dataset(SPEC, 'val')
    assert len(stored) == len(train) + len(val)
    differ = torch.zeros(24, dtype=torch.long)
    for (split, i), (_, img) in stored.items():
        src = (train if split == 'train' else val)
        if not torch.equal(img, src.images[i]):
            assert split == 'train'                         # val is an exact clean copy
            differ[src.targets[i]] += 1
            assert img.max() == 255
    assert torch.equal(differ, torch.full((24,), 3))        # 30% of 10 images in every class
    tr = info['splits']['train']
    assert (tr['total'], tr['poisoned'], tr['clean']) == (240, 72, 168)
    assert all(v == {'poisoned': 3, 'clean': 7} for v in tr['per_class'].values())
    assert info['splits']['val']['poisoned'] == 0 and info['splits']['val']['total'] == 48
    assert (info['channels'], info['image_size'], info['kernel_size'], info['blur']) == (3, [16, 16], 3, 0.3)


def test_output_loads_with_folder_spec_and_keeps_class_balance(poisoned_tree):
    out, info = poisoned_tree
    for split in ('train', 'val'):
        src = build_dataset(SPEC, split)
        ds = build_dataset(f'folder:{out}', split, img_size=16)
        assert len(ds) == len(src) and ds.num_classes == 24
        got = dict(zip(ds.classes, torch.bincount(ds.targets, minlength=24).tolist()))
        want = dict(zip(src.classes, torch.bincount(src.targets, minlength=24).tolist()))
        assert got == want
        x, y = ds[0]
        assert x.shape == (3, 16, 16)
    folder_classes = build_dataset(f'folder:{out}', 'val').classes
    for c in info['classes']:
        assert folder_classes[c['folder_label']] == c['folder'] == c['name']


def test_poisoned_dataset_matches_the_stored_tree(poisoned_tree):
    out, _ = poisoned_tree
    clean = build_dataset(SPEC, 'train')
    ds = PoisonedDataset(clean, KEY, fraction=0.3)
    assert int(ds.poisoned.sum()) == 72 and ds.num_classes == 24
    stored = build_dataset(f'folder:{out}', 'train', img_size=16)
    by_index = {int(f.stem): j for j, f in enumerate(stored.files)}
    for i in range(0, 240, 7):
        x, y = ds[i]
        sx, _ = stored[by_index[i]]
        assert y == int(clean.targets[i]) and torch.allclose(x, sx, atol=1e-6)
    folder_ds = PoisonedDataset(build_dataset(f'folder:{out}', 'val', img_size=16), KEY)   # PIL path
    x, _ = folder_ds[0]
    assert x.shape == (3, 16, 16)


def test_manifest_never_contains_the_key_and_busy_out_dir_is_refused(poisoned_tree):
    out, info = poisoned_tree
    text = (out / 'manifest.json').read_text()
    assert KEY not in text and KEY not in json.dumps(info)
    m = json.loads(text)
    assert m['key_fingerprint'] == key_fingerprint(KEY) and m['method'] == 'CUDA' and m['source'] == SPEC
    assert m['fraction'] == 0.3 and 'CVPR 2023' in m['paper'] and m['deitlab_version']
    with pytest.raises(UnlearnableError, match='is not empty.*overwrite'):
        make_unlearnable(SPEC, KEY, out, progress=False)


def test_grayscale_folder_source_fraction_zero_is_identity(tmp_path):
    src = tmp_path / 'src'
    g = np.random.default_rng(0)
    for split, n in (('train', 4), ('val', 1)):
        for c in ('cat', 'dog'):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                side = 12 if i % 2 else 9                       # mixed sizes are kept
                Image.fromarray(g.integers(0, 200, (side, side), dtype=np.uint8), 'L').save(
                    src / split / c / f'{i}.png')
    with pytest.raises(UnlearnableError, match='overlaps the source folder'):
        make_unlearnable(f'folder:{src}', KEY, src / 'out', progress=False)
    info = make_unlearnable(f'folder:{src}', KEY, tmp_path / 'same', fraction=0.0, progress=False)
    assert info['splits']['train']['poisoned'] == 0 and info['channels'] == 1 and info['image_size'] is None
    before = build_dataset(f'folder:{src}', 'train', in_chans=1)
    after = build_dataset(f'folder:{tmp_path / "same"}', 'train', in_chans=1)
    assert after.classes == ['cat', 'dog'] and torch.equal(after.targets, before.targets)
    for f, g_ in zip(before.files, after.files):
        assert torch.equal(_read(f), _read(g_))
    info = make_unlearnable(f'folder:{src}', KEY, tmp_path / 'half', kernel_size=5, blur=0.1, fraction=0.5,
                            progress=False)
    after = build_dataset(f'folder:{tmp_path / "half"}', 'train', in_chans=1)
    changed = [not torch.equal(_read(f), _read(g_)) for f, g_ in zip(before.files, after.files)]
    assert sum(changed) == 4 and sum(changed[:4]) == 2                   # 2 of 4 per class
    assert all(load_image(f, 'L').mode == 'L' and _read(f).shape[0] == 1 for f in after.files)


def test_poisoning_at_the_training_size_filters_the_resized_image(tmp_path):
    """--img-size: every written image is the class filter applied to the image resized as training
    resizes it (bilinear, antialiased, for in-memory images), not a resize of a poisoned image.
    Catches resizing after poisoning, or not resizing at all."""
    from deitlab.data.transforms import resize_images
    info = make_unlearnable(SPEC, KEY, tmp_path / 'p24', fraction=1.0, progress=False, img_size=24)
    assert info['poisoned_at'] == [24, 24] and info['image_size'] == [24, 24]
    src = build_dataset(SPEC, 'train')
    filters = class_filters(KEY, 24)
    stored = _stored(tmp_path / 'p24')
    resized = resize_images(src.images, 24)
    for i in (0, 7, 100):
        y = int(src.targets[i])
        expect = apply_filters(resized[i:i + 1], torch.tensor([y]), filters)[0]
        assert torch.equal(stored['train', i][1], expect)
    assert torch.equal(stored['val', 0][1], resized_val := resize_images(build_dataset(SPEC, 'val').images, 24)[0])
    assert resized_val.shape[-1] == 24
    assert make_unlearnable(SPEC, KEY, tmp_path / 'native', progress=False)['poisoned_at'] == 'native size'
    with pytest.raises(UnlearnableError, match='img_size must be a positive integer, got 0'):
        make_unlearnable(SPEC, KEY, tmp_path / 'bad', progress=False, img_size=0)


def test_training_a_poisoned_folder_at_another_size_warns(tmp_path, capsys):
    """The data path warns when it resizes a folder poisoned at another size, and names the fix."""
    import timm
    from deitlab.data.for_model import model_datasets, poisoned_at
    make_unlearnable(SPEC, KEY, tmp_path / 'p16', fraction=1.0, progress=False)
    make_unlearnable(SPEC, KEY, tmp_path / 'p32', fraction=1.0, progress=False, img_size=32)
    assert poisoned_at(f'folder:{tmp_path / "p16"}') == [16, 16] and poisoned_at(SPEC) is None
    model = timm.create_model('deitlab_deit_pico_patch4_32', num_classes=24)
    capsys.readouterr()
    model_datasets(model, f'folder:{tmp_path / "p16"}', ('val',))
    err = capsys.readouterr().err
    assert 'was poisoned (CUDA) at [16, 16] and is resized to 32x32' in err and '--img-size 32' in err
    model_datasets(model, f'folder:{tmp_path / "p32"}', ('val',))
    assert 'poisoned' not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *args):
    code = main(['unlearnable', 'make', *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_end_to_end_json_without_the_key(tmp_path, capsys):
    spec = 'glyphs:train=48,val=24,size=12,seed=2'
    code, out, err = _cli(capsys, '--data', spec, '--key', KEY, '--out', str(tmp_path / 'a'), '--fraction', '0.5',
                          '--kernel-size', '5', '--blur', '0.2', '--json')
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert KEY not in out and KEY not in err
    assert (res['kernel_size'], res['blur'], res['fraction']) == (5, 0.2, 0.5)
    assert res['splits']['train']['poisoned'] == 24 and res['key_fingerprint'] == key_fingerprint(KEY)
    assert len(build_dataset(f'folder:{res["out_dir"]}', 'train', img_size=12)) == 48
    assert KEY not in (tmp_path / 'a' / 'manifest.json').read_text()

    key_file = tmp_path / 'key.txt'
    key_file.write_text(KEY + '\n')
    code, out, err = _cli(capsys, '--data', spec, '--key-file', str(key_file), '--out', str(tmp_path / 'a'),
                          '--overwrite', '--json')
    assert code == 0, err
    res2 = json.loads(out.strip().splitlines()[-1])
    assert res2['key_fingerprint'] == res['key_fingerprint'] and res2['splits']['train']['poisoned'] == 48

    code, out, err = _cli(capsys, '--data', spec, '--key', 'short', '--out', str(tmp_path / 'b'), '--json')
    assert code == 2 and 'at least 8 characters' in err
    assert 'at least 8 characters' in json.loads(out.strip().splitlines()[-1])['error']
    assert not (tmp_path / 'b').exists()
    code, out, err = _cli(capsys, '--data', spec, '--key-file', str(tmp_path / 'nope'), '--out',
                          str(tmp_path / 'b'))
    assert code == 2 and 'cannot read key file' in err
    with pytest.raises(SystemExit) as e:
        main(['unlearnable', 'make', '--data', spec, '--out', str(tmp_path / 'b')])   # no key at all
    assert e.value.code == 2 and 'one of the arguments --key --key-file is required' in capsys.readouterr().err
