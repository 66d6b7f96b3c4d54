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

from .groups import GROUP_TYPES, Masks, PruneError, tokens_of


@dataclass
class Group:
    score: float
    kind: str
    block: Optional[int]
    units: torch.Tensor      # indices into the layer's mask


def default_group_sizes(model) -> Dict[str, int]:
    """NViT's ranking group sizes (embedding 16, heads 2, qk 8, v 8, MLP 16 on DeiT-B) scaled to the
    model, so that each layer has about as many groups as in NViT: E/48, H/6, dq/8, dv/8, M/192."""
    w = model.block_widths
    return dict(emb=max(1, model.embed_dim // 48), head=max(1, max(w['num_heads']) // 6),
                qk=max(1, max(w['qk_dim']) // 8), v=max(1, max(w['v_dim']) // 8),
                mlp=max(1, max(w['mlp_hidden']) // 192))


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


def block_params(D: int, H: int, dq: int, dv: int, M: int, qkv_bias: bool = True, layer_scale: bool = False) -> int:
    """Parameters of one block: two LayerNorms, qkv (+bias), proj, fc1, fc2 (+biases), LayerScale."""
    qkv = D * H * (2 * dq + dv) + (H * (2 * dq + dv) if qkv_bias else 0)
    return 4 * D + qkv + H * dv * D + D + D * M + M + M * D + D + (2 * D if layer_scale else 0)


class Budget:
    """Estimates of a pruned model relative to the dense one, and whether the target is met.

    Exactly one target: ``latency`` (needs a ``LatencyTable``), ``gmacs`` or ``params``, each a
    fraction of the dense model in (0, 1]. GMACs and parameters come in closed form from the widths:
    per block exactly, and for the rest of the model (patch embedding, tokens, final norm, heads),
    which is affine in the embedding width, from two models without blocks built once.
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
        blk = model.blocks[0]
        self.qkv_bias = blk.attn.qkv.bias is not None
        self.layer_scale = hasattr(blk.ls1, 'gamma')
        self.tokens = tokens_of(model)
        self._rest = self._affine_rest(model)
        self.dense = self.absolute(dict(model.block_widths, embed_dim=model.embed_dim))

    @staticmethod
    def _affine_rest(model) -> dict:
        from ..bench import analytic_macs, count_params
        E = model.embed_dim
        pts = {}
        for d in (E, max(1, E // 2)):
            meta = build_like(model, dict(embed_dim=d, num_heads=[], qk_dim=[], v_dim=[], mlp_hidden=[]),
                              device='meta', depth=0)
            pts[d] = (analytic_macs(meta)['total'], count_params(meta))
        (d1, (m1, p1)), (d2, (m2, p2)) = sorted(pts.items())
        slope = lambda a, b: (b - a) / (d2 - d1) if d2 != d1 else 0.0
        return dict(macs=(m1 - slope(m1, m2) * d1, slope(m1, m2)), params=(p1 - slope(p1, p2) * d1, slope(p1, p2)))

    def absolute(self, widths: dict) -> dict:
        """``gmacs``, ``params`` and (with a table) ``latency_ms`` of a model with these widths."""
        D, N = widths['embed_dim'], self.tokens
        rows = list(zip(widths['num_heads'], widths['qk_dim'], widths['v_dim'], widths['mlp_hidden']))
        from ..bench import block_macs
        macs = self._rest['macs'][0] + self._rest['macs'][1] * D + sum(
            sum(block_macs(N, D, *r).values()) for r in rows)
        params = self._rest['params'][0] + self._rest['params'][1] * D + sum(
            block_params(D, *r, qkv_bias=self.qkv_bias, layer_scale=self.layer_scale) for r in rows)
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
    builds it without memory). The attention scale stays the dense model's."""
    import timm
    from ..rundir import architecture_of
    args = dict(model.model_args)
    args.update({k: widths[k] for k in ('embed_dim', 'num_heads', 'qk_dim', 'v_dim', 'mlp_hidden')})
    args['attn_scale'] = list(model.block_widths['attn_scale'])[:len(widths['num_heads'])]
    args.update(overrides)
    if device == 'meta':
        with torch.device('meta'):
            return timm.create_model(architecture_of(model), pretrained=False, num_classes=model.num_classes, **args)
    return timm.create_model(architecture_of(model), pretrained=False, num_classes=model.num_classes,
                             **args).to(device or 'cpu')
