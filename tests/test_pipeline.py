"""deitlab pipeline: a YAML file of steps checked before anything runs, each step the next one's input,
re-runs that skip the steps done, a failed step that keeps the ones before it, one report.

Most tests run the pipeline with a stand-in for the subprocess (``runner``) that writes what each
command would and records its command line; ``test_a_real_pipeline_end_to_end`` runs the real commands."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from deitlab.cli import main
from deitlab.pipeline import PipelineError, PipelineInterrupted
from deitlab.pipeline.run import StepRun, plan_pipeline, run_pipeline
from deitlab.pipeline.spec import load_pipeline
from deitlab.rundir import create, save_run_dir

PICO = 'deitlab_deit_pico_patch4_32'
GLYPHS = 'glyphs:train=64,val=32,size=32,seed=1'
SRC = str(Path(__file__).resolve().parents[1] / 'src')
STEPS = f"""steps:
  - train: {{model: {PICO}, epochs: 1, batch-size: 16, tensorboard: false, max-steps-per-epoch: 2}}
  - prune: {{method: nvit, target-gmacs: 0.6, interval: 2, prune-steps: 4, total-steps: 6, lam: 0, val-batches: 1,
             group-sizes: {{mlp: 16}}}}
  - fuse: {{method: tome, r: 4}}
  - export:
"""


def _write(tmp_path, text, name='p.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return path


def _pipeline(tmp_path, steps=STEPS, head=None, name='p.yaml'):
    head = head if head is not None else f'out: {tmp_path / "out"}\ndata: {GLYPHS}\n'
    return _write(tmp_path, head + steps, name)


def _argv(text: str) -> list:
    return text.split()


class FakeSteps:
    """Stands in for ``python -m deitlab ...``: writes each command's output (a tiny run directory,
    an ONNX file's bytes) and prints a JSON result like the command's; ``fail`` returns an error
    for the commands it matches."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def __call__(self, argv):
        self.calls.append(list(argv))
        opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith('--')}
        if self.fail and self.fail(argv):
            return StepRun(2, json.dumps({'error': 'r = 99 is more than a block can merge', 'type': 'TokenFusionError'}))
        kind, data, out = argv[0], opt.get('--data'), opt.get('--out')
        if kind in ('train', 'prune'):
            import timm
            torch.manual_seed(len(self.calls))
            save_run_dir(timm.create_model(PICO, depth=1, num_classes=3), out)
        if kind == 'train':
            result = dict(run_dir=out, data=data, val_top1=50.0, val_top5=100.0, params=1000)
        elif kind == 'prune':
            result = dict(rows=[dict(name='dense', top1=50.0, gmacs=0.02, params_m=0.2),
                                dict(name='nvit', top1=40.0, gmacs=0.01, params_m=0.1)],
                          config=dict(data=data), target=dict(kind='gmacs', value=0.6), run_dir=out)
        elif kind == 'fuse':
            result = dict(rows=[dict(name='fused attention', top1=40.0, params_m=0.1, gmacs_closed_form=0.01),
                                dict(name='explicit attention', top1=40.0, params_m=0.1, gmacs_closed_form=0.01),
                                dict(name='tome r=4', top1=39.0, params_m=0.1, gmacs_closed_form=0.008)],
                          fusion=dict(method='tome', r=4), gmacs_ratio=0.8, config=dict(data=data), settings=None)
        elif kind == 'export':
            Path(out).write_bytes(b'onnx')
            result = dict(path=out, bytes=4, parity=dict(max_abs_diff=1e-7, tolerance=1e-4), speed=None,
                          config=dict(token_fusion=opt.get('--token-fusion'), r=opt.get('--r')))
        else:   # eval
            result = dict(top1=25.0, top5=75.0)
        return StepRun(0, 'a line before\n' + json.dumps(result) + '\n')


# --- the file is checked before anything runs ---

@pytest.mark.parametrize('steps, message', [
    ('steps:\n  - trian: {model: x}\n',
     r"step 1 \(line 4\): unknown step kind 'trian' \(did you mean 'train'\?\); the kinds: train, prune, fuse, export"),
    (f'steps:\n  - train: {{model: {PICO}, epoch: 2}}\n',
     r"step 1 \(train, line 4\): unknown option 'epoch' \(did you mean 'epochs'\?\); deitlab train --help lists"),
    (f'steps:\n  - train: {{model: {PICO}, epochs: many}}\n',
     r"step 1 \(train, line 4\): argument --epochs: invalid int value: 'many'"),
    (f'steps:\n  - train: {{model: {PICO}, lr: 0}}\n', r'step 1 \(train, line 4\): lr must be > 0, got 0'),
    ('steps:\n  - prune: {method: nvit, target-gmacs: 0.5}\n',
     r'step 1 \(prune nvit, line 4\): no model to prune: give model: \(a run directory or a deitlab/timm name\), '
     r'or put a train step before it'),
    (f'steps:\n  - train: {{model: {PICO}}}\n  - prune: {{method: nvt}}\n',
     r"step 2 \(prune, line 5\): unknown method 'nvt' \(did you mean 'nvit'\?\); the methods of prune: nvit, ofb"),
    (f'steps:\n  - train: {{model: {PICO}}}\n  - prune: {{target-gmacs: 0.5}}\n',
     r'step 2 \(prune, line 5\): give method: one of nvit, ofb'),
    (f'steps:\n  - train: {{model: {PICO}}}\n  - prune: {{method: nvit}}\n',
     r'step 2 \(prune nvit, line 5\): give exactly one pruning target'),
    (f'steps:\n  - train: {{model: {PICO}, out: elsewhere}}\n',
     r'step 1 \(train, line 4\): out is not a step option: the pipeline writes each step to OUT/NN-name'),
    (f'steps:\n  - train: {{model: {PICO}}}\n  - fuse: {{method: tome, r: 99, inflect: 2}}\n  - export:\n',
     r'step 3 \(export, line 6\): step 2 \(fuse tome\) sets inflect, which export cannot take'),
    (f'steps:\n  - train: {{model: {PICO}}}\n  - fuse: {{method: tome, r: 99x}}\n',
     r"step 2 \(fuse tome, line 5\): r must be a number or a comma-separated list of numbers, got '99x'"),
    (f'steps:\n  - train: {{model: {PICO}}}\n    epochs: 2\n',
     r'step 1 \(line 4\): one kind per step, got train, epochs'),
    (f'steps:\n  - train: {{model: {PICO}, name: a/b}}\n',
     r"step 1 \(train, line 4\): name 'a/b' names the step's output"),
    (f'steps:\n  - export: {{model: {PICO}, tolerance: 0}}\n', r'step 1 \(export, line 4\): tolerance must be > 0'),
    ('steps: []\n', r'give steps: a list of steps'),
])
def test_a_bad_step_is_one_error_naming_it(tmp_path, steps, message):
    path = _pipeline(tmp_path, steps)
    with pytest.raises(PipelineError) as e:
        load_pipeline(path)
    assert re.search(message, str(e.value)), str(e.value)
    assert str(e.value).startswith(str(path)) and '\n' not in str(e.value)
    assert not (tmp_path / 'out').exists()


def test_bad_keys_at_the_top(tmp_path):
    with pytest.raises(PipelineError, match=r"p.yaml, line 1: unknown key 'outt' \(did you mean 'out'\?\); a pipeline "
                                            r"file has out, data, measure, report, title, steps"):
        load_pipeline(_pipeline(tmp_path, head='outt: x\n'))
    with pytest.raises(PipelineError, match=r'give out: the directory every step writes under'):
        load_pipeline(_pipeline(tmp_path, head='data: glyphs\n'))
    with pytest.raises(PipelineError, match=r'measure is true or false'):
        load_pipeline(_pipeline(tmp_path, head='out: o\nmeasure: sometimes\n'))


# --- the commands ---

def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    path = _pipeline(tmp_path)
    assert main(['pipeline', str(path), '--dry-run', '--json']) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / 'out'
    assert [s['argv'] for s in got['steps']] == [
        _argv(f'train --model {PICO} --data {GLYPHS} --out {out}/01-train --epochs 1 --batch-size 16 --no-tensorboard '
              f'--max-steps-per-epoch 2 --json'),
        _argv(f'prune nvit --model {out}/01-train --data {GLYPHS} --out {out}/02-prune-nvit --target-gmacs 0.6 '
              f'--interval 2 --prune-steps 4 --total-steps 6 --lam 0 --val-batches 1 --group-sizes mlp=16 --no-measure '
              f'--json'),
        _argv(f'fuse tome --model {out}/02-prune-nvit --data {GLYPHS} --r 4 --no-measure --json'),
        _argv(f'export --model {out}/02-prune-nvit --out {out}/04-export.onnx --token-fusion tome --r 4 '
              f'--fusion-options prop_attn=true --no-measure --json')]
    assert [s['action'] for s in got['steps']] == ['run'] * 4
    assert got['steps'][0]['command'].startswith(f'deitlab train --model {PICO} ')
    assert not out.exists()
    assert main(['pipeline', str(path), '--dry-run']) == 0   # readable: one line per step
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == (f'step 3 (fuse tome, runs): deitlab fuse tome --model {out}/02-prune-nvit --data {GLYPHS} '
                        f'--r 4 --no-measure --json')


def test_options_become_the_commands_flags(tmp_path):
    """Names with underscores or dashes, booleans (--x / --no-x, store_true), K=V mappings, lists as
    comma-separated values; null leaves the command's default; measure: true keeps the timing; a
    step's own model, data and name; MCTF's options carried to the export."""
    steps = f"""measure: true
steps:
  - train: {{model: {PICO}, data: other, batch_size: 16, ema: true, amp: false, model-kwargs: {{depth: 2}},
             resume: false, lr: null, name: dense}}
  - prune: {{method: ofb, target-gmacs: 0.5, pmim: false}}
  - train: {{epochs: 1}}
  - fuse: {{method: mctf, r: 2, layers: '1,2', pooling: size}}
  - prune: {{method: nvit, model: {PICO}, target-params: 0.5, no-masked-ln: true, prune-types: [head, mlp]}}
  - export: {{model: {PICO}}}
"""
    pipe = load_pipeline(_pipeline(tmp_path, steps, head=f'out: o\ndata: {GLYPHS}\n'))
    a = [s.argv for s in pipe.steps]
    assert a[0] == _argv(f'train --model {PICO} --data other --out o/01-dense --batch-size 16 --ema --no-amp '
                         '--model-kwargs depth=2 --no-resume --json')
    assert a[1] == _argv(f'prune ofb --model o/01-dense --data {GLYPHS} --out o/02-prune-ofb --target-gmacs 0.5 '
                         '--no-pmim --json')
    assert a[2] == _argv(f'train --model o/02-prune-ofb --data {GLYPHS} --out o/03-train --epochs 1 --json')
    assert a[3] == _argv(f'fuse mctf --model o/03-train --data {GLYPHS} --r 2 --layers 1,2 --pooling size --json')
    assert a[4] == _argv(f'prune nvit --model {PICO} --data {GLYPHS} --out o/05-prune-nvit --target-params 0.5 '
                         '--no-masked-ln --prune-types head,mlp --json')
    # the fusion does not carry past a new model: the export reads the named model, unfused
    assert a[5] == _argv(f'export --model {PICO} --out o/06-export.onnx --json')
    assert [s.source for s in pipe.steps] == [None, 1, 2, 3, None, None]
    pipe = load_pipeline(_pipeline(tmp_path, f"""steps:
  - fuse: {{method: mctf, model: {PICO}, r: 2, layers: '1,2', pooling: size, tau-sim: 2}}
  - export: {{dynamic-batch: true}}
""", head='out: o\n'))
    assert pipe.steps[1].argv == _argv(
        f'export --model {PICO} --out o/02-export.onnx --token-fusion mctf --r 2 --fusion-options prop_attn=true '
        'tau_sim=2.0 tau_info=20.0 tau_size=40.0 bidirectional=true pooling=size mode=one_step_ahead layers=[1,2] '
        '--dynamic-batch --no-measure --json')
    assert pipe.steps[1].fusion_from == 1 and pipe.steps[0].data is None   # no data: fuse has no top-1


def test_a_changed_step_changes_its_hash_and_every_later_one(tmp_path):
    a = load_pipeline(_pipeline(tmp_path))
    b = load_pipeline(_pipeline(tmp_path, STEPS.replace('target-gmacs: 0.6', 'target-gmacs: 0.5')))
    assert [x.hash == y.hash for x, y in zip(a.steps, b.steps)] == [True, False, False, False]
    assert a.steps[3].argv == b.steps[3].argv   # the export's command is the same; its input is not


# --- running: chaining, skipping, failing ---

def test_run_skip_and_rerun_from_a_changed_step(tmp_path):
    path = _pipeline(tmp_path)
    fake = FakeSteps()
    result = run_pipeline(load_pipeline(path), runner=fake, report=False, quiet=True)
    out = tmp_path / 'out'
    assert [c[:2] for c in fake.calls] == [['train', '--model'], ['prune', 'nvit'], ['fuse', 'tome'],
                                           ['export', '--model']]
    assert fake.calls[1][3] == str(out / '01-train') and fake.calls[3][2] == str(out / '02-prune-nvit')
    assert (result['ran'], result['skipped'], result['status']) == (4, 0, 'complete')
    assert sorted(p.name for p in out.iterdir()) == [
        '01-train', '01-train.step.json', '02-prune-nvit', '02-prune-nvit.step.json', '03-fuse-tome.step.json',
        '04-export.onnx', '04-export.step.json', 'pipeline.json']
    rec = json.loads((out / '03-fuse-tome.step.json').read_text())
    assert rec['hash'] == load_pipeline(path).steps[2].hash and rec['result']['gmacs_ratio'] == 0.8
    steps = json.loads((out / 'pipeline.json').read_text())['steps']
    assert [(s.get('top1'), s.get('gmacs')) for s in steps] == [(50.0, None), (40.0, 0.01), (39.0, 0.008), (None, 0.008)]
    assert steps[3]['model_step'] == 3 and steps[3]['extra']['max_abs_diff'] == 1e-7

    fake.calls.clear()   # the same file again: nothing runs
    result = run_pipeline(load_pipeline(path), runner=fake, report=False, quiet=True)
    assert fake.calls == [] and (result['ran'], result['skipped']) == (0, 4)
    assert [s['status'] for s in result['steps']] == ['skipped'] * 4 and result['steps'][2]['top1'] == 39.0

    _pipeline(tmp_path, STEPS.replace('r: 4', 'r: 2'))   # step 3 changed: it and the export run again
    result = run_pipeline(load_pipeline(path), runner=fake, report=False, quiet=True)
    assert [c[:2] for c in fake.calls] == [['fuse', 'tome'], ['export', '--model']]
    assert '--r' in fake.calls[1] and fake.calls[1][fake.calls[1].index('--r') + 1] == '2'
    assert [s['status'] for s in result['steps']] == ['skipped', 'skipped', 'done', 'done']

    fake.calls.clear()   # --from 2: steps 2 to 4 again, though done
    plan = plan_pipeline(load_pipeline(path), 2)
    assert [a for _, a in plan] == ['skip', 'run', 'run', 'run']
    run_pipeline(load_pipeline(path), start=2, runner=fake, report=False, quiet=True)
    assert [c[0] for c in fake.calls] == ['prune', 'fuse', 'export']

    fake.calls.clear()   # an output gone: that step and the ones after it
    (out / '04-export.onnx').unlink()
    run_pipeline(load_pipeline(path), runner=fake, report=False, quiet=True)
    assert [c[0] for c in fake.calls] == ['export']


def test_a_failed_step_stops_and_keeps_the_steps_before_it(tmp_path, capsys, monkeypatch):
    path = _pipeline(tmp_path)
    out = tmp_path / 'out'
    fake = FakeSteps(fail=lambda argv: argv[0] == 'fuse')
    with pytest.raises(PipelineError) as e:
        run_pipeline(load_pipeline(path), runner=fake, report=False, quiet=True)
    assert str(e.value) == (f'step 3 (fuse tome) failed: r = 99 is more than a block can merge; steps 1-2 are kept in '
                            f'{out}; fix the step and run the pipeline again to continue from step 3')
    assert [c[0] for c in fake.calls] == ['train', 'prune', 'fuse']   # the export did not run
    doc = json.loads((out / 'pipeline.json').read_text())
    assert doc['status'] == 'failed at step 3'
    assert [s['status'] for s in doc['steps']] == ['done', 'done', 'failed', 'not run']
    assert (out / '01-train' / 'model.safetensors').is_file() and (out / '02-prune-nvit.step.json').is_file()
    assert not (out / '03-fuse-tome.step.json').exists()
    # the same from the command line: exit 2, one error line; then fixed, it goes on from step 3
    fake.calls.clear()
    monkeypatch.setattr('deitlab.pipeline.run.subprocess_runner', fake)
    assert main(['pipeline', str(path), '--json']) == 2
    captured = capsys.readouterr()
    assert 'deitlab: error: step 3 (fuse tome) failed: r = 99' in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])['type'] == 'PipelineError'
    assert [c[0] for c in fake.calls] == ['fuse']
    fake.fail, fake.calls[:] = None, []
    run_pipeline(load_pipeline(path), report=False, quiet=True)
    assert [c[0] for c in fake.calls] == ['fuse', 'export']


def test_a_step_that_runs_again_removes_the_outputs_after_it(tmp_path):
    path = _pipeline(tmp_path)
    out = tmp_path / 'out'
    run_pipeline(load_pipeline(path), runner=FakeSteps(), report=False, quiet=True)
    assert (out / '04-export.onnx').is_file()
    _pipeline(tmp_path, STEPS.replace('r: 4', 'r: 40'))
    with pytest.raises(PipelineError, match=r'step 3 \(fuse tome\) failed'):
        run_pipeline(load_pipeline(path), runner=FakeSteps(fail=lambda argv: argv[0] == 'fuse'), report=False,
                     quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [   # the export of the old fusion is gone with its record
        '01-train', '01-train.step.json', '02-prune-nvit', '02-prune-nvit.step.json', 'pipeline.json']


def test_a_step_that_crashes_or_prints_no_json(tmp_path):
    path = _pipeline(tmp_path)
    with pytest.raises(PipelineError, match=r'^step 1 \(train\) failed: exit status 1 \(its messages are above\); no '
                                            r'step had completed; fix the step'):
        run_pipeline(load_pipeline(path), runner=lambda argv: StepRun(1, ''), report=False, quiet=True)
    with pytest.raises(PipelineError, match=r'step 1 \(train\) failed: it printed no JSON result on its last line'):
        run_pipeline(load_pipeline(path), runner=lambda argv: StepRun(0, 'done\n'), report=False, quiet=True)


def test_ctrl_c_says_what_is_kept(tmp_path, capsys, monkeypatch):
    path = _pipeline(tmp_path)
    fake = FakeSteps()

    def runner(argv):
        if argv[0] == 'prune':
            raise KeyboardInterrupt
        return fake(argv)
    monkeypatch.setattr('deitlab.pipeline.run.subprocess_runner', runner)
    assert main(['pipeline', str(path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f'deitlab: interrupted; at step 2 (prune nvit); step 1 is kept in {tmp_path / "out"}; run the '
                   f'pipeline again to continue from step 2')
    with pytest.raises(PipelineInterrupted):
        run_pipeline(load_pipeline(path), runner=runner, report=False, quiet=True)


def _interrupted_train(tmp_path, path):
    """Run ``path`` with a train step that writes its checkpoint, then is interrupted."""
    fake = FakeSteps()

    def runner(argv):
        if argv[0] == 'train':
            out = Path(argv[argv.index('--out') + 1])
            out.mkdir(parents=True)
            (out / 'checkpoint.pt').write_bytes(b'epoch 3 of 6')
            raise KeyboardInterrupt
        return fake(argv)
    with pytest.raises(PipelineInterrupted):
        run_pipeline(load_pipeline(path), runner=runner, report=False, quiet=True)
    doc = json.loads((tmp_path / 'out' / 'pipeline.json').read_text())
    assert doc['steps'][0]['status'] == 'interrupted' and doc['steps'][0]['resumable'] is True


def test_an_interrupted_train_step_continues_from_its_checkpoint(tmp_path):
    path = _pipeline(tmp_path)
    out = tmp_path / 'out' / '01-train'
    _interrupted_train(tmp_path, path)
    seen = []

    def runner(argv):   # the checkpoint is still there when the step runs again
        seen.append((out / 'checkpoint.pt').read_bytes())
        return FakeSteps()(argv)
    result = run_pipeline(load_pipeline(path), runner=runner, report=False, quiet=True)
    assert seen[0] == b'epoch 3 of 6' and result['status'] == 'complete' and result['ran'] == 4
    rec = json.loads((tmp_path / 'out' / '01-train.step.json').read_text())
    assert rec['resumed'] is True and '--resume' not in rec['argv']   # its hash and command are the step's own
    assert run_pipeline(load_pipeline(path), runner=FakeSteps(), report=False, quiet=True)['skipped'] == 4


@pytest.mark.parametrize('how', ['changed', 'from'])
def test_a_changed_or_forced_step_starts_over(tmp_path, how):
    path = _pipeline(tmp_path)
    _interrupted_train(tmp_path, path)
    fake = FakeSteps()
    if how == 'changed':
        _pipeline(tmp_path, STEPS.replace('epochs: 1', 'epochs: 2'))
    run_pipeline(load_pipeline(path), runner=fake, start=1 if how == 'from' else None, report=False, quiet=True)
    assert fake.calls[0][0] == 'train' and '--resume' not in fake.calls[0]
    assert not (tmp_path / 'out' / '01-train' / 'checkpoint.pt').exists()   # the old output was removed first


def test_a_resumed_run_passes_resume_to_the_command(tmp_path):
    path = _pipeline(tmp_path)
    _interrupted_train(tmp_path, path)
    fake = FakeSteps()
    run_pipeline(load_pipeline(path), runner=fake, report=False, quiet=True)
    assert fake.calls[0][0] == 'train' and fake.calls[0][-3:] == ['--json', '--resume', '--quiet']
    assert all('--resume' not in c for c in fake.calls[1:])


def test_a_failed_pipeline_reports_the_steps_it_completed(tmp_path):
    pytest.importorskip('plotly')
    path = _pipeline(tmp_path)
    out = tmp_path / 'out'
    with pytest.raises(PipelineError) as e:
        run_pipeline(load_pipeline(path), runner=FakeSteps(fail=lambda argv: argv[0] == 'fuse'), quiet=True)
    assert str(e.value).startswith(f'step 3 (fuse tome) failed: r = 99 is more than a block can merge; steps 1-2 are '
                                   f'kept in {out}, with their report page {out / "report.html"}; fix the step')
    page = (out / 'report.html').read_text()
    assert '01-train' in page and '02-prune-nvit' in page and '03-fuse-tome' not in page
    steps = json.loads((out / 'pipeline.json').read_text())['steps']
    assert [s['status'] for s in steps] == ['done', 'done', 'failed', 'not run'] and steps[0]['gmacs'] > 0


def test_top1_on_the_pipelines_data_when_a_step_trained_on_other_data(tmp_path):
    steps = f'steps:\n  - train: {{model: {PICO}, data: other}}\n'
    fake = FakeSteps()
    result = run_pipeline(load_pipeline(_pipeline(tmp_path, steps)), runner=fake, report=False, quiet=True)
    assert fake.calls[1] == _argv(f'eval --model {tmp_path / "out" / "01-train"} --data {GLYPHS} --json --quiet')
    assert result['steps'][0]['top1'] == 25.0 and result['steps'][0]['top1_from'] == 'deitlab eval'


def test_the_report_has_one_record_per_step(tmp_path):
    pytest.importorskip('plotly')
    from deitlab.report import collect_records
    path = _pipeline(tmp_path)
    result = run_pipeline(load_pipeline(path), runner=FakeSteps(), quiet=True)
    out = tmp_path / 'out'
    assert (out / 'report.html').is_file() and result['report_summary']['models'] == 4
    records, runs = collect_records([out / '01-train', out / '02-prune-nvit', out / 'pipeline.json'])
    assert [r.name for r in records] == ['01-train', '02-prune-nvit', '03-fuse-tome', '04-export']
    assert [r.kind for r in records] == ['run', 'run', 'pipeline', 'pipeline']
    fused, exported = records[2], records[3]
    assert (fused.top1, fused.gmacs, fused.params, fused.data) == (39.0, 0.008, 100000, GLYPHS)
    assert exported.top1 is None and exported.extra['max_abs_diff'] == 1e-7
    page = (out / 'report.html').read_text()
    assert all(name in page for name in ('01-train', '02-prune-nvit', '03-fuse-tome', '04-export'))
    steps = json.loads((out / 'pipeline.json').read_text())['steps']   # the counted numbers, back in the records
    model = create(str(out / '01-train'))
    assert steps[0]['params'] == sum(p.numel() for p in model.parameters()) and steps[0]['gmacs'] > 0


@pytest.mark.slow
def test_a_real_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    """train -> prune nvit -> fuse tome -> export, each a ``python -m deitlab`` subprocess of this
    source tree; then the same file again runs nothing."""
    pytest.importorskip('plotly')
    for package in ('onnx', 'onnxruntime', 'onnxscript'):
        pytest.importorskip(package)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([SRC, os.environ.get('PYTHONPATH', '')]))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    path = _pipeline(tmp_path)
    assert main(['pipeline', str(path), '--json']) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert [s['status'] for s in result['steps']] == ['done'] * 4
    steps = result['steps']
    assert steps[1]['gmacs'] < steps[0]['gmacs'] and steps[2]['gmacs'] < steps[1]['gmacs']
    assert steps[3]['extra']['max_abs_diff'] < 1e-4 and steps[3]['extra']['token_fusion'] == 'tome'
    assert all(s['top1'] is not None for s in steps[:3]) and result['report_summary']['models'] == 4
    assert '[deitlab pipeline] step 1/4 (train): deitlab train' in captured.err
    assert main(['pipeline', str(path), '--json']) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again['ran'], again['skipped']) == (0, 4)
    assert sys.executable   # the steps ran with this interpreter


def test_the_documented_example_is_a_valid_pipeline():
    """docs/pipeline.yaml is the README's example, word for word, and it loads."""
    root = Path(__file__).resolve().parents[1]
    example = (root / 'docs' / 'pipeline.yaml').read_text()
    readme = (root / 'README.md').read_text()
    section = readme[readme.index('## Pipelines'):]
    assert '```yaml\n' + example + '```' in section
    pipe = load_pipeline(root / 'docs' / 'pipeline.yaml')
    assert [s.name for s in pipe.steps] == ['01-train', '02-nvit-half', '03-fuse-tome', '04-export']
    assert pipe.steps[3].argv[:4] == ['export', '--model', 'runs/pico-pipeline/02-nvit-half', '--out']
    assert pipe.report == Path('runs/pico-pipeline/report.html')
