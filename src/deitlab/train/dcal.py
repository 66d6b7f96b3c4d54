"""DCAL's three branches around a ViT backbone: self-, global-local cross- and pair-wise cross-attention.

Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification", CVPR 2022 (no code released; written from the paper). ``DCAL(backbone)`` wraps
a deitlab ``DeiT`` / ``DeiTDistilled`` or a timm ``VisionTransformer`` (L pre-norm blocks, timm
``Block`` or deitlab ``WidthBlock``, run one by one as ``forward_features`` runs them)::

    SA     x_0 = embed(image),  x_l = Block_l(x_{l-1}),  logits = head(norm(x_L))   (the backbone)
    GLCA   rollout  S̄_l = 0.5 mean_h A_l + 0.5 I,  Ŝ = S̄_L ··· S̄_k   (no grad; maps recorded during
           the SA forward by ``record_attention_maps``, no second forward)
           Q-tokens = [CLS] + the top R = ceil(ratio * patches) patch tokens of x_{L-1} by Ŝ's CLS row
           z = CrossBlock(Q-tokens, all tokens of x_{L-1})   (own weights, parallel to block L)
           logits = glca_head(norm(z)[:, 0])                 (norm shared, own Linear(D, classes))
    PWCA   (training only) I2 = the batch permuted; for l = 1..L, with the SA blocks' weights:
           h_l = h_{l-1} + Attn(q(h), [k(h); k(I2)], [v(h); v(I2)]),  then + MLP, as Block_l
           (ONE softmax over the 2(N+1) keys);  logits = head(norm(h_L)), I1's labels
    loss   L = 1/2 sum_k (exp(-w_k) L_k + w_k) over the branches present, w_k learnable (init 0)
    eval   softmax(SA logits) + softmax(GLCA logits); no PWCA

Choices where the paper leaves room (each an option with this default):

* ``ratio=0.1`` of the patch tokens (the fine-grained setting; the paper uses 0.3 for re-ID), at
  least one patch. The selected indices are sorted into their original order (always, not only at
  ratio 1), so with ``ratio=1`` and ``glca_init='copy'`` GLCA is exactly the last SA block.
* ``glca_cls=True``: the class token is a GLCA query (R+1 queries) and the GLCA head reads its
  output. Only the class token: a distilled backbone's distillation token (and register tokens)
  are keys/values, never queries. With ``glca_cls=False`` the R outputs are averaged for the head.
* ``glca_init='fresh'``: the GLCA block is ``CrossBlock.like(last block)``, timm's ViT init;
  ``'copy'`` starts from the last block's weights (its own copy, trained separately).
* ``head_fusion='mean'`` ('max': element-wise max over heads, rows renormalised, as in
  ``layers/rollout.py``) and ``start_layer=0`` of the rollout.
* ``pwca_kv='sa'``: the distractor's keys/values at block l come from its SA-branch state (the
  input of SA block l); ``'pwca'`` takes them from its PWCA-branch state. ``pwca_detach=False``;
  True detaches the distractor's K/V (no gradient to the distractor's tokens nor to qkv through
  them). The distractor is ``torch.randperm`` of the batch (an image may be its own partner: then
  its PWCA equals its SA); ``forward(x, distractor=idx)`` gives the pairing, ``generator=`` seeds it.
  The PWCA branch starts from the SA branch's embedding (same patch/position embedding output).
* A distilled backbone: the SA branch's logits are what its head returns; in training with
  ``set_distilled_training(True)`` the two heads' logits are averaged (as at eval). The PWCA branch
  uses the same head. Distillation against a teacher is left to the training integration.
* ``inference='sa+glca'`` (probabilities summed, values in [0, 2]); ``'sa'`` returns the SA logits,
  exactly the backbone's eval output, and skips GLCA. ``glca=False`` needs ``inference='sa'``.
* ``features(x)``: the backbone's pre-logits feature (the class token; for a distilled DeiT the mean
  of class and distillation tokens) concatenated with GLCA's normalised class token (re-ID).
* The GLCA head does not use the backbone's ``fc_norm`` (an Identity for class-token pooling).
* ``forward(x, features=True)`` in training adds ``'features'``: each branch's pre-logits feature
  (as ``features(x)`` takes them), for a metric loss; ``loss(..., feature_loss=f)`` adds
  ``f(features_k, y)`` to each branch's loss before the weighting (re-ID's triplet loss).

A model on disk: the wrapper is the registered architecture :data:`DCAL_ARCH` (``deitlab_dcal``,
``models/dcal.py``; its entry point :func:`create_dcal`), its ``model_args`` the backbone's
architecture name and arguments and the options above, its ``pretrained_cfg`` the backbone's input
and normalisation, so ``rundir.save_run_dir`` / ``rundir.create`` and timm's ``local-dir:`` save and
rebuild it with its weights (the w_k included). ``no_weight_decay()`` keeps the w_k (and the
backbone's tokens and position embedding) out of weight decay; ``training_gmacs()`` counts the
training forward (with PWCA) for the training FLOPs.

Costs: the rollout hooks recompute every block's q/k and q k^T in float32 and multiply L-k-1
T x T maps (T tokens), so the eval-mode count of :func:`dcal_inference_gmacs` is the backbone, that
rollout work, and the GLCA block on R+1 queries over T keys plus its head.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm

from ..bench import count_gmacs
from ..layers.attention import attend, attention_output, project
from ..layers.block import CrossBlock, WidthBlock
from ..layers.rollout import (HEAD_FUSIONS, check_start_layer, cls_row, record_attention_maps, rollout_maps,
                              self_attention_modules, top_tokens)
from ..models.inputs import resolve_input_size
from ..rundir import architecture_of, create, model_args_of

__all__ = ['DCAL', 'dcal_inference_gmacs', 'create_dcal', 'pair_attention_block', 'BRANCHES', 'GLCA_INITS',
           'PWCA_KV', 'INFERENCE', 'DCAL_ARCH', 'DEFAULT_BACKBONE']

BRANCHES = ('sa', 'glca', 'pwca')
GLCA_INITS = ('fresh', 'copy')
PWCA_KV = ('sa', 'pwca')
INFERENCE = ('sa+glca', 'sa')
_BLOCK_FORWARDS = (Block.forward, WidthBlock.forward)
DCAL_ARCH = 'deitlab_dcal'   # the registered architecture of a saved wrapper (models/dcal.py)
DEFAULT_BACKBONE = 'deitlab_deit_pico_patch4_32'
_OPTIONS = ('ratio', 'glca_cls', 'glca_init', 'head_fusion', 'start_layer', 'pwca', 'glca', 'pwca_kv', 'pwca_detach',
            'inference')
# timm's arguments of an entry point that are not the architecture's
_FACTORY_KEYS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'pretrained_model_args')
# create_model arguments of a plain timm backbone that only shape its training or its classifier
_NOT_ARCH = ('num_classes', 'drop_rate', 'drop_path_rate', 'proj_drop_rate', 'attn_drop_rate', 'pos_drop_rate',
             'patch_drop_rate', 'device', 'dtype') + _FACTORY_KEYS


def _choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f'DCAL: {name} must be one of {", ".join(map(repr, choices))}, got {value!r}')


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f'DCAL: {name} must be True or False, got {value!r}')


def _check_backbone(backbone: nn.Module, glca: bool) -> None:
    name = type(backbone).__name__
    self_attention_modules(backbone)   # the rollout's ValueError for a model without self-attention
    if not isinstance(backbone, VisionTransformer) or \
            type(backbone).forward_features is not VisionTransformer.forward_features:
        raise ValueError(f'DCAL wraps a deitlab DeiT / DeiTDistilled or a timm VisionTransformer whose blocks run '
                         f'one after another; {name} has its own forward_features (its tokens change on the way)')
    for i, blk in enumerate(backbone.blocks):
        if getattr(type(blk), 'forward', None) not in _BLOCK_FORWARDS:
            raise ValueError(f'DCAL: block {i} of {name} is a {type(blk).__name__}; the pair-wise branch repeats '
                             f'the pre-norm block of timm Block / deitlab WidthBlock and no other')
    if glca and getattr(backbone, 'cls_token', None) is None:
        raise ValueError(f'DCAL: {name} has no class token; global-local cross-attention selects patches by the '
                         f'class token\'s rollout row and classifies its class token (use glca=False)')


def _copy_as_cross(block: nn.Module) -> CrossBlock:
    new = copy.deepcopy(block)
    new.__class__ = CrossBlock
    return new


def pair_attention_block(block: nn.Module, h: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """One PWCA step of a pre-norm block: queries, keys and values of ``h`` (B, N, D) from the
    block's own ``qkv``, the distractor's keys/values ``k2``, ``v2`` (B, H, N2, .) appended, one
    softmax over all N + N2 keys, then ``proj``, residual and the MLP exactly as the block does."""
    attn = block.attn
    hn = block.norm1(h)
    q, k, v = project(attn, hn)
    ctx = attend(attn, q, torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2))
    h = h + block.drop_path1(block.ls1(attention_output(attn, ctx, hn)))
    return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def _backbone_args(backbone: nn.Module) -> dict:
    """The arguments that rebuild ``backbone`` by its architecture name: a deitlab model's
    ``model_args``; for a timm model its input shape and the JSON-able architecture arguments it
    was created with (timm keeps them in ``_model_args``)."""
    args = model_args_of(backbone)
    if args:
        return args
    chans, h, w = resolve_input_size(backbone)
    args = {k: v for k, v in (getattr(backbone, '_model_args', None) or {}).items()
            if k not in _NOT_ARCH and isinstance(v, (int, float, str, bool, list, tuple))}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()} | dict(
        in_chans=chans, img_size=h if h == w else [h, w])


def _wrapper_cfg(backbone: nn.Module, num_classes: int) -> dict:
    """The wrapper's ``pretrained_cfg``: the backbone's (input size, normalisation) under the name
    :data:`DCAL_ARCH`, its first convolution and classifiers named from the wrapper."""
    cfg = dict(getattr(backbone, 'pretrained_cfg', None) or {})
    for key in ('hf_hub_id', 'url', 'file', 'state_dict', 'source', 'tag'):
        cfg.pop(key, None)
    first = cfg.get('first_conv')
    cfg.update(architecture=DCAL_ARCH, num_classes=num_classes, input_size=list(resolve_input_size(backbone)),
               classifier=('backbone.head', 'glca_head'))
    if isinstance(first, str):
        cfg['first_conv'] = f'backbone.{first}'
    return cfg


def _logits(out) -> torch.Tensor:
    """A head's logits; a distilled head's (class, distillation) pair in training is averaged."""
    if isinstance(out, (tuple, list)):
        return torch.stack(list(out)).mean(dim=0)
    return out


class DCAL(nn.Module):
    """DCAL's SA, GLCA and PWCA branches around ``backbone``; see the module docstring.

    ``forward(x)`` in training returns ``{'sa', 'glca', 'pwca'}`` logits (the branches enabled),
    ``'distractor'`` (the partner index of each image) and ``'glca_index'`` (the token positions
    of GLCA's queries, (B, R[+1])); in eval it returns the classification output. ``loss(outputs,
    y)`` weighs the branches' losses (``self.loss_weights``, one scalar per branch) and keeps the
    unweighted ones in ``self.last_losses``. The backbone's classifier is reset when ``num_classes``
    differs from its own.
    """

    def __init__(self, backbone: nn.Module, num_classes: Optional[int] = None, ratio: float = 0.1,
                 glca_cls: bool = True, glca_init: str = 'fresh', head_fusion: str = 'mean', start_layer: int = 0,
                 pwca: bool = True, glca: bool = True, pwca_kv: str = 'sa', pwca_detach: bool = False,
                 inference: str = 'sa+glca', uncertainty_init: float = 0.0):
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f'DCAL: ratio must be a fraction of the patch tokens in (0, 1], got {ratio!r}')
        for name, value in (('glca_cls', glca_cls), ('pwca', pwca), ('glca', glca), ('pwca_detach', pwca_detach)):
            _flag(name, value)
        _choice('glca_init', glca_init, GLCA_INITS)
        _choice('head_fusion', head_fusion, HEAD_FUSIONS)
        _choice('pwca_kv', pwca_kv, PWCA_KV)
        _choice('inference', inference, INFERENCE)
        if not pwca and not glca:
            raise ValueError('DCAL: pwca=False and glca=False leave only the backbone; enable at least one of the '
                             'cross-attention branches')
        if inference == 'sa+glca' and not glca:
            raise ValueError("DCAL: inference='sa+glca' needs the GLCA branch (glca=True); use inference='sa'")
        if isinstance(uncertainty_init, bool) or not isinstance(uncertainty_init, (int, float)) \
                or not math.isfinite(uncertainty_init):
            raise ValueError(f'DCAL: uncertainty_init must be a finite number, got {uncertainty_init!r}')
        _check_backbone(backbone, glca)
        try:
            check_start_layer(start_layer, len(backbone.blocks))
        except ValueError as e:
            raise ValueError(f'DCAL: rollout {e}') from None
        if num_classes is None:
            num_classes = int(getattr(backbone, 'num_classes', 0))
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'DCAL: num_classes must be a positive int (the backbone has no classifier), '
                             f'got {num_classes!r}')
        if num_classes != backbone.num_classes:
            backbone.reset_classifier(num_classes)

        self.backbone = backbone
        self.num_classes = num_classes
        self.ratio = float(ratio)
        self.glca_cls, self.glca_init, self.head_fusion, self.start_layer = glca_cls, glca_init, head_fusion, start_layer
        self.pwca, self.glca, self.pwca_kv, self.pwca_detach = pwca, glca, pwca_kv, pwca_detach
        self.inference = inference
        self.glca_block: Optional[CrossBlock] = None
        self.glca_head: Optional[nn.Linear] = None
        if glca:
            last = backbone.blocks[-1]
            self.glca_block = CrossBlock.like(last) if glca_init == 'fresh' else _copy_as_cross(last)
            p = next(backbone.parameters())
            self.glca_head = nn.Linear(backbone.embed_dim, num_classes).to(device=p.device, dtype=p.dtype)
            init_weights_vit_timm(self.glca_head)
        self.branches = tuple(b for b, on in zip(BRANCHES, (True, glca, pwca)) if on)
        self.loss_weights = nn.ParameterDict(
            {b: nn.Parameter(torch.tensor(float(uncertainty_init))) for b in self.branches})
        self.last_losses: Dict[str, torch.Tensor] = {}
        self.last_feature_losses: Dict[str, torch.Tensor] = {}
        self.pretrained_cfg = _wrapper_cfg(backbone, num_classes)

    # ------------------------------------------------------------------ branches

    def _sa(self, x: torch.Tensor, rollout: bool, keep_states: bool):
        """The SA forward block by block: (last tokens before the norm, inputs of the blocks (all when
        ``keep_states``, else the last one), attention maps or None)."""
        bb = self.backbone
        h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        states = []
        record = record_attention_maps(bb) if rollout else contextlib.nullcontext(None)
        with record as maps:
            for blk in bb.blocks:
                states = states + [h] if keep_states else [h]
                h = blk(h)
        return h, states, maps

    def _sa_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return _logits(bb.forward_head(bb.norm(tokens)))

    def _glca(self, x_in: torch.Tensor, maps):
        """GLCA on the last block's input ``x_in``: (its output tokens (B, R[+1], D), query positions)."""
        bb = self.backbone
        row = cls_row(rollout_maps(maps, self.head_fusion, self.start_layer), bb)
        prefix = int(bb.num_prefix_tokens)
        idx = top_tokens(row, self.ratio).sort(dim=1).values + prefix
        if self.glca_cls:
            idx = torch.cat([idx.new_zeros(idx.shape[0], 1), idx], dim=1)
        queries = x_in.gather(1, idx.to(x_in.device).unsqueeze(-1).expand(-1, -1, x_in.shape[-1]))
        return self.glca_block(queries, x_in), idx

    def _glca_feature(self, z: torch.Tensor) -> torch.Tensor:
        z = self.backbone.norm(z)
        return z[:, 0] if self.glca_cls else z.mean(dim=1)

    def _glca_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.glca_head(self.backbone.head_drop(self._glca_feature(z)))

    def _sa_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return bb.forward_head(bb.norm(tokens), pre_logits=True)

    def _pwca_tokens(self, states, perm: torch.Tensor) -> torch.Tensor:
        h = states[0]
        for l, blk in enumerate(self.backbone.blocks):
            source = states[l] if self.pwca_kv == 'sa' else h
            k2, v2 = project(blk.attn, blk.norm1(source[perm]), 'kv')
            if self.pwca_detach:
                k2, v2 = k2.detach(), v2.detach()
            h = pair_attention_block(blk, h, k2, v2)
        return h

    def _distractor(self, B: int, device, distractor, generator) -> torch.Tensor:
        if distractor is None:
            where = generator.device if generator is not None else 'cpu'
            return torch.randperm(B, generator=generator, device=where).to(device)
        d = torch.as_tensor(distractor)
        if d.shape != (B,) or d.is_floating_point() or d.is_complex() or d.dtype == torch.bool or \
                (B and (int(d.min()) < 0 or int(d.max()) >= B)):
            raise ValueError(f'DCAL: distractor must be {B} integer batch indices in 0..{B - 1} (the partner of '
                             f'each image), got {tuple(d.shape)} {d.dtype}')
        return d.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ API

    def forward(self, x: torch.Tensor, distractor: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, features: bool = False):
        if not self.training:
            return self.predict(x)
        return self.branch_outputs(x, distractor, generator, features)

    def branch_outputs(self, x: torch.Tensor, distractor: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, features: bool = False) -> dict:
        """What the training-mode forward returns, in the module's current mode; ``features=True``
        adds ``'features'``: each branch's pre-logits feature (SA and PWCA: the backbone's, GLCA:
        its normalised class token), for a metric loss (re-ID's triplet loss)."""
        tokens, states, maps = self._sa(x, rollout=self.glca, keep_states=self.pwca)
        out = {'sa': self._sa_logits(tokens)}
        feats = {'sa': self._sa_feature(tokens)} if features else None
        if self.glca:
            z, idx = self._glca(states[-1], maps)
            out['glca'], out['glca_index'] = self._glca_logits(z), idx
            if features:
                feats['glca'] = self._glca_feature(z)
        if self.pwca:
            perm = self._distractor(x.shape[0], x.device, distractor, generator)
            h = self._pwca_tokens(states, perm)
            out['pwca'], out['distractor'] = self._sa_logits(h), perm
            if features:
                feats['pwca'] = self._sa_feature(h)
        if features:
            out['features'] = feats
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The classification output (what eval mode returns): softmax(SA) + softmax(GLCA), or the SA
        logits for ``inference='sa'``. No PWCA. Runs in the module's current mode."""
        use_glca = self.inference == 'sa+glca'
        tokens, states, maps = self._sa(x, rollout=use_glca, keep_states=False)
        sa = self._sa_logits(tokens)
        if not use_glca:
            return sa
        z, _ = self._glca(states[-1], maps)
        return sa.softmax(dim=-1) + self._glca_logits(z).softmax(dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Retrieval features (B, 2D): the backbone's pre-logits feature and GLCA's normalised class
        token, concatenated ((B, D), the SA feature only, with ``glca=False``)."""
        tokens, states, maps = self._sa(x, rollout=self.glca, keep_states=False)
        sa = self._sa_feature(tokens)
        if not self.glca:
            return sa
        z, _ = self._glca(states[-1], maps)
        return torch.cat([sa, self._glca_feature(z)], dim=-1)

    def loss(self, outputs: Dict[str, torch.Tensor], y: torch.Tensor,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
             feature_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``1/2 sum_k (exp(-w_k) L_k + w_k)`` over the branches in ``outputs`` (the training-mode
        dict), ``L_k = criterion(logits_k, y)`` plus ``feature_loss(features_k, y)`` when given (the
        forward's ``features=True`` output; re-ID's triplet loss); the L_k (detached) are kept in
        ``last_losses``, their feature-loss parts in ``last_feature_losses``."""
        if not isinstance(outputs, dict) or 'sa' not in outputs:
            raise ValueError('DCAL.loss takes the dict of branch logits the training-mode forward returns '
                             '(in eval mode the forward returns the classification output)')
        if feature_loss is not None and 'features' not in outputs:
            raise ValueError('DCAL.loss: a feature_loss needs the branch features: run the forward with '
                             'features=True')
        total = None
        self.last_losses, self.last_feature_losses = {}, {}
        for name in self.branches:
            if name not in outputs:
                continue
            value = criterion(outputs[name], y)
            if feature_loss is not None:
                extra = feature_loss(outputs['features'][name], y)
                value = value + extra
                self.last_feature_losses[name] = extra.detach()
            w = self.loss_weights[name]
            term = 0.5 * (torch.exp(-w) * value + w)
            total = term if total is None else total + term
            self.last_losses[name] = value.detach()
        return total

    # ------------------------------------------------------------------ as a model of its own

    @property
    def output_is_probability(self) -> bool:
        """Whether the eval output sums class distributions (``inference='sa+glca'``) rather than
        being logits; ``deitlab.evaluate`` computes its loss accordingly."""
        return self.inference == 'sa+glca'

    @property
    def model_args(self) -> dict:
        """The arguments of :data:`DCAL_ARCH` that rebuild this wrapper (a run directory's
        ``model_args``): the backbone's architecture name and arguments, and the options."""
        return dict(backbone=architecture_of(self.backbone), backbone_args=_backbone_args(self.backbone),
                    **{k: getattr(self, k) for k in _OPTIONS})

    def reset_classifier(self, num_classes: int) -> None:
        """New classifiers (the backbone's and GLCA's) for ``num_classes`` classes."""
        self.backbone.reset_classifier(num_classes)
        if self.glca_head is not None:
            old = self.glca_head
            self.glca_head = nn.Linear(old.in_features, num_classes).to(device=old.weight.device,
                                                                         dtype=old.weight.dtype)
            init_weights_vit_timm(self.glca_head)
        self.num_classes = num_classes
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

    def set_distilled_training(self, enable: bool = True) -> None:
        """A distilled backbone's two heads in training: averaged by the SA and PWCA branches."""
        inner = getattr(self.backbone, 'set_distilled_training', None)
        if inner is not None:
            inner(enable)

    def no_weight_decay(self) -> set:
        """Parameter names kept out of weight decay (timm's optimizer factory asks): the backbone's
        (position embedding, class / distillation tokens) and the loss weights w_k."""
        inner = getattr(self.backbone, 'no_weight_decay', None)
        names = {f'backbone.{n}' for n in (inner() if callable(inner) else ())}
        return names | {f'loss_weights.{b}' for b in self.branches}

    def training_gmacs(self) -> float:
        """MACs per image (1e9) of the training forward (SA, rollout, GLCA and PWCA, the branches
        enabled), counted as :func:`deitlab.bench.count_gmacs` counts (eval mode, no dropout, the
        global RNG untouched)."""
        from ..bench.common import eval_mode, fused_attention, model_device, model_dtype, random_input
        x = random_input(resolve_input_size(self.backbone), 1, model_device(self), model_dtype(self))
        counter = FlopCounterMode(display=False)
        with fused_attention(self, False), eval_mode(self), torch.no_grad(), counter:
            self.branch_outputs(x, distractor=torch.zeros(1, dtype=torch.long))
        return counter.get_total_flops() / 2 / 1e9


def create_dcal(name: str = DCAL_ARCH, pretrained: bool = False, *, backbone: str = DEFAULT_BACKBONE,
                backbone_args: Optional[dict] = None, num_classes: Optional[int] = None, **kwargs) -> DCAL:
    """timm's entry point of :data:`DCAL_ARCH` (registered by ``deitlab.models``): the backbone
    ``backbone`` (a timm / deitlab architecture name) built with ``backbone_args`` and
    ``num_classes``, wrapped with the DCAL options in ``kwargs`` (other keyword arguments, e.g.
    ``drop_path_rate``, go to the backbone). ``pretrained=True`` loads the file of a run
    directory's configuration (``timm.create_model('local-dir:RUN', pretrained=True)``); the
    backbone's released weights are the business of whoever builds the backbone by its name."""
    cfg = kwargs.pop('pretrained_cfg', None)
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg) if isinstance(cfg, dict) else {}
    for key in _FACTORY_KEYS:
        kwargs.pop(key, None)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS + ('uncertainty_init',)}
    args = dict(backbone_args or {}, **kwargs)
    if num_classes is None:   # timm's local-dir: passes the classes in the configuration, as for its own models
        num_classes = cfg.get('num_classes')
    if num_classes is not None:
        args['num_classes'] = num_classes
    model = DCAL(create(backbone, **args), **options)
    if pretrained:
        from timm.models import load_pretrained
        if not (cfg.get('file') or cfg.get('state_dict')):
            raise ValueError(f'{name}: pretrained=True loads the weights of a run directory '
                             f"(timm.create_model('local-dir:RUN', pretrained=True)); there are no released ones")
        load_pretrained(model, pretrained_cfg=dict(model.pretrained_cfg, **cfg), num_classes=model.num_classes,
                        strict=True)
    return model


def dcal_inference_gmacs(model: DCAL, input_size: Optional[Sequence[int]] = None, batch_size: int = 1) -> float:
    """MACs per image (1e9) of ``model``'s eval-mode output (SA + rollout + GLCA, no PWCA), counted by
    :func:`deitlab.bench.count_gmacs` on the wrapper; ``input_size`` defaults to the backbone's."""
    if not isinstance(model, DCAL):
        raise ValueError(f'dcal_inference_gmacs counts a DCAL wrapper, not {type(model).__name__}')
    return count_gmacs(model, resolve_input_size(model.backbone, input_size), batch_size)
