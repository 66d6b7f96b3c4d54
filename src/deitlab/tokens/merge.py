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
add up (``s_g = sum_i s_i``) and a source map (which input patches a token holds) merges with
``max``. With proportional attention the logits get ``+ log s`` over keys, so a merged token
counts as ``s`` identical copies.
"""
from __future__ import annotations

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


def _expand(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Index (B, n, 1) broadcast to gather n tokens of ``like`` (B, *mid, N, C) along dim -2."""
    mid = like.dim() - 3
    shape = (idx.shape[0],) + (1,) * mid + idx.shape[1:]
    return idx.view(shape).expand(*like.shape[:-2], idx.shape[1], like.shape[-1])


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-2, _expand(idx, x))


def _reduce_into(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, mode: str) -> torch.Tensor:
    return dst.scatter_reduce(-2, _expand(idx, src), src, reduce=mode)


@dataclass
class MergePlan:
    """Which tokens go where in one merge; ``merge`` applies it to any tensor whose dim -2 is
    the token dim (tokens, sizes, source maps, the key or query axis of an attention map)."""
    p: int
    unm: torch.Tensor            # (B, |A| - r1, 1) A tokens kept, ascending
    src: torch.Tensor            # (B, r1, 1) A tokens merged into B
    dst: torch.Tensor            # (B, r1, 1) their B partners
    unm2: Optional[torch.Tensor] = None   # second pass: B tokens kept (by score)
    src2: Optional[torch.Tensor] = None   # B tokens merged into A survivors
    dst2: Optional[torch.Tensor] = None   # their positions among the A survivors

    @property
    def r(self) -> int:
        return self.src.shape[1] + (0 if self.src2 is None else self.src2.shape[1])

    def merge(self, x: torch.Tensor, mode: str = 'sum') -> torch.Tensor:
        """Reduce each merged group with ``mode`` (sum, mean, amax, ...) along dim -2."""
        a, b = split_ab(x, self.p)
        kept = _take(a, self.unm)
        b = _reduce_into(b, self.dst, _take(a, self.src), mode)
        if self.src2 is None:
            rest = [kept, b]
        else:
            rest = [_reduce_into(kept, self.dst2, _take(b, self.src2), mode), _take(b, self.unm2)]
        return torch.cat([x[..., :self.p, :]] + rest, dim=-2)


def bipartite_plan(scores: torch.Tensor, r: int, p: int, bidirectional: bool = False) -> MergePlan:
    """Plan the merge of ``r`` tokens from A-to-B edge ``scores`` (B, |A|, |B|).

    One pass (ToMe) or, with ``bidirectional``, MCTF's two passes (``r // 2`` A->B, then
    ``r - r // 2`` B->A on the same scores restricted to the A survivors)."""
    n_a, n_b = scores.shape[-2:]
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    if r < 0 or r1 > n_a or r2 > n_a - r1 or r1 > 0 and n_b == 0:
        raise ValueError(f'cannot merge r={r} tokens between sets of {n_a} and {n_b} tokens')
    with torch.no_grad():
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)[..., None]
        unm = order[:, r1:].sort(dim=1)[0]
        src = order[:, :r1]
        dst = node_idx[..., None].gather(1, src)
        if not bidirectional:
            return MergePlan(p, unm, src, dst)
        back = scores.gather(1, unm.expand(-1, -1, n_b)).transpose(1, 2)   # (B, |B|, |A| - r1)
        node_max2, node_idx2 = back.max(dim=-1)
        order2 = node_max2.sort(dim=-1, descending=True)[1][..., None]
        src2 = order2[:, :r2]
        return MergePlan(p, unm, src, dst, order2[:, r2:], src2, node_idx2[..., None].gather(1, src2))


def merge_weighted(plan: MergePlan, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` per merged group; ``weights`` (B, T, 1) are positive."""
    w = weights.to(torch.promote_types(x.dtype, weights.dtype))
    return (plan.merge(x * w, 'sum') / plan.merge(w, 'sum')).to(x.dtype)


class TokenState:
    """Per-forward bookkeeping of a token-reduced ViT: sizes, optional source map, counts."""

    def __init__(self, x: torch.Tensor, p: int, trace_source: bool = False):
        B, T, _ = x.shape
        self.p = p
        self.size: Optional[torch.Tensor] = None      # None: every token has size 1
        self.dtype = torch.promote_types(x.dtype, torch.float32)
        self.source = (torch.eye(T, device=x.device, dtype=self.dtype).expand(B, T, T)
                       if trace_source else None)
        self.tokens = [T]

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=self.dtype)
        return self.size

    def log_size_bias(self) -> Optional[torch.Tensor]:
        """Proportional-attention bias ``log s`` over keys, (B, 1, 1, T); None before any merge."""
        return None if self.size is None else self.size.log()[:, None, None, :, 0]

    def update(self, plan: MergePlan, x: torch.Tensor) -> None:
        """Record a merge (x: the tokens before it)."""
        self.size = plan.merge(self.sizes(x), 'sum')
        if self.source is not None:
            self.source = plan.merge(self.source, 'amax')
        self.tokens.append(self.size.shape[1])
