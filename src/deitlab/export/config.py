"""The settings of ``deitlab export`` and its error type, without torch (``deitlab export --help``
reads them).

``ExportError`` is bad input or a model that cannot be exported: the command line prints it as one
line and exits with status 2. Every check that needs no model -- the format, the numbers, the output
path -- runs in :meth:`ModelExportConfig.validate`, before a model is built or a file is touched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..registry import TOKEN_FUSION

__all__ = ['ExportError', 'ModelExportConfig', 'FORMATS', 'EXTRA_HINT']

#: the formats ``--format`` takes
FORMATS = ('onnx',)
#: how to install what the export needs (the ``export`` extra of ``pyproject.toml``)
EXTRA_HINT = "pip install 'deitlab[export]'"


class ExportError(ValueError):
    """A model, setting or output path that ``deitlab export`` cannot use, with the reason."""


@dataclass
class ModelExportConfig:
    """Settings of :func:`deitlab.export.export_model` (one field per ``deitlab export`` flag).

    The model is traced at ``batch_size`` images of its own input size (``img_size`` /
    ``in_chans`` rebuild it at another one) and, with ``token_fusion``, fused first with a fixed r
    schedule at that size. The written file must reproduce the PyTorch logits within
    ``tolerance`` on ``parity_inputs`` seeded random batches, or nothing is written. With
    ``measure`` the ONNX Runtime session is timed against the PyTorch model in interleaved rounds.
    """
    model: str = field(metadata={'group': 'model', 'help': 'timm/deitlab name or run directory'})
    out: str = field(metadata={'group': 'run', 'help': 'the file to write (e.g. model.onnx); its directory must exist'})
    format: str = field(default='onnx', metadata={'group': 'export', 'help': f'file format: {" | ".join(FORMATS)}'})
    pretrained: bool = field(default=False, metadata={
        'group': 'model', 'help': 'a timm name: load its released weights (timm downloads them); a run directory '
                                  'always has its own'})
    img_size: Optional[int] = field(default=None, metadata={'group': 'model', 'help': "input side; unset: the model's"})
    in_chans: Optional[int] = field(default=None, metadata={
        'group': 'model', 'help': "input channels; unset: the model's"})
    token_fusion: Optional[str] = field(default=None, metadata={
        'group': 'token fusion', 'help': lambda: 'fuse tokens before exporting, with a fixed r schedule at the fixed '
                                                 f'input size: {" | ".join(TOKEN_FUSION.names())}; unset: no fusion'})
    r: Optional[str] = field(default=None, metadata={
        'group': 'token fusion', 'help': "tokens fused per block: int, fraction or comma list; unset: the method's"})
    fusion_options: dict = field(default_factory=dict, metadata={
        'group': 'token fusion', 'help': 'further options of the fusion method, e.g. mode=precise (MCTF)'})
    batch_size: int = field(default=1, metadata={
        'group': 'export', 'help': 'the batch the graph is traced at; its input and output have this batch unless '
                                   '--dynamic-batch'})
    dynamic_batch: bool = field(default=False, metadata={
        'group': 'export', 'help': 'a symbolic batch dimension ("batch") on the input and the logits'})
    opset: Optional[int] = field(default=None, metadata={
        'group': 'export', 'help': "ONNX opset of the graph; unset: the exporter's default (20 with torch 2.14)"})
    tolerance: float = field(default=1e-4, metadata={
        'group': 'export', 'help': 'largest max |ONNX Runtime - PyTorch| logit difference accepted; above it nothing '
                                   'is written'})
    parity_inputs: int = field(default=3, metadata={
        'group': 'export', 'help': 'seeded random batches on which the two must agree'})
    seed: int = field(default=0, metadata={'group': 'export', 'help': 'seed of the parity inputs'})
    overwrite: bool = field(default=False, metadata={'group': 'run', 'help': 'replace an existing --out file'})
    measure: bool = field(default=True, metadata={
        'group': 'measurement', 'help': 'time ONNX Runtime against PyTorch at batch 1 and --speed-batch'})
    speed_batch: int = field(default=64, metadata={'group': 'measurement', 'help': 'the larger batch timed'})
    rounds: Optional[int] = field(default=None, metadata={
        'group': 'measurement', 'help': 'interleaved timing rounds; unset: 9, or 3 with --quick'})
    quick: bool = field(default=False, metadata={'group': 'measurement', 'help': 'fewer repeats and rounds'})
    threads: Optional[int] = field(default=None, metadata={
        'group': 'measurement', 'help': "CPU threads of both runtimes; unset: torch's"})

    def validate(self) -> 'ModelExportConfig':
        """Check every setting that needs no model; the output path last (it touches nothing)."""
        if self.format not in FORMATS:
            raise ExportError(f'unknown format {self.format!r}; known: {", ".join(FORMATS)}')
        if not str(self.model).strip():
            raise ExportError('the model is empty: give a deitlab/timm name or a run directory')
        for name, low in (('batch_size', 1), ('parity_inputs', 1), ('speed_batch', 1), ('rounds', 1),
                          ('threads', 1), ('img_size', 1), ('in_chans', 1), ('opset', 7)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ExportError(f'{name} must be >= {low}, got {value}')
        if not self.tolerance > 0:
            raise ExportError(f'tolerance must be > 0, got {self.tolerance}')
        if self.token_fusion is not None:
            TOKEN_FUSION.check(self.token_fusion, ExportError, 'token fusion method')
        elif self.r is not None or self.fusion_options:
            raise ExportError('--r and --fusion-options are settings of token fusion: add --token-fusion METHOD')
        check_out_path(self.out, self.overwrite)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_out_path(out: str, overwrite: bool) -> Path:
    """``out`` as a path the export may write: a file (not a directory) in an existing directory,
    not there yet unless ``overwrite``."""
    if not str(out).strip():
        raise ExportError('--out is empty: give the file to write, e.g. model.onnx')
    path = Path(out)
    if path.is_dir():
        raise ExportError(f'--out {out} is a directory; give the file to write, e.g. {path / "model.onnx"}')
    if not path.parent.is_dir():
        raise ExportError(f'the directory of --out does not exist: {path.parent} (create it first)')
    if path.exists() and not overwrite:
        raise ExportError(f'{out} already exists; pass --overwrite to replace it')
    return path
