"""The generated pages of the papyri benchmarks, one definition for all of them (``papyri_detect.py``'s
part-1 pages, which ``papyri_pipeline.py`` evaluates on too):

* ``train``  16 pages, seed 0, the DejaVu fonts bundled with matplotlib (Sans, Serif, Mono; 12 files);
* ``test``   8 pages, seed 1, the STIX fonts (4 files, never seen in training): the bars' pages;
* ``test-seen``  8 pages, seed 2, the training fonts (how much the unseen font costs).

Pages are ``deitlab papyri synth`` with its defaults (512 x 384, 8 lines of up to 24 letters, up to 3
hands, damage 1); the same settings give byte-identical files, so every benchmark that generates them
gets the same pages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TRAIN_FAMILIES = ('DejaVuSans', 'DejaVuSerif', 'DejaVuSansMono')
HELD_OUT_FAMILY = 'STIXGeneral'
#: name -> (pages, seed, fonts: 'train' or 'held_out')
PAGES = dict(train=(16, 0, 'train'), test=(8, 1, 'held_out'), **{'test-seen': (8, 2, 'train')})
#: the smoke runs' pages: two of each
SMOKE_PAGES = {k: (2, seed, fonts) for k, (_, seed, fonts) in PAGES.items()}


def fonts(which: str) -> list:
    """The font files of ``which``: ``'train'`` (the DejaVu families) or ``'held_out'`` (STIX)."""
    from deitlab.data.glyphs import find_fonts
    paths = find_fonts('bundled')
    stem = lambda p: Path(p).stem.split('-')[0]   # DejaVuSans-Bold -> DejaVuSans
    if which == 'held_out':
        return [p for p in paths if Path(p).stem.startswith(HELD_OUT_FAMILY)]
    return [p for p in paths if stem(p) in TRAIN_FAMILIES]


def deitlab_json(*args) -> dict:
    """``deitlab ARGS --json --quiet`` on 1 thread: the JSON object on its last line (a failure stops
    the benchmark with the command's error output)."""
    out = subprocess.run([sys.executable, '-m', 'deitlab', *args, '--json', '--quiet'],
                         env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f'deitlab {" ".join(args)} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])
