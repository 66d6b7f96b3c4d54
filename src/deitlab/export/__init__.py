"""Exporting models to other runtimes: ``deitlab export`` (ONNX, checked against PyTorch's logits and
timed against PyTorch with ONNX Runtime).

``config.py`` is torch-free (``deitlab export --help`` reads it); ``onnx_export.py`` holds
:func:`export_onnx` (trace, check, write), :func:`onnx_parity` and :func:`onnx_speed`;
``command.py`` the command, :func:`export_model`. The names below are imported from their modules on
first use.
"""
from ..lazy import lazy_exports

_HOME = {'ExportError': 'config', 'ModelExportConfig': 'config', 'FORMATS': 'config',
         'export_onnx': 'onnx_export', 'onnx_parity': 'onnx_export', 'onnx_speed': 'onnx_export',
         'OnnxRuntimeModule': 'onnx_export', 'ort_session': 'onnx_export', 'describe_model': 'onnx_export',
         'require_onnx': 'onnx_export', 'export_model': 'command', 'summary_lines': 'command'}
__all__ = sorted(_HOME)
__getattr__, __dir__ = lazy_exports(__name__, _HOME)
