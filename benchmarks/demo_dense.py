"""Rebuild the demo's committed dense run, ``src/deitlab/assets/demo_deit_pico``.

    python benchmarks/demo_dense.py          # 4-5 CPU minutes at 2 threads

Trains DeiT-pico on the demo's glyphs with the demo's own configuration (``deitlab.demo``,
``_demo_config``), exactly what ``deitlab demo --train`` does, and copies the run's
``config.json``, ``model.safetensors``, ``metrics.jsonl`` and ``train_config.json`` into the
package. At 2 threads the weights come out bit for bit the same on this machine. Writes
``benchmarks/results/demo_dense.json``: the final top-1, the weights' SHA-256, whether the committed
weights changed, the training time and the load average around it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULT = Path(__file__).resolve().parent / 'results' / 'demo_dense.json'


def main() -> None:
    from deitlab.demo import DEMO_DENSE_RUN, DENSE_FILES, _demo_config
    from deitlab.train import train

    with tempfile.TemporaryDirectory(prefix='deitlab-demo-dense-') as tmp:
        cfg = _demo_config(Path(tmp), quick=False, progress=False)
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        summary = train(cfg)
        seconds = time.perf_counter() - t0
        new = Path(cfg.out) / 'model.safetensors'
        old = DEMO_DENSE_RUN / 'model.safetensors'
        digest = hashlib.sha256(new.read_bytes()).hexdigest()
        same = old.is_file() and hashlib.sha256(old.read_bytes()).hexdigest() == digest
        DEMO_DENSE_RUN.mkdir(parents=True, exist_ok=True)
        for name in DENSE_FILES:
            shutil.copy(Path(cfg.out) / name, DEMO_DENSE_RUN / name)
    res = dict(val_top1=round(summary['val_top1'], 4), sha256=digest, unchanged=same, train_time_s=round(seconds, 1),
               threads=torch.get_num_threads(), load_avg=dict(start=round(load0, 2), end=round(os.getloadavg()[0], 2)),
               run='src/deitlab/assets/demo_deit_pico')
    RESULT.write_text(json.dumps(res, indent=1) + '\n')
    print(json.dumps(res))


if __name__ == '__main__':
    main()
