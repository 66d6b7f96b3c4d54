"""Shared token-merge machinery: bipartite soft matching, fusion operators, token sizes.

Tokens are ``(B, T, C)`` with ``p`` protected prefix tokens first (CLS, a distillation token,
registers). Protected tokens are never merged and stay in front, in their order. The other
``T - p`` tokens are split alternately as in ToMe (Bolya et al., ICLR 2023): set A holds the
tokens at even positions of the full sequence, set B those at odd positions. The edge scores
are an ``(B, |A|, |B|)`` matrix.

* **One pass** (ToMe): every A token keeps its best B edge; the ``r`` A tokens with the highest
  edges are merged into their B partners. Output ``[protected, unmerged A (in order), B]``.
* **Two passes** (MCTF, Lee et al., CVPR 2024, bidirectional matching): ``r1 = r // 2`` A tokens
  merge into B as above; then, on the same (pre-merge) scores restricted to the A survivors and
  transposed, every B token picks its best surviving A token and the ``r2 = r - r1`` best are
  merged into A. Output ``[protected, A survivors (in order), unmerged B (by score)]``.

A fusion is a weighted average per group: ``x_g = sum_i w_i x_i / sum_i w_i`` (``w = s``, the
token sizes, gives ToMe's merge; MCTF weighs by attention received times relative size). Sizes
add up (``s_g = sum_i s_i``) and a source map (which input patches a token holds) merges by
summing its disjoint 0/1 rows. With proportional attention the logits get ``+ log s`` over keys, so a merged token
counts as ``s`` identical copies.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ['split_ab', 'cosine_scores', 'MergePlan', 'bipartite_plan', 'merge_weighted', 'TokenState']


def split_ab(x: torch.Tensor, p: int):
    """Sets A and B of the non-protected tokens along dim -2 (A: even positions of the full
    sequence, B: odd)."""
    rest = x[..., p:, :]
    s = p % 2
    return rest[..., s::2, :], rest[..., 1 - s::2, :]


def cosine_scores(metric: torch.Tensor, p: int) -> torch.Tensor:
    """Cosine similarity between the A and B tokens of ``metric`` (B, T, d): (B, |A|, |B|)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = split_ab(metric, p)
    return a @ b.transpose(-1, -2)


@dataclass
class MergePlan:
    """Where every input token goes in one merge: ``slot`` (B, T) is the output position of each
    of the T input tokens (protected tokens keep theirs), ``tokens`` the output count. ``merge``
    applies it to any tensor along a token dim (tokens, sizes, source maps, the key or the query
    axis of an attention map) with one scatter: groups are summed, or max-pooled."""
    slot: torch.Tensor
    tokens: int

    @property
    def r(self) -> int:
        return self.slot.shape[1] - self.tokens

    def merge(self, x: torch.Tensor, mode: str = 'sum', dim: int = -2) -> torch.Tensor:
        dim = dim % x.dim()
        if dim != x.dim() - 2:
            return self.merge(x.transpose(dim, -2), mode).transpose(dim, -2)
        B, T, C = x.shape[0], x.shape[-2], x.shape[-1]
        n = x[0, ..., 0, 0].numel()   # rows per image on other dims (heads, ...)
        # one flat index_add over (image, other dims, token) rows: much faster than scatter on the CPU
        idx = (self.slot.view(B, 1, T) + self.tokens * torch.arange(B * n, device=x.device).view(B, n, 1)).reshape(-1)
        out = x.new_zeros(B * n * self.tokens, C)
        rows = x.reshape(B * n * T, C)
        if mode == 'sum':
            out.index_add_(0, idx, rows)
        elif mode == 'amax':
            with warnings.catch_warnings():   # index_reduce_ is marked beta; its amax is what we need
                warnings.simplefilter('ignore', UserWarning)
                out.index_reduce_(0, idx, rows, 'amax', include_self=False)
        else:
            raise ValueError(f"merge mode must be 'sum' or 'amax', got {mode!r}")
        return out.view(*x.shape[:-2], self.tokens, C)


def _slots(p: int, n_a: int, n_b: int, unm, src, dst, unm2=None, src2=None, dst2=None) -> torch.Tensor:
    """Output position of every input token for the orders in the module docstring."""
    B, dev = unm.shape[0], unm.device
    base_b = p + unm.shape[1]
    slot_b = (base_b + torch.arange(n_b, device=dev)).expand(B, n_b).clone()
    if unm2 is not None:   # second pass: B survivors by score, B sources into A survivors
        slot_b.scatter_(1, unm2, (base_b + torch.arange(unm2.shape[1], device=dev)).expand(B, -1).contiguous())
        slot_b.scatter_(1, src2, p + dst2)
    slot_a = torch.empty(B, n_a, dtype=torch.long, device=dev)
    slot_a.scatter_(1, unm, (p + torch.arange(unm.shape[1], device=dev)).expand(B, -1).contiguous())
    slot_a.scatter_(1, src, slot_b.gather(1, dst))
    s = p % 2
    rest = torch.empty(B, n_a + n_b, dtype=torch.long, device=dev)
    rest[:, s::2], rest[:, 1 - s::2] = slot_a, slot_b
    return torch.cat([torch.arange(p, device=dev).expand(B, p), rest], dim=1)


def bipartite_plan(scores: torch.Tensor, r: int, p: int, bidirectional: bool = False) -> MergePlan:
    """Plan the merge of ``r`` tokens from A-to-B edge ``scores`` (B, |A|, |B|).

    One pass (ToMe) or, with ``bidirectional``, MCTF's two passes (``r // 2`` A->B, then
    ``r - r // 2`` B->A on the same scores restricted to the A survivors)."""
    n_a, n_b = scores.shape[-2:]
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    if r < 0 or r1 > n_a or r2 > n_a - r1 or r2 > n_b or r1 > 0 and n_b == 0:
        raise ValueError(f'cannot merge r={r} tokens between sets of {n_a} and {n_b} tokens')
    T = p + n_a + n_b
    with torch.no_grad():
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)
        unm, src = order[:, r1:].sort(dim=1)[0], order[:, :r1]
        dst = node_idx.gather(1, src)
        if not bidirectional:
            return MergePlan(_slots(p, n_a, n_b, unm, src, dst), T - r)
        back = scores.gather(1, unm[..., None].expand(-1, -1, n_b)).transpose(1, 2)   # (B, |B|, |A| - r1)
        node_max2, node_idx2 = back.max(dim=-1)
        order2 = node_max2.sort(dim=-1, descending=True)[1]
        src2 = order2[:, :r2]
        return MergePlan(_slots(p, n_a, n_b, unm, src, dst, order2[:, r2:], src2, node_idx2.gather(1, src2)), T - r)


def merge_weighted(plan: MergePlan, x: torch.Tensor, weights: torch.Tensor,
                   total: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` per merged group. ``weights`` are positive and broadcast
    against ``x`` on every dim but the last (e.g. (B, T, 1), or (B, 1, T, 1) for per-head
    tensors); ``total`` is ``plan.merge(weights)`` when the caller has it already."""
    w = weights.to(torch.promote_types(x.dtype, weights.dtype))
    if total is None:
        total = plan.merge(w)
    return (plan.merge(x * w) / total).to(x.dtype)


class TokenState:
    """Per-forward bookkeeping of a token-reduced ViT: sizes and the optional source map."""

    def __init__(self, x: torch.Tensor, p: int, trace_source: bool = False):
        B, T, _ = x.shape
        self.p = p
        self.size: Optional[torch.Tensor] = None      # None: every token has size 1
        self.dtype = torch.promote_types(x.dtype, torch.float32)
        self.source = (torch.eye(T, device=x.device, dtype=self.dtype).expand(B, T, T)
                       if trace_source else None)

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=self.dtype)
        return self.size

    def log_size_bias(self) -> Optional[torch.Tensor]:
        """Proportional-attention bias ``log s`` over keys, (B, 1, 1, T); None before any merge."""
        return None if self.size is None else self.size.log()[:, None, None, :, 0]

    def update(self, plan: MergePlan, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> None:
        """Record a merge (x: the tokens before it; ``size``: the merged sizes, if known)."""
        self.size = plan.merge(self.sizes(x), 'sum') if size is None else size
        if self.source is not None:
            self.source = plan.merge(self.source, 'sum')   # disjoint 0/1 rows: the sum is the max
