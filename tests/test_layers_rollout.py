"""Attention rollout (Abnar & Zuidema 2020, as DCAL uses it): deitlab.layers.rollout, and
``deitlab explain``."""
import json
import math

import pytest
import timm
import torch
from PIL import Image

from deitlab.cli import main
from deitlab.layers.rollout import (attention_maps, attention_rollout, cls_rollout, record_attention_maps,
                                    rollout_maps, top_tokens)
from deitlab.models import DeiT  # importing deitlab.models registers the deitlab_* names
from deitlab.rundir import save_run_dir
from _nn_helpers import sharpen_attention

PICO = 'deitlab_deit_pico_patch4_32'


def _model(name=PICO, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _x(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_rows_sum_to_one_and_the_class_row_drops_the_prefix(one_thread):
    model = _model()
    x = _x()
    for fusion in ('mean', 'max'):
        R = attention_rollout(model, x, head_fusion=fusion)
        assert R.shape == (2, 65, 65) and R.dtype == torch.float32
        assert torch.allclose(R.sum(-1), torch.ones(2, 65), atol=1e-5)
        row = cls_rollout(model, x, head_fusion=fusion)
        assert row.shape == (2, 64) and torch.equal(row, R[:, 0, 1:])


def test_one_block_with_uniform_attention_is_half_uniform_half_identity(one_thread):
    model = _model(depth=1)
    attn = model.blocks[0].attn
    with torch.no_grad():   # q = k = 0: every logit is 0, the softmax is uniform
        n = 2 * attn.num_heads * attn.qk_dim
        attn.qkv.weight[:n] = 0
        attn.qkv.bias[:n] = 0
    R = attention_rollout(model, _x())
    T = 65
    expected = 0.5 * torch.full((T, T), 1 / T) + 0.5 * torch.eye(T)
    assert torch.allclose(R, expected.expand(2, T, T), atol=1e-6)
    # max over identical heads is the same map
    assert torch.allclose(attention_rollout(model, _x(), head_fusion='max'), R, atol=1e-6)


def test_maps_equal_a_hand_computation_and_leave_the_output_unchanged(one_thread):
    model = _model(qk_dim=[8, 16, 32, 16], v_dim=[32, 8, 16, 24])
    assert isinstance(model, DeiT)
    x = _x()
    store = {}
    h = model.blocks[0].norm1.register_forward_hook(lambda m, i, o: store.setdefault('t', o))
    with torch.no_grad():
        ref_out = model(x)
    h.remove()
    t, attn = store['t'], model.blocks[0].attn
    B, T, _ = t.shape
    H, dq = attn.num_heads, attn.qk_dim
    qkv = t @ attn.qkv.weight.T + attn.qkv.bias
    q = qkv[..., :H * dq].reshape(B, T, H, dq).transpose(1, 2)
    k = qkv[..., H * dq:2 * H * dq].reshape(B, T, H, dq).transpose(1, 2)
    ref = torch.softmax(attn.scale * q @ k.transpose(-1, -2), dim=-1)
    maps = attention_maps(model, x)
    assert len(maps) == 4 and maps[0].shape == (2, H, T, T)
    assert torch.allclose(maps[0], ref, atol=1e-6)
    assert all(not m.requires_grad for m in maps)
    with record_attention_maps(model) as recorded, torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref_out)
    assert torch.equal(rollout_maps(recorded), attention_rollout(model, x))
    assert all(not b.attn._forward_pre_hooks for b in model.blocks)


def test_hooks_are_removed_on_an_error():
    model = _model()

    def fail(module, args):
        raise RuntimeError('block 2 failed')

    h = model.blocks[2].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match='block 2 failed'):
        with record_attention_maps(model) as maps:
            model(_x(1))
    h.remove()
    assert maps[1] is not None and maps[2] is None   # the error came in the middle of the forward
    assert all(not b.attn._forward_pre_hooks for b in model.blocks)


def test_max_fusion_differs_from_mean(one_thread):
    model = sharpen_attention(_model())
    x = _x()
    mean, mx = attention_rollout(model, x), attention_rollout(model, x, head_fusion='max')
    assert torch.allclose(mx.sum(-1), torch.ones(2, 65), atol=1e-5)
    assert (mean - mx).abs().max() > 1e-3


def test_start_layer_and_head_fusion_are_checked(one_thread):
    model = _model()
    x = _x(1)
    full, last = attention_rollout(model, x), attention_rollout(model, x, start_layer=3)
    maps = attention_maps(model, x)
    assert torch.allclose(last, rollout_maps(maps[3:]), atol=1e-6) and not torch.allclose(full, last)
    with pytest.raises(ValueError, match=r'DeiT: start layer 4 is out of range: the model has 4 blocks \(0..3\)'):
        attention_rollout(model, x, start_layer=4)
    with pytest.raises(ValueError, match=r"head fusion must be one of mean, max, got 'median'"):
        cls_rollout(model, x, head_fusion='median')


def test_top_tokens():
    row = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0], [0.3, 0.1, 0.4, 0.0, 0.2]])
    assert top_tokens(row, 0.4).tolist() == [[3, 1], [2, 0]]
    assert top_tokens(row, 1.0).shape == (2, 5)
    assert top_tokens(row, 0.01).shape == (2, 1)   # ceil: at least one
    assert top_tokens(torch.rand(1, 30), 0.1).shape == (1, 3)   # 0.1 * 30 is 3, not 3.0000000000000004 -> 4
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf'ratio must be a fraction of the patches in \(0, 1\], got {bad}'):
            top_tokens(row, bad)


def test_distilled_deit_has_two_prefix_tokens(one_thread):
    model = sharpen_attention(_model('deitlab_deit_pico_distilled_patch4_32'))
    x = _x()
    R = attention_rollout(model, x)
    assert R.shape == (2, 66, 66) and torch.allclose(R.sum(-1), torch.ones(2, 66), atol=1e-5)
    row = cls_rollout(model, x)
    assert row.shape == (2, 64) and torch.equal(row, R[:, 0, 2:])   # CLS and DIST columns dropped
    idx = top_tokens(row, 0.25)
    assert idx.shape == (2, math.ceil(0.25 * 64)) and int(idx.max()) < 64
    assert torch.equal(idx, R[:, 0, 2:].topk(16, dim=1).indices)


def test_timm_vit_with_register_tokens(one_thread):
    model = _model('vit_tiny_patch16_224', img_size=32, depth=2, reg_tokens=1)
    assert model.num_prefix_tokens == 2
    x = _x()
    R = attention_rollout(model, x)
    assert R.shape == (2, 6, 6) and torch.allclose(R.sum(-1), torch.ones(2, 6), atol=1e-5)
    assert torch.equal(cls_rollout(model, x), R[:, 0, 2:])
    assert len(attention_maps(timm.create_model('deit_tiny_patch16_224', img_size=32, depth=1), x)) == 1


def test_models_without_self_attention_are_refused():
    x = _x(1)
    with pytest.raises(ValueError, match=r'^PoolFormer has no self-attention blocks'):
        attention_rollout(_model('deitlab_poolformer_pico_32'), x)
    with pytest.raises(ValueError, match=r'^SpectFormer has no self-attention in block 0: SpectralBlock'):
        attention_maps(_model('deitlab_spectformer_pico_patch4_32'), x)


def test_stvit_maps_change_size_and_its_rollout_says_so(one_thread):
    model = _model('deitlab_stvit_pico_patch4_32')
    x = _x(1)
    k = model.stvit_layer
    maps = attention_maps(model, x)
    assert maps[0].shape[-1] == 65 and maps[-1].shape[-1] == 1 + model.num_semantic_tokens
    with pytest.raises(ValueError, match=rf'STViT: blocks {k - 1} and {k} see 65 and 10 tokens'):
        attention_rollout(model, x)
    assert attention_rollout(model, x, start_layer=k).shape == (1, 10, 10)
    with pytest.raises(ValueError, match=r'see 9 tokens after the 1 prefix token\(s\), not the 64 patch tokens'):
        cls_rollout(model, x, start_layer=k)


# --- deitlab explain ---

@pytest.fixture(scope='module')
def run_and_image(tmp_path_factory):
    root = tmp_path_factory.mktemp('explain')
    torch.manual_seed(0)
    save_run_dir(timm.create_model(PICO, num_classes=3), root / 'run', label_names=['ant', 'bee', 'cat'])
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(24, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / 'pic.png')
    return root


def test_explain_writes_the_png_and_the_json_line(run_and_image, tmp_path, capsys):
    root = run_and_image
    out = tmp_path / 'map.png'
    assert main(['explain', '--model', str(root / 'run'), '--image', str(root / 'pic.png'), '--out', str(out),
                 '--head-fusion', 'max', '--start-layer', '1', '--json']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['out'] == str(out) and res['grid'] == [8, 8]
    assert res['pred'] in ('ant', 'bee', 'cat') and 1 / 3 <= res['prob'] <= 1
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.width > img.height


def test_explain_default_output_is_in_the_current_directory(run_and_image, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(['explain', '--model', str(run_and_image / 'run'), '--image', str(run_and_image / 'pic.png')]) == 0
    assert (tmp_path / 'pic_rollout.png').is_file()
    assert f'out: {tmp_path / "pic_rollout.png"}' in capsys.readouterr().out
