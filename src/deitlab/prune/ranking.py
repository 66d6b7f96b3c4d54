"""Global ranking of unit groups with the latency penalty, and the budget a pruner stops at.

NViT (Yang et al. CVPR 2023, Sec. 3.3) ranks every unit of every layer in one list by its
latency-penalised saliency

    I'_u = I_u - lambda * dLat_u

where ``dLat_u`` is the latency one more unit of that layer's type saves at the current widths
(``LatencyTable.unit_savings``; the same offset for every unit of a layer). Within a layer the
units are sorted by ``I'`` and chunked into consecutive groups of the type's group size; a group
scores the sum of its members, and the lowest-scoring groups of the whole model go first.

deitlab makes the two terms scale-free before subtracting them, so that one ``lambda`` means the
same on any model, loss and device: ``I'_u = I_u / mean(I) - lambda * dLat_u / mean(dLat)``, with
both means over all active units. ``lambda = 0`` is the pure saliency order; NViT's raw form with
seconds and a KL loss scaled by 1e5 used ``lambda = 5e-4``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .families import block_params, layout_of
from .groups import GROUP_TYPES, Masks, PruneError

__all__ = ['Group', 'default_group_sizes', 'rank_groups', 'remove_group', 'block_params', 'Budget', 'build_like']


@dataclass
class Group:
    score: float
    kind: str
    block: Optional[int]
    units: torch.Tensor      # indices into the layer's mask


_GROUP_DIVISORS = dict(emb=48, head=6, qk=8, v=8, mlp=192)


def default_group_sizes(model) -> Dict[str, int]:
    """NViT's ranking group sizes (embedding 16, heads 2, qk 8, v 8, MLP 16 on DeiT-B) scaled to the
    model, so that each layer has about as many groups as in NViT: E/48, H/6, dq/8, dv/8, M/192 of
    the widest layer; only the unit types of the model's family (PoolFormer, SpectFormer: ``mlp``)."""
    counts = layout_of(model).unit_counts()
    return {k: max(1, max(n) // _GROUP_DIVISORS[k]) for k, n in counts.items()}


def _layer_values(scores: dict, kind: str, block: Optional[int]) -> torch.Tensor:
    return scores[kind] if block is None else scores[kind][block]


def rank_groups(scores: dict, savings: Optional[dict], masks: Masks, lam: float, group_sizes: Dict[str, int],
                min_keep: Dict[str, int], types=GROUP_TYPES) -> List[Group]:
    """All groups that may be removed now, lowest penalised score first.

    ``scores`` (per unit) and ``savings`` (per layer, ms per unit) use the layouts of
    ``reduce_units`` and ``LatencyTable.unit_savings``; ``savings=None`` or ``lam=0`` ranks by
    saliency alone. A layer offers only whole groups and never goes below ``min_keep`` units.
    Negative latency savings (timing noise) count as zero.
    """
    layers = [(k, b) for k, b in masks.layers() if k in types]
    active = {(k, b): masks.layer(k, b).nonzero().flatten() for k, b in layers}
    all_scores = torch.cat([_layer_values(scores, k, b)[active[(k, b)]].float().cpu() for k, b in layers])
    s_mean = float(all_scores.mean()) if all_scores.numel() else 1.0
    s_mean = s_mean if s_mean > 0 else 1.0
    use_lat = savings is not None and lam != 0
    d_mean = 1.0
    if use_lat:
        lat = torch.cat([torch.full((active[(k, b)].numel(),), max(0.0, float(_layer_values(savings, k, b))))
                         for k, b in layers])
        d_mean = float(lat.mean()) if lat.numel() and float(lat.mean()) > 0 else 1.0
    groups: List[Group] = []
    for k, b in layers:
        idx = active[(k, b)]
        size = int(group_sizes[k])
        if size < 1:
            raise PruneError(f'group size of {k} must be >= 1, got {size}')
        removable = (idx.numel() - int(min_keep[k])) // size
        if removable < 1:
            continue
        val = _layer_values(scores, k, b)[idx].float().cpu() / s_mean
        if use_lat:
            val = val - lam * max(0.0, float(_layer_values(savings, k, b))) / d_mean
        order = torch.argsort(val, stable=True)
        for j in range(removable):
            members = order[j * size:(j + 1) * size]
            groups.append(Group(float(val[members].sum()), k, b, idx[members.to(idx.device)]))
    groups.sort(key=lambda g: g.score)
    return groups


def remove_group(masks: Masks, group: Group) -> None:
    masks.layer(group.kind, group.block)[group.units] = False


class Budget:
    """Estimates of a pruned model relative to the dense one, and whether the target is met.

    Exactly one target: ``latency`` (needs a ``LatencyTable``), ``gmacs`` or ``params``, each a
    fraction of the dense model in (0, 1]. GMACs and parameters come in closed form from the widths
    (``layout_of(model).cost_model()``): for a DeiT per block exactly, and for the rest of the model
    (patch embedding, tokens, final norm, heads), which is affine in the embedding width, from two
    models without blocks built once; for PoolFormer / SpectFormer the dense model's closed form
    plus, per block, the MACs and parameters of one MLP hidden unit times the change of its width.
    """

    def __init__(self, model, lut=None, latency: Optional[float] = None, gmacs: Optional[float] = None,
                 params: Optional[float] = None):
        given = {k: v for k, v in dict(latency=latency, gmacs=gmacs, params=params).items() if v is not None}
        if len(given) != 1:
            raise PruneError(f'give exactly one pruning target (latency, GMACs or params fraction), got '
                             f'{sorted(given) or "none"}')
        (self.kind, self.target), = given.items()
        if not 0.0 < float(self.target) <= 1.0:
            raise PruneError(f'the {self.kind} target is a fraction of the dense model in (0, 1], got {self.target}')
        if self.kind == 'latency' and lut is None:
            raise PruneError('a latency target needs a latency table')
        self.lut = lut
        self.layout = layout_of(model)
        self._cost = self.layout.cost_model()
        self.dense = self.absolute(self.layout.widths())

    def absolute(self, widths: dict) -> dict:
        """``gmacs``, ``params`` and (with a table) ``latency_ms`` of a model with these widths."""
        macs, params = self._cost(widths)
        out = dict(gmacs=macs / 1e9, params=int(round(params)))
        if self.lut is not None:
            out['latency_ms'] = self.lut.model_ms(widths)
        return out

    def fraction(self, widths: dict) -> float:
        """The target quantity of a model with these widths, as a fraction of the dense model."""
        if self.kind == 'latency':
            return self.lut.model_ms(widths) / self.dense['latency_ms']
        return self.absolute(widths)[self.kind] / self.dense[self.kind]

    def relative(self, widths: dict) -> dict:
        a = self.absolute(widths)
        out = dict(gmacs=a['gmacs'] / self.dense['gmacs'], params=a['params'] / self.dense['params'])
        if 'latency_ms' in a:
            out['latency'] = a['latency_ms'] / self.dense['latency_ms']
        return out

    def reached(self, widths: dict) -> bool:
        return self.fraction(widths) <= self.target


def build_like(model, widths: dict, device=None, **overrides):
    """A model of ``model``'s architecture with other widths (random weights; ``device='meta'``
    builds it without memory): ``layout_of(model).build``. A DeiT keeps the dense attention scale."""
    return layout_of(model).build(widths, device=device, **overrides)
