"""File-system faults at the command line (a full disk, a read-only directory) and the output flags
``--quiet`` and ``--debug``. Faults run the CLI in a subprocess, so that the fault is real: the
kernel refuses the write."""
import contextlib
import hashlib
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from deitlab.cli import main
from deitlab.rundir import create

PICO = 'deitlab_deit_pico_patch4_32'
GLYPHS = 'glyphs:train=64,val=32,size=32'
TRAIN = ['train', '--model', PICO, '--data', GLYPHS, '--epochs', '1', '--batch-size', '16', '--no-progress',
         '--no-tensorboard', '--max-steps-per-epoch', '1', '--recipe', 'short']


def _deitlab(args, limit_bytes=None):
    """``python -m deitlab ARGS``; with ``limit_bytes``, no file it writes may grow past that size
    (RLIMIT_FSIZE, with SIGXFSZ ignored so that the write fails with EFBIG, as on a full disk)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, '-m', 'deitlab', *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if limit_bytes else None)


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _one_error_line(r, pattern):
    errors = [line for line in r.stderr.splitlines() if 'error:' in line]
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and __import__('re').search(pattern, errors[0]), r.stderr[-3000:]


@pytest.mark.parametrize('limit, file', [(64 * 1024, 'model.safetensors'), (900 * 1024, 'checkpoint.pt')])
def test_a_full_disk_is_one_line_and_the_previous_files_survive(tmp_path, limit, file):
    """The pico model's weights are 0.84 MB and its checkpoint (with AdamW's state) larger: a 64 KB
    limit stops the weights, 900 KB the checkpoint. Catches the writers' own error types leaking
    out as tracebacks (safetensors' SafetensorError 'File too large (os error 27)', torch's
    RuntimeError from its zip writer) and a partial file replacing a good one."""
    out = tmp_path / 'run'
    assert main(TRAIN + ['--out', str(out)]) == 0
    (out / 'checkpoint.pt').unlink()   # a finished run's directory, trained again with --overwrite
    before = _digest(out)
    r = _deitlab(TRAIN + ['--out', out, '--overwrite'], limit_bytes=limit)
    _one_error_line(r, rf'{file}')
    assert 'is the disk full' in r.stderr or 'File too large' in r.stderr
    after = _digest(out)
    assert not [n for n in after if n.endswith('.tmp')] and 'checkpoint.pt' not in after
    if file == 'model.safetensors':   # the write failed before the rename: the old weights are kept
        assert after['model.safetensors'] == before['model.safetensors']
    assert create(str(out)) is not None   # what is there loads


@contextlib.contextmanager
def _read_only(path):
    """Make ``path`` read-only for this process: the immutable attribute (root, which ignores file
    modes) or mode 0555; skip the test where neither stops a write."""
    immutable = shutil.which('chattr') and subprocess.run(['chattr', '+i', str(path)],
                                                         capture_output=True).returncode == 0
    if not immutable:
        path.chmod(0o555)
    try:
        try:
            (path / 'probe').write_text('x')
        except OSError:
            yield
        else:
            pytest.skip('cannot make a directory read-only here')
    finally:
        if immutable:
            subprocess.run(['chattr', '-i', str(path)])
        path.chmod(0o755)


def test_a_read_only_output_directory_is_one_line(tmp_path):
    ro = tmp_path / 'ro'
    ro.mkdir()
    with _read_only(ro):
        r = _deitlab(TRAIN + ['--out', ro / 'run'])
        _one_error_line(r, r'(Permission denied|Operation not permitted): .*ro/run \(the file system refused')
        r = _deitlab(['unlearnable', 'make', '--data', GLYPHS, '--out', ro, '--key', 'a long enough key'])
        _one_error_line(r, r'(Permission denied|Operation not permitted): .*ro')
    assert not list(ro.iterdir())


def test_quiet_keeps_warnings_and_the_result_only(tmp_path, capsys):
    """A recipe-too-short warning and the epoch log line without --quiet; with it, the warning only."""
    args = ['train', '--model', PICO, '--data', GLYPHS, '--epochs', '1', '--batch-size', '16', '--no-tensorboard',
            '--max-steps-per-epoch', '1', '--recipe', 'deit', '--json']
    assert main(args + ['--out', str(tmp_path / 'a')]) == 0
    loud = capsys.readouterr()
    assert main(args + ['--out', str(tmp_path / 'b'), '--quiet']) == 0
    quiet = capsys.readouterr()
    assert '[deitlab] epoch 1' in loud.err and '[deitlab] epoch 1' not in quiet.err
    assert [line for line in quiet.err.splitlines() if line.startswith('[deitlab]')] == \
        [line for line in loud.err.splitlines() if line.startswith('[deitlab] warning')]
    assert 'warning: run too short' in quiet.err
    assert quiet.out.strip().splitlines()[-1].startswith('{')


def test_debug_shows_the_traceback_of_bad_input(capsys):
    with pytest.raises(Exception, match='lr must be > 0'):
        main(TRAIN + ['--out', 'never-written', '--lr', '0', '--debug'])
    assert main(TRAIN + ['--out', 'never-written', '--lr', '0']) == 2
    assert 'deitlab: error: lr must be > 0' in capsys.readouterr().err
