"""Shared helpers for the structural-pruning tests (tests/test_prune_*.py): tiny perturbed models,
inputs, and hand-written lists of the tensor slices each unit couples."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import deitlab  # noqa: F401  (registers the deitlab_* names with timm)
from deitlab.prune import Masks

PICO = 'deitlab_deit_pico_patch4_32'
PICO_DIST = 'deitlab_deit_pico_distilled_patch4_32'
# A smaller pico: E=32, 2 blocks, 4 heads, qk 8 != v 6 per head, MLP 64 (forward in ~1 ms).
SMALL = dict(num_classes=5, embed_dim=32, depth=2, num_heads=4, qk_dim=8, v_dim=6, mlp_hidden=64)
BLOCK_KINDS = ('head', 'qk', 'v', 'mlp')
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _loader(n: int = 16, batch: int = 8, classes: int = 5, seed: int = 0) -> DataLoader:
    """A fixed loader of random 32 px images and labels."""
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=False)


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter, so that zero-initialised biases / heads are not trivially 0."""
    g = torch.Generator().manual_seed(seed + 1000)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _model(distilled: bool = False, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(PICO_DIST if distilled else PICO, **{**SMALL, **kw})
    return _perturb(model, seed).eval()


def _x(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _remove_some(masks: Masks, kinds, seed: int = 0) -> None:
    """Switch off about a third of the units of every layer of the given kinds (at least one stays)."""
    g = torch.Generator().manual_seed(seed)
    for kind, b in masks.layers():
        if kind in kinds:
            m = masks.layer(kind, b)
            n = m.numel()
            m[torch.randperm(n, generator=g)[:max(1, n // 3)]] = False


def _empty(model):
    return {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def _qkv_rows(attn, kind: str, i: int):
    """Row indices of qkv (layout [Q (H*dq), K (H*dq), V (H*dv)], heads contiguous) of a unit."""
    H, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    if kind == 'head':
        q = list(range(i * dq, (i + 1) * dq))
        return q, [H * dq + r for r in q], [2 * H * dq + r for r in range(i * dv, (i + 1) * dv)]
    if kind == 'qk':
        q = [h * dq + i for h in range(H)]
        return q, [H * dq + r for r in q], []
    if kind == 'v':
        return [], [], [2 * H * dq + h * dv + i for h in range(H)]
    raise AssertionError(kind)


def _zeroed(model, kind: str, block, i: int) -> dict:
    """Written out by hand: the parameter elements one unit couples (True = zeroed with it)."""
    z = _empty(model)
    if kind == 'emb':
        z['patch_embed.proj.weight'][i] = True
        z['patch_embed.proj.bias'][i] = True
        for n in ('cls_token', 'dist_token', 'pos_embed'):
            if n in z:
                z[n][..., i] = True
        for b in range(len(model.blocks)):
            p = f'blocks.{b}.'
            for n in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'attn.proj.weight',
                      'attn.proj.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'):
                z[p + n][i] = True
            z[p + 'attn.qkv.weight'][:, i] = True
            z[p + 'mlp.fc1.weight'][:, i] = True
        z['norm.weight'][i] = True
        z['norm.bias'][i] = True
        for n in ('head.weight', 'head_dist.weight'):
            if n in z:
                z[n][:, i] = True
        return z
    p = f'blocks.{block}.'
    attn = model.blocks[block].attn
    if kind == 'mlp':
        z[p + 'mlp.fc1.weight'][i] = True
        z[p + 'mlp.fc1.bias'][i] = True
        z[p + 'mlp.fc2.weight'][:, i] = True
        return z
    q, k, v = _qkv_rows(attn, kind, i)
    rows = q + k + v
    z[p + 'attn.qkv.weight'][rows] = True
    z[p + 'attn.qkv.bias'][rows] = True
    dv = attn.v_dim
    if kind == 'head':
        z[p + 'attn.proj.weight'][:, i * dv:(i + 1) * dv] = True
    elif kind == 'v':
        z[p + 'attn.proj.weight'][:, [h * dv + i for h in range(attn.num_heads)]] = True
    return z


def _criteria(model, kind: str, block, i: int) -> dict:
    """Written out by hand: the parameter elements whose w*g add up to a unit's saliency."""
    z = _empty(model)
    if kind == 'emb':
        z['patch_embed.proj.weight'][i] = True
        z['patch_embed.proj.bias'][i] = True
        for b in range(len(model.blocks)):
            p = f'blocks.{b}.'
            z[p + 'attn.qkv.weight'][:, i] = True
            z[p + 'mlp.fc1.weight'][:, i] = True
            for n in ('attn.proj.weight', 'attn.proj.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'):
                z[p + n][i] = True
        return z
    p = f'blocks.{block}.'
    if kind == 'mlp':
        z[p + 'mlp.fc1.weight'][i] = True
        z[p + 'mlp.fc1.bias'][i] = True
        return z
    q, k, v = _qkv_rows(model.blocks[block].attn, kind, i)
    rows = q + k + v if kind == 'head' else q + v   # qk counts its Q rows only, v its V rows
    z[p + 'attn.qkv.weight'][rows] = True
    z[p + 'attn.qkv.bias'][rows] = True
    return z


def _flat(tensors: dict, sel: dict) -> torch.Tensor:
    """The selected elements of every parameter, concatenated in a fixed order (float64)."""
    return torch.cat([tensors[n].detach()[m].double() for n, m in sorted(sel.items()) if m.any()])


def _unit(scores: dict, kind: str, block, i: int) -> float:
    return float(scores[kind][i] if kind == 'emb' else scores[kind][block][i])


def _set_grads(model: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g)
        grads[n] = p.grad.clone()
    return grads


def _capture(module: nn.Module, store: list, pre: bool = False):
    if pre:
        return module.register_forward_pre_hook(lambda m, inp: store.append(inp[0].detach().clone()))
    return module.register_forward_hook(lambda m, inp, out: store.append(out.detach().clone()))

__all__ = [n for n in dir() if not n.startswith('__')]
