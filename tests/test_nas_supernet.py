"""Tests for the ViT-ResNAS search space and weight-sharing supernet (ViT-ResNAS part 2)."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deitlab.bench import count_gmacs
from deitlab.models.vitres import ViTRes, vitres_macs
from deitlab.models.vitres_stems import ConvStem
from deitlab.nas import SPACES, Arch, SearchSpace, SearchSpaceError, Supernet, masked_layer_norm
from deitlab.rundir import create, save_run_dir
from _nn_helpers import perturb


@pytest.fixture(scope='module')
def supernet():
    torch.manual_seed(0)
    return perturb(Supernet(SPACES['mu'])).eval()


@pytest.fixture(scope='module')
def archs():
    """The largest, the smallest and four seeded random architectures (some skip blocks)."""
    space, rng = SPACES['mu'], random.Random(3)
    out = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(4)]
    assert any(not all(a.keep) for a in out[2:]) and any(a.keep[1] != a.keep[2] for a in out[2:])
    return out


def _x(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- masked LayerNorm

def test_masked_layer_norm_equals_layer_norm_on_the_active_slice():
    torch.manual_seed(0)
    norm = perturb(nn.LayerNorm(8))
    x = torch.randn(3, 5, 8)
    widths = [8, 5, 2]
    mask = (torch.arange(8)[None, :] < torch.tensor(widths)[:, None]).float()[:, None, :]   # (B, 1, C)
    y = masked_layer_norm(x, mask, norm)
    for b, c in enumerate(widths):
        ref = F.layer_norm(x[b, :, :c], (c,), norm.weight[:c], norm.bias[:c], norm.eps)
        assert torch.allclose(y[b, :, :c], ref, atol=1e-6)
        assert torch.equal(y[b, :, c:], torch.zeros(5, 8 - c))
    assert torch.allclose(masked_layer_norm(x, None, norm), norm(x), atol=1e-6)


# ----------------------------------------------------------------------------- masked forward == sliced sub-network

def test_each_arch_equals_its_sliced_subnet(supernet, archs):
    x = _x(2)
    with torch.no_grad():
        for arch in archs:
            sub = supernet.subnet(arch)
            assert isinstance(sub, ViTRes) and not sub.training
            assert sub.depths == [sum(arch.keep[s * 3:(s + 1) * 3]) for s in range(3)]
            assert sub.widths == list(arch.widths)
            ref = sub(x)
            assert torch.allclose(supernet(x, [arch]), ref, atol=1e-5), arch
            assert torch.allclose(supernet(x, arch), ref, atol=1e-5)   # one Arch: the whole batch


def test_two_archs_in_one_batch(supernet, archs):
    x = _x(4, seed=1)
    space = supernet.space
    pairs = [(space.smallest(), space.largest()), (archs[2], archs[3])]
    with torch.no_grad():
        for a, b in pairs:
            out = supernet(x, [a, b])   # examples 0, 1 use a; 2, 3 use b
            ref = torch.cat([supernet.subnet(a)(x[:2]), supernet.subnet(b)(x[2:])])
            assert torch.allclose(out, ref, atol=1e-5)


def test_largest_is_the_plain_vitres(supernet):
    x = _x(2)
    with torch.no_grad():
        assert torch.allclose(supernet(x), supernet.model(x), atol=1e-5)   # no archs: the largest
        small = supernet.space.smallest()
        with supernet.sampled([small]):
            assert torch.allclose(supernet(x), supernet(x, small), atol=0)


def test_batch_not_divisible(supernet, archs):
    with pytest.raises(SearchSpaceError, match=r'batch of 3 examples cannot be split evenly among 2'):
        supernet(_x(3), archs[:2])


# ----------------------------------------------------------------------------- gradients

def test_gradients_reach_active_slices_only():
    torch.manual_seed(0)
    net = perturb(Supernet(SPACES['mu']))
    space = net.space
    arch = dataclasses.replace(space.largest(), widths=(48, 96, 192), heads=(1,) + space.largest().heads[1:],
                               mlp_hidden=(128,) + space.largest().mlp_hidden[1:],
                               keep=(True, False, True) + (True,) * 6)
    net(_x(2), [arch]).square().sum().backward()
    m = net.model
    qkv = m.blocks[0].attn.qkv.weight.grad          # rows [Q0 Q1 K0 K1 V0 V1], 32 each; columns: 64 channels
    rows = qkv.reshape(6, 32, 64)
    for head, active in ((0, True), (1, False)):
        for part in range(3):
            g = rows[2 * part + head, :, :48]
            assert (g.abs().sum() > 0) == active, (head, part)
    assert torch.equal(qkv[:, 48:], torch.zeros_like(qkv[:, 48:]))          # inactive input channels
    assert torch.equal(m.blocks[0].attn.proj.weight.grad[:, 32:], torch.zeros(64, 32))   # inactive head's context
    assert torch.equal(m.blocks[0].attn.proj.weight.grad[48:], torch.zeros(16, 64))      # inactive output channels
    fc1 = m.blocks[0].mlp.fc1.weight.grad
    assert fc1[:128, :48].abs().sum() > 0 and torch.equal(fc1[128:], torch.zeros(128, 64))
    assert torch.equal(m.patch_embed.proj.weight.grad[48:], torch.zeros(16, 3, 4, 4))
    assert torch.equal(m.blocks[0].norm1.weight.grad[48:], torch.zeros(16))
    assert torch.equal(m.reductions[0].conv.weight.grad[96:], torch.zeros(32, 64, 3, 3))
    assert torch.equal(m.head.weight.grad[:, 192:], torch.zeros(10, 64))
    assert all(p.grad is None for p in m.blocks[1].parameters())          # skipped by every example
    assert all(p.grad is not None for p in m.blocks[2].parameters())


def test_training_step_with_drop_path_and_four_archs():
    torch.manual_seed(0)
    net = Supernet(SPACES['mu'], drop_path_rate=0.1).train()
    archs = net.sample_archs(4, random.Random(1))
    with net.sampled(archs):
        F.cross_entropy(net(_x(4)), torch.tensor([0, 1, 2, 3])).backward()
    assert torch.isfinite(net.model.cls_token.grad).all()
    sub = net.subnet(archs[0])
    assert sub.training and sub.model_args['drop_path_rate'] == 0.1


# ----------------------------------------------------------------------------- MACs

def test_macs_equal_the_counter(supernet, archs):
    space = supernet.space
    for arch in archs[1:4]:
        assert space.macs(arch) == round(count_gmacs(supernet.subnet(arch)) * 1e9)
    assert space.macs(space.largest()) == vitres_macs(supernet.model)['total']
    assert space.macs(space.smallest()) < space.macs(archs[2]) < space.macs(space.largest())


# ----------------------------------------------------------------------------- search space

def test_arch_json_round_trip_and_hash(archs):
    for arch in archs:
        back = Arch.from_dict(json.loads(json.dumps(arch.to_dict())))
        assert back == arch and hash(back) == hash(arch)
    assert len(set(archs)) == len(archs)


def test_space_genes():
    space = SPACES['mu']
    assert space.widths == [[48, 56, 64], [96, 112, 128], [192, 224, 256]]
    assert space.heads[0] == [1, 2] and space.heads[3] == [2, 3, 4] and space.heads[8] == [4, 6, 8]
    assert space.mlp_hidden[0] == [128, 192, 256] and space.mlp_hidden[8] == [512, 768, 1024]
    assert space.supernet_args()['widths'] == [64, 128, 256]
    assert space.supernet_args()['num_heads'] == [2, 2, 2, 4, 4, 4, 8, 8, 8]
    small = space.smallest()
    assert small.keep == (True, False, False) * 3
    args = space.model_args(small)
    assert args['depths'] == [1, 1, 1] and args['num_heads'] == [1, 2, 4] and args['mlp_hidden'] == [128, 256, 512]
    assert space.num_archs() == 3 ** 3 * 6 * 7 * 7 * 9 * 10 * 10 * 9 * 10 * 10


def test_sample_archs_distinct(supernet):
    got = supernet.sample_archs(8, random.Random(0))
    assert len({supernet.space.canonical(a) for a in got}) == 8
    tiny = SearchSpace(widths=[[8, 16]], depths=[1], heads=[[1]], mlp_hidden=[[8]], head_dim=8, img_size=8)
    assert tiny.num_archs() == 2
    assert set(tiny.sample_distinct(2, random.Random(0))) == {tiny.smallest(), tiny.largest()}
    assert len(tiny.sample_distinct(5, random.Random(0))) == 5   # more than the space holds: repeats


def _bad(**changes):
    base = SPACES['mu'].largest().to_dict()
    base.update(changes)
    return Arch.from_dict(base)


@pytest.mark.parametrize('arch,match', [
    (_bad(widths=[64, 128]), r'2 stage widths but the space has 3 stages'),
    (_bad(widths=[64, 100, 256]), r'stage 1 width 100 is not in the search space; choices: \[96, 112, 128\]'),
    (_bad(heads=[2] * 8), r'8 heads entries but the space has 9 blocks'),
    (_bad(heads=[2, 2, 2, 5, 4, 4, 8, 8, 8]), r'block 3 \(stage 1, block 0\) has 5 heads.*choices: \[2, 3, 4\]'),
    (_bad(mlp_hidden=[256] * 9), r'block 6 \(stage 2, block 0\) has MLP hidden width 256.*\[512, 768, 1024\]'),
    (_bad(mlp_hidden=[100] + [1024] * 8), r'block 0 \(stage 0, block 0\) has MLP hidden width 100'),
    (_bad(keep=[True] * 3 + [False] + [True] * 5), r'block 3 \(stage 1, block 0\) is skipped but is not skippable'),
    (_bad(keep=[True] * 10), r'10 keep entries'),
])
def test_validation_errors(arch, match):
    with pytest.raises(SearchSpaceError, match=match):
        SPACES['mu'].validate(arch)
    assert issubclass(SearchSpaceError, ValueError)


@pytest.mark.parametrize('kwargs,match', [
    (dict(skippable=[3]), r'block 3 is the first block of stage 1 and cannot be skippable'),
    (dict(skippable=[9]), r'skippable block 9 is out of range'),
    (dict(widths=[[48, 64], [56, 128], [256]]), r'stage 1 width choices \[56, 128\] overlap'),
    (dict(heads=[[1], [2]]), r'heads has 2 lists of choices; give one per stage \(3\) or one per block \(9\)'),
    (dict(img_size=24), r'6x6 grid'),
    (dict(distilled=True), r'does not match distilled=True'),
])
def test_bad_spaces(kwargs, match):
    with pytest.raises(SearchSpaceError, match=match):
        dataclasses.replace(SPACES['mu'], **kwargs)


# ----------------------------------------------------------------------------- distillation, run directories

def test_distilled_supernet(tmp_path):
    torch.manual_seed(0)
    net = perturb(Supernet(SPACES['mu_distilled'])).eval()
    assert net.model.distilled and net.model.num_prefix_tokens == 2
    arch = SPACES['mu_distilled'].sample(random.Random(5))
    x = _x(2)
    sub = net.subnet(arch)
    assert sub.distilled and sub.pretrained_cfg['architecture'] == 'deitlab_vitres_mu_distilled_patch4_32'
    with torch.no_grad():
        assert torch.allclose(net(x, arch), sub(x), atol=1e-5)   # eval: the average of both heads
        net.train().set_distilled_training(True)
        sub.train().set_distilled_training(True)
        for a, b in zip(net(x, arch), sub(x)):
            assert torch.allclose(a, b, atol=1e-5)
    save_run_dir(sub.eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(create(str(tmp_path)).eval()(x), sub(x))


# ----------------------------------------------------------------------------- the conv stem

@pytest.fixture(scope='module')
def conv_supernet():
    """The mu_conv supernet, weights and the stem's BatchNorm running statistics off their init."""
    torch.manual_seed(0)
    net = perturb(Supernet(SPACES['mu_conv'])).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_conv_stem_space_carries_the_stem():
    space = SPACES['mu_conv']
    assert space.stem == 'conv' and SPACES['mu'].stem == 'linear'
    assert space.supernet_args()['stem'] == 'conv' and space.model_args(space.smallest())['stem'] == 'conv'
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    old = SPACES['mu'].to_dict()
    del old['stem']   # a definition written before the stem option: the linear stem
    assert SearchSpace.from_dict(old) == SPACES['mu']
    with pytest.raises(SearchSpaceError, match=r'stem must be one of linear, conv; got .patchify.'):
        dataclasses.replace(space, stem='patchify')
    with pytest.raises(SearchSpaceError, match=r'the conv stem needs an even patch size dividing img_size, got '
                                               r'patch_size 1 and img_size 32'):
        dataclasses.replace(space, patch_size=1, img_size=32, depths=[3, 3, 3])
    with pytest.raises(SearchSpaceError, match=r'stem is set by the search space'):
        Supernet(space, stem='linear')
    with pytest.raises(SearchSpaceError, match=r'stem_width is set by the search space'):
        Supernet(space, stem_width=16)


def test_conv_stem_supernet_equals_its_sliced_subnets(conv_supernet, archs):
    """archs are the mu space's; mu_conv has the same genes."""
    assert isinstance(conv_supernet.model.patch_embed, ConvStem)
    x = _x(4, seed=2)
    with torch.no_grad():
        for arch in archs:
            sub = conv_supernet.subnet(arch)
            assert isinstance(sub.patch_embed, ConvStem) and sub.model_args['stem'] == 'conv'
            assert sub.patch_embed.proj.out_channels == arch.widths[0]
            assert torch.allclose(conv_supernet(x, arch), sub(x), atol=1e-5), arch
        a, b = archs[2], archs[3]
        out = conv_supernet(x, [a, b])
        ref = torch.cat([conv_supernet.subnet(a)(x[:2]), conv_supernet.subnet(b)(x[2:])])
        assert torch.allclose(out, ref, atol=1e-5)
        assert conv_supernet.space.macs(a) == round(count_gmacs(conv_supernet.subnet(a)) * 1e9)
        assert conv_supernet.space.macs(a) > SPACES['mu'].macs(a)


def test_conv_stem_batch_statistics_are_the_shared_stems(conv_supernet, archs):
    """Training mode: the unmasked stem's BatchNorm sees the whole batch, so two archs in one batch give
    each example what its sliced sub-network gives on that whole batch."""
    x = _x(4, seed=4)
    a, b = archs[2], archs[3]
    try:
        conv_supernet.train()
        with torch.no_grad():
            subs = [conv_supernet.subnet(a), conv_supernet.subnet(b)]   # in training mode, like the supernet
            out = conv_supernet(x, [a, b])
            ref = torch.cat([subs[0](x)[:2], subs[1](x)[2:]])
        assert subs[0].training and torch.allclose(out, ref, atol=1e-5)
    finally:
        conv_supernet.eval()
