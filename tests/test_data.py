"""Tests of deitlab.data: glyphs, fashion-mnist, folder, transforms and error messages."""
import gzip
import os
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deitlab.data import DataError, build_dataset, dataset_info
from deitlab.data import fashion_mnist, glyphs

SMALL = 'glyphs:train=240,val=48'


# ------------------------------------------------------------------------------------------ glyphs
def test_glyphs_deterministic_per_seed():
    a, la = glyphs.generate_glyphs(64, 32, seed=3, split='train')
    b, lb = glyphs.generate_glyphs(64, 32, seed=3, split='train')
    c, _ = glyphs.generate_glyphs(64, 32, seed=4, split='train')
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_glyphs_train_and_val_differ():
    tr = build_dataset(SMALL, 'train')
    va = build_dataset(SMALL, 'val')
    assert len(tr) == 240 and len(va) == 48
    assert not torch.equal(tr.images[:48], va.images)
    # no val image is an exact copy of a train image
    flat_tr = {bytes(x.numpy().tobytes()) for x in tr.images}
    assert not any(x.numpy().tobytes() in flat_tr for x in va.images)


def test_glyphs_seed_in_spec_and_argument():
    a = build_dataset('glyphs:train=48,val=24,seed=5', 'train')
    b = build_dataset('glyphs:train=48,val=24', 'train', seed=5)
    c = build_dataset('glyphs:train=48,val=24', 'train', seed=6)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_glyphs_classes_balanced():
    ds = build_dataset(SMALL, 'train')
    assert ds.num_classes == 24 and ds.classes[0] == 'alpha' and ds.classes[-1] == 'omega'
    assert ds.targets.dtype == torch.long and ds.targets.shape == (240,)
    assert torch.bincount(ds.targets, minlength=24).tolist() == [10] * 24


@pytest.mark.parametrize('in_chans', [1, 3])
@pytest.mark.parametrize('img_size', [28, 32])
def test_glyphs_shapes_and_range(in_chans, img_size):
    ds = build_dataset(SMALL, 'val', img_size=img_size, in_chans=in_chans)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (in_chans, img_size, img_size)
    assert isinstance(y, int) and 0 <= y < 24
    batch = torch.stack([ds[i][0] for i in range(len(ds))])
    assert batch.min() >= -1.0 - 1e-5 and batch.max() <= 1.0 + 1e-5
    assert -0.5 < batch.mean() < 0.8  # light papyrus, some dark ink
    assert batch.std() > 0.1


def test_glyphs_other_size_option():
    ds = build_dataset('glyphs:train=24,val=24,size=48', 'train')
    assert ds[0][0].shape == (3, 48, 48)
    assert dataset_info('glyphs:size=48').img_size == 48


def test_glyph_fonts_are_real():
    fonts = glyphs.find_fonts('bundled')
    names = [os.path.basename(f) for f in fonts]
    assert len(fonts) >= 8 and 'DejaVuSans.ttf' in names
    assert not any(n.startswith(('LastResort', 'cm', 'STIXSiz')) for n in names)
    assert len(glyphs.find_fonts('system')) >= len(fonts)
    atlas = glyphs.glyph_atlas(fonts[:2], 64)
    assert atlas.shape == (2, 24, glyphs.NUM_WEIGHTS, 64, 64)
    # heavier weights have more ink
    ink = atlas.sum(dim=(-1, -2))
    assert (ink[:, :, 1:] >= ink[:, :, :-1]).all()


def test_render_glyph_any_size():
    patch = glyphs.render_glyph('omega', 80, seed=1)
    assert patch.shape == (3, 80, 80) and 0 <= patch.min() and patch.max() <= 1
    gray = patch.mean(0)
    assert gray[20:60, 20:60].min() < gray[:5, :5].mean() - 0.2  # dark ink in the middle
    tex = glyphs.papyrus_texture(2, 40, 100, torch.Generator().manual_seed(0))
    assert tex.shape == (2, 3, 40, 100)


@pytest.mark.slow
def test_glyphs_default_generation_time():
    t = time.perf_counter()
    a, _ = glyphs.generate_glyphs(12000, 32, 0, 'train')
    b, _ = glyphs.generate_glyphs(2400, 32, 0, 'val')
    print(f'glyphs 12000 + 2400 at 32 px: {time.perf_counter() - t:.2f} s')
    assert a.shape == (12000, 3, 32, 32) and b.shape == (2400, 3, 32, 32)


# ----------------------------------------------------------------------------------- fashion-mnist
def _write_idx(path, magic, array, gz):
    data = struct.pack('>I', magic) + b''.join(struct.pack('>I', d) for d in array.shape)
    data += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + '.gz')
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _fake_fashion(root, gz=True, n_train=20, n_val=10):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (('train', n_train), ('t10k', n_val)):
        images = rng.integers(0, 256, (n, 28, 28))
        images[0] = 255
        _write_idx(root / f'{prefix}-images-idx3-ubyte', 0x803, images, gz)
        _write_idx(root / f'{prefix}-labels-idx1-ubyte', 0x801, np.arange(n) % 10, gz)
    return root


@pytest.mark.parametrize('gz', [True, False])
def test_fashion_mnist_fake_idx(tmp_path, gz):
    root = _fake_fashion(tmp_path / 'fm', gz=gz)
    tr = build_dataset(f'fashion-mnist:{root}', 'train', in_chans=1)
    va = build_dataset(f'fashion-mnist:{root}', 'val', in_chans=3, img_size=32)
    assert len(tr) == 20 and len(va) == 10
    assert tr.classes[0] == 'T-shirt/top' and tr.num_classes == 10
    assert tr.targets.tolist() == [i % 10 for i in range(20)]
    x, y = tr[0]
    assert x.shape == (1, 28, 28) and y == 0
    assert torch.allclose(x, torch.ones_like(x))  # pixel 255 -> (1 - 0.5) / 0.5
    x3, _ = va[1]
    assert x3.shape == (3, 32, 32) and torch.equal(x3[0], x3[2])


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    root = _fake_fashion(tmp_path / 'env', n_train=30)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(root))
    assert len(build_dataset('fashion-mnist', 'train')) == 30


def test_fashion_mnist_corrupt_magic(tmp_path):
    root = _fake_fashion(tmp_path / 'bad', gz=False)
    path = root / 'train-labels-idx1-ubyte'
    raw = bytearray(path.read_bytes())
    raw[3] = 0x07
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match='train-labels-idx1-ubyte.*magic'):
        build_dataset(f'fashion-mnist:{root}', 'train')


def test_fashion_mnist_truncated(tmp_path):
    root = _fake_fashion(tmp_path / 'trunc', gz=False)
    path = root / 't10k-images-idx3-ubyte'
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match='t10k-images-idx3-ubyte.*truncated'):
        build_dataset(f'fashion-mnist:{root}', 'val')


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, 'SYSTEM_DIRS', [str(tmp_path / 'no-system-copy')])
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    with pytest.raises(DataError, match='dataset-fashion-mnist') as e:
        build_dataset('fashion-mnist', 'train')
    assert 'no-system-copy' in str(e.value) and 'download=True' in str(e.value)
    with pytest.raises(DataError, match='nowhere'):
        build_dataset(f'fashion-mnist:{tmp_path / "nowhere"}', 'val')


@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs apt-get install dataset-fashion-mnist')
def test_fashion_mnist_real(monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    tr = build_dataset('fashion-mnist', 'train')
    va = build_dataset('fashion-mnist', 'val')
    assert len(tr) == 60000 and len(va) == 10000
    assert torch.bincount(tr.targets).tolist() == [6000] * 10
    assert tr[0][0].shape == (3, 28, 28)


# ------------------------------------------------------------------------------------------ folder
def _image(path, size=(40, 30), mode='RGB', color=(200, 50, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == 'RGB' else 128).save(path)


def _tree(root):
    _image(root / 'train' / 'cat' / 'a.png')
    _image(root / 'train' / 'cat' / 'sub' / 'b.JPG', size=(20, 50))
    _image(root / 'train' / 'dog' / 'c.png', mode='L')
    (root / 'train' / 'dog' / 'notes.txt').write_text('not an image')
    _image(root / 'val' / 'dog' / 'd.bmp', mode='L')
    return root


def test_folder_classes_targets_shapes(tmp_path):
    root = _tree(tmp_path / 'data')
    tr = build_dataset(f'folder:{root}', 'train', img_size=32)
    assert tr.classes == ['cat', 'dog'] and tr.num_classes == 2
    assert tr.targets.tolist() == [0, 0, 1] and len(tr) == 3
    for i in range(3):
        x, y = tr[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    gray, _ = tr[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # gray -> 3 channels
    va = build_dataset(f'folder:{root}', 'val', img_size=32)
    assert va.classes == ['cat', 'dog'] and va.targets.tolist() == [1]
    one = build_dataset(f'folder:{root}', 'train', img_size=16, in_chans=1)
    x, _ = one[0]  # RGB -> luminance
    lum = (0.299 * 200 + 0.587 * 50 + 0.114 * 10) / 255
    assert x.shape == (1, 16, 16) and torch.allclose(x, torch.full_like(x, (lum - 0.5) / 0.5), atol=0.01)
    assert build_dataset(f'folder:{root}', 'val')[0][0].shape == (3, 224, 224)
    info = dataset_info(f'folder:{root}')
    assert info.classes == ('cat', 'dog') and info.img_size is None and info.default_hflip == 0.5
    assert info.native_size is None   # 40x30 and 20x50 files
    assert info.resize_note(32) == ("images have several sizes, resized (shorter side) and centre-cropped to the "
                                    "model's 32x32")
    (root / 'train' / 'cat' / 'sub' / 'b.JPG').unlink()
    info = dataset_info(f'folder:{root}')
    assert info.native_size == (30, 40)   # (height, width)
    assert info.resize_note(32) == "images are 30x40, resized (shorter side) and centre-cropped to the model's 32x32"


def test_folder_validation_name(tmp_path):
    root = tmp_path / 'data'
    _image(root / 'train' / 'a' / '1.png')
    _image(root / 'train' / 'b' / '1.png')
    _image(root / 'validation' / 'a' / '2.png')
    _image(root / 'validation' / 'b' / '2.png')
    assert len(build_dataset(f'folder:{root}', 'val', img_size=8)) == 2


def test_folder_missing_path(tmp_path):
    with pytest.raises(DataError, match='dataset path does not exist: .*missing'):
        build_dataset(f'folder:{tmp_path / "missing"}', 'train')
    with pytest.raises(DataError, match='folder needs a path'):
        build_dataset('folder', 'train')


def test_folder_missing_split(tmp_path):
    root = tmp_path / 'data'
    _image(root / 'train' / 'a' / '1.png')
    _image(root / 'train' / 'b' / '1.png')   # two classes: one is refused
    with pytest.raises(DataError, match=r'no val/ or validation/ folder .*found: train'):
        build_dataset(f'folder:{root}', 'val')


def test_folder_no_class_folders(tmp_path):
    root = tmp_path / 'data'
    _image(root / 'train' / '1.png')
    with pytest.raises(DataError, match='no class folders in .*train.*1.png'):
        build_dataset(f'folder:{root}', 'train')


def test_folder_empty_class(tmp_path):
    root = tmp_path / 'data'
    _image(root / 'train' / 'a' / '1.png')
    (root / 'train' / 'empty').mkdir()
    (root / 'train' / 'empty' / 'readme.md').write_text('x')
    with pytest.raises(DataError, match=r'class folder .*empty has no images'):
        build_dataset(f'folder:{root}', 'train')


def test_folder_corrupt_image_named(tmp_path):
    root = tmp_path / 'data'
    _image(root / 'train' / 'a' / '1.png')
    _image(root / 'train' / 'b' / '1.png')   # two classes: one is refused
    (root / 'train' / 'a' / '2.jpg').write_bytes(b'definitely not a jpeg')
    ds = build_dataset(f'folder:{root}', 'train', img_size=8)
    ds[0]
    with pytest.raises(DataError, match=r'cannot read image .*2\.jpg'):
        ds[1]


def test_folder_unknown_val_class(tmp_path):
    root = tmp_path / 'data'
    _image(root / 'train' / 'a' / '1.png')
    _image(root / 'train' / 'b' / '1.png')   # two classes: one is refused
    _image(root / 'val' / 'zebra' / '1.png')
    with pytest.raises(DataError, match='not in train/: zebra'):
        build_dataset(f'folder:{root}', 'val')


# ------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize('aug', ['light', 'deit'])
@pytest.mark.parametrize('in_chans', [1, 3])
def test_aug_shapes(tmp_path, aug, in_chans):
    ds = build_dataset(SMALL, 'train', aug=aug, in_chans=in_chans, img_size=28)
    xs = torch.stack([ds[i][0] for i in range(8)])
    assert xs.shape == (8, in_chans, 28, 28) and torch.isfinite(xs).all()
    root = _tree(tmp_path / 'data')
    fds = build_dataset(f'folder:{root}', 'train', aug=aug, in_chans=in_chans, img_size=24)
    assert fds[0][0].shape == (in_chans, 24, 24)


@pytest.mark.parametrize('aug', ['light', 'deit'])
def test_aug_reproducible_from_torch_seed(aug):
    ds = build_dataset(SMALL, 'train', aug=aug, hflip=0.5)
    torch.manual_seed(0)
    a = torch.stack([ds[i][0] for i in range(16)])
    torch.manual_seed(0)
    b = torch.stack([ds[i][0] for i in range(16)])
    assert torch.equal(a, b)
    plain = build_dataset(SMALL, 'train')
    assert not torch.equal(a, torch.stack([plain[i][0] for i in range(16)]))

    def epoch(num_workers):
        g = torch.Generator().manual_seed(1)
        return list(DataLoader(ds, batch_size=8, shuffle=True, generator=g, num_workers=num_workers))

    torch.manual_seed(2)  # in-process loading draws from the global RNG
    first = epoch(0)
    torch.manual_seed(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, epoch(0)))
    if aug == 'light':  # workers are seeded from the loader's generator alone
        first = epoch(2)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(2)))


def test_light_crop_and_flip():
    from deitlab.data.transforms import TensorTransform
    img = torch.arange(16, dtype=torch.uint8).view(1, 4, 4) + 10
    tt = TensorTransform(4, [0.0], [1 / 255], train=True, pad=1, hflip=1.0)  # output = pixel value
    expected = set()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = torch.zeros(1, 6, 6, dtype=torch.uint8)
            shifted[:, 1:5, 1:5] = img
            crop = shifted[:, 1 + dy:5 + dy, 1 + dx:5 + dx].flip(-1)
            expected.add(tuple(crop.flatten().float().tolist()))
    torch.manual_seed(0)
    seen = {tuple(tt(img).flatten().tolist()) for _ in range(200)}
    assert seen == expected


# ------------------------------------------------------------------------------------------ errors
def test_error_messages():
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'.*glyphs, fashion-mnist, folder"):
        build_dataset('imagenet', 'train')
    with pytest.raises(DataError, match=r"unknown split 'test'.*'train', 'val'"):
        build_dataset(SMALL, 'test')
    with pytest.raises(DataError, match=r"unknown aug 'strong'.*'none', 'light', 'deit'"):
        build_dataset(SMALL, 'train', aug='strong')
    with pytest.raises(DataError, match=r"bad option 'colour=red'.*train, val, size, seed, fonts"):
        dataset_info('glyphs:colour=red')
    with pytest.raises(DataError, match='needs an integer'):
        build_dataset('glyphs:train=many', 'train')
    with pytest.raises(DataError, match="fonts must be 'bundled' or 'system'"):
        build_dataset('glyphs:fonts=comic', 'train')
    with pytest.raises(DataError, match='in_chans must be 1 or 3'):
        build_dataset(SMALL, 'train', in_chans=2)
    with pytest.raises(DataError, match='hflip'):
        build_dataset(SMALL, 'train', hflip=2.0)
    assert issubclass(DataError, ValueError)


def test_dataset_info_cheap():
    info = dataset_info('glyphs')
    assert (info.num_classes, info.img_size, info.in_chans, info.default_hflip) == (24, 32, 3, 0.0)
    info = dataset_info('fashion-mnist:/does/not/matter')
    assert (info.num_classes, info.img_size, info.in_chans, info.default_hflip) == (10, 28, 1, 0.5)
    assert info.native_size == (28, 28) and info.resize_note(28) is None
    assert info.resize_note(32) == "images are 28x28, resized to the model's 32x32"
