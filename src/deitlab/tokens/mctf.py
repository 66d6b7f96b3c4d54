"""MCTF -- multi-criteria token fusion with one-step-ahead attention (Lee, Choi, Kim, CVPR 2024).

At the start of every active block ``l`` the block's own attention ``A`` (softmax of
``q k^T / sqrt(d) + log s``) is computed once on the ``T`` input tokens ``x`` and drives the
fusion. Tokens are split alternately into A and B; the edge weight between ``i`` in A and ``j``
in B multiplies three criteria:

* similarity   ``W_sim  = ((1 + cos(x_i, x_j)) / 2) ** (1 / tau_sim)`` on the block inputs;
* informativeness ``W_info = (a~_i a~_j) ** (1 / tau_info)`` with ``a_j = mean_{h, q} A[h, q, j]``
  (attention received) and ``a~_j = (1 / a_j) / max_k (1 / a_k)``: rarely attended tokens fuse;
* size         ``W_size = (s~_i s~_j) ** (1 / tau_size)``, ``s~_j = (1 / s_j) / max_k (1 / s_k)``;

``W = W_sim W_info W_size`` (a criterion with ``tau = 0`` is off; defaults 1, 20, 40). Matching is
bidirectional (``r // 2`` A->B, then ``r - r // 2`` B->A on the same scores), and a group fuses
as ``x_g = sum_i w_i x_i / sum_i w_i`` with ``w_i = a_i s_i / max_k s_k`` (pooling 'attn_size';
also 'size' = ToMe's, 'mean', 'max'). The attention map is fused with the same plan -- key
columns summed, query rows averaged with ``w`` -- and reused: ``V``, ``A V``, the projection and
the MLP run on ``T - r`` tokens ('one_step_ahead'; 'precise' recomputes attention after fusing,
'previous' fuses at the end of the block with its own attention, the baseline the paper argues
against).

Schedules: MCTF r = 16 at blocks 1..11 of a 12-block DeiT (197 -> 21 tokens); MCTF-Fast removes
35 % of the tokens at blocks 3, 6 and 9 (``depth * k // 4``). Token-reduction consistency
fine-tuning runs each batch twice with shared weights, at ``r`` and at a random
``r' ~ U{0, ..., r_teacher_max - 1}``, and minimises
``CE(student) + CE(teacher) + lambda * gate * ||cls_s - sg(cls_t)||^2 / C`` (``lambda = 3``; the
gate keeps samples whose student probability of the true class exceeds 0.4; ``cls`` is the
class token after the final norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .merge import MergePlan, TokenState, bipartite_plan, cosine_scores, merge_weighted, split_ab
from ..layers.attention import attention_output, attention_probs, project
from .patch import TokenFusion, TokenFusionError, check_supported, grid_blocks, patch_model, tome_block
from .config import MCTF_MODES, POOLINGS

__all__ = ['MCTF', 'apply_mctf', 'mctf_scores', 'fusion_weights', 'fuse_tokens', 'fuse_attention',
           'mctf_fast_layers', 'ConsistencyOutput', 'ConsistencyLoss', 'POOLINGS']



def _pair_term(per_token: torch.Tensor, p: int, tau: float) -> torch.Tensor:
    """``(v~_i v~_j) ** (1/tau)`` for A x B, with ``v~ = (1/v) / max(1/v)`` over all tokens."""
    inv = 1.0 / per_token
    a, b = split_ab((inv / inv.amax(dim=1, keepdim=True)) ** (1.0 / tau), p)   # (v_i v_j)^e = v_i^e v_j^e
    return a * b.transpose(1, 2)


@torch.no_grad()
def mctf_scores(x: torch.Tensor, attn: Optional[torch.Tensor], size: Optional[torch.Tensor], p: int,
                tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
                received: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MCTF edge weights (B, |A|, |B|) from block inputs x (B, T, C), attention (B, H, T, T) (or
    the attention each token receives, ``received`` (B, T)) and sizes (B, T, 1) (None = all 1);
    see the module docstring."""
    if received is None and attn is not None:
        received = attn.mean(dim=(1, 2))
    if tau_sim:
        w = (cosine_scores(x, p) + 1) / 2
        w = w if tau_sim == 1 else w ** (1.0 / tau_sim)
    else:
        a, b = split_ab(x[..., :1], p)
        w = torch.ones(x.shape[0], a.shape[1], b.shape[1], device=x.device, dtype=x.dtype)
    if tau_info and received is not None:
        w = w * _pair_term(received.unsqueeze(-1), p, tau_info)
    if tau_size and size is not None:
        w = w * _pair_term(size, p, tau_size)
    return w


@torch.no_grad()
def fusion_weights(attn: Optional[torch.Tensor], size: torch.Tensor, pooling: str,
                   received: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token fusion weights (B, T, 1): attention received x relative size ('attn_size'),
    size ('size'), 1 ('mean' and 'max')."""
    if pooling == 'attn_size':
        received = attn.mean(dim=(1, 2)) if received is None else received
        return received.unsqueeze(-1).to(size.dtype) * (size / size.amax(dim=1, keepdim=True))
    if pooling == 'size':
        return size
    return torch.ones_like(size)


def fuse_tokens(plan: MergePlan, x: torch.Tensor, w: torch.Tensor, pooling: str) -> torch.Tensor:
    return plan.merge(x, 'amax') if pooling == 'max' else merge_weighted(plan, x, w)


def fuse_attention(plan: MergePlan, attn: torch.Tensor, w: torch.Tensor, pooling: str) -> torch.Tensor:
    """Fuse a softmax map (B, H, T, T) with ``plan``: key columns are summed (rows still sum to
    1), query rows averaged with the token weights ``w`` (or max-pooled)."""
    keys = plan.merge(attn, 'sum', dim=-1)
    if pooling == 'max':
        return plan.merge(keys, 'amax')
    w = w[:, None].to(attn.dtype)
    return plan.merge(keys * w, 'sum') / plan.merge(w, 'sum')


def mctf_fast_layers(depth: int) -> list:
    """MCTF-Fast's three reduction blocks: 3, 6, 9 for 12 blocks (``depth * k // 4``)."""
    layers = sorted({depth * k // 4 for k in (1, 2, 3)} - {0})
    if not layers:
        raise TokenFusionError(f'MCTF-Fast needs at least 2 blocks, the model has {depth}')
    return layers


@dataclass
class ConsistencyOutput:
    """What an MCTF model returns in training with consistency on (see ``ConsistencyLoss``)."""
    student: object          # logits at r (a tuple for distilled training)
    teacher: object          # logits at the random r'
    student_cls: torch.Tensor
    teacher_cls: torch.Tensor   # detached
    r_teacher: float


class MCTF(TokenFusion):
    method = 'mctf'

    def __init__(self, r=16, layers=None, tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
                 bidirectional: bool = True, pooling: str = 'attn_size', mode: str = 'one_step_ahead',
                 prop_attn: bool = True, trace_source: bool = False, r_teacher_max: float = 0):
        super().__init__(r, layers, prop_attn, trace_source)
        if pooling not in POOLINGS:
            raise TokenFusionError(f'pooling must be one of {POOLINGS}, got {pooling!r}')
        if mode not in MCTF_MODES:
            raise TokenFusionError(f'mode must be one of {MCTF_MODES}, got {mode!r}')
        if min(tau_sim, tau_info, tau_size) < 0 or r_teacher_max < 0:
            raise TokenFusionError('temperatures and r_teacher_max must be >= 0 (0 turns a criterion off)')
        self.tau = (tau_sim, tau_info, tau_size)
        self.bidirectional, self.pooling, self.mode = bidirectional, pooling, mode
        self.r_teacher_max = r_teacher_max

    def describe(self) -> dict:
        return dict(super().describe(), tau_sim=self.tau[0], tau_info=self.tau[1], tau_size=self.tau[2],
                    bidirectional=self.bidirectional, pooling=self.pooling, mode=self.mode,
                    r_teacher_max=self.r_teacher_max)

    def cost_options(self) -> dict:
        return dict(mode=self.mode)

    def _fuse(self, x: torch.Tensor, attn: torch.Tensor, st: TokenState, r: int):
        """Plan and fuse the tokens; returns the fused tokens, the plan and the fusion weights."""
        size = st.sizes(x)
        with torch.no_grad():
            received = attn.mean(dim=(1, 2))   # attention each token receives, once for all criteria
            plan = bipartite_plan(mctf_scores(x, None, st.size, st.p, *self.tau, received=received), r, st.p,
                                  self.bidirectional)
            w = fusion_weights(None, size, self.pooling, received=received)
        fused = fuse_tokens(plan, x, w, self.pooling)
        st.update(plan, x)
        return fused, plan, w

    def block(self, blk: nn.Module, x: torch.Tensor, st: TokenState, r: int) -> torch.Tensor:
        if r == 0:
            return tome_block(blk, x, st, 0, self.prop_attn)
        attn = blk.attn
        bias = st.log_size_bias() if self.prop_attn else None
        h = blk.norm1(x)
        if self.mode == 'previous':
            q, k, v = project(attn, h)
            a = attention_probs(attn, q, k, bias)
            x = x + blk.drop_path1(blk.ls1(attention_output(attn, attn.attn_drop(a) @ v, h)))
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            return self._fuse(x, a, st, r)[0]
        if self.mode == 'precise':
            with torch.no_grad():
                a = attention_probs(attn, *project(attn, h, 'qk'), bias)
            x = self._fuse(x, a, st, r)[0]
            return tome_block(blk, x, st, 0, self.prop_attn)
        a = attention_probs(attn, *project(attn, h, 'qk'), bias)
        x, plan, w = self._fuse(x, a, st, r)
        h = blk.norm1(x)
        ctx = attn.attn_drop(fuse_attention(plan, a, w, self.pooling)) @ project(attn, h, 'v')
        x = x + blk.drop_path1(blk.ls1(attention_output(attn, ctx, h)))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def draw_r_teacher(self) -> float:
        """r' for the consistency pass: an integer in [0, r_teacher_max), or a fraction in steps
        of 0.01 when r_teacher_max < 1."""
        m = self.r_teacher_max
        if m < 1:
            return int(torch.randint(0, max(1, int(m * 100)), ())) / 100
        return int(torch.randint(0, int(m), ()))

    def training_forward(self, model: nn.Module, x: torch.Tensor):
        if not self.r_teacher_max:
            return None
        r_t = self.draw_r_teacher()
        # the head right after each pass: a mean-pooled model pools with that pass's token sizes
        feats = model.forward_features(x)
        out, rep = model.forward_head(feats), _representation(model, feats)
        with self.using_r(r_t):
            feats_t = model.forward_features(x)
            out_t, rep_t = model.forward_head(feats_t), _representation(model, feats_t)
        return ConsistencyOutput(out, out_t, rep, rep_t.detach(), r_t)


def _representation(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """What the consistency MSE compares: the final class token, or for a mean-pooled model
    (SpectFormer) the size-weighted mean of its tokens."""
    return model.forward_head(feats, pre_logits=True) if model.global_pool == 'avg' else feats[:, 0]


def apply_mctf(model: nn.Module, r=16, layers=None, fast: bool = False, **options) -> nn.Module:
    """Patch ``model`` in place with MCTF. Defaults: r = 16 at every block but the first, the
    paper's temperatures (1, 20, 40), bidirectional matching, attention x size pooling,
    one-step-ahead attention. ``fast=True`` is MCTF-Fast (r = 0.35 at ``mctf_fast_layers``).
    ``r_teacher_max > 0`` turns on the consistency pass in training (see ``ConsistencyLoss``)."""
    check_supported(model)   # before reading model.blocks
    depth = len(model.blocks) - grid_blocks(model)   # the attention blocks
    if fast:
        r = 0.35 if r == 16 else r
        layers = mctf_fast_layers(depth) if layers is None else layers
    elif layers is None:
        layers = list(range(1, depth)) if depth > 1 else [0]
    return patch_model(model, MCTF(r, layers, **options))


class ConsistencyLoss(nn.Module):
    """Token-reduction consistency: ``base(student) + base(teacher) + weight * gated MSE`` of the
    class tokens (see the module docstring); other outputs go to ``base`` unchanged.

    ``base`` is called as ``base(inputs, outputs, targets)`` (deitlab's ``DistillationLoss``).
    Targets may be class indices or soft (Mixup) targets; for soft targets the gate sums the
    probabilities of the classes mixed into the sample.
    """

    def __init__(self, base: nn.Module, weight: float = 3.0, gate: float = 0.4):
        super().__init__()
        self.base, self.weight, self.gate = base, weight, gate
        self.last: dict = {}

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, ConsistencyOutput):
            return self.base(inputs, outputs, targets)
        loss = self.base(inputs, outputs.student, targets) + self.base(inputs, outputs.teacher, targets)
        logits = outputs.student[0] if isinstance(outputs.student, tuple) else outputs.student
        prob = logits.detach().float().softmax(dim=-1)
        if targets.dim() == 1:
            conf = prob.gather(1, targets[:, None])[:, 0]
        else:
            conf = (prob * (targets > targets.amin(dim=1, keepdim=True))).sum(dim=1)
        keep = (conf > self.gate).to(prob.dtype)
        mse = ((outputs.student_cls - outputs.teacher_cls) ** 2).mean(dim=1)
        if keep.sum() > 0:
            loss = loss + self.weight * (mse * keep).sum() / keep.sum()
        self.last = dict(consistency=float((mse.detach() * keep).sum() / keep.sum().clamp(min=1)),
                         gate_pass=float(keep.mean()), r_teacher=outputs.r_teacher)
        return loss
