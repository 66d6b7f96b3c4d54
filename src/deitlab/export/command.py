"""``deitlab export``: a model by name or run directory, optionally token-fused, as a file another
runtime runs, checked against PyTorch and timed against it.

:func:`export_model` builds the model (``rundir.create``: a deitlab or timm name, or a run
directory with its per-block widths, e.g. an NViT- or OFB-pruned model), fuses its tokens when
asked (``tokens.fuse.apply_token_fusion``: a fixed r schedule at the fixed input size, so every
shape in the graph is known when it is traced), writes it with :func:`export_onnx` (nothing is
written when ONNX Runtime's logits differ from PyTorch's by more than the tolerance) and, with
``measure``, reports ONNX Runtime's speed over PyTorch's at batch 1 and ``speed_batch``
(:func:`onnx_speed`).
"""
from __future__ import annotations

from .config import ExportError, ModelExportConfig
from .onnx_export import export_onnx, onnx_speed, require_onnx

__all__ = ['export_model', 'summary_lines']


def _fused(model, cfg: ModelExportConfig):
    """``model`` patched with ``cfg.token_fusion`` at ``cfg.r`` (the method's default r when unset)."""
    from ..tokens.fuse import apply_token_fusion, parse_r_arg
    r = None if cfg.r is None else parse_r_arg(cfg.r)
    try:
        return apply_token_fusion(model, cfg.token_fusion, r, **cfg.fusion_options)
    except TypeError as e:   # an option the method does not take
        raise ExportError(f'--fusion-options {cfg.fusion_options}: {cfg.token_fusion} does not take them ({e})') \
            from None


def export_model(cfg: ModelExportConfig) -> dict:
    """Export ``cfg.model`` as ``cfg.format`` to ``cfg.out`` (see the module docstring). Returns
    :func:`export_onnx`'s report with ``speed`` (:func:`onnx_speed`, or None without ``measure``)
    and the ``config``."""
    from ..rundir import create

    cfg.validate()
    require_onnx()   # before the model is built: a missing package is the first thing to say
    kwargs = {k: getattr(cfg, k) for k in ('img_size', 'in_chans') if getattr(cfg, k) is not None}
    model = create(cfg.model, pretrained=cfg.pretrained, **kwargs).eval()
    if cfg.token_fusion is not None:
        model = _fused(model, cfg)
    report = export_onnx(model, cfg.out, batch_size=cfg.batch_size, dynamic_batch=cfg.dynamic_batch,
                         opset=cfg.opset, tolerance=cfg.tolerance, parity_inputs=cfg.parity_inputs, seed=cfg.seed,
                         overwrite=cfg.overwrite)
    report['speed'] = None
    if cfg.measure:
        report['speed'] = onnx_speed(model, cfg.out, batch_size=cfg.batch_size, dynamic_batch=cfg.dynamic_batch,
                                     speed_batch=cfg.speed_batch, opset=cfg.opset, rounds=cfg.rounds,
                                     quick=cfg.quick, threads=cfg.threads)
    report['config'] = cfg.to_dict()
    return report


def summary_lines(report: dict) -> dict:
    """The report as a few readable lines (what ``deitlab export`` prints without ``--json``)."""
    shapes = ', '.join(f'{n} {tuple(s)}' for n, s in {**report['inputs'], **report['outputs']}.items())
    parity = report['parity']
    lines = {'written': f'{report["path"]} ({report["bytes"] / 1e6:.2f} MB, ONNX opset {report["opset"]})',
             'model': report['model'], 'graph': shapes,
             'parity': f'max |ONNX Runtime - PyTorch| = {parity["max_abs_diff"]:.2g} over {len(parity["batches"])} '
                       f'seeded random inputs (tolerance {parity["tolerance"]:g})'}
    speed = report.get('speed')
    if speed:
        for key, row in speed.items():
            if key.startswith('batch_'):
                lines[f'speed, {key.replace("_", " ")}'] = (f'ONNX Runtime {row["ratio"]:.2f}x PyTorch '
                                                            f'({row["lo"]:.2f}-{row["hi"]:.2f} over the rounds)')
        lines['timing'] = (f'{speed["settings"]["threads"]} threads, {speed["settings"]["rounds"]} interleaved rounds, '
                           f'load average {speed["settings"]["load_avg"]} -> {speed["settings"]["load_avg_after"]}')
        for i, text in enumerate(speed['warnings']):
            lines[f'warning {i + 1}' if len(speed['warnings']) > 1 else 'warning'] = text
    return lines
