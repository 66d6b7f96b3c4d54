"""ONNX export of every model family: does ONNX Runtime reproduce the PyTorch logits, and how fast does
it run them against PyTorch on this CPU?

Arms: the committed reference DeiT-nano and the NViT-0.5 model pruned from it (non-uniform widths per
block; an OFB run directory is the same architecture), each also token-fused (ToMe r=6 on the dense
model, MCTF-Fast on the pruned one, a fixed r schedule at 28 px); PoolFormer-nano, SpectFormer-nano,
SpectFormer-H-pico, ViT-Res-nano, DCAL around DeiT-pico and timm's DeiT-Ti at 224 px, built by name
with random weights (timm's initialisation plus seeded noise, so that no head is zero; speed does not
depend on the weights and nothing is downloaded). One more setting is tried and recorded as refused:
MCTF with max pooling of the merged groups.

Each arm goes through ``deitlab.export``: ``export_onnx`` (torch's dynamo exporter, the default
opset, batch 1; ONNX Runtime's logits against PyTorch's on 3 seeded random inputs, tolerance 1e-4)
and ``onnx_speed`` (batch 1 on the written file, batch ``--batch`` on the model exported again at
that batch; ``deitlab.bench.compare``'s interleaved rounds, ``--threads`` threads for both runtimes,
the median of the per-round ratios with their min-max). A ratio above 1 means ONNX Runtime is
faster. Also recorded per arm: what the older TorchScript exporter (``dynamo=False``) makes of it
(refused, or exported with its logit difference), the CPU seconds of the export, and the largest PyTorch logit (parity on all-zero logits would prove
nothing).

    python benchmarks/export.py [--rounds 5] [--threads 1] [--batch 64]

About 10 CPU-minutes on two cores. Writes ``results/export.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / 'results'
REF = HERE / 'reference'

# name -> (model name or run directory, creation arguments, token fusion (method, r) or None, random weights)
ARMS = {
    'DeiT-nano (reference)': (str(REF / 'fmnist-deit-nano'), {}, None, False),
    'DeiT-nano + ToMe r=6': (str(REF / 'fmnist-deit-nano'), {}, ('tome', 6), False),
    'NViT-0.5 (reference, pruned)': (str(REF / 'fmnist-nvit-0.5'), {}, None, False),
    'NViT-0.5 + MCTF-Fast': (str(REF / 'fmnist-nvit-0.5'), {}, ('mctf-fast', None), False),
    'PoolFormer-nano': ('deitlab_poolformer_nano_32', dict(num_classes=10), None, True),
    'SpectFormer-nano': ('deitlab_spectformer_nano_patch4_32', dict(num_classes=10), None, True),
    'SpectFormer-H-pico': ('deitlab_spectformer_h_pico_32', dict(num_classes=10), None, True),
    'ViT-Res-nano': ('deitlab_vitres_nano_patch4_32', dict(num_classes=10), None, True),
    'DCAL (DeiT-pico)': ('deitlab_dcal', dict(num_classes=10), None, True),
    'DeiT-Ti (timm, 224 px)': ('deit_tiny_patch16_224', {}, None, True),
}
REFUSED = {'DeiT-nano + MCTF r=8, max pooling': (str(REF / 'fmnist-deit-nano'), ('mctf', 8), dict(pooling='max'))}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(spec: str, kwargs: dict, fusion, random: bool, options=None):
    import torch
    from deitlab.rundir import create
    from deitlab.tokens.fuse import apply_token_fusion

    torch.manual_seed(0)
    model = create(spec, **kwargs).eval()
    if random:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    if fusion:
        model = apply_token_fusion(model, fusion[0], fusion[1], **(options or {}))
    return model


def torchscript_exporter(model, input_size) -> dict:
    """What the older TorchScript exporter (``dynamo=False``) makes of ``model``: ``exported`` with the
    max |ONNX Runtime - PyTorch| logit difference on one seeded input, or ``refused`` with the first
    line of its error."""
    import torch
    from deitlab.bench.common import random_input
    from deitlab.export import OnnxRuntimeModule, ort_session
    x = random_input(tuple(input_size), 1, torch.device('cpu'), torch.float32, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'm.onnx'
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')
            try:
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['input'],
                                  output_names=['logits'])
            except Exception as e:   # noqa: BLE001 -- recorded, not raised
                first = (str(e).strip().splitlines() or [''])[0]
                return dict(status='refused', error=f'{type(e).__name__}: {first[:200]}'.rstrip(': '))
        with torch.inference_mode():
            diff = float((OnnxRuntimeModule({1: ort_session(path)})(x) - model(x)).abs().max())
    return dict(status='exported', max_abs_diff=diff)


def run_arm(name: str, args, tmp: Path) -> dict:
    import torch
    from deitlab.bench import count_params, resolve_input_size
    from deitlab.bench.common import random_input
    from deitlab.export import describe_model, export_onnx, onnx_speed

    spec, kwargs, fusion, random = ARMS[name]
    model = build(spec, kwargs, fusion, random)
    size = tuple(resolve_input_size(getattr(model, 'backbone', model)))
    with torch.inference_mode():
        logits_max = float(model(random_input(size, 2, torch.device('cpu'), torch.float32, seed=5)).abs().max())
    c0 = _cpu_s()
    report = export_onnx(model, tmp / 'model.onnx', overwrite=True)
    export_cpu = _cpu_s() - c0
    speed = onnx_speed(model, tmp / 'model.onnx', speed_batch=args.batch, rounds=args.rounds, threads=args.threads)
    row = dict(name=name, model=describe_model(model), spec=Path(spec).name if '/' in spec else spec,
               weights='random (timm init + seeded noise)' if random else 'trained (committed run)',
               token_fusion=dict(method=fusion[0], r=model.token_fusion.r) if fusion else None,
               params_m=count_params(model) / 1e6, input_size=list(size), logits_abs_max=logits_max,
               max_abs_diff=report['parity']['max_abs_diff'], parity=report['parity'], opset=report['opset'],
               bytes=report['bytes'], inputs=report['inputs'], outputs=report['outputs'],
               export_cpu_s=round(export_cpu, 1), torchscript_exporter=torchscript_exporter(model, size),
               speed=speed)
    ts = row['torchscript_exporter']
    print(f'{name}: max |diff| {row["max_abs_diff"]:.1e}, batch 1 {speed["batch_1"]["ratio"]:.2f}x, batch '
          f'{args.batch} {speed[f"batch_{args.batch}"]["ratio"]:.2f}x; TorchScript exporter: '
          f'{ts.get("error", "")[:60] or "max |diff| %.1e" % ts["max_abs_diff"]}', flush=True)
    return row


def refused_arm(name: str, tmp: Path) -> dict:
    from deitlab.export import ExportError, export_onnx
    spec, fusion, options = REFUSED[name]
    try:
        export_onnx(build(spec, {}, fusion, False, options), tmp / 'refused.onnx', overwrite=True)
    except ExportError as e:
        return dict(name=name, refused=True, error=str(e), file_left=(tmp / 'refused.onnx').exists())
    return dict(name=name, refused=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--arms', default=None, help='comma-separated arm names (default: all)')
    p.add_argument('--out', default=str(RESULTS / 'export.json'))
    args = p.parse_args(argv)

    from deitlab.bench.speed import fix_malloc_thresholds
    malloc = fix_malloc_thresholds()
    import onnx
    import onnxruntime
    import onnxscript
    import timm
    import torch
    from deitlab.bench.common import device_name, load_average

    torch.set_num_threads(args.threads)
    t0, cpu0, load_before = time.time(), _cpu_s(), load_average()
    names = args.arms.split(',') if args.arms else list(ARMS)
    with tempfile.TemporaryDirectory(prefix='deitlab-export-bench-') as tmp:
        rows = [run_arm(n, args, Path(tmp)) for n in names]
        refused = [refused_arm(n, Path(tmp)) for n in REFUSED]
    res = dict(benchmark='export', batch=args.batch, rounds=args.rounds, tolerance=1e-4,
               command=' '.join(['python', 'benchmarks/export.py'] + (argv if argv is not None else sys.argv[1:])),
               ratio='ONNX Runtime speed / PyTorch speed (above 1: ONNX Runtime is faster), median of per-round '
                     'ratios; lo / hi: min / max over the rounds',
               rows=rows, refused=refused,
               settings=dict(threads=args.threads, device='cpu', device_name=device_name(torch.device('cpu')),
                             torch=torch.__version__, timm=timm.__version__, onnx=onnx.__version__,
                             onnxruntime=onnxruntime.__version__, onnxscript=onnxscript.__version__,
                             python=platform.python_version(), machine=platform.machine(), malloc=malloc,
                             load_avg_start=load_before, load_avg_end=load_average(),
                             wall_s=round(time.time() - t0, 1), cpu_s=round(_cpu_s() - cpu0, 1)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + '\n')
    for r in refused:
        print(f'{r["name"]}: ' + (f'refused: {r["error"]}' if r['refused'] else 'exported'))
    print(f'{args.rounds} rounds, {args.threads} thread(s), load average {load_before} -> '
          f'{res["settings"]["load_avg_end"]}, {res["settings"]["wall_s"]} s; wrote {out}')


if __name__ == '__main__':
    main()
