"""PMIM, OFB's progressive masked image modelling (Ye et al., CVPR 2024, Sec. 3.4): what keeps the
features representative while the search cuts widths (ofb.py, ofb_search.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .ofb import _replace_param

__all__ = ['PMIM']


class PMIM(nn.Module):
    """Progressive masked image modelling (OFB Sec. 3.4, SimMIM-style): during the search a growing
    fraction of the patch tokens is replaced by a learnable mask token (before the position
    embedding; the sequence keeps its length), and a light decoder -- one linear layer from a
    final patch token to its patch's pixels -- reconstructs the image. The loss is L1 on locally
    normalised pixels (each patch's target minus its mean, over its standard deviation) of the
    masked patches only. The search rescales it each step to the classification loss
    (``w = task / pmim``, detached). The kept fraction falls linearly from 0.95 to 0.75 over the
    warm-up (``keep_at``); masking is off after the search (``remove``)."""

    KEEP_RANGE = (0.95, 0.75)

    def __init__(self, model: nn.Module, seed: int = 0):
        super().__init__()
        pe = model.patch_embed
        self.patch = tuple(pe.patch_size)
        self.chans = pe.proj.in_channels
        self.num_patches = pe.num_patches
        self.prefix = getattr(model, 'num_prefix_tokens', 1)
        E = model.embed_dim
        dev = next(model.parameters()).device
        self.mask_token = nn.Parameter(torch.zeros(E, device=dev))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(E, self.patch[0] * self.patch[1] * self.chans).to(dev)
        self.keep = self.KEEP_RANGE[0]
        self.generator = torch.Generator(device='cpu').manual_seed(seed)
        self._handles: list = []
        self._mask: Optional[torch.Tensor] = None
        self._tokens: Optional[torch.Tensor] = None

    @torch.no_grad()
    def cut_embedding(self, keep: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Follow a shrunk embedding: the mask token and the decoder's input columns cut to ``keep``."""
        _replace_param(self, 'mask_token', lambda t: t[keep], optimizer)
        _replace_param(self.decoder, 'weight', lambda t: t[:, keep], optimizer)
        self.decoder.in_features = int(keep.sum())

    def search_state(self) -> dict:
        """Mask token, decoder, kept share and the masking generator, for a checkpoint."""
        return dict(params={k: v.detach().cpu() for k, v in self.state_dict().items()}, keep=float(self.keep),
                    generator=self.generator.get_state())

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        params = state['params']
        dev = self.mask_token.device
        self.mask_token = nn.Parameter(params['mask_token'].to(dev).clone())
        w, b = params['decoder.weight'].to(dev), params['decoder.bias'].to(dev)
        self.decoder = nn.Linear(w.shape[1], w.shape[0]).to(dev)
        self.decoder.weight.copy_(w)
        self.decoder.bias.copy_(b)
        self.keep = float(state['keep'])
        self.generator.set_state(state['generator'])

    def keep_at(self, progress: float) -> float:
        a, b = self.KEEP_RANGE
        return a + (b - a) * min(1.0, max(0.0, float(progress)))

    def install(self, model: nn.Module) -> None:
        def replace(_, __, out):
            B, N, _E = out.shape
            n_mask = int(round((1.0 - self.keep) * N))
            mask = torch.zeros(B, N, dtype=torch.bool)
            if n_mask:
                idx = torch.rand(B, N, generator=self.generator).argsort(1)[:, :n_mask]
                mask.scatter_(1, idx, True)
            self._mask = mask.to(out.device)
            return torch.where(self._mask[..., None], self.mask_token.to(out.dtype), out)

        def grab(_, __, out):
            self._tokens = out
        self._handles = [model.patch_embed.register_forward_hook(replace), model.norm.register_forward_hook(grab)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._mask, self._tokens = [], None, None

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Per patch its pixels, locally normalised: (B, N, p*p*C)."""
        ph, pw = self.patch
        B, C, H, W = x.shape
        t = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, ph * pw * C)
        mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
        return (t - mean) / (var + 1e-6).sqrt()

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """L1 between the decoded final patch tokens and the normalised pixels, masked patches only
        (0 when nothing was masked)."""
        if self._mask is None or self._tokens is None or not bool(self._mask.any()):
            return self.mask_token.new_zeros(())
        pred = self.decoder(self._tokens[:, self.prefix:].float())
        err = (pred - self.targets(x.float())).abs().mean(-1)
        m = self._mask.to(err.dtype)
        return (err * m).sum() / m.sum()
