"""deitlab.papyri.simclr: NT-Xent against a hand computation (and lightly's, when installed), its
gradient, the two views of a window as each other's positives, the windows and views drawn from
the seed alone, the glyph-safe views (no flip, no hue), the run directory (a backbone without head
that deitlab train fine-tunes), resume to the weights of an unbroken run, bad settings."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from deitlab.papyri.config import PapyriError, SynthConfig
from deitlab.papyri.refine_config import SimCLRConfig
from deitlab.papyri.simclr import (GlyphViews, NTXent, PageWindows, SimCLRNet, SimCLRStep, build_backbone, nt_xent,
                                   pretrain_simclr, resolve_backend)
from deitlab.papyri.synth import synthesize
from deitlab.train.loop import Hooks, Trainer

HAVE_LIGHTLY = importlib.util.find_spec('lightly') is not None
TINY_RESNET = dict(model='resnet18', model_kwargs={'channels': [8, 16, 32, 64]}, img_size=32)


@pytest.fixture(scope='module')
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp('simclr') / 'pages'
    synthesize(SynthConfig(pages=2, out=str(out), seed=4, progress=False, size='128x96', lines=3, letters=8))
    return out / 'images'


def _hand_nt_xent(z1, z2, tau):
    """SimCLR's eq. 1 with loops: views 0..N-1 are z1, N..2N-1 are z2; view i's partner is i +- N."""
    views = [list(map(float, v)) for v in list(z1) + list(z2)]
    n = len(z1)

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(cos(views[i], views[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(views[i], views[j]) / tau) / denominator)
    return total / (2 * n)


def test_nt_xent_equals_the_hand_computation_on_four_samples():
    # identical views of four orthogonal projections: every view has cosine 1 with its partner and 0 with the
    # six others, so l = -log(e^(1/tau) / (e^(1/tau) + 6)) = log(1 + 6 e^(-1/tau)) for all eight views
    z = torch.eye(4) * torch.tensor([[1.], [2.], [3.], [4.]])   # lengths do not matter: cosine similarity
    for tau in (0.5, 0.2, 1.0):
        assert nt_xent(z, z.clone(), tau).item() == pytest.approx(math.log(1 + 6 * math.exp(-1 / tau)), rel=1e-6)
    # and any four pairs: the loops of eq. 1
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(_hand_nt_xent(z1, z2, 0.2), rel=1e-5)
    # swapping the views of every pair changes nothing; pairing the wrong views costs more
    assert nt_xent(z2, z1, 0.2).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), rel=1e-6)
    z = torch.eye(4)
    assert nt_xent(z, z, 0.2) < nt_xent(z, z[[1, 2, 3, 0]], 0.2)


def test_nt_xent_gradient_is_finite_and_the_module_matches_the_function():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 8, generator=g, requires_grad=True)
    z2 = torch.randn(4, 8, generator=g, requires_grad=True)
    loss = nt_xent(z1, z2, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert z1.grad.abs().sum() > 0
    same = torch.eye(4).requires_grad_()   # at the hand case too (exp of -inf on the diagonal is kept out)
    nt_xent(same, same, 0.2).backward()
    assert torch.isfinite(same.grad).all()
    assert NTXent(0.2, 'native')(z1, z2).item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r'nt_xent needs two \(N, D\) projections with N >= 2'):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3))


@pytest.mark.skipif(not HAVE_LIGHTLY, reason="lightly (the simclr extra) is not installed")
def test_lightly_ntxent_is_the_same_loss():
    g = torch.Generator().manual_seed(2)
    for n, d in ((4, 3), (16, 32)):
        z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        for tau in (0.1, 0.5):
            assert NTXent(tau, 'lightly')(z1, z2).item() == pytest.approx(nt_xent(z1, z2, tau).item(), rel=1e-5)
    assert resolve_backend('auto') == 'lightly'


def test_backend_lightly_without_lightly_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'lightly' else object())
    assert resolve_backend('auto') == 'native'
    with pytest.raises(PapyriError, match=r"backend lightly needs the lightly package: pip install 'deitlab\[simclr\]'"):
        resolve_backend('lightly')


class _Code(nn.Module):
    """A 'model' that reads the code written in the first pixels of a view."""
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, 0, 0, :6] * self.p


def test_the_two_views_of_a_window_are_each_others_positives():
    """SimCLRStep stacks first views then second views, and NT-Xent pairs row k with row B + k: with the
    two views of each image carrying that image's code (and a little noise), every view finds its
    partner and the loss is near its minimum; any other pairing of the same views costs far more."""
    g = torch.Generator().manual_seed(3)
    b = 6
    x = torch.zeros(b, 2, 3, 4, 6)
    for k in range(b):
        x[k, :, 0, 0, k] = 1.0
    x[:, 1] += 0.05 * torch.randn(b, 3, 4, 6, generator=g)   # the second view differs a little
    step = SimCLRStep(NTXent(0.1, 'native'))
    trainer = Trainer(_Code(), torch.optim.SGD(_Code().parameters(), lr=0.0), hooks=[step], progress=False)
    stacked, _ = step.on_batch(x, torch.zeros(b))
    assert torch.equal(stacked[:b], x[:, 0]) and torch.equal(stacked[b:], x[:, 1])
    _, loss = trainer.forward_loss(stacked, torch.zeros(b))
    assert step.hits == 2 * b   # contrastive top-1: 100 %
    crossed = nt_xent(stacked[:b, 0, 0, :6], stacked[b:, 0, 0, :6][torch.roll(torch.arange(b), 1)], 0.1)
    assert loss.item() < 0.01 < 1.0 < crossed.item()


def test_glyph_views_never_flip_nor_shift_hue():
    """Only the random resized crop moves pixels: with scale 1 and no rotation, jitter or blur a view is
    the window resized, never mirrored; and the views hold no hue jitter (lightly's too)."""
    window = Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3))
    views = GlyphViews(32, (0.0,) * 3, (1.0,) * 3, min_scale=1.0, rotation=0.0, jitter=0.0, grayscale=0.0, blur=0.0,
                       backend='native')
    torch.manual_seed(0)
    pair = views(window)
    want = torch.from_numpy(np.array(window)).permute(2, 0, 1).float() / 255
    assert pair.shape == (2, 3, 32, 32)
    # scale 1 keeps the whole window (no other square crop has all its area)
    assert torch.allclose(pair[0], want, atol=0.15) and torch.allclose(pair[1], want, atol=0.15)
    assert not torch.allclose(pair[0], want.flip(-1), atol=0.15)
    names = [type(t).__name__ for t in GlyphViews(32, (0.5,) * 3, (0.5,) * 3, backend='native').view.transforms]
    assert 'RandomHorizontalFlip' not in names and 'RandomVerticalFlip' not in names
    jitter = next(t for t in GlyphViews(32, (0.5,) * 3, (0.5,) * 3, backend='native').view.transforms
                  if type(t).__name__ == 'RandomApply').transforms[0]
    assert jitter.hue is None and jitter.brightness == (0.6, 1.4)
    if HAVE_LIGHTLY:
        lightly_view = GlyphViews(32, (0.5,) * 3, (0.5,) * 3, backend='lightly').transform.transforms[0].transform
        steps = lightly_view.transforms
        assert [t.p for t in steps if 'Flip' in type(t).__name__] == [0.0, 0.0]
        cj = next(t for t in steps if type(t).__name__ == 'RandomApply' and 'ColorJitter' in repr(t.transforms))
        assert cj.transforms[0].hue is None


def test_windows_and_their_views_come_from_the_seed_alone(pages):
    views = GlyphViews(32, (0.5,) * 3, (0.5,) * 3, backend='native')
    a = PageWindows([pages / 'page_0000.png', pages / 'page_0001.png'], (16, 40), views, length=4, seed=5)
    b = PageWindows([pages / 'page_0000.png', pages / 'page_0001.png'], (16, 40), views, length=4, seed=5)
    torch.manual_seed(123)
    first = [a[i][0] for i in range(4)]
    torch.manual_seed(999)   # the global random state is not used
    assert all(torch.equal(x, b[i][0]) for i, x in enumerate(first))
    assert first[0].shape == (2, 3, 32, 32) and not torch.equal(first[0][0], first[0][1])   # two views differ
    sides = {a.window_at(i).size for i in range(20)}
    assert all(w == h and 16 <= w <= 40 for w, h in sides)
    a.set_epoch(1)
    assert not torch.equal(a[0][0], first[0])


def _cfg(pages, out, **kw):
    base = dict(images=(str(pages),), out=str(out), window='16,32', epochs=2, steps=2, batch_size=8, progress=False,
                backend='native', **TINY_RESNET)
    return SimCLRConfig(**{**base, **kw})


class _Interrupt(Hooks):
    def __init__(self, n):
        self.n = n

    def after_epoch(self, epoch, row):
        if epoch + 1 == self.n:
            raise KeyboardInterrupt


def test_pretraining_writes_the_backbone_without_its_head_as_a_run_directory(pages, tmp_path, one_thread):
    from deitlab.rundir import create
    out = tmp_path / 'simclr'
    summary = pretrain_simclr(_cfg(pages, out))
    assert {p.name for p in out.iterdir()} == {'config.json', 'model.safetensors', 'metrics.jsonl', 'summary.json',
                                              'checkpoint.pt', 'simclr_config.json'}
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18' and config['num_classes'] == 0   # the projection head dropped
    assert config['model_args'] == {'channels': [8, 16, 32, 64]} and config['pretrained_cfg']['input_size'] == [3, 32, 32]
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2] and all(np.isfinite(r['train_loss']) for r in rows)
    assert summary['updates'] == 4 and summary['backend'] == 'native' and 0 <= summary['contrastive_top1'] <= 100
    backbone = create(str(out)).eval()
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert any(k.startswith('head.') for k in ckpt['model'])
    assert all(torch.equal(backbone.state_dict()[k], ckpt['model']['backbone.' + k]) for k in backbone.state_dict())
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_resume_continues_to_the_weights_of_an_unbroken_run(pages, tmp_path, one_thread):
    from safetensors.torch import load_file
    pretrain_simclr(_cfg(pages, tmp_path / 'whole', epochs=3))
    with pytest.raises(KeyboardInterrupt):
        pretrain_simclr(_cfg(pages, tmp_path / 'part', epochs=3), hooks=[_Interrupt(2)])
    with pytest.raises(PapyriError, match=r'already holds a SimCLR checkpoint; pass --resume'):
        pretrain_simclr(_cfg(pages, tmp_path / 'part', epochs=3))
    with pytest.raises(Exception, match=r'cannot resume .*temperature: saved 0.2 vs now 0.5'):
        pretrain_simclr(_cfg(pages, tmp_path / 'part', epochs=3, temperature=0.5, resume=True))
    summary = pretrain_simclr(_cfg(pages, tmp_path / 'part', epochs=3, resume=True))
    whole = load_file(str(tmp_path / 'whole' / 'model.safetensors'))
    part = load_file(str(tmp_path / 'part' / 'model.safetensors'))
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    rows = [json.loads(line) for line in (tmp_path / 'part' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2, 3] and summary['updates'] == 6


def test_the_projection_head_maps_the_pooled_features():
    backbone = build_backbone('resnet18', 32, {'channels': [8, 16, 32, 64]})
    net = SimCLRNet(backbone, proj_dim=5).eval()
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 5) and backbone.num_classes == 0


def test_bad_settings_are_refused(pages, tmp_path):
    with pytest.raises(PapyriError, match=r"model must be a timm ResNet \(resnet18, resnet50, ...\), got 'vit_tiny'"):
        _cfg(pages, tmp_path / 'o', model='vit_tiny').validate()
    with pytest.raises(PapyriError, match=r'window must be two numbers LOW,HIGH'):
        _cfg(pages, tmp_path / 'o', window='small').validate()
    with pytest.raises(PapyriError, match=r'window: the smallest window must be at least 4 px'):
        _cfg(pages, tmp_path / 'o', window='2,8').validate()
    with pytest.raises(PapyriError, match=r'temperature must be > 0'):
        _cfg(pages, tmp_path / 'o', temperature=0).validate()
    with pytest.raises(PapyriError, match=r'backend must be one of auto, native, lightly'):
        _cfg(pages, tmp_path / 'o', backend='torch').validate()
    with pytest.raises(PapyriError, match=r"cannot build resnet18 with \{'depth': 3\}"):
        pretrain_simclr(_cfg(pages, tmp_path / 'o', model_kwargs={'depth': 3}))
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'notes.txt').write_text('mine')
    with pytest.raises(PapyriError, match=r'foreign is not empty \(notes.txt\) and holds no SimCLR run'):
        pretrain_simclr(_cfg(pages, tmp_path / 'foreign'))
    assert (tmp_path / 'foreign' / 'notes.txt').read_text() == 'mine'


# ------------------------------------------------------------------------------------------ linear probe
def test_the_linear_probe_separates_separable_features_and_not_noise():
    from deitlab.papyri.probe import linear_probe
    g = np.random.default_rng(0)
    centres = g.normal(size=(4, 8)) * 5
    y = np.repeat(np.arange(4), 30)
    x = centres[y] + g.normal(size=(120, 8))
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2], 4) == 100.0
    noise = g.normal(size=(120, 8))
    assert linear_probe(noise[::2], y[::2], noise[1::2], y[1::2], 4) < 50.0
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2], 4) == linear_probe(x[::2], y[::2], x[1::2], y[1::2], 4)


def test_probe_crops_encodes_a_backbone_on_a_crops_dataset(pages, tmp_path, one_thread):
    from deitlab.papyri.crops import write_crops
    from deitlab.papyri.probe import encode, probe_crops
    from deitlab.papyri.refine_config import CropsConfig
    write_crops(CropsConfig(data=str(pages.parent), out=str(tmp_path / 'crops'), size=32, progress=False))
    torch.manual_seed(0)
    backbone = build_backbone('resnet18', 32, {'channels': [8, 16, 32, 64]})
    result = probe_crops(backbone, tmp_path / 'crops')
    assert result['features'] == 64 and result['train'] > result['test'] > 0 and 0 <= result['top1'] <= 100
    from deitlab.data.for_model import model_datasets
    train, _ = model_datasets(backbone, f'folder:{tmp_path / "crops"}')
    feats, labels = encode(backbone, train)
    assert feats.shape == (len(train), 64) and labels.tolist() == train.targets.tolist() and backbone.training
