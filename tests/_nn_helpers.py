"""Helpers for tests that need a model whose weights or attention are far from their init."""
import torch


def sharpen_attention(model, factor: float = 8.):
    """Scale the q/k rows of every block's qkv so that the heads' maps are far from uniform and differ
    (a well-separated rollout and top patches)."""
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            n = 2 * attn.num_heads * getattr(attn, 'qk_dim', getattr(attn, 'head_dim', None))
            attn.qkv.weight[:n] *= factor
    return model


def perturb(model, seed: int = 1):
    """Move every parameter off its init (zero biases, unit LayerNorm weights), so slices matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
