"""The token-fusion settings, without torch (``deitlab fuse --help`` reads them): the error type,
MCTF's pooling and attention modes, and ``deitlab fuse``'s configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..registry import TOKEN_FUSION

__all__ = ['TokenFusionError', 'POOLINGS', 'MCTF_MODES', 'FuseConfig']

POOLINGS = ('attn_size', 'size', 'mean', 'max')
MCTF_MODES = ('one_step_ahead', 'precise', 'previous')


class TokenFusionError(ValueError):
    """A model or setting token fusion cannot handle."""


@dataclass
class FuseConfig:
    model: str = field(default='', metadata={'group': 'model', 'help': 'timm/deitlab name or run directory'})
    pretrained: bool = field(default=False, metadata={
        'group': 'model', 'help': 'a timm name: load its released weights (timm downloads them)'})
    method: str = field(default='mctf', metadata={'group': 'token fusion', 'help': TOKEN_FUSION.choices_help()})
    r: Optional[str] = field(default=None, metadata={
        'group': 'token fusion', 'help': 'tokens fused per block: int, fraction or comma list; unset: ToMe 8, '
                                         'MCTF 16, MCTF-Fast 0.35'})
    inflect: Optional[float] = field(default=None, metadata={
        'group': 'token fusion', 'help': 'ToMe: the (r, inflect) schedule, with an integer r'})
    layers: Optional[str] = field(default=None, metadata={
        'group': 'token fusion', 'help': "comma list of the blocks that fuse; unset: the method's"})
    prop_attn: bool = field(default=True, metadata={
        'group': 'token fusion', 'help': 'proportional attention: add log(token size) to the attention logits'})
    tau_sim: float = field(default=1.0, metadata={
        'group': 'token fusion', 'help': 'MCTF: temperature of the similarity criterion (0: off)'})
    tau_info: float = field(default=20.0, metadata={
        'group': 'token fusion', 'help': 'MCTF: temperature of the informativeness criterion (0: off)'})
    tau_size: float = field(default=40.0, metadata={
        'group': 'token fusion', 'help': 'MCTF: temperature of the size criterion (0: off)'})
    bidirectional: bool = field(default=True, metadata={
        'group': 'token fusion', 'help': 'MCTF: match A->B for half of r, then B->A'})
    pooling: str = field(default='attn_size', metadata={
        'group': 'token fusion', 'help': 'MCTF: how a group fuses: attn_size | size | mean | max'})
    mode: str = field(default='one_step_ahead', metadata={
        'group': 'token fusion', 'help': 'MCTF: one_step_ahead | precise | previous'})
    data: Optional[str] = field(default=None, metadata={
        'group': 'data', 'help': 'dataset spec to report top-1 on; unset: no accuracy'})
    split: str = field(default='val', metadata={'group': 'data', 'help': 'the split to evaluate'})
    eval_batch_size: int = field(default=256, metadata={'group': 'data', 'help': 'evaluation batch size'})
    batch_size: Optional[int] = field(default=None, metadata={
        'group': 'measurement', 'help': 'throughput batch; unset: about 64 GMACs of work (default_batch)'})
    measure: bool = field(default=True, metadata={
        'group': 'measurement', 'help': 'time the models (off: accuracy, parameters and GMACs only)'})
    quick: bool = field(default=False, metadata={'group': 'measurement', 'help': 'fewer repeats and rounds'})
    rounds: Optional[int] = field(default=None, metadata={
        'group': 'measurement', 'help': 'interleaved timing rounds; unset: 9, or 3 with --quick'})
    threads: Optional[int] = field(default=None, metadata={
        'group': 'measurement', 'help': "CPU threads for the timing; unset: torch's"})
    device: Optional[str] = field(default=None, metadata={
        'group': 'run', 'help': 'torch device of the models; unset: the CPU for the timing, and CUDA when '
                                'available for the accuracy'})
    workers: int = field(default=0, metadata={'group': 'data', 'help': 'data loader worker processes'})

    def fusion_options(self) -> dict:
        opts = dict(prop_attn=self.prop_attn)
        if TOKEN_FUSION.get(self.method, TokenFusionError, 'method')['cost'] == 'mctf':   # MCTF's own options
            if self.pooling not in POOLINGS:
                raise TokenFusionError(f'--pooling must be one of {POOLINGS}, got {self.pooling!r}')
            if self.mode not in MCTF_MODES:
                raise TokenFusionError(f'--mode must be one of {MCTF_MODES}, got {self.mode!r}')
            opts.update(tau_sim=self.tau_sim, tau_info=self.tau_info, tau_size=self.tau_size,
                         bidirectional=self.bidirectional, pooling=self.pooling, mode=self.mode)
        return opts

    def layer_list(self) -> Optional[list]:
        if self.layers is None:
            return None
        try:
            return [int(v) for v in str(self.layers).split(',') if v.strip()]
        except ValueError:
            raise TokenFusionError(f'--layers takes comma-separated block indices, got {self.layers!r}') from None
