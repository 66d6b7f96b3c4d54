"""``deitlab export``: every family's ONNX graph reproduces the PyTorch logits in ONNX Runtime, the
graph's input and output are named and shaped as documented, a graph that disagrees or cannot be
exported leaves no file, and the speed report has its ratios (never asserted: speed is a measurement).
Tiny models; each export takes a few CPU-seconds."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deitlab.export import ExportError, OnnxRuntimeModule, describe_model, export_onnx, onnx_speed
from deitlab.rundir import create

ROOT = Path(__file__).resolve().parents[1]
NVIT_REF = ROOT / 'benchmarks' / 'reference' / 'fmnist-nvit-0.5'
PICO = 'deitlab_deit_pico_patch4_32'
needs_ort = pytest.mark.skipif(any(__import__('importlib').util.find_spec(p) is None
                                   for p in ('onnx', 'onnxruntime', 'onnxscript')),
                               reason="the export extra is not installed (pip install -e '.[export]')")


def _model(name: str, **kwargs):
    """A model with random weights, perturbed so that zero-initialised heads and biases are not 0
    (otherwise every logit could agree trivially)."""
    torch.manual_seed(0)
    model = create(name, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _no_leftovers(directory: Path):
    return [p.name for p in directory.iterdir()]


def _ort_logits(path, x):
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {'input': x.numpy()})[0]


@needs_ort
@pytest.mark.parametrize('name, kwargs, family', [
    (PICO, dict(num_classes=5), 'DeiT'),
    ('deitlab_poolformer_pico_32', dict(num_classes=5), 'PoolFormer'),
    ('deitlab_spectformer_pico_patch4_32', dict(num_classes=5), 'SpectFormer'),   # FFTs: ONNX DFT
    ('deitlab_vitres_mu_patch4_32', dict(num_classes=5), 'ViTRes'),
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2, num_classes=5), 'ViT (timm)'),
], ids=['deit', 'poolformer', 'spectformer', 'vitres', 'timm-vit'])
def test_each_family_exports_with_parity(tmp_path, one_thread, name, kwargs, family):
    model = _model(name, **kwargs)
    out = tmp_path / 'model.onnx'
    report = export_onnx(model, out)
    assert report['parity']['max_abs_diff'] <= 1e-4 and report['parity']['batches'] == [1, 1, 1]
    assert report['inputs'] == {'input': [1, 3, 32, 32]} and report['outputs'] == {'logits': [1, 5]}
    assert report['opset'] == 20 and f'({family})' in report['model'] and report['path'] == str(out)
    assert _no_leftovers(tmp_path) == ['model.onnx']
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))   # an input the check did not see
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(_ort_logits(out, x) - want).max() <= 1e-4
    assert np.abs(want).max() > 1e-2   # logits that are not trivially zero


@needs_ort
def test_pruned_run_directory_with_a_dynamic_batch(tmp_path, one_thread):
    """The committed NViT model: non-uniform heads, q/k and v widths and MLP widths per block."""
    config = json.loads((NVIT_REF / 'config.json').read_text())
    assert len(set(config['model_args']['mlp_hidden'])) > 1 and len(set(config['model_args']['num_heads'])) > 1
    model = create(str(NVIT_REF)).eval()
    report = export_onnx(model, tmp_path / 'nvit.onnx', batch_size=2, dynamic_batch=True, opset=18)
    assert report['inputs'] == {'input': ['batch', 1, 28, 28]} and report['outputs'] == {'logits': ['batch', 10]}
    assert report['parity']['batches'] == [2, 3, 4] and report['parity']['max_abs_diff'] <= 1e-4
    assert report['opset'] == 18
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert np.abs(_ort_logits(tmp_path / 'nvit.onnx', x) - model(x).numpy()).max() <= 1e-4


@needs_ort
def test_token_fused_model_exports_and_max_pooling_is_refused(tmp_path, one_thread):
    """ToMe with a fixed r at a fixed input size: every shape is known at tracing time, and the merges'
    index_add becomes ONNX ScatterElements. MCTF's max pooling of groups (index_reduce amax) has no
    ONNX translation: one line naming the operator and the model, and no file."""
    from deitlab.tokens.fuse import apply_token_fusion
    fused = apply_token_fusion(_model(PICO, num_classes=5), 'tome', 4)
    report = export_onnx(fused, tmp_path / 'tome.onnx')
    assert report['parity']['max_abs_diff'] <= 1e-4 and 'DeiT with TOME token fusion' in report['model']
    pooled = apply_token_fusion(_model(PICO, num_classes=5), 'mctf', 4, pooling='max')
    with pytest.raises(ExportError, match=r'cannot export deitlab_deit_pico_patch4_32 \(DeiT with MCTF token fusion\) '
                                          r'to ONNX: its operator aten.index_reduce has no ONNX translation'):
        export_onnx(pooled, tmp_path / 'pooled.onnx')
    assert _no_leftovers(tmp_path) == ['tome.onnx']


class _KthValue(torch.nn.Module):
    """A toy classifier whose forward uses an operator ONNX has no translation for (kthvalue)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(48, 3)

    def forward(self, x):
        return self.head(x.flatten(1)) + torch.kthvalue(x.flatten(1), 2, dim=1).values[:, None]


@needs_ort
def test_an_unsupported_operator_is_one_clear_error(tmp_path):
    with pytest.raises(ExportError) as e:
        export_onnx(_KthValue(), tmp_path / 'k.onnx', input_size=(3, 4, 4))
    assert str(e.value) == ("cannot export _KthValue (_KthValue) to ONNX: its operator aten.kthvalue has no ONNX "
                            "translation in torch.onnx's exporter (the exporter's default opset); nothing was written")
    assert _no_leftovers(tmp_path) == []


@needs_ort
def test_a_disagreeing_graph_is_not_written(tmp_path, monkeypatch, one_thread):
    """ONNX Runtime's logits moved by 1e-3: the check fails with the difference, and neither the file
    nor its temporary copy is left."""
    model = _model(PICO, num_classes=5)
    run = OnnxRuntimeModule.forward
    monkeypatch.setattr(OnnxRuntimeModule, 'forward', lambda self, x: run(self, x) + 1e-3)
    with pytest.raises(ExportError, match=r'ONNX Runtime and PyTorch disagree on deitlab_deit_pico_patch4_32 \(DeiT\): '
                                          r'max \|difference\| of the logits 0.001 > tolerance 0.0001 on 3 seeded '
                                          r'random inputs; nothing was written'):
        export_onnx(model, tmp_path / 'm.onnx')
    assert _no_leftovers(tmp_path) == []
    (tmp_path / 'm.onnx').write_text('an earlier file')   # --overwrite: a failed export keeps the old file
    with pytest.raises(ExportError, match='disagree'):
        export_onnx(model, tmp_path / 'm.onnx', overwrite=True)
    assert _no_leftovers(tmp_path) == ['m.onnx'] and (tmp_path / 'm.onnx').read_text() == 'an earlier file'


def test_missing_packages_name_the_extra(monkeypatch):
    import importlib
    from deitlab.export import require_onnx
    real = importlib.import_module

    def fake(name, *args):
        if name == 'onnxruntime':
            raise ImportError(name)
        return real(name, *args)
    monkeypatch.setattr(importlib, 'import_module', fake)
    with pytest.raises(ExportError, match=r"ONNX export needs onnxruntime, which is not installed: "
                                          r"pip install 'deitlab\[export\]'"):
        require_onnx()


def test_describe_model_names_the_family():
    assert describe_model(create('deitlab_poolformer_pico_32')) == 'deitlab_poolformer_pico_32 (PoolFormer)'
    assert describe_model(create('deitlab_spectformer_h_pico_32')) == 'deitlab_spectformer_h_pico_32 (SpectFormer-H)'


@needs_ort
def test_speed_report_has_ratios_at_both_batches(tmp_path, one_thread):
    """Batch 1 is timed on the written file, batch 4 on the model exported again at that batch; the
    ratios are reported, not judged."""
    model = _model(PICO, num_classes=5)
    export_onnx(model, tmp_path / 'm.onnx')
    speed = onnx_speed(model, tmp_path / 'm.onnx', speed_batch=4, quick=True, rounds=2)
    assert speed['graphs'] == {'batch_1': 'the exported file', 'batch_4': 'the model exported again at batch 4'}
    for key in ('batch_1', 'batch_4'):
        assert speed[key]['ratio'] > 0 and speed[key]['lo'] <= speed[key]['ratio'] <= speed[key]['hi']
    assert speed['settings']['threads'] == 1 and speed['settings']['rounds'] == 2
    assert _no_leftovers(tmp_path) == ['m.onnx']


@needs_ort
def test_the_command_writes_the_file_and_one_json_line(tmp_path, capsys, one_thread):
    from deitlab.cli import main
    out = tmp_path / 'pico.onnx'
    assert main(['export', '--model', PICO, '--out', str(out), '--no-measure', '--json']) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['path'] == str(out) and out.is_file() and report['speed'] is None
    assert report['inputs'] == {'input': [1, 3, 32, 32]} and report['parity']['max_abs_diff'] <= 1e-4
    assert report['config']['format'] == 'onnx' and report['exporter'] == 'torch.onnx.export(dynamo=True)'
