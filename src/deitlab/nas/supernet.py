"""The ViT-ResNAS weight-sharing supernet: one ViT-Res at the largest shape, sub-networks by masks.

:class:`Supernet` holds one ``ViTRes`` built at ``space.supernet_args()``. A sub-network
(:class:`~deitlab.nas.space.Arch`) uses the *first* ``C_s`` channels of each stage's residual
stream, the *first* ``h`` heads and the *first* ``m`` MLP hidden units of each block, and skips the
blocks whose keep flag is False. The supernet's own forward walks the ViTRes modules with
per-example masks, so one batch can hold several architectures (the paper's multi-architectural
sampling: example ``i`` uses ``archs[i // (B // len(archs))]``, one forward and one backward for
all):

* channels ``(B, 1, C_s)``: applied after the patch stem and position embedding, to both branch
  outputs of every block (so the stream stays zero outside the active channels) and after each
  residual spatial reduction;
* the patch stem (``space.stem``) runs unmasked: the linear stem is one projection, and the conv
  stem's hidden convolutions and BatchNorms are shared by every sub-network (their width is not a
  gene), only its projection's output channels follow the stage-1 width, masked as above. A mask
  inside the conv stem would be wrong in training mode: BatchNorm's batch statistics would average
  the zeros of the examples whose sub-network lacks a channel. As it is, the statistics are those of
  the shared stem over the whole batch, as in any sub-network run on that batch;
* heads ``(B, H, 1, 1)``: the context of inactive heads is zeroed before ``proj``;
* MLP hidden ``(B, 1, M)``: after the activation;
* keep: a block runs on the examples that keep it only (the identity for the others);
* every LayerNorm is a masked LayerNorm (:func:`masked_layer_norm`): mean and variance over each
  example's active channels, affine parameters applied, 0 on inactive channels.

Channels outside the active ones are zero everywhere, so a layer reading the stream computes what
the sliced layer of the sub-network computes, and :meth:`Supernet.subnet` (the physically sliced
``ViTRes``) gives the same outputs (``tests/test_nas_supernet.py``). Gradients reach the shared
weights only through the active slices.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.attention import attend, attention_output, project
from ..models.vitres import ResidualSpatialReduction, ViTRes
from .space import Arch, SearchSpace, SearchSpaceError

__all__ = ['Supernet', 'masked_layer_norm']

Archs = Union[Arch, Sequence[Arch], None]


def masked_layer_norm(x: torch.Tensor, mask: Optional[torch.Tensor], norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` over the channels where ``mask`` (broadcastable to ``x``, e.g. (B, 1, C), 0/1) is 1:
    mean and variance over each row's active channels, then the affine parameters; 0 on the inactive
    channels. ``mask=None``: every channel is active (plain ``F.layer_norm``)."""
    if mask is None:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    m = mask.to(x.dtype)
    k = m.sum(-1, keepdim=True)
    mean = (x * m).sum(-1, keepdim=True) / k
    xc = (x - mean) * m
    var = (xc * xc).sum(-1, keepdim=True) / k
    y = xc * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight
    if norm.bias is not None:
        y = y + norm.bias
    return y * m


def _apply(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x * mask


def _take(mask: Optional[torch.Tensor], rows: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows of a per-example mask (a mask shared by the batch has one row and stays as it is)."""
    return mask if mask is None or mask.shape[0] == 1 else mask.index_select(0, rows)


@dataclass
class _Masks:
    """Per-example masks of one batch; None where every example uses the full width."""

    channels: List[Optional[torch.Tensor]]   # per stage (B or 1, 1, C_s)
    heads: List[Optional[torch.Tensor]]      # per block (B or 1, H, 1, 1)
    hidden: List[Optional[torch.Tensor]]     # per block (B or 1, 1, M)
    keep: List[Optional[torch.Tensor]]       # per block: rows that run the block (None: all of them)


def _prefix_mask(values: Sequence[int], full: int, per: int, shape, device, dtype) -> Optional[torch.Tensor]:
    """``(arange(full) < v)`` for each architecture's value ``v``, one row per example (a single
    row if all architectures agree), reshaped to ``shape`` (with -1 for ``full``); None if all are
    ``full``."""
    if all(v == full for v in values):
        return None
    if len(set(values)) == 1:
        values, per = values[:1], 1
    v = torch.tensor(values, device=device).repeat_interleave(per)
    m = (torch.arange(full, device=device)[None, :] < v[:, None]).to(dtype)
    return m.reshape(len(v), *shape)


class Supernet(nn.Module):
    """The weight-sharing supernet of a :class:`SearchSpace` (see the module docstring).

    ``supernet(x, archs)``: ``archs`` is one ``Arch`` or a list whose length divides the batch
    (``None``: the architectures set by :meth:`sampled`, else the largest). The output is the
    ViTRes output: logits, with distillation the average of both heads, or both heads after
    ``set_distilled_training(True)`` in training mode. ``model_kwargs`` go to the ViTRes
    constructor (e.g. ``drop_path_rate``, ``qkv_bias``).
    """

    def __init__(self, space: SearchSpace, **model_kwargs):
        super().__init__()
        self.space = space
        self.model = _build(space, space.supernet_args(), **model_kwargs)
        self._active: Optional[List[Arch]] = None

    # ------------------------------------------------------------------ architectures

    def sample_archs(self, n: int, rng: random.Random) -> List[Arch]:
        """``n`` architectures for one step, drawn without replacement (distinct while the space
        has enough)."""
        return self.space.sample_distinct(n, rng)

    @contextlib.contextmanager
    def sampled(self, archs: Archs) -> Iterator['Supernet']:
        """Within the block, ``supernet(x)`` (no ``archs``) runs ``archs``."""
        before, self._active = self._active, self._arch_list(archs)
        try:
            yield self
        finally:
            self._active = before

    def _arch_list(self, archs: Archs) -> List[Arch]:
        if archs is None:
            return list(self._active) if self._active is not None else [self.space.largest()]
        if isinstance(archs, Arch):
            archs = [archs]
        archs = list(archs)
        if not archs:
            raise SearchSpaceError('give at least one architecture')
        for a in archs:
            self.space.validate(a)
        return archs

    def macs(self, arch: Arch) -> int:
        return self.space.macs(arch)

    def set_distilled_training(self, enable: bool = True) -> None:
        self.model.set_distilled_training(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The ViTRes's parameters without weight decay (position embeddings, tokens), by their names here."""
        return {f'model.{name}' for name in self.model.no_weight_decay()}

    # ------------------------------------------------------------------ masked forward

    def _masks(self, archs: List[Arch], batch: int, device, dtype) -> _Masks:
        if batch % len(archs):
            raise SearchSpaceError(f'a batch of {batch} examples cannot be split evenly among {len(archs)} '
                                   f'architectures (example i uses archs[i // (batch // {len(archs)})]); make the '
                                   f'batch size a multiple of the number of architectures')
        per = batch // len(archs)
        m = self.model
        channels = [_prefix_mask([a.widths[s] for a in archs], C, per, (1, -1), device, dtype)
                    for s, C in enumerate(m.widths)]
        heads, hidden, keep = [], [], []
        for i, blk in enumerate(m.blocks):
            heads.append(_prefix_mask([a.heads[i] for a in archs], blk.attn.num_heads, per, (-1, 1, 1), device,
                                      dtype))
            hidden.append(_prefix_mask([a.mlp_hidden[i] for a in archs], blk.mlp.fc1.out_features, per, (1, -1),
                                       device, dtype))
            flags = [a.keep[i] for a in archs]
            keep.append(None if all(flags) else
                        torch.tensor([j for j in range(batch) if flags[j // per]], dtype=torch.long, device=device))
        return _Masks(channels, heads, hidden, keep)

    def _block(self, blk: nn.Module, x: torch.Tensor, channels, heads, hidden) -> torch.Tensor:
        attn = blk.attn
        h = masked_layer_norm(x, channels, blk.norm1)
        ctx = _apply(attend(attn, *project(attn, h)), heads)
        x = x + _apply(blk.drop_path1(blk.ls1(attention_output(attn, ctx, h))), channels)
        mlp = blk.mlp
        h = _apply(mlp.act(mlp.fc1(masked_layer_norm(x, channels, blk.norm2))), hidden)
        h = mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))
        return x + _apply(blk.drop_path2(blk.ls2(h)), channels)

    @staticmethod
    def _reduction(red: ResidualSpatialReduction, x: torch.Tensor, c_in, c_out) -> torch.Tensor:
        B, N, C = x.shape
        p, (h, w) = red.num_prefix_tokens, red.grid
        y = masked_layer_norm(x, c_in, red.norm)
        patches = y[:, p:].transpose(1, 2).reshape(B, C, h, w)
        main = torch.cat([red.token_proj(y[:, :p]), red.conv(patches).flatten(2).transpose(1, 2)], dim=1)
        main = main + red.pos_embed
        pooled = F.avg_pool2d(x[:, p:].transpose(1, 2).reshape(B, C, h, w), kernel_size=2, stride=2)
        residual = F.pad(torch.cat([x[:, :p], pooled.flatten(2).transpose(1, 2)], dim=1), (0, red.out_dim - C))
        return _apply(main + residual, c_out)

    def forward_features(self, x: torch.Tensor, archs: Archs = None) -> torch.Tensor:
        """The final-norm tokens (B, N, C_S) of each example's sub-network (zero outside its width)."""
        m = self.model
        masks = self._masks(self._arch_list(archs), x.shape[0], x.device, x.dtype)
        x = m.patch_embed(x)
        prefix = [m.cls_token] + ([m.dist_token] if m.distilled else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + m.pos_embed
        x = _apply(x, masks.channels[0])
        i = 0
        for s, depth in enumerate(m.depths):
            if s > 0:
                x = self._reduction(m.reductions[s - 1], x, masks.channels[s - 1], masks.channels[s])
            c = masks.channels[s]
            for blk in m.blocks[i:i + depth]:
                rows = masks.keep[i]
                if rows is None:
                    x = self._block(blk, x, c, masks.heads[i], masks.hidden[i])
                elif rows.numel():
                    y = self._block(blk, x.index_select(0, rows), _take(c, rows), _take(masks.heads[i], rows),
                                    _take(masks.hidden[i], rows))
                    x = x.index_copy(0, rows, y)
                i += 1
        return masked_layer_norm(x, masks.channels[-1], m.norm)

    def forward(self, x: torch.Tensor, archs: Archs = None):
        return self.model.forward_head(self.forward_features(x, archs))

    # ------------------------------------------------------------------ sliced sub-networks

    def subnet(self, arch: Arch) -> ViTRes:
        """The sub-network ``arch`` as a stand-alone ``ViTRes`` (built through ``space.model_name``
        when set), its weights copied from the supernet's slices: the first channels, heads and MLP
        units, the kept blocks only. In the supernet's train/eval mode, on its device and dtype."""
        args = self.space.model_args(arch)
        m = self.model
        p = next(m.parameters())
        kwargs = {k: v for k, v in m.arch_kwargs.items() if k not in args and k != 'stem_width'}   # drop path, qkv bias
        with torch.device('meta'):   # no initialisation: every tensor is loaded from the supernet below
            sub = _build(self.space, args, **kwargs)
        if set(sub.state_dict()) == {name for name, _ in sub.named_parameters()} | \
                {name for name, _ in sub.named_buffers()}:
            sub = sub.to_empty(device=p.device).to(dtype=p.dtype)
        else:   # a tensor the state dict does not hold (a non-persistent buffer) needs the real constructor
            sub = _build(self.space, args, **kwargs).to(device=p.device, dtype=p.dtype)
        kept = [i for i, k in enumerate(arch.keep) if k]   # sub-network block j is supernet block kept[j]
        src = m.state_dict()
        state = {}
        with torch.no_grad():
            for name, t in sub.state_dict().items():
                parts = name.split('.')
                if parts[0] == 'blocks':
                    j = int(parts[1])
                    parts[1] = str(kept[j])
                full = src['.'.join(parts)]
                if parts[0] == 'blocks' and parts[2:4] == ['attn', 'qkv']:   # the first h heads of Q, K and V
                    a = m.blocks[kept[j]].attn
                    full = full.index_select(0, _qkv_rows(a.num_heads, sub.blocks[j].attn.num_heads, a.qk_dim,
                                                          full.device))
                state[name] = full[tuple(slice(0, n) for n in t.shape)]   # copied by load_state_dict
        sub.load_state_dict(state)
        return sub.train(self.training)


def _qkv_rows(H: int, h: int, d: int, device) -> torch.Tensor:
    """The rows of the first ``h`` of ``H`` heads (width ``d``) in a qkv layer ``[Q, K, V]``."""
    first = torch.arange(h * d, device=device)
    return torch.cat([first, first + H * d, first + 2 * H * d])


def _build(space: SearchSpace, args: dict, **kwargs) -> ViTRes:
    fixed = sorted(set(kwargs) & (set(args) | {'stem_width'}))
    if fixed:
        raise SearchSpaceError(f'{", ".join(fixed)} {"is" if len(fixed) == 1 else "are"} set by the search space (its '
                               f'definition, and the default conv stem width its MACs and latency tables assume); '
                               f'pass only other ViTRes arguments (e.g. drop_path_rate)')
    if space.model_name is None:
        return ViTRes(**args, **kwargs)
    import timm
    model = timm.create_model(space.model_name, **args, **kwargs)
    if not isinstance(model, ViTRes):
        raise SearchSpaceError(f'model_name {space.model_name!r} builds a {type(model).__name__}, not a ViTRes')
    return model
