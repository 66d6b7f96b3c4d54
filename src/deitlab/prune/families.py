"""The model families the structural pruner handles, and which units each of them lets it remove.

NViT's machinery (``Masks``, ``reduce_units``, ``densify``, ``Budget``, the latency tables) is
written against a *layout*: one object per model (``layout_of(model)``) that says which unit
types exist, where the blocks and their MLPs are (module names), what the model's widths are, how
to build the same architecture with other widths, and what GMACs / parameters widths cost.

=============  =====================  =============================================================
family         unit types             blocks (module names)
=============  =====================  =============================================================
DeiT           emb, head, qk, v, mlp  ``blocks.{b}`` (``WidthBlock``; see groups.py)
SpectFormer    mlp                    ``blocks.{b}``: spectral, attention, pooling or identity mixer;
                                      ``mlp.fc1`` / ``mlp.fc2`` are ``nn.Linear``
PoolFormer     mlp                    ``stages.{i}.blocks.{j}`` (timm's ``MetaFormerBlock``);
                                      ``mlp.fc1`` / ``mlp.fc2`` are 1x1 ``nn.Conv2d``
=============  =====================  =============================================================

The token-mixer families are pruned in their **MLP hidden widths only**. Their mixers are either
parameter-free (pooling, identity) or per-channel spectral filters (``SpectralGating`` holds one
complex filter per residual channel), so every mixer is tied to the residual width, which stays
fixed; so do the heads and the query/key/value widths of SpectFormer's attention blocks (timm
``Block`` with one head width for q, k and v). The MLPs hold most of each block's parameters and
MACs. An MLP hidden unit n couples fc1's output row n (weight and bias) with fc2's input column n;
because the activation is 0 at 0 (GELU), a zeroed unit adds exactly nothing, so a masked model
computes what its densified form computes. Its criteria slice is the fc1 row with its bias (as for
DeiT's ``mlp`` units).
"""
from __future__ import annotations

import abc
import copy
import math
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..registry import PRUNABLE, load_target
from .base import BLOCK_TYPES, GROUP_TYPES, WIDTH_KEYS, PruneError

__all__ = ['PruneError', 'GROUP_TYPES', 'BLOCK_TYPES', 'WIDTH_KEYS', 'Layout', 'DeiTLayout', 'MLPLayout',
           'PoolFormerLayout', 'SpectFormerLayout', 'layout_of', 'tokens_of', 'block_params']

Cost = Callable[[dict], Tuple[float, float]]


def tokens_of(model: nn.Module) -> int:
    """Tokens a DeiT block sees: patches plus prefix tokens (class, distillation)."""
    return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)


def block_params(D: int, H: int, dq: int, dv: int, M: int, qkv_bias: bool = True, layer_scale: bool = False) -> int:
    """Parameters of one DeiT block: two LayerNorms, qkv (+bias), proj, fc1, fc2 (+biases), LayerScale."""
    qkv = D * H * (2 * dq + dv) + (H * (2 * dq + dv) if qkv_bias else 0)
    return 4 * D + qkv + H * dv * D + D + D * M + M + M * D + D + (2 * D if layer_scale else 0)


def _create_like(model: nn.Module, args: dict, device=None) -> nn.Module:
    """``model``'s registered architecture built from ``args`` (random weights; ``device='meta'``
    builds it without memory)."""
    import timm
    from ..rundir import architecture_of
    kw = dict(pretrained=False, num_classes=model.num_classes, **args)
    if device == 'meta':
        with torch.device('meta'):
            return timm.create_model(architecture_of(model), **kw)
    return timm.create_model(architecture_of(model), **kw).to(device or 'cpu')


def _grid_axis(full: int, fractions: Sequence[float], minimum: int = 1) -> List[int]:
    vals = {max(minimum, int(round(full * f))) for f in fractions}
    vals.add(full)
    return sorted(v for v in vals if v <= full)


class Layout(abc.ABC):
    """What the pruner may remove from one model, and how to rebuild and cost it."""

    family = 'model'
    types: Tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.check()

    def check(self) -> None:
        """Raise ``PruneError`` for a model of the family whose layout the pruner cannot handle."""

    @property
    @abc.abstractmethod
    def block_names(self) -> List[str]:
        """Module names of the blocks, in forward order."""

    @property
    def mlp_names(self) -> List[str]:
        return [n + '.mlp' for n in self.block_names]

    @property
    def depth(self) -> int:
        return len(self.block_names)

    def blocks(self) -> List[nn.Module]:
        return [self.model.get_submodule(n) for n in self.block_names]

    @abc.abstractmethod
    def unit_counts(self) -> Dict[str, List[int]]:
        """Units per layer for every unit type the family has (``emb``: one layer)."""

    @abc.abstractmethod
    def widths(self) -> dict:
        """The model's widths, in the vocabulary of ``Masks.kept()`` and ``model_args``."""

    @abc.abstractmethod
    def build(self, widths: dict, device=None, **overrides) -> nn.Module:
        """A model of the same architecture with these widths (random weights)."""

    @abc.abstractmethod
    def cost_model(self) -> Cost:
        """``cost(widths) -> (MACs, parameters)`` in closed form, exact for the architecture."""

    @abc.abstractmethod
    def gmacs(self) -> float:
        """Closed-form GMACs of the model (matrix products, as ``count_gmacs`` counts them)."""

    #: the latency-table file format that times this family (``prune/latency.py``)
    table_format = ''

    @abc.abstractmethod
    def latency_grid(self, fine: bool = False) -> Dict[str, List[int]]:
        """The widths a latency table times: nodes covering every width the model could be pruned to."""

    def grid_with(self, overrides: Optional[Dict[str, list]] = None) -> Dict[str, List[int]]:
        """``latency_grid()`` with some axes given (``NViTConfig.lut_grid``)."""
        return dict(self.latency_grid(), **(overrides or {}))


class DeiTLayout(Layout):
    """deitlab ``DeiT`` / ``DeiTDistilled``: all five unit types (see groups.py)."""

    family = 'DeiT'
    types = GROUP_TYPES

    def check(self) -> None:
        model = self.model
        for name in ('norm_pre', 'fc_norm'):
            if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
                raise PruneError(f'models with {name} are not supported by the pruner')
        if not isinstance(model.patch_embed.norm, nn.Identity):
            raise PruneError('patch embeddings with a norm layer are not supported by the pruner')
        if getattr(model, 'num_reg_tokens', 0):
            raise PruneError('models with register tokens are not supported by the pruner')
        if getattr(model, 'attn_pool', None) is not None:
            raise PruneError('attention pooling (global_pool="map") is not supported by the pruner')
        for i, blk in enumerate(model.blocks):
            if blk.attn.qkv.bias is None:
                raise PruneError(f'block {i}: qkv without bias is not supported by the pruner')

    @property
    def block_names(self) -> List[str]:
        return [f'blocks.{i}' for i in range(len(self.model.blocks))]

    def unit_counts(self) -> Dict[str, List[int]]:
        w = self.model.block_widths
        return dict(emb=[self.model.embed_dim], **{k: list(w[WIDTH_KEYS[k]]) for k in BLOCK_TYPES})

    def widths(self) -> dict:
        return dict(self.model.block_widths, embed_dim=self.model.embed_dim)

    def build(self, widths: dict, device=None, **overrides) -> nn.Module:
        """The attention scale stays the dense model's (see groups.py)."""
        model = self.model
        args = dict(model.model_args)
        args.update({k: widths[k] for k in ('embed_dim', 'num_heads', 'qk_dim', 'v_dim', 'mlp_hidden')})
        args['attn_scale'] = list(model.block_widths['attn_scale'])[:len(widths['num_heads'])]
        args.update(overrides)
        return _create_like(model, args, device)

    def cost_model(self) -> Cost:
        """Per block exactly (``block_macs`` / ``block_params``); the rest of the model (patch
        embedding, tokens, final norm, heads) is affine in the embedding width and comes from two
        models without blocks built once on the meta device."""
        from ..bench import analytic_macs, block_macs, count_params
        model = self.model
        blk = model.blocks[0]
        qkv_bias, layer_scale = blk.attn.qkv.bias is not None, hasattr(blk.ls1, 'gamma')
        N, E = tokens_of(model), model.embed_dim
        pts = {}
        for d in (E, max(1, E // 2)):
            meta = self.build(dict(embed_dim=d, num_heads=[], qk_dim=[], v_dim=[], mlp_hidden=[]), device='meta',
                              depth=0)
            pts[d] = (analytic_macs(meta)['total'], count_params(meta))
        (d1, (m1, p1)), (d2, (m2, p2)) = sorted(pts.items())
        slope = lambda a, b: (b - a) / (d2 - d1) if d2 != d1 else 0.0
        rest_macs, rest_params = (m1 - slope(m1, m2) * d1, slope(m1, m2)), (p1 - slope(p1, p2) * d1, slope(p1, p2))

        def cost(widths: dict) -> Tuple[float, float]:
            D = widths['embed_dim']
            rows = list(zip(widths['num_heads'], widths['qk_dim'], widths['v_dim'], widths['mlp_hidden']))
            macs = rest_macs[0] + rest_macs[1] * D + sum(sum(block_macs(N, D, *r).values()) for r in rows)
            params = rest_params[0] + rest_params[1] * D + sum(
                block_params(D, *r, qkv_bias=qkv_bias, layer_scale=layer_scale) for r in rows)
            return macs, params
        return cost

    def gmacs(self) -> float:
        from ..bench import analytic_gmacs
        return analytic_gmacs(self.model)

    table_format = 'deitlab-latency-table/1'

    def latency_grid(self, fine: bool = False) -> Dict[str, List[int]]:
        """Per axis (emb, heads, qk, v, mlp): quarters of the dense widths (eighths with ``fine``)."""
        w = self.model.block_widths
        E, H = self.model.embed_dim, max(w['num_heads'])
        dq, dv, M = max(w['qk_dim']), max(w['v_dim']), max(w['mlp_hidden'])
        quarters = (0.0, 0.25, 0.5, 1.0) if not fine else (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
        heads = list(range(1, H + 1)) if H <= 4 else _grid_axis(H, (0.0, 0.25, 0.5, 0.75, 1.0))
        return dict(emb=_grid_axis(E, (0.25, 0.5, 0.75, 1.0), minimum=8 if E >= 32 else 1),
                    heads=heads, qk=_grid_axis(dq, quarters), v=_grid_axis(dv, quarters),
                    mlp=_grid_axis(M, (0.0, 0.25, 0.5, 0.75, 1.0)))


def _pointwise(layer: nn.Module) -> bool:
    """A Linear, or a Conv2d that is one (1x1 kernel, stride 1, no padding, no groups)."""
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding in ((0, 0), 'valid') and layer.groups == 1 and layer.dilation == (1, 1))


def _width(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == 'in' else layer.out_features
    return layer.in_channels if side == 'in' else layer.out_channels


class MLPLayout(Layout):
    """A token-mixer family pruned in its MLP hidden widths only (see the module docstring).

    Besides the ``Layout`` interface it gives the latency table what it times: the kind of every
    block (blocks of one kind differ only in their MLP width), the input shape of every block, a
    copy of a block with another MLP width, and the model without its blocks.
    """

    types = ('mlp',)

    def check(self) -> None:
        for name, blk in zip(self.block_names, self.blocks()):
            mlp = getattr(blk, 'mlp', None)
            where = f'{self.family} block {name}'
            if type(mlp) is not Mlp:
                raise PruneError(f"{where}: the pruner needs timm's Mlp (fc1, act, fc2), not {type(mlp).__name__}")
            if not (_pointwise(mlp.fc1) and _pointwise(mlp.fc2) and type(mlp.fc1) is type(mlp.fc2)):
                raise PruneError(f'{where}: mlp.fc1 / mlp.fc2 must both be Linear or both 1x1 Conv2d')
            if not isinstance(mlp.norm, nn.Identity):
                raise PruneError(f'{where}: an MLP with a norm between fc1 and fc2 is not supported by the pruner')
            if any(True for _ in mlp.act.parameters()):
                raise PruneError(f'{where}: an MLP activation with parameters ({type(mlp.act).__name__}) is not '
                                 f'supported by the pruner')
            with torch.no_grad():   # parameter-free: probe on the CPU, whatever device the model is on
                at_zero = mlp.act(torch.zeros(1))
            if float(at_zero.abs().max()) != 0.0:
                raise PruneError(f'{where}: the MLP activation {type(mlp.act).__name__} is not 0 at 0, so a removed '
                                 f'hidden unit would still add a constant; the pruner needs act(0) = 0 (GELU, ReLU)')

    def unit_counts(self) -> Dict[str, List[int]]:
        return dict(mlp=self.widths()['mlp_hidden'])

    def widths(self) -> dict:
        return dict(mlp_hidden=[_width(blk.mlp.fc1, 'out') for blk in self.blocks()])

    def build(self, widths: dict, device=None, **overrides) -> nn.Module:
        args = dict(self.model.model_args, mlp_hidden=[int(m) for m in widths['mlp_hidden']])
        args.update(overrides)
        return _create_like(self.model, args, device)

    @abc.abstractmethod
    def closed_form_macs(self) -> int:
        """Closed-form MACs per image of the model (its family's formula, per-block MLP widths)."""

    def gmacs(self) -> float:
        return self.closed_form_macs() / 1e9

    @cached_property
    def block_inputs(self) -> List[Tuple[int, ...]]:
        """Shape (without the batch) of every block's input at the model's input size, read by
        hooks on one forward pass of a zero image."""
        from ..bench.common import eval_mode, resolve_input_size
        model = self.model
        p = next(model.parameters())
        shapes: Dict[int, Tuple[int, ...]] = {}

        def hook(i):
            def record(module, args):   # returns None: the input goes on unchanged
                shapes.setdefault(i, tuple(args[0].shape[1:]))
            return record
        hooks = [blk.register_forward_pre_hook(hook(i)) for i, blk in enumerate(self.blocks())]
        try:
            with torch.no_grad(), eval_mode(model):
                model(torch.zeros(1, *resolve_input_size(model), device=p.device, dtype=p.dtype))
        finally:
            for h in hooks:
                h.remove()
        return [shapes[i] for i in range(self.depth)]

    def cost_model(self) -> Cost:
        """The dense model's closed-form MACs and its parameter count, plus per block, for each
        hidden unit more or less, ``2 * positions * C`` MACs (fc1 and fc2 at every token / pixel)
        and ``2 * C (+1 for fc1's bias)`` parameters, C being the block's residual width."""
        from ..bench import count_params
        dense = self.widths()['mlp_hidden']
        macs0, params0 = self.closed_form_macs(), count_params(self.model)
        per_unit = []
        for blk, shape in zip(self.blocks(), self.block_inputs):
            fc1 = blk.mlp.fc1
            C = _width(fc1, 'in')
            per_unit.append((2 * (math.prod(shape) // C) * C, 2 * C + (fc1.bias is not None)))

        def cost(widths: dict) -> Tuple[float, float]:
            delta = [m - m0 for m, m0 in zip(widths['mlp_hidden'], dense)]
            return (macs0 + sum(u[0] * d for u, d in zip(per_unit, delta)),
                    params0 + sum(u[1] * d for u, d in zip(per_unit, delta)))
        return cost

    # ------------------------------------------------------------------ for the latency table
    @abc.abstractmethod
    def block_kind(self, b: int) -> str:
        """Blocks of one kind have the same structure and input shape; only the MLP width varies."""

    def block_with_mlp(self, b: int, hidden: int) -> nn.Module:
        """A copy of block ``b`` whose MLP has ``hidden`` units (fresh weights)."""
        blk = copy.deepcopy(self.blocks()[b])
        old = blk.mlp
        p = next(old.parameters())
        blk.mlp = Mlp(_width(old.fc1, 'in'), int(hidden), out_features=_width(old.fc2, 'out'), act_layer=type(old.act),
                      bias=(old.fc1.bias is not None, old.fc2.bias is not None),
                      use_conv=isinstance(old.fc1, nn.Conv2d)).to(device=p.device, dtype=p.dtype)
        return blk

    def without_blocks(self) -> nn.Module:
        """A copy of the model with every block an identity: what no MLP width changes."""
        blocks = {n: self.model.get_submodule(n) for n in self.block_names}
        memo = {id(m): nn.Identity() for m in blocks.values()}   # do not copy the blocks' weights
        return copy.deepcopy(self.model, memo)


    table_format = 'deitlab-mlp-latency-table/1'

    def latency_grid(self, fine: bool = False) -> Dict[str, List[int]]:
        """Per block kind: the MLP widths of that kind's blocks at quarters (eighths with ``fine``)."""
        fractions = (0.0, 0.25, 0.5, 0.75, 1.0) if not fine else tuple(i / 8 for i in range(9))
        grid: Dict[str, List[int]] = {}
        for b, m in enumerate(self.widths()['mlp_hidden']):
            kind = self.block_kind(b)
            grid[kind] = sorted(set(grid.get(kind, [])) | set(_grid_axis(m, fractions)))
        return grid

    def grid_with(self, overrides: Optional[Dict[str, list]] = None) -> Dict[str, List[int]]:
        """Only ``mlp`` may be given: those widths are the nodes of every block kind, capped at the
        kind's widest MLP, which always stays a node."""
        grid = self.latency_grid()
        if not overrides:
            return grid
        bad = sorted(set(overrides) - {'mlp'})
        if bad:
            raise PruneError(f'{self.family} models prune MLP hidden widths only; the latency grid takes an mlp '
                             f'axis, not {bad}')
        values = [int(v) for v in overrides['mlp']]
        return {k: sorted({v for v in values if 1 <= v <= max(axis)} | {max(axis)}) for k, axis in grid.items()}


class PoolFormerLayout(MLPLayout):
    """deitlab ``PoolFormer``: blocks ``stages.{i}.blocks.{j}``, one block kind per stage."""

    family = 'PoolFormer'

    @property
    def block_names(self) -> List[str]:
        return [f'stages.{i}.blocks.{j}' for i, s in enumerate(self.model.stages) for j in range(len(s.blocks))]

    def block_kind(self, b: int) -> str:
        return 'stage' + self.block_names[b].split('.')[1]

    def closed_form_macs(self) -> int:
        from ..bench.common import resolve_input_size
        from ..models.poolformer import analytic_macs
        size = resolve_input_size(self.model)
        if size[1] != size[2]:
            raise PruneError(f'the PoolFormer closed form takes square inputs, the model takes {tuple(size)}')
        return analytic_macs(self.model, size[1])


class SpectFormerLayout(MLPLayout):
    """deitlab ``SpectFormer``: blocks ``blocks.{b}``, one block kind per token mixer."""

    family = 'SpectFormer'
    kind_names = dict(s='spectral', a='attention', p='pooling', i='identity')

    @property
    def block_names(self) -> List[str]:
        return [f'blocks.{i}' for i in range(len(self.model.blocks))]

    def block_kind(self, b: int) -> str:
        return self.kind_names[self.model.mixers[b]]

    def closed_form_macs(self) -> int:
        from ..models.spectformer import spectformer_macs
        return spectformer_macs(self.model)['total']


def layout_of(model: nn.Module) -> Layout:
    """The layout of a model the pruner handles (the first family in ``deitlab.registry.PRUNABLE``
    whose classes the model is an instance of); ``PruneError`` for anything else (or when the
    layout's checks fail)."""
    for family in PRUNABLE:
        if isinstance(model, tuple(load_target(c) for c in family['classes'])):
            return family.load()(model)
    raise PruneError(f'structural pruning works on deitlab DeiT models, not {type(model).__name__}; convert a timm '
                     f'ViT/DeiT with deitlab.models.deit.from_timm(model) (deitlab PoolFormer and SpectFormer '
                     f'models are pruned in their MLP hidden widths)')
