"""Shared builders and checks for the token-reduction tests."""

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

# importing deitlab registers the deitlab_* model names with timm
from deitlab.bench import resolve_input_size
from deitlab.tokens import (apply_mctf, apply_tome)
from deitlab.tokens.merge import MergePlan, TokenState, split_ab

# ---------------------------------------------------------------------------------------------
# models, inputs and shared checks
# ---------------------------------------------------------------------------------------------

# 8x8 patches of 4 px + prefix tokens; 3 blocks of width 48 (3 heads of 16)
VIT = dict(img_size=32, patch_size=4, depth=3, embed_dim=48, num_heads=3, num_classes=10)
# NViT-style: every block has its own heads, q/k and v widths per head, and MLP width
NVIT = dict(num_heads=[3, 2, 1, 3, 2, 1], qk_dim=[32, 16, 8, 32, 24, 16], v_dim=[32, 8, 16, 24, 32, 16],
            mlp_hidden=[384, 100, 50, 200, 17, 384], num_classes=10)
MODELS = {
    'vit': ('vit_tiny_patch16_224', VIT),
    'distilled': ('deit_tiny_distilled_patch16_224', VIT),
    'layerscale': ('vit_tiny_patch16_224', dict(VIT, init_values=0.5)),
    'qk_norm': ('vit_tiny_patch16_224', dict(VIT, qk_norm=True)),
    'registers': ('vit_tiny_patch16_224', dict(VIT, reg_tokens=2)),
    'scale_norms': ('vit_tiny_patch16_224', dict(VIT, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True,
                                                 fc_norm=True)),
    'deitlab_distilled': ('deitlab_deit_pico_distilled_patch4_32', dict(img_size=28, in_chans=1, num_classes=10)),
    'nvit': ('deitlab_deit_nano_patch4_32', NVIT),
}
# 'mctf-precise' is MCTF with mode='precise', and so on
METHODS = ('tome', 'mctf', 'mctf-precise', 'mctf-previous')
MCTF_MODE = {'mctf': 'one_step_ahead', 'mctf-precise': 'precise', 'mctf-previous': 'previous'}


def _model(kind: str = 'vit', seed: int = 0, **kw) -> nn.Module:
    """A tiny model with random weights, perturbed so that zero-initialised biases and heads are not 0."""
    name, args = MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**args, **kw})
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _meta(name: str) -> nn.Module:
    """A full-size timm model built on the meta device (shapes only)."""
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False)


def _images(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *resolve_input_size(model), generator=torch.Generator().manual_seed(seed))


def _tokens(model: nn.Module) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def _apply(model: nn.Module, method: str, r, **kw) -> nn.Module:
    if method == 'tome':
        return apply_tome(model, r=r, **kw)
    return apply_mctf(model, r=r, mode=MCTF_MODE[method], **kw)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _ab_positions(T: int, p: int, batch: int = 1):
    """Positions (batch, n, 1) of the A and B tokens of a T-token sequence with p protected tokens."""
    pos = torch.arange(T).expand(batch, T)[..., None]
    return split_ab(pos, p)


def _source(plan: MergePlan, batch: int, T: int) -> torch.Tensor:
    """Which input tokens each output token holds, (batch, T - r, T) of 0/1."""
    return plan.merge(torch.eye(T).expand(batch, T, T), 'amax')


def _groups(source: torch.Tensor, b: int = 0) -> set:
    """The merged groups (input positions of every output token holding more than one) of sample b."""
    return {tuple(torch.nonzero(row)[:, 0].tolist()) for row in source[b] if row.sum() > 1}


def _log_bias(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The proportional-attention bias ``log s`` over keys for tokens x of the given sizes."""
    st = TokenState(x, 1)
    st.size = size
    return st.log_size_bias()


def _duplicate_pairs(x: torch.Tensor, pairs):
    """Copy token j onto token i for each (i, j) in pairs."""
    x = x.clone()
    for i, j in pairs:
        x[:, i] = x[:, j]
    return x


def _paired_images(model: nn.Module, pairs: int, batch: int = 2) -> torch.Tensor:
    """Images whose first ``pairs`` horizontal pairs of patches (row-major: patches 2m, 2m+1) are
    identical; with the position embedding zeroed, those patches are duplicate tokens, one in set
    A and one in set B (their positions differ by one)."""
    x = _images(model, batch)
    P = model.patch_embed.patch_size[0]
    cols = model.patch_embed.grid_size[1] // 2
    for m in range(pairs):
        r, c = divmod(m, cols)
        rows = slice(r * P, (r + 1) * P)
        x[..., rows, (2 * c + 1) * P:(2 * c + 2) * P] = x[..., rows, 2 * c * P:(2 * c + 1) * P]
    return x


class _CE(nn.Module):
    """Cross-entropy under the (inputs, outputs, targets) signature of the training losses."""

    def forward(self, inputs, outputs, targets):
        return F.cross_entropy(outputs, targets)


def _tokens_in(schedule):
    return [s['tokens_in'] for s in schedule]
