"""Parity of deitlab's ToMe and MCTF with the authors' code, on fixed random DeiT-T weights.

``tests/data/token_parity_deit_tiny.npz`` holds, for every setting in ``SETTINGS``, the logits
(2 x 1000, stored as fp32) of the two images from ``deterministic_deit``, the final token sizes,
and the final token that holds each input token (read off the source map). These golden outputs
were produced by the authors' code on exactly these weights -- ToMe, facebookresearch/ToMe at
commit af95e4b, and MCTF, mlvlab/MCTF at commit 2004da0 -- with timm 1.0.31 and torch 2.14 on
CPU. No code of either project is part of this repository; only those outputs are.
``tests/data/make_golden.py`` regenerates the file from checkouts of both projects at those
commits (``--check`` compares a fresh run with the committed file).

Both the golden runs and this test compute in float64 (weights and images drawn in fp32, then
cast). In fp32 the merge plans are not well conditioned on these weights: MCTF's second pass
orders the surviving B tokens by score, that order decides the next block's A/B split, and
adjacent scores there are as close as one fp32 ulp (with tau_sim = 0 the scores are products of
per-token factors near 1 and tie exactly), so a rounding change can swap two tokens. In float64
the smallest such gap is above 1e-8, far from rounding.

* ToMe: the timm model from ``deterministic_deit`` (plain or distilled DeiT-T), copied, patched
  in place with the authors' timm patch (source tracing on, proportional attention as the
  setting says), its ``r`` set to the setting's value (an int or an (r, inflection) pair); the
  logits of one forward, and the sizes and sources the patch records, were stored. On the
  distilled model the authors' patch notices the distillation token and protects it (a -inf
  score column for it in set B; it is put back at index 1 after every merge).
* MCTF: the authors' own ViT (``deit_tiny`` of their models/deit.py, written for timm 0.5.4; it
  imports unchanged under timm 1.0.31 through timm's deprecated module paths), built as their
  evaluation scripts build it -- MCTF on, task type [1, 0, 0, 0], active layers 1..11 and the
  eleven-number MCTF type list [r, 0, trace, prop_attn, one_step_ahead, tau_sim, tau_info,
  tau_size, bidirection, pooling, 0] with the defaults 16, 1, 20, 40, bidirectional, pooling 1
  (attention x size) -- then given the same state dict by name (every name is timm's; loaded
  strictly), put in eval mode and run with ``r_eval = r`` as their evaluation loop does. MCTF-Fast
  is r = 0.35 at layers 3, 6, 9. One-step-ahead 1 / 2 / 0 are our modes 'one_step_ahead' /
  'precise' / 'previous'; pooling 0 / 1 / 2 / 3 are 'size' / 'attn_size' / 'max' / 'mean'
  (``MCTF_MODE``, ``MCTF_POOLING``). Source tracing was on; it does not change the outputs.
  MCTF on a distilled DeiT has no reference: the authors' ViT has no distillation token.

Our implementation runs with explicit softmax attention, as the reference code does. When the
data were made, the float64 logits agreed to within 2e-15 and the sizes and token groups were
identical in every setting. The test demands identical sizes and groups and logits within 1e-4;
the settings differ from each other by more than 2e-2.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from deitlab.tokens import apply_mctf, apply_tome

DATA = Path(__file__).parent / 'data' / 'token_parity_deit_tiny.npz'
PLAIN = 'deit_tiny_patch16_224'
DISTILLED = 'deit_tiny_distilled_patch16_224'

# MCTF options as the authors' --mctf_type list numbers them.
MCTF_MODE = {1: 'one_step_ahead', 2: 'precise', 0: 'previous'}
MCTF_POOLING = {0: 'size', 1: 'attn_size', 2: 'max', 3: 'mean'}

# name -> (timm model, method, options of apply_tome / apply_mctf)
SETTINGS = {
    'tome_r0': (PLAIN, 'tome', dict(r=0)),
    'tome_r4': (PLAIN, 'tome', dict(r=4)),
    'tome_r8': (PLAIN, 'tome', dict(r=8)),
    'tome_r13': (PLAIN, 'tome', dict(r=13)),
    'tome_r16': (PLAIN, 'tome', dict(r=16)),
    'tome_r8_decreasing': (PLAIN, 'tome', dict(r=(8, -1.0))),
    'tome_r13_decreasing': (PLAIN, 'tome', dict(r=(13, -1.0))),
    'tome_r13_no_prop_attn': (PLAIN, 'tome', dict(r=13, prop_attn=False)),
    'tome_distilled_r0': (DISTILLED, 'tome', dict(r=0)),
    'tome_distilled_r8': (DISTILLED, 'tome', dict(r=8)),
    'tome_distilled_r13': (DISTILLED, 'tome', dict(r=13)),
    'tome_distilled_r13_decreasing': (DISTILLED, 'tome', dict(r=(13, -1.0))),
    'mctf_r16': (PLAIN, 'mctf', dict(r=16)),
    'mctf_fast': (PLAIN, 'mctf', dict(fast=True)),
    'mctf_r8': (PLAIN, 'mctf', dict(r=8)),
    'mctf_r16_tau_sim0': (PLAIN, 'mctf', dict(r=16, tau_sim=0)),
    'mctf_r16_tau_info0': (PLAIN, 'mctf', dict(r=16, tau_info=0)),
    'mctf_r16_tau_size0': (PLAIN, 'mctf', dict(r=16, tau_size=0)),
    'mctf_r16_one_way': (PLAIN, 'mctf', dict(r=16, bidirectional=False)),
    'mctf_r16_pool_size': (PLAIN, 'mctf', dict(r=16, pooling='size')),
    'mctf_r16_pool_max': (PLAIN, 'mctf', dict(r=16, pooling='max')),
    'mctf_r16_pool_mean': (PLAIN, 'mctf', dict(r=16, pooling='mean')),
    'mctf_r16_precise': (PLAIN, 'mctf', dict(r=16, mode='precise')),
    'mctf_r16_previous': (PLAIN, 'mctf', dict(r=16, mode='previous')),
    'mctf_r16_no_prop_attn': (PLAIN, 'mctf', dict(r=16, prop_attn=False)),
}


def deterministic_deit(name: str = PLAIN, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A timm DeiT whose weights do not depend on timm's initialisation, and two images.

    Every tensor of the state dict, in order, is filled from one generator with
    ``randn * 0.02`` (LayerNorm weights: ``1 + randn * 0.02``); then the (2, 3, 224, 224)
    images are drawn from the same generator. All of it is drawn in fp32, then cast to ``dtype``."""
    model = timm.create_model(name, pretrained=False)
    norm_weights = {f'{n}.weight' for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            assert t.is_floating_point(), key
            noise = torch.randn(t.shape, generator=g) * 0.02
            t.copy_(noise + 1 if key in norm_weights else noise)
    images = torch.randn(2, 3, 224, 224, generator=g)
    return model.eval().to(dtype), images.to(dtype)


def explicit_attention(model: nn.Module) -> nn.Module:
    """Softmax attention written out (as in the reference code) instead of the fused kernel."""
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    return model


def groups_of(source: torch.Tensor) -> torch.Tensor:
    """The final token holding each input token, (B, T0), from a source map (B, T, T0)."""
    assert torch.equal(source.sum(dim=1), torch.ones_like(source[:, 0]))
    return source.argmax(dim=1)


def run_ours(model: nn.Module, images: torch.Tensor, method: str, options: dict):
    """Logits, final sizes (B, T) and groups (B, T0) of our implementation on a copy of ``model``."""
    model = explicit_attention(copy.deepcopy(model))
    if method == 'tome':
        apply_tome(model, trace_source=True, **options)
    else:
        apply_mctf(model, trace_source=True, **options)
    with torch.no_grad():
        logits = model(images)
    last = model.token_fusion.last
    return logits, last['size'][..., 0], groups_of(last['source'])


@functools.lru_cache(maxsize=None)
def _base(name: str):
    return deterministic_deit(name, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _golden() -> dict:
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


def test_golden_file_has_every_setting():
    golden = _golden()
    stored = {k.rsplit('.', 1)[0] for k in golden if not k.startswith('meta.')}
    assert stored == set(SETTINGS)
    for name in SETTINGS:
        assert golden[f'{name}.logits'].dtype == np.float32
        assert golden[f'{name}.logits'].shape == (2, 1000)


@pytest.mark.parametrize('name', [PLAIN, DISTILLED])
def test_weights_rebuild_as_when_the_golden_data_were_made(name):
    """The unpatched model (timm's fused attention) reproduces the stored r = 0 logits; if this
    fails, the weights differ (e.g. timm changed its state-dict order), not the token reduction.
    fp32 agrees too: r = 0 has no merge to decide."""
    model, images = _base(name)
    with torch.no_grad():
        logits = model(images)
    key = 'tome_r0' if name == PLAIN else 'tome_distilled_r0'
    golden = torch.from_numpy(_golden()[f'{key}.logits'])
    torch.testing.assert_close(logits.float(), golden, rtol=0, atol=1e-4)
    model32, images32 = deterministic_deit(name)
    with torch.no_grad():
        torch.testing.assert_close(model32(images32), golden, rtol=0, atol=1e-4)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_matches_reference_implementation(name):
    model_name, method, options = SETTINGS[name]
    model, images = _base(model_name)
    logits, size, groups = run_ours(model, images, method, options)
    golden = _golden()
    torch.testing.assert_close(size.to(torch.int16), torch.from_numpy(golden[f'{name}.size']), rtol=0, atol=0)
    torch.testing.assert_close(groups.to(torch.int16), torch.from_numpy(golden[f'{name}.groups']), rtol=0, atol=0)
    torch.testing.assert_close(logits.float(), torch.from_numpy(golden[f'{name}.logits']), rtol=0, atol=1e-4)
