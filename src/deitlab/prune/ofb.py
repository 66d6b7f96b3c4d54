"""OFB: one-stage importance and sparsity search (Ye et al., "Once for Both", CVPR 2024), the search
space, bi-mask and losses on a DeiT-family model.

Every searchable *module* -- the embedding width (global), and per block the heads, the per-head
query/key width, the per-head value width and the MLP hidden width (the unit types of NViT's
groups, groups.py) -- has a learnable importance score ``S`` (one per unit) and a learnable
distribution over candidate widths ``softmax(alpha)`` (one logit per candidate width ``r_j``).
Each unit's activation is multiplied by the *bi-mask* (paper Eq. 4)::

    m(t) = lambda(t) * sigmoid(S) + (1 - lambda(t)) * sum_j softmax(alpha)_j * M_j

where ``M_j`` keeps the ``r_j`` units of highest score. Early on (``lambda`` near 0.99) the scores
dominate and learn which units matter; ``lambda`` falls linearly to 0.1 over the warm-up and the
candidate mixture then decides how many units survive. The losses (paper Sec. 3.3):

* adaptive one-hot, per module over its ``n`` active candidates with ``p = softmax(alpha)``:
  ``-sum p log p + tan(pi/2 - pi * sigma / sigma*) / n``, ``sigma = sum (p - mean p)^2`` and
  ``sigma* = 1 - 1/n`` (sigma of a one-hot p): ``+inf`` for a uniform p, ``-inf`` for a one-hot one;
  ``sigma*`` follows ``n`` as candidates are eliminated;
* score sparsity ``sum sigmoid(S)``, x 4e-4 for the attention modules and x 1e-4 for the MLP and
  embedding; module totals weighted 0.5 each (``w_head = w_mlp = w_embed``);
* FLOPs ``w_F ((F - F_target) / F_dense)^2`` with ``F`` the closed-form MACs (``Layout.cost_model``)
  at the expected widths ``sum_j p_j r_j``; exact at a one-hot choice. The paper fixes ``w_F = 5``
  for a search of about 100 epochs. In a search of a few hundred steps that weight loses to the
  distillation loss (on the Fashion-MNIST DeiT-nano, 400 steps to 0.35 of the dense GMACs ended at
  0.515), so by default ``w_F`` adapts (``adapt_budget``): starting at 5 it is multiplied by
  ``exp(rate)`` after every step that ends with the expected cost more than 3% off the target
  (either side) and divided by it (not below 5) after every step within, a multiplicative
  dual-ascent step on the budget constraint; ``adapt_budget=False`` keeps the paper's fixed 5.

Candidates whose probability falls to ``0.2 / n`` or below are eliminated (never the last). Where
the masks act (forward hooks, installed by ``OFBSearch.install``): the embedding mask on every
write to the residual stream (after the position embedding, after ``attn.proj``, after
``mlp.fc2``); the q/k mask on the queries (so the logits are linear in it), the v mask on the
values, the head mask on each head's context, the MLP mask after the activation. Each is a
per-unit scale of a linear layer's output or input, so ``fold`` moves the final masks into the
weights exactly.

Where this differs from the paper's code: q/k and v widths are separate modules (our DeiT allows
``qk_dim != v_dim``; the paper searches one q/k/v width per head jointly with the head count), heads
have their own scores (the paper orders heads by the sum of their dims' scores), head candidates
are every count 1..H by default (``grid='paper'``: the paper's even counts), and the blocks stay the
standard pre-norm block (the paper's code adds the norm's output to the residual in one place).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.attention import attend, attention_output, project
from .base import BLOCK_TYPES, PruneError
from .families import layout_of
from .compact import densify
from .groups import Masks, use_masked_layernorm

if TYPE_CHECKING:
    from .ofb_pmim import PMIM

__all__ = ['candidate_widths', 'SearchModule', 'OFBSearch', 'onehot_loss', 'lambda_at', 'SPARSITY_WEIGHTS',
           'MODULE_WEIGHT', 'FLOPS_WEIGHT', 'ELIMINATE_THRESHOLD']

GRIDS = ('ours', 'paper')
SPARSITY_WEIGHTS = dict(emb=1e-4, head=4e-4, qk=4e-4, v=4e-4, mlp=1e-4)
MODULE_WEIGHT = 0.5          # w_head = w_mlp = w_embed
FLOPS_WEIGHT = 5.0
BUDGET_BAND = 0.03           # the adaptive budget weight grows while the cost is off the target by more
ELIMINATE_THRESHOLD = 0.2    # a candidate goes when its probability is <= 0.2 / n_active
LAMBDA_RANGE = (0.99, 0.1)


def candidate_widths(kind: str, n: int, grid: str = 'ours') -> List[int]:
    """Candidate widths (increasing, the last ``n``) of a module of ``n`` units.

    ``emb``: ``n/2`` to ``n`` in steps of ``min(n // 32, 12)`` units (at least 1); ``head``: every
    count 1..n (``grid='paper'``: the even counts 2, 4, ..., n, or n when below 2); ``qk``, ``v``,
    ``mlp``: the ratios 2/8, 3/8, ..., 8/8 of ``n`` (rounded, at least 1)."""
    if grid not in GRIDS:
        raise PruneError(f'OFB grid must be one of {", ".join(GRIDS)}, got {grid!r}')
    if n < 1:
        raise PruneError(f'OFB module {kind} has no units')
    if kind == 'emb':
        out = list(range(n // 2, n + 1, max(1, min(n // 32, 12))))
    elif kind == 'head':
        out = list(range(1, n + 1)) if grid == 'ours' else list(range(2, n + 1, 2))
    elif kind in ('qk', 'v', 'mlp'):
        out = [max(1, round(n * k / 8)) for k in range(2, 9)]
    else:
        raise PruneError(f'unknown OFB module kind {kind!r}')
    return sorted(set(w for w in out if w >= 1) | {n})


def lambda_at(progress: float, lo_hi: Tuple[float, float] = LAMBDA_RANGE) -> float:
    """``lambda(t)``: linear from 0.99 at the start to 0.1 at the end of the warm-up
    (``progress`` = warm-up fraction done, clipped to [0, 1])."""
    start, end = lo_hi
    return start + (end - start) * min(1.0, max(0.0, float(progress)))


def onehot_loss(p: torch.Tensor) -> torch.Tensor:
    """Adaptive one-hot loss of a distribution ``p`` over ``n >= 2`` active candidates: entropy
    plus ``tan(pi/2 - pi sigma / sigma*) / n`` (module docstring)."""
    n = p.numel()
    if n < 2:
        return p.new_zeros(())
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    # in float64 and with sigma / sigma* kept in [0, 1]: float32's pi/2 lies above pi/2, and a ratio
    # rounded above 1 puts the argument below -pi/2, where tan jumps to +inf
    sigma = ((p.double() - p.double().mean()) ** 2).sum()
    ratio = (sigma / (1.0 - 1.0 / n)).clamp(0.0, 1.0)
    return entropy + (torch.tan(math.pi / 2 - math.pi * ratio) / n).to(p.dtype)


class SearchModule(nn.Module):
    """One searchable module: ``score`` (one logit per unit), ``alpha`` (one logit per candidate
    width) and which candidates are still active."""

    def __init__(self, kind: str, block: Optional[int], n: int, widths: List[int], generator=None):
        super().__init__()
        self.kind, self.block, self.n = kind, block, int(n)
        self.register_buffer('widths', torch.tensor(widths, dtype=torch.long))
        self.register_buffer('active', torch.ones(len(widths), dtype=torch.bool))
        # the paper's initialisation: scores ~ N(0, 0.2) (truncated), alpha ~ U(0, 1)
        self.score = nn.Parameter(torch.randn(n, generator=generator).clamp(-2, 2) * 0.2)
        self.alpha = nn.Parameter(torch.rand(len(widths), generator=generator))

    @property
    def name(self) -> str:
        return self.kind if self.block is None else f'{self.kind}.{self.block}'

    def probs(self) -> torch.Tensor:
        """``softmax(alpha)`` over the active candidates, 0 for the eliminated ones."""
        logits = self.alpha.masked_fill(~self.active, float('-inf'))
        return torch.softmax(logits, dim=0)

    def order(self) -> torch.Tensor:
        """Units by decreasing score (ties: lower index first)."""
        return torch.argsort(self.score.detach(), descending=True, stable=True)

    def sparsity_mask(self) -> torch.Tensor:
        """``sum_j p_j M_j`` per unit: a unit of rank i (by score) gets the probability of every
        candidate keeping more than i units."""
        p = self.probs()
        ranks = torch.arange(self.n, device=p.device)
        by_rank = (p[None, :] * (ranks[:, None] < self.widths[None, :]).to(p.dtype)).sum(1)
        return torch.empty_like(by_rank).scatter(0, self.order(), by_rank)

    def inside(self) -> torch.Tensor:
        """Units some active candidate keeps (bool): the ``max active width`` of highest score."""
        top = int(self.widths[self.active].max())
        out = torch.zeros(self.n, dtype=torch.bool, device=self.score.device)
        out[self.order()[:top]] = True
        return out

    def mask(self, lam: float) -> torch.Tensor:
        """The bi-mask ``lam * sigmoid(S) + (1 - lam) * sum_j p_j M_j`` on the units some active
        candidate keeps, 0 on the others: a unit leaves the network when the last candidate that
        kept it is eliminated (the paper cuts it out then, when that candidate was the largest)."""
        m = lam * torch.sigmoid(self.score) + (1.0 - lam) * self.sparsity_mask()
        return m * self.inside().to(m.dtype)

    def expected_width(self) -> torch.Tensor:
        return (self.probs() * self.widths.to(self.alpha.dtype)).sum()

    def searching(self) -> bool:
        return int(self.active.sum()) > 1

    def onehot(self) -> torch.Tensor:
        return onehot_loss(self.probs()[self.active])

    @torch.no_grad()
    def eliminate(self, threshold: float = ELIMINATE_THRESHOLD) -> List[int]:
        """Drop the active candidates whose probability is ``<= threshold / n_active`` (the most
        probable one always stays); the widths dropped."""
        if not self.searching():
            return []
        p = self.probs()
        n = int(self.active.sum())
        drop = self.active & (p <= threshold / n)
        drop[int(torch.argmax(p))] = False
        self.active &= ~drop
        return [int(w) for w in self.widths[drop]]

    def chosen(self) -> int:
        """The width of the most probable active candidate (the only one once the search is done)."""
        return int(self.widths[int(torch.argmax(self.probs().detach()))])

    def keep(self, width: Optional[int] = None) -> torch.Tensor:
        """Keep-mask (bool) of the ``width`` (default ``chosen()``) units of highest score."""
        width = self.chosen() if width is None else int(width)
        out = torch.zeros(self.n, dtype=torch.bool, device=self.score.device)
        out[self.order()[:width]] = True
        return out

    @torch.no_grad()
    def cut(self, keep: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Keep only the units ``keep`` (bool, in their order) and the candidates that fit in them,
        slicing ``score`` / ``alpha`` in place and their optimizer state with them."""
        n = int(keep.sum())
        fits = self.widths <= n
        _replace_param(self, 'score', lambda t: t[keep], optimizer)
        _replace_param(self, 'alpha', lambda t: t[fits], optimizer)
        self.widths = self.widths[fits]
        self.active = self.active[fits]
        self.n = n

    def final_mask(self, lam: float) -> torch.Tensor:
        """The mask once the search is done: ``lam sigmoid(S) + 1 - lam`` on the kept units, 0 on
        the others (the eliminated units are cut out)."""
        keep = self.keep().to(self.score.dtype)
        return (lam * torch.sigmoid(self.score) + (1.0 - lam)) * keep


def _replace_param(owner: nn.Module, name: str, cut, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Replace ``owner.<name>`` by a new parameter holding ``cut(old)``, and point ``optimizer`` at
    it with its state cut the same way (a new tensor shape needs a new leaf for autograd)."""
    old = getattr(owner, name)
    new = nn.Parameter(cut(old.detach()).clone(), requires_grad=old.requires_grad)
    setattr(owner, name, new)
    if optimizer is not None:
        _move_state(optimizer, old, new, cut=cut)


def _move_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                elem: Optional[torch.Tensor] = None, cut=None) -> None:
    """Point ``optimizer`` at ``new`` instead of ``old``, its state cut to the elements ``elem``
    keeps (a 0/1 mask of ``old``'s shape whose kept elements form ``new``'s grid), or by ``cut``;
    neither: the same shape."""
    for group in optimizer.param_groups:
        group['params'] = [new if q is old else q for q in group['params']]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    for k, v in list(state.items()):
        if torch.is_tensor(v) and v.shape == old.shape:
            if cut is not None:
                state[k] = cut(v)
            elif elem is not None:
                state[k] = v[elem.bool()].reshape(new.shape)
    optimizer.state[new] = state


class OFBSearch(nn.Module):
    """The search state of one DeiT-family model: its ``SearchModule`` per module, the bi-masks
    installed on the model's forward, and the losses. ``lam`` is ``lambda(t)``; set it from
    ``lambda_at`` as the warm-up progresses."""

    def __init__(self, model: nn.Module, grid: str = 'ours', seed: int = 0):
        super().__init__()
        layout = layout_of(model)
        if layout.family != 'DeiT':
            raise PruneError(f'OFB searches the widths of DeiT-family models; this is a {layout.family} '
                             f'(prune its MLP widths with deitlab prune nvit)')
        self.grid = grid
        counts = layout.unit_counts()
        g = torch.Generator().manual_seed(seed)
        mods = [SearchModule('emb', None, counts['emb'][0], candidate_widths('emb', counts['emb'][0], grid), g)]
        for b in range(layout.depth):
            for kind in BLOCK_TYPES:
                n = counts[kind][b]
                mods.append(SearchModule(kind, b, n, candidate_widths(kind, n, grid), g))
        dev = next(model.parameters()).device
        self.mods = nn.ModuleDict({m.name.replace('.', '_'): m for m in mods}).to(dev)
        self.lam = LAMBDA_RANGE[0]
        self.budget_weight = FLOPS_WEIGHT
        self.final = False
        self.lut = None
        self._dense_ms = None
        self._cost = layout.cost_model()
        self._dense_macs = float(self._cost(layout.widths())[0])
        self._handles: list = []
        self._model: Optional[nn.Module] = None
        self._masks: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ modules
    def module(self, kind: str, block: Optional[int] = None) -> SearchModule:
        return self.mods[kind if block is None else f'{kind}_{block}']

    def modules_list(self) -> List[SearchModule]:
        return list(self.mods.values())

    @property
    def depth(self) -> int:
        return sum(1 for m in self.mods.values() if m.kind == 'mlp')

    def arch_parameters(self) -> List[nn.Parameter]:
        """The candidate logits (the arch optimiser's parameters)."""
        return [m.alpha for m in self.mods.values()]

    def score_parameters(self) -> List[nn.Parameter]:
        """The importance scores (trained with the weights, without weight decay)."""
        return [m.score for m in self.mods.values()]

    # ------------------------------------------------------------------ masks on the forward
    def current_masks(self) -> Dict[str, torch.Tensor]:
        """Every module's mask at this ``lam`` (the final masks once ``final`` is set)."""
        return {k: (m.final_mask(self.lam) if self.final else m.mask(self.lam)) for k, m in self.mods.items()}

    def install(self, model: nn.Module) -> None:
        """Multiply the model's activations by the masks (module docstring); ``remove`` undoes it."""
        if self._model is not None:
            raise PruneError('the OFB masks are already installed on a model')
        self._model = model

        use_masked_layernorm(model)
        emb = self.module('emb')

        def refresh(*_):
            self._masks = self.current_masks()
            active = emb.keep() if self.final else emb.inside()
            self._sync_norms(model, active)

        def scale(key, dim=-1):
            def hook(_, __, out):
                m = self._masks[key]
                shape = [1] * out.dim()
                shape[dim] = -1
                return out * m.view(shape).to(out.dtype)
            return hook
        h = self._handles
        h.append(model.register_forward_pre_hook(refresh))
        h.append(model.norm_pre.register_forward_hook(scale('emb')))
        for b, blk in enumerate(model.blocks):
            h.append(blk.attn.proj.register_forward_hook(scale('emb')))
            h.append(blk.mlp.fc2.register_forward_hook(scale('emb')))
            h.append(blk.mlp.act.register_forward_hook(scale(f'mlp_{b}')))
            blk.attn.forward = self._attention_forward(blk.attn, b)

    def _attention_forward(self, attn: nn.Module, b: int):
        def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            q, k, v = project(attn, x)
            q = q * self._masks[f'qk_{b}'].to(q.dtype)
            v = v * self._masks[f'v_{b}'].to(v.dtype)
            ctx = attend(attn, q, k, v, attn_mask) * self._masks[f'head_{b}'].to(q.dtype).view(1, -1, 1, 1)
            return attention_output(attn, ctx, x)
        return forward

    @staticmethod
    def _sync_norms(model: nn.Module, active: torch.Tensor) -> None:
        """The residual ``MaskedLayerNorm``s over the embedding channels still in the network."""
        from .groups import MaskedLayerNorm, _norm_slots
        for parent, name in _norm_slots(model):
            norm = getattr(parent, name)
            if isinstance(norm, MaskedLayerNorm):
                norm.active.copy_(active.to(norm.active.dtype))

    def remove(self) -> None:
        """Take the masks off the model's forward."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._model is not None:
            for blk in self._model.blocks:
                blk.attn.__dict__.pop('forward', None)
        self._model = None

    # ------------------------------------------------------------------ losses
    def widths_by(self, of) -> dict:
        """``of(module)`` for every module, in the model's width vocabulary (``embed_dim`` and the
        per-block lists)."""
        out = dict(embed_dim=of(self.module('emb')))
        for kind, key in (('head', 'num_heads'), ('qk', 'qk_dim'), ('v', 'v_dim'), ('mlp', 'mlp_hidden')):
            out[key] = [of(self.module(kind, b)) for b in range(self.depth)]
        return out

    def expected_widths(self) -> dict:
        """Expected widths ``sum_j p_j r_j`` (tensors, differentiable in alpha)."""
        return self.widths_by(SearchModule.expected_width)

    def chosen_widths(self) -> dict:
        """The most probable width of every module (the result once every module is done)."""
        return self.widths_by(SearchModule.chosen)

    def macs(self, widths: Optional[dict] = None) -> torch.Tensor:
        """Closed-form MACs at ``widths`` (default: the expected widths, differentiable in alpha)."""
        return self._cost(self.expected_widths() if widths is None else widths)[0]

    @property
    def dense_macs(self) -> float:
        return self._dense_macs

    def fraction(self, widths: Optional[dict] = None) -> torch.Tensor:
        """The budget the search works to at ``widths`` (default: the expected ones): MACs over the
        dense MACs, or with a latency table (``lut``) the table's latency over the dense model's."""
        widths = self.expected_widths() if widths is None else widths
        if self.lut is None:
            return self._cost(widths)[0] / self._dense_macs
        return table_latency(self.lut, widths) / self._dense_ms

    def use_latency_table(self, lut, dense: nn.Module) -> None:
        """Work to a latency target: the budget term prices the expected widths with ``lut``."""
        self.lut = lut
        self._dense_ms = float(lut.model_ms(layout_of(dense).widths()))

    def losses(self, target_fraction: float) -> Dict[str, torch.Tensor]:
        """``onehot``, ``sparsity`` and the budget term ``flops`` (GMACs, or latency with a table),
        with the module docstring's weights."""
        mods = self.modules_list()
        zero = mods[0].alpha.new_zeros(())
        onehot = sum((m.onehot() for m in mods if m.searching()), zero) * MODULE_WEIGHT
        sparsity = sum((torch.sigmoid(m.score).sum() * SPARSITY_WEIGHTS[m.kind] for m in mods), zero) * MODULE_WEIGHT
        flops = self.budget_weight * (self.fraction() - target_fraction) ** 2
        return dict(onehot=onehot, sparsity=sparsity, flops=flops)

    @torch.no_grad()
    def adapt_budget(self, target_fraction: float, rate: float) -> float:
        """One dual-ascent step on the budget weight ``w_F`` (module docstring): ``x exp(rate)`` while
        the expected cost is off ``target_fraction`` by more than ``BUDGET_BAND`` of it (either side:
        the term is two-sided), ``/ exp(rate)`` (not below ``FLOPS_WEIGHT``) while within. Returns the
        new weight."""
        off = abs(float(self.fraction()) - target_fraction) > BUDGET_BAND * target_fraction
        self.budget_weight = max(FLOPS_WEIGHT, self.budget_weight * math.exp(rate if off else -rate))
        return self.budget_weight

    def eliminate(self, threshold: float = ELIMINATE_THRESHOLD) -> Dict[str, List[int]]:
        """Eliminate candidates in every module (``SearchModule.eliminate``); the widths dropped."""
        out = {m.name: m.eliminate(threshold) for m in self.modules_list()}
        return {k: v for k, v in out.items() if v}

    def done(self) -> bool:
        return not any(m.searching() for m in self.modules_list())

    # ------------------------------------------------------------------ the result
    @torch.no_grad()
    def shrink(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               pmim: Optional['PMIM'] = None) -> nn.Module:
        """Cut out the units no active candidate keeps (OFB shrinks a module as soon as its largest
        candidate is eliminated): returns the narrower model with the masks installed on it, the
        search modules, PMIM's embedding-wide tensors and the optimizer (pointed at the new
        parameters, Adam's moments re-indexed) cut to match. Those units have mask 0 already, so
        the network computes the same function before and after. ``model`` itself when nothing is
        outside."""
        inside = {k: m.inside() for k, m in self.mods.items()}
        if all(bool(v.all()) for v in inside.values()):
            return model
        masks = Masks(model)
        masks.emb.copy_(inside['emb'])
        for kind in BLOCK_TYPES:
            for b in range(self.depth):
                masks.block[kind][b].copy_(inside[f'{kind}_{b}'])
        elem = masks.param_masks(model)
        self.remove()
        if pmim is not None:
            pmim.remove()
        new = densify(model, masks)
        new.train(model.training)
        if optimizer is not None:
            old_params = dict(model.named_parameters())
            for name, p in new.named_parameters():
                _move_state(optimizer, old_params[name], p, elem.get(name))
        for k, m in self.mods.items():
            m.cut(inside[k], optimizer)
        if pmim is not None:
            pmim.cut_embedding(inside['emb'], optimizer)
        self.install(new)
        if pmim is not None:
            pmim.install(new)
        return new

    def search_state(self) -> dict:
        """What a checkpoint needs to rebuild the search: ``lam`` and per module its candidate
        widths, which are active, its scores and candidate logits (the shapes change as it shrinks)."""
        return dict(lam=float(self.lam), budget_weight=float(self.budget_weight), modules={k: dict(widths=m.widths.cpu(), active=m.active.cpu(),
                                                         score=m.score.detach().cpu(), alpha=m.alpha.detach().cpu())
                                                  for k, m in self.mods.items()})

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        """Back to ``search_state()`` (on a search built from the dense model, not installed yet)."""
        self.lam = float(state['lam'])
        self.budget_weight = float(state.get('budget_weight', FLOPS_WEIGHT))
        for k, m in self.mods.items():
            saved = state['modules'][k]
            dev = m.score.device
            m.widths, m.active = saved['widths'].to(dev), saved['active'].to(dev)
            m.score = nn.Parameter(saved['score'].to(dev).clone())
            m.alpha = nn.Parameter(saved['alpha'].to(dev).clone())
            m.n = int(m.score.numel())

    @torch.no_grad()
    def keep_masks(self, model: nn.Module) -> Masks:
        """The chosen units as NViT's keep-masks (``groups.Masks``)."""
        masks = Masks(model)
        masks.emb.copy_(self.module('emb').keep())
        for kind in BLOCK_TYPES:
            for b in range(self.depth):
                masks.block[kind][b].copy_(self.module(kind, b).keep())
        return masks

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """End the search: every module at its chosen width (``final`` masks: the cut units at 0)
        and the residual norms over the kept embedding channels only (``MaskedLayerNorm``), so
        that the masked model computes what the cut model will."""
        self.final = True
        use_masked_layernorm(model)
        self._sync_norms(model, self.module('emb').keep())

    @torch.no_grad()
    def fold(self, model: nn.Module) -> Masks:
        """Move the final masks into the weights, take the hooks off, zero the cut units and switch
        the residual norms to the kept channels (``MaskedLayerNorm``): the model then computes what
        the masked model computed after ``finish``, and ``compact.densify(model, masks)`` cuts it
        to the chosen widths with the same logits. Returns the keep-masks."""
        self.finish(model)
        m = {k: v.detach() for k, v in self.current_masks().items()}
        self.remove()
        e = m['emb']
        model.patch_embed.proj.weight.mul_(e.view(-1, *([1] * (model.patch_embed.proj.weight.dim() - 1))))
        if model.patch_embed.proj.bias is not None:
            model.patch_embed.proj.bias.mul_(e)
        for name in ('cls_token', 'dist_token', 'pos_embed'):
            t = getattr(model, name, None)
            if isinstance(t, torch.Tensor):
                t.mul_(e)
        for b, blk in enumerate(model.blocks):
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.mul_(e[:, None])
                if lin.bias is not None:
                    lin.bias.mul_(e)
            H, dq, dv = blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim
            W, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
            q_scale = m[f'qk_{b}'].repeat(H)
            v_scale = m[f'v_{b}'].repeat(H)
            W[:H * dq].mul_(q_scale[:, None])
            W[2 * H * dq:].mul_(v_scale[:, None])
            if bias is not None:
                bias[:H * dq].mul_(q_scale)
                bias[2 * H * dq:].mul_(v_scale)
            blk.attn.proj.weight.mul_(m[f'head_{b}'].repeat_interleave(dv)[None, :])
            blk.mlp.fc2.weight.mul_(m[f'mlp_{b}'][None, :])
        masks = self.keep_masks(model)
        masks.apply(model)
        return masks


def _check_target(target: float) -> None:
    if not 0 < target < 1:
        raise PruneError(f'the OFB target is a fraction of the dense model, strictly between 0 and 1; got {target}')


def smallest_fraction(search: OFBSearch) -> float:
    """The budget (``OFBSearch.fraction``) of the smallest candidate network: a lower bound for a target."""
    return float(search.fraction(search.widths_by(lambda m: int(m.widths[0]))))


def check_target(search: OFBSearch, target: float) -> None:
    """``PruneError`` unless ``0 < target < 1`` and the smallest candidate network is below it."""
    _check_target(target)
    lo = smallest_fraction(search)
    if target <= lo:
        what = 'MACs' if search.lut is None else 'latency (by the latency table)'
        raise PruneError(f'target {target} is below the smallest network the OFB search space holds '
                         f'({lo:.3f} of the dense {what}); raise the target')


class _TableLatency(torch.autograd.Function):
    """A latency table's estimate at real-valued widths; its gradient is the table's saving of one
    unit of each width (``LatencyTable.unit_savings``), the slope NViT's penalty uses."""

    @staticmethod
    def forward(ctx, lut, emb, *blocks):
        d = len(blocks) // 4
        cols = [[float(t) for t in blocks[i * d:(i + 1) * d]] for i in range(4)]
        widths = dict(embed_dim=float(emb), num_heads=cols[0], qk_dim=cols[1], v_dim=cols[2], mlp_hidden=cols[3])
        ctx.savings = lut.unit_savings(widths)
        ctx.depth = d
        return emb.new_tensor(lut.model_ms(widths))

    @staticmethod
    def backward(ctx, grad):
        sv = ctx.savings
        per_block = [g for kind in ('head', 'qk', 'v', 'mlp') for g in sv[kind]]
        return (None, grad * sv['emb'], *(grad * g for g in per_block))


def table_latency(lut, widths: dict) -> torch.Tensor:
    """``lut.model_ms`` at (expected, real-valued) widths, differentiable in them (``_TableLatency``)."""
    blocks = [t if torch.is_tensor(t) else torch.tensor(float(t)) for key in ('num_heads', 'qk_dim', 'v_dim',
                                                                            'mlp_hidden') for t in widths[key]]
    emb = widths['embed_dim']
    emb = emb if torch.is_tensor(emb) else torch.tensor(float(emb))
    return _TableLatency.apply(lut, emb, *blocks)

