"""--mix patchmix: deitlab.train.patchmix (the box, the labels, the loss) and its wiring through
BatchMixer, MixLoss, the engine and the command line."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from deitlab.cli import main
from deitlab.registry import MIX_MODES
from deitlab.train import ConfigError, TrainConfig
from deitlab.train.mixing import BatchMixer, MixLoss
from deitlab.train.patchmix import PatchMixTarget, patch_box, patch_mix, patch_mix_loss

K = 6
VITRES = 'deitlab_vitres_mu_patch4_32'
DATA = 'glyphs:train=64,val=16,size=32,seed=1'


def _model(**kw):
    torch.manual_seed(0)
    return timm.create_model(VITRES, num_classes=K, patch_head=True, **kw)


def _constant_images(B, H=32, W=32):
    """Image i is the constant i + 1: a pixel tells which image it came from."""
    return (torch.arange(B, dtype=torch.float32) + 1)[:, None, None, None].expand(B, 3, H, W).contiguous()


def test_registered_as_a_patch_mode():
    entry = MIX_MODES['patchmix']
    assert entry['patch'] and entry['cutmix'] and not (entry['mixup'] or entry['maskmix'] or entry['attention'])
    assert MIX_MODES.names(patch=True) == ('patchmix',)


def test_the_box_lies_on_the_last_stage_grid_and_every_token_region_has_one_source():
    """mu: patch 4, two reductions, so the last stage is 2x2 tokens of 16x16 px; a 3-stage model on
    64 px with patch 4 has 4x4 tokens of 16 px. Every 16x16 cell holds one image, the one
    token_source names, and the label weights are the exact area fractions."""
    mixer = BatchMixer('patchmix', _model(), K, (32, 32), smoothing=0.0)
    assert (mixer.patch_grid, mixer.patch_cell) == ((2, 2), (16, 16))
    big = timm.create_model(VITRES, num_classes=K, patch_head=True, img_size=64)
    cases = [(mixer.patch_grid, 32), (BatchMixer('patchmix', big, K, (64, 64)).patch_grid, 64)]
    assert cases[1][0] == (4, 4)
    seen_boxes = set()
    for (gh, gw), size in cases:
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            B = 6
            x, y = _constant_images(B, size, size), torch.randint(0, K, (B,), generator=g)
            xm, t = patch_mix(x, y, K, (gh, gw), smoothing=0.0, generator=g)
            assert isinstance(t, PatchMixTarget) and t.token_source.shape == (B, gh * gw)
            seen_boxes.add(t.box)
            cells = xm[:, 0].reshape(B, gh, size // gh, gw, size // gw).permute(0, 1, 3, 2, 4).reshape(B, gh * gw, -1)
            first = cells[..., :1]
            assert torch.equal(cells, first.expand_as(cells))                 # one image per token region
            assert torch.equal(first[..., 0].long() - 1, t.token_source)      # ... the one token_source names
            assert ((t.token_source == torch.arange(B)[:, None]) | (t.token_source == t.perm[:, None])).all()
            own = (xm[:, 0] == (torch.arange(B, dtype=torch.float32) + 1)[:, None, None]).float().mean(dim=(1, 2))
            assert torch.equal(own, torch.full((B,), t.lam_area))             # area fraction, exactly
            top, bottom, left, right = t.box
            assert t.lam_area == 1 - (bottom - top) * (right - left) / (gh * gw)
            one = F.one_hot(y, K).float()
            assert torch.equal(t.y_soft, t.lam_area * one + (1 - t.lam_area) * one[t.perm])
            assert torch.equal(t.y[t.token_source], y[first[..., 0].long() - 1])   # per-patch labels
    assert len(seen_boxes) > 4   # boxes of several sizes and places


def test_box_sizes_follow_cutmix_and_are_exact():
    assert patch_box((4, 4), 0.75, torch.Generator().manual_seed(0))[1] == 1 - 2 * 2 / 16   # sqrt(1/4) of each side
    assert patch_box((4, 4), 1.0, torch.Generator().manual_seed(0)) [1] == 1.0               # no box
    (t, b, l, r), lam = patch_box((2, 2), 0.0, torch.Generator().manual_seed(0))
    assert (t, b, l, r, lam) == (0, 2, 0, 2, 0.0)                                             # the whole grid
    x, y = _constant_images(4), torch.arange(4)
    xm, target = patch_mix(x, y, K, (2, 2), prob=0.0)     # an unmixed batch still labels every token
    assert torch.equal(xm, x) and target.lam_area == 1.0
    assert torch.equal(target.token_source, torch.arange(4)[:, None].expand(4, 4))


def test_loss_by_hand():
    """B = 2, K = 3, a 1x2 grid with the right token swapped: L = CE(cls, mixed) + w * mean CE(tokens)."""
    y = torch.tensor([0, 2])
    x = _constant_images(2, 8, 8)
    xm, t = patch_mix(x, y, 3, (1, 2), smoothing=0.0, lam=0.5, generator=torch.Generator().manual_seed(1))
    assert t.lam_area == 0.5 and t.box[2:] in ((0, 1), (1, 2))
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, -1.0, 0.0]])
    patches = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], [[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]])

    def ce(z, k):
        return -(z[k] - math.log(sum(math.exp(v) for v in z.tolist())))

    cls = (0.5 * ce(logits[0], 0) + 0.5 * ce(logits[0], 2) + 0.5 * ce(logits[1], 2) + 0.5 * ce(logits[1], 0)) / 2
    src = t.token_source
    patch = sum(ce(patches[i, j], int(y[src[i, j]])) for i in range(2) for j in range(2)) / 4
    total, got_cls, got_patch = patch_mix_loss(logits, patches, t, weight=0.3)
    assert got_cls.item() == pytest.approx(cls, abs=1e-6) and got_patch.item() == pytest.approx(patch, abs=1e-6)
    assert total.item() == pytest.approx(cls + 0.3 * patch, abs=1e-6)
    swapped = 1 if t.box[2:] == (1, 2) else 0
    assert src.tolist() == [[0, 1] if swapped else [1, 0], [1, 0] if swapped else [0, 1]]


def test_the_mixer_and_loss_capture_the_patch_logits_in_the_forward():
    model = _model().train()
    mixer, loss_fn = BatchMixer('patchmix', model, K, (32, 32)), MixLoss(patch_loss_weight=0.25)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, K, (4,), generator=g)
    torch.manual_seed(3)
    xm, target = mixer(x, y)
    with mixer.capture(target):
        loss = loss_fn(model(xm), target)
    cls, patches = model.forward_dense(xm)
    assert torch.allclose(loss, patch_mix_loss(cls, patches, target, 0.25)[0], atol=1e-6)
    loss.backward()
    assert model.patch_head.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    stats = loss_fn.pop_stats()
    assert set(stats) == {'patchmix_cls_loss', 'patchmix_patch_loss'}
    with pytest.raises(RuntimeError, match='needs the patch logits of this forward'):
        loss_fn(model(xm), target.__class__(**{**target.__dict__, 'captured': None}))


def test_models_without_a_patch_head_are_refused():
    for model in (timm.create_model(VITRES, num_classes=K), timm.create_model('deitlab_deit_pico_patch4_32')):
        with pytest.raises(ValueError, match=r"--mix patchmix trains an auxiliary head on the last stage's patch "
                                             r"tokens, and (ViTRes|DeiT) has none: build a ViT-Res with a patch head "
                                             r"\(--model-kwargs patch_head=true\)"):
            BatchMixer('patchmix', model, K, (32, 32))
    with pytest.raises(ValueError, match='needs --cutmix > 0'):
        BatchMixer('patchmix', _model(), K, (32, 32), cutmix_alpha=0)
    with pytest.raises(ValueError, match=r'2x2 token grid, which does not divide the 33x33 input'):
        BatchMixer('patchmix', _model(), K, (33, 33))
    with pytest.raises(ConfigError, match='patch_loss_weight must be >= 0'):
        TrainConfig(model=VITRES, data=DATA, out='x', mix='patchmix', patch_loss_weight=-1).validate()
    with pytest.raises(ConfigError, match='does not compose with --token-fusion'):
        TrainConfig(model=VITRES, data=DATA, out='x', mix='patchmix', token_fusion='tome').validate()


def test_cli_trains_two_steps_with_the_patch_head(tmp_path, capsys):
    out = tmp_path / 'run'
    argv = ['train', '--model', VITRES, '--model-kwargs', 'patch_head=true', '--mix', 'patchmix', '--data', DATA,
            '--out', str(out), '--epochs', '1', '--batch-size', '8', '--max-steps-per-epoch', '2',
            '--warmup-epochs', '0', '--aug', 'none', '--drop-path', '0', '--no-tensorboard', '--no-progress']
    assert main(argv) == 0
    row = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()][-1]
    assert row['patchmix_patch_loss'] > 0 and row['patchmix_cls_loss'] > 0
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['patch_head'] is True
    printed = capsys.readouterr()
    assert 'mix: patchmix, CutMix 1.0 on the 2x2 last-stage token grid' in printed.out + printed.err
