"""Unit saliency for structural pruning: NViT's Hessian-aware score and the usual baselines.

NViT (Yang et al. CVPR 2023, Sec. 3.2). Removing a group S of weights sets ``w_S -> 0``; by a
second-order Taylor expansion of the loss around the trained weights,

    dL(S) ~= -g_S^T w_S + 1/2 w_S^T H_SS w_S,

and near a converged (distilled) optimum the first-order term vanishes in expectation. With the
empirical Fisher ``H ~= E[g g^T]`` in place of the Hessian this becomes

    I(S) = E[(sum_{s in S} g_s w_s)^2]        (up to the constant 1/2)

- the products are **summed over every coupled parameter of the group before squaring** (so
  contributions that cancel across layers cancel in the score), squared per batch, averaged over
  the batches since the last pruning event, and smoothed across events with an exponential moving
  average. Because ``I`` estimates a change of the loss, scores of different unit types and layers
  are comparable in one global ranking. NViT's code divides the sums by fixed constants before
  squaring (embedding / number of blocks, heads / 12, qk / 2, v / 2); ``divisors='nvit'`` applies
  them (with the model's depth for the embedding), ``divisors=None`` does not.

Baselines behind the same interface:

- ``magnitude``: ``sum w^2`` over the unit's criteria slices (no data).
- ``taylor``: first-order ``sum |w * g|`` per element, averaged over batches (Molchanov et al.
  2017; Torch-Pruning's ``GroupTaylorImportance`` default).
- ``fisher``: the diagonal-Fisher / Optimal-Brain-Damage form ``sum w^2 E[g^2]`` with the
  expectation over *per-sample* gradients (computed with ``torch.func``); Torch-Pruning calls
  it ``GroupHessianImportance``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from ..registry import SALIENCY
from .groups import PruneError, reduce_units

CRITERIA = SALIENCY.names()


def nvit_divisors(depth: int) -> Dict[str, float]:
    """The constants NViT's code divides the summed ``w * g`` by before squaring."""
    return {'emb': float(depth), 'head': 12.0, 'qk': 2.0, 'v': 2.0, 'mlp': 1.0}


def _map(units: dict, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
    return {k: (fn(k, v) if torch.is_tensor(v) else [fn(k, t) for t in v]) for k, v in units.items()}


def _zip(a: dict, b: dict, fn) -> dict:
    return {k: (fn(a[k], b[k]) if torch.is_tensor(a[k]) else [fn(x, y) for x, y in zip(a[k], b[k])]) for k in a}


def per_sample_sq_grads(model: nn.Module, loss_fn: Callable, x: torch.Tensor, *extra: torch.Tensor,
                        chunk: int = 8) -> Dict[str, torch.Tensor]:
    """``sum_i g_i^2`` over the samples of a batch, per parameter, where ``g_i`` is the gradient of
    ``loss_fn(model_output_i, extra_i...)`` for sample i alone (``torch.func.vmap`` over ``grad``,
    ``chunk`` samples at a time). ``loss_fn`` gets a batch of one."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p, xi, *ei):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, *(e.unsqueeze(0) for e in ei))

    g_fn = vmap(grad(one), in_dims=(None, 0) + (0,) * len(extra))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(0, x.shape[0], chunk):
        grads = g_fn(params, x[s:s + chunk], *(e[s:s + chunk] for e in extra))
        for k, g in grads.items():
            total[k] += (g * g).sum(0)
    return total


class Criterion:
    """One saliency criterion (registered in ``deitlab.registry.SALIENCY``). ``data`` says what it
    reads: 'grad' (``batch`` after each backward), 'per_sample' (``Saliency.accumulate_sq_grads``)
    or None (weights only). ``window_mean`` turns what was accumulated since the last event into
    one score per unit, in the layout of ``reduce_units``."""

    data: Optional[str] = None   # criteria with data='grad' also define batch(model, divisors)

    def window_mean(self, model: nn.Module, sal: 'Saliency') -> dict:
        if not sal.count:
            raise PruneError(f'{sal.criterion} saliency has no batches yet: call accumulate() after backward')
        return _map(sal.window, lambda k, t: t / sal.count)


class HessianAware(Criterion):
    """NViT: ``(sum_S g w / divisor)^2`` per batch, averaged over the window."""
    data = 'grad'

    def batch(self, model, divisors):
        sums = reduce_units(model, lambda n, p: None if p.grad is None else p * p.grad)
        if divisors:
            sums = _map(sums, lambda k, t: t / divisors.get(k, 1.0))
        return _map(sums, lambda k, t: t * t)


class Taylor(Criterion):
    """First-order Taylor: ``sum |w g|`` per batch, averaged over the window."""
    data = 'grad'

    def batch(self, model, divisors):
        return reduce_units(model, lambda n, p: None if p.grad is None else (p * p.grad).abs())


class Magnitude(Criterion):
    """``sum w^2``: needs no data."""

    def window_mean(self, model, sal):
        return reduce_units(model, lambda n, p: p * p)


class Fisher(Criterion):
    """Diagonal Fisher: ``sum w^2 E[g^2]`` with per-sample gradients."""
    data = 'per_sample'

    def window_mean(self, model, sal):
        if not sal.samples:
            raise PruneError('fisher saliency has no per-sample gradients yet')
        mean_sq = {k: v / sal.samples for k, v in sal.sq_grads.items()}
        return reduce_units(model, lambda n, p: p * p * mean_sq[n] if n in mean_sq else None)


class Saliency:
    """Per-unit importance, accumulated over batches and smoothed over pruning events.

    Call ``accumulate(model)`` after each backward (``accumulate_sq_grads`` for ``fisher``), and
    ``event(model)`` at a pruning event: it returns the scores in the layout of ``reduce_units``
    and starts a new averaging window.

    Args:
        criterion: a name in ``deitlab.registry.SALIENCY`` ('nvit', 'taylor', 'magnitude', 'fisher').
        momentum: EMA factor across events, ``score = m * previous + (1 - m) * window mean``.
        divisors: 'nvit', None, or a dict per unit type (applied to the 'nvit' sums before squaring).
    """

    def __init__(self, criterion: str = 'nvit', momentum: float = 0.9,
                 divisors: Union[None, str, Dict[str, float]] = 'nvit', depth: Optional[int] = None):
        if criterion not in SALIENCY:
            raise PruneError(f'unknown saliency criterion {criterion!r}; choose one of {", ".join(SALIENCY.names())}')
        if not 0.0 <= momentum < 1.0:
            raise PruneError(f'saliency momentum must be in [0, 1), got {momentum}')
        if divisors == 'nvit':
            if depth is None:
                raise PruneError("divisors='nvit' needs the model depth")
            divisors = nvit_divisors(depth)
        self.criterion = criterion
        self.rule: Criterion = SALIENCY[criterion].load()()
        self.momentum = momentum
        self.divisors = divisors
        self.window: Optional[dict] = None
        self.count = 0
        self.sq_grads: Optional[Dict[str, torch.Tensor]] = None
        self.samples = 0
        self.scores: Optional[dict] = None

    @property
    def needs_grad(self) -> bool:
        return self.rule.data == 'grad'

    @property
    def needs_per_sample(self) -> bool:
        return self.rule.data == 'per_sample'

    def _add(self, units: dict) -> None:
        self.window = units if self.window is None else _zip(self.window, units, torch.add)
        self.count += 1

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Add one batch's contribution, from the gradients now in ``param.grad``."""
        if self.needs_grad:   # magnitude needs no data; fisher uses accumulate_sq_grads
            self._add(self.rule.batch(model, self.divisors))

    def accumulate_sq_grads(self, sq_grads: Dict[str, torch.Tensor], samples: int) -> None:
        """Add ``sum_i g_i^2`` of ``samples`` per-sample gradients (see ``per_sample_sq_grads``)."""
        if self.sq_grads is None:
            self.sq_grads = {k: v.detach().clone() for k, v in sq_grads.items()}
        else:
            for k, v in sq_grads.items():
                self.sq_grads[k] += v
        self.samples += int(samples)

    @torch.no_grad()
    def _window_mean(self, model: nn.Module) -> dict:
        return self.rule.window_mean(model, self)

    def event(self, model: nn.Module) -> dict:
        """The smoothed scores now; resets the averaging window."""
        mean = self._window_mean(model)
        if self.scores is None or self.momentum == 0:
            self.scores = mean
        else:
            m = self.momentum
            self.scores = _zip(self.scores, mean, lambda a, b: m * a + (1 - m) * b)
        self.window, self.count, self.sq_grads, self.samples = None, 0, None, 0
        return self.scores
