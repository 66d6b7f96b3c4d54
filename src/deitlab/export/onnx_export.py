"""A model as an ONNX file that ONNX Runtime runs with the same logits, and how fast it runs there.

:func:`export_onnx` traces the model with ``torch.onnx.export(..., dynamo=True)``: the exporter
built on ``torch.export`` and onnxscript, which is torch's default since 2.9 and the one this
module uses on torch 2.14. The older TorchScript exporter (``dynamo=False``) was tried and is
not reliable here: it has no translation of ``aten::fft_rfft2`` (SpectFormer's spectral gating)
nor of ``index_add_`` with repeated indices (ToMe's and MCTF's merges), it cannot trace DCAL, and
it wrote the pruned NViT model with MCTF-Fast without complaint as a graph whose logits were off
by more than 1 (``benchmarks/export.py`` records what it makes of every family). The dynamo
exporter turns the FFTs into ONNX ``DFT`` and the merges into ``ScatterElements`` with an
additive reduction. The graph is written to a temporary file next to ``out``, loaded into
ONNX Runtime (CPU provider) and run on seeded random batches; only when every logit is within
``tolerance`` of PyTorch's is it renamed to ``out``, so a failed export leaves nothing behind.

:func:`onnx_speed` times the session against the PyTorch model with :func:`deitlab.bench.compare`
(interleaved rounds, median of per-round ratios, both on the same number of CPU threads): an
:class:`OnnxRuntimeModule` puts the session behind ``nn.Module``'s call, so the session is timed
by the same loop as the model.

``onnx``, ``onnxruntime`` and ``onnxscript`` are the optional ``export`` extra; they are imported
when an export runs, and their absence is an :class:`ExportError` naming the install command.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..bench.common import eval_mode, model_device, model_dtype, random_input, resolve_input_size
from .config import EXTRA_HINT, ExportError, check_out_path

__all__ = ['export_onnx', 'onnx_parity', 'onnx_speed', 'OnnxRuntimeModule', 'ort_session', 'require_onnx',
           'describe_model', 'INPUT_NAME', 'OUTPUT_NAME', 'BATCH_DIM']

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = 'input', 'logits', 'batch'
_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')   # onnxscript: what torch's dynamo exporter writes graphs with


def require_onnx() -> None:
    """Import the packages an export needs, or an ExportError naming the missing ones and the extra."""
    missing = []
    for name in _PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f'ONNX export needs {", ".join(missing)}, which {"is" if len(missing) == 1 else "are"} not '
                          f'installed: {EXTRA_HINT}')


_FAMILIES = {'MetaFormer': 'PoolFormer', 'VisionTransformer': 'ViT (timm)',
             'VisionTransformerDistilled': 'distilled ViT (timm)', 'SpectFormerH': 'SpectFormer-H'}


def describe_model(model: nn.Module) -> str:
    """``architecture (family)`` for messages, with the token fusion a model is patched with, e.g.
    ``deitlab_deit_pico_patch4_32 (DeiT with MCTF token fusion)``."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cls = getattr(type(model), 'plain_class', type(model))   # a token-fused model's class is a subclass
    family = _FAMILIES.get(cls.__name__, cls.__name__)
    tf = getattr(model, 'token_fusion', None)
    if tf is not None:
        family += f' with {tf.method.upper().replace("-FAST", "-Fast")} token fusion'
    return f"{cfg.get('architecture') or cls.__name__} ({family})"


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(text))   # the exporter colours its messages
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'")
_NODE_TARGET = re.compile(r'target=torch\.ops\.([\w.]+?)(?:\.default)?\]')
_DATA_DEPENDENT = ('GuardOnDataDependentSymNode', 'data-dependent', 'data dependent')


def _export_failure(exc: Exception, what: str, opset: Optional[int]) -> ExportError:
    """One line for an exporter failure: the operator without an ONNX translation when that is what
    failed, shapes that depend on the input's values, or the innermost error."""
    chain = list(_causes(exc))
    text = '\n'.join(f'{type(e).__name__}: {e}' for e in chain)
    at = f'opset {opset}' if opset else "the exporter's default opset"
    op = _NO_FUNCTION.search(text) or _NODE_TARGET.search(text)
    if op:
        return ExportError(f'cannot export {what} to ONNX: its operator {op.group(1)} has no ONNX translation in '
                           f"torch.onnx's exporter ({at}); nothing was written")
    if any(k in text for k in _DATA_DEPENDENT):
        return ExportError(f'cannot export {what} to ONNX: its forward has shapes or branches that depend on the input '
                           f'values, which a static graph cannot hold ({_one_line(chain[-1], 200)}); nothing was '
                           f'written')
    inner = chain[-1]
    return ExportError(f'cannot export {what} to ONNX ({at}): {type(inner).__name__}: {_one_line(inner)}; nothing was '
                       f'written')


def _cpu_float32(model: nn.Module) -> nn.Module:
    """The model itself when it is on the CPU in float32, else a copy moved there (the graph and the
    parity check are made on the CPU; the caller's model is left where it is)."""
    if model_device(model).type == 'cpu' and model_dtype(model) == torch.float32:
        return model
    with torch.inference_mode(False):
        return copy.deepcopy(model).to(device='cpu', dtype=torch.float32)


def _write_graph(model: nn.Module, path: Path, input_size: Sequence[int], batch_size: int, dynamic_batch: bool,
                 opset: Optional[int], what: str) -> None:
    """Trace ``model`` (CPU, float32, eval mode) on a batch of ``input_size`` and save the graph to
    ``path`` as one file (weights inside). The exporter's progress lines are kept off the console."""
    # torch.export specialises a dimension of size 1, so a symbolic batch is traced at 2 at least
    x = random_input(tuple(input_size), max(batch_size, 2) if dynamic_batch else batch_size, torch.device('cpu'),
                     torch.float32)
    shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, dynamic_shapes=shapes,
                                        external_data=False, verbose=False)
            program.save(str(path), external_data=False)
    except Exception as e:   # noqa: BLE001 -- every exporter failure becomes one line naming the model
        raise _export_failure(e, what, opset) from e


def ort_session(path, threads: Optional[int] = None, what: Optional[str] = None):
    """An ONNX Runtime session of the file ``path`` on the CPU provider, with ``threads`` intra-op
    threads (None: torch's current number, so that both runtimes get the same cores) and one
    inter-op thread; an ExportError naming ``what`` (default: the file) when it cannot load it."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3   # errors only: the session's warnings are not the user's business
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=['CPUExecutionProvider'])
    except Exception as e:   # noqa: BLE001 -- ONNX Runtime's own error types (InvalidGraph, NotImplemented, ...)
        reason = _one_line(str(e).replace(f'from {path} ', ''))   # a temporary file's name tells nothing
        raise ExportError(f'ONNX Runtime cannot load {what or path}: {reason}') from e


class OnnxRuntimeModule(nn.Module):
    """ONNX Runtime sessions behind ``nn.Module``'s call: ``forward(x)`` hands ``x`` to the session
    of its batch size (or to the one under ``None``, a graph with a symbolic batch) as a NumPy array
    and returns the logits as a tensor. It holds no parameters; :func:`deitlab.bench.compare` times
    it like any model."""

    def __init__(self, sessions: Dict[Optional[int], object]):
        super().__init__()
        self.sessions = dict(sessions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self.sessions.get(int(x.shape[0]), self.sessions.get(None))
        if session is None:
            raise ValueError(f'no ONNX Runtime session takes a batch of {x.shape[0]} (batches: '
                             f'{sorted(k for k in self.sessions if k is not None)})')
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


def _logits(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise ExportError(f'{what} returns {type(out).__name__}, not one tensor of logits; export a model whose '
                          f'eval-mode forward returns the logits')
    return out


def onnx_parity(model: nn.Module, runtime: nn.Module, input_size: Sequence[int], batches: Sequence[int],
                seed: int = 0) -> dict:
    """The largest ``|runtime(x) - model(x)|`` over seeded standard-normal inputs, one of each batch
    size in ``batches`` (input ``i`` drawn with seed ``seed + i``): ``max_abs_diff`` (the largest),
    ``per_input`` (each input's) and the ``batches``. ``runtime`` is an :class:`OnnxRuntimeModule`."""
    diffs = []
    with eval_mode(model), torch.inference_mode():
        for i, b in enumerate(batches):
            x = random_input(tuple(input_size), int(b), torch.device('cpu'), torch.float32, seed=seed + i)
            want = _logits(model, x, describe_model(model)).float()
            got = runtime(x)
            if tuple(got.shape) != tuple(want.shape):
                raise ExportError(f'ONNX Runtime returned logits of shape {tuple(got.shape)}, PyTorch '
                                  f'{tuple(want.shape)}; nothing was written')
            diffs.append(float((got - want).abs().max()) if want.numel() else 0.0)
    return dict(max_abs_diff=max(diffs), per_input=diffs, batches=[int(b) for b in batches], seed=int(seed))


def _graph_info(path: Path) -> dict:
    """Opset, input and output names and shapes (a symbolic dimension by its name) of the ONNX file."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    opset = next((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), None)
    return dict(opset=opset, inputs={v.name: shape(v) for v in proto.graph.input},
                outputs={v.name: shape(v) for v in proto.graph.output}, bytes=path.stat().st_size)


def export_onnx(model: nn.Module, out, *, input_size: Optional[Sequence[int]] = None, batch_size: int = 1,
                dynamic_batch: bool = False, opset: Optional[int] = None, tolerance: float = 1e-4,
                parity_inputs: int = 3, seed: int = 0, overwrite: bool = False) -> dict:
    """Write ``model`` to the ONNX file ``out`` if ONNX Runtime reproduces its logits.

    The input ``input`` is ``(batch_size, C, H, W)`` of the model's own input size (or
    ``input_size``), the output ``logits`` ``(batch_size, classes)``; with ``dynamic_batch`` both
    have a symbolic first dimension ``batch``. The graph is checked on ``parity_inputs`` seeded
    random batches (all of ``batch_size``, or of ``batch_size``, ``batch_size + 1``, ... with a
    dynamic batch) and written only when the largest absolute logit difference is at most
    ``tolerance``; otherwise an ExportError says by how much it missed and no file is left.
    Returns ``path``, ``model`` (:func:`describe_model`), ``opset``, ``inputs`` / ``outputs``
    (names and shapes), ``bytes``, ``parity`` (:func:`onnx_parity`) and the settings.
    """
    require_onnx()
    path = check_out_path(out, overwrite)
    what = describe_model(model)
    run = _cpu_float32(model)
    size = tuple(resolve_input_size(getattr(run, 'backbone', run), input_size))   # DCAL: its backbone's input
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with eval_mode(run):
            _write_graph(run, tmp, size, batch_size, dynamic_batch, opset, what)
            at = f'opset {opset}' if opset else "the exporter's default opset"
            runtime = OnnxRuntimeModule({None if dynamic_batch else batch_size: ort_session(
                tmp, what=f'the graph of {what} ({at}); nothing was written')})
            batches = [batch_size + i if dynamic_batch else batch_size for i in range(parity_inputs)]
            parity = onnx_parity(run, runtime, size, batches, seed)
        if not parity['max_abs_diff'] <= tolerance:   # also catches NaN
            raise ExportError(f'ONNX Runtime and PyTorch disagree on {what}: max |difference| of the logits '
                              f'{parity["max_abs_diff"]:.3g} > tolerance {tolerance:g} on {len(batches)} seeded random '
                              f'inputs; nothing was written')
        info = _graph_info(tmp)
        if opset and info['opset'] != opset:   # below its own opset the exporter converts down, or keeps its own
            raise ExportError(f'the exporter wrote {what} with ONNX opset {info["opset"]}, not the {opset} asked for '
                              f'(it converts its graphs down, which can fail); nothing was written')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return dict(path=str(path), model=what, format='onnx', exporter='torch.onnx.export(dynamo=True)',
                input_size=list(size), batch_size=int(batch_size), dynamic_batch=bool(dynamic_batch), **info,
                parity=dict(parity, tolerance=float(tolerance)), torch=torch.__version__,
                onnx=_version('onnx'), onnxruntime=_version('onnxruntime'), onnxscript=_version('onnxscript'))


def _version(package: str) -> Optional[str]:
    try:
        return importlib.import_module(package).__version__
    except (ImportError, AttributeError):
        return None


def onnx_speed(model: nn.Module, path, *, batch_size: int = 1, dynamic_batch: bool = False,
               input_size: Optional[Sequence[int]] = None, speed_batch: int = 64, opset: Optional[int] = None,
               rounds: Optional[int] = None, quick: bool = False, threads: Optional[int] = None) -> dict:
    """ONNX Runtime's speed over PyTorch's on the CPU, at batch 1 and at ``speed_batch``.

    Each batch is timed on a graph of that batch: the file ``path`` (exported at ``batch_size``, or
    with a symbolic batch when ``dynamic_batch``) where it fits, else the same model exported again
    at that batch into a temporary directory. Both runtimes use ``threads`` CPU threads (None:
    torch's current number) and are measured by :func:`deitlab.bench.compare`, interleaved, in
    ``rounds`` rounds (9, or 3 with ``quick``). Returns ``batch_1`` and ``batch_{speed_batch}``,
    each with ``ratio`` (ONNX Runtime's speed over PyTorch's: above 1, ONNX Runtime is faster; the
    median of the per-round ratios), ``lo`` / ``hi`` (min / max over the rounds) and the two
    runtimes' medians (ms at batch 1, images/s at the larger batch); ``graphs`` (which file timed
    which batch), ``warnings`` (ratios within the noise, a busy CPU) and the ``settings``.
    """
    from ..bench import compare
    from ..bench.speed import noise_warnings

    require_onnx()
    run = _cpu_float32(model)
    size = tuple(resolve_input_size(getattr(run, 'backbone', run), input_size))
    want = sorted({1, int(speed_batch)})
    with tempfile.TemporaryDirectory(prefix='deitlab-export-') as tmp, eval_mode(run):
        sessions, graphs, own = {}, {}, None
        for b in want:
            if dynamic_batch or b == batch_size:
                own = own or ort_session(path, threads)
                sessions[b], graphs[f'batch_{b}'] = own, 'the exported file'
                continue
            extra = Path(tmp) / f'batch{b}.onnx'
            _write_graph(run, extra, size, b, False, opset, describe_model(model))
            sessions[b], graphs[f'batch_{b}'] = ort_session(extra, threads), f'the model exported again at batch {b}'
        rows = compare({'pytorch': run, 'onnxruntime': OnnxRuntimeModule(sessions)}, 'pytorch', input_size=size,
                       batch_size=int(speed_batch), rounds=rounds, quick=quick, threads=threads, gmacs=False)
    torch_row, ort_row = rows
    settings = ort_row['settings']
    out = {'batch_1': dict(ratio=ort_row['latency_speedup'], lo=ort_row['latency_speedup_lo'],
                           hi=ort_row['latency_speedup_hi'], pytorch_ms=torch_row['latency_ms'],
                           onnxruntime_ms=ort_row['latency_ms'])}
    out[f'batch_{speed_batch}'] = dict(ratio=ort_row['throughput_ratio'], lo=ort_row['throughput_ratio_lo'],
                                       hi=ort_row['throughput_ratio_hi'],
                                       pytorch_images_per_s=torch_row['images_per_s'],
                                       onnxruntime_images_per_s=ort_row['images_per_s'])
    named = [dict(ort_row, name='onnxruntime vs pytorch')]
    return dict(out, graphs=graphs, ratio='ONNX Runtime speed / PyTorch speed (above 1: ONNX Runtime is faster), '
                                         'median of per-round ratios, min-max over the rounds in lo / hi',
                warnings=noise_warnings(named, settings=settings),
                settings={k: settings.get(k) for k in ('device', 'device_name', 'threads', 'rounds', 'latency_steps',
                                                       'throughput_steps', 'warmup', 'run_time', 'load_avg',
                                                       'load_avg_after', 'cpu_count', 'malloc', 'torch')})
