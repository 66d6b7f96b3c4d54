"""The demo's committed dense run: deitlab.demo (the full demo runs in benchmarks/demo_run.py;
``--quick`` runs in test_cli.py)."""
import dataclasses
import json

import torch

from deitlab.demo import DEMO_DENSE_RUN, DENSE_FILES, _demo_config, committed_dense_matches, dense_run
from deitlab.rundir import create


def test_the_committed_run_is_what_the_demo_recipe_trains(tmp_path):
    """Catches a demo recipe changed without rebuilding the committed run (benchmarks/demo_dense.py):
    every setting recorded with the run equals the demo's configuration."""
    cfg = _demo_config(tmp_path, quick=False, progress=False)
    assert all((DEMO_DENSE_RUN / name).is_file() for name in DENSE_FILES)
    assert committed_dense_matches(cfg)
    saved = json.loads((DEMO_DENSE_RUN / 'train_config.json').read_text())
    metrics = [json.loads(line) for line in (DEMO_DENSE_RUN / 'metrics.jsonl').read_text().splitlines()]
    assert saved['epochs'] == cfg.epochs == max(m['epoch'] for m in metrics)


def test_a_changed_recipe_does_not_reuse_the_committed_run(tmp_path):
    cfg = _demo_config(tmp_path, quick=False, progress=False)
    assert not committed_dense_matches(dataclasses.replace(cfg, lr=cfg.lr * 2))
    assert not committed_dense_matches(dataclasses.replace(cfg, data=cfg.data.replace('seed=0', 'seed=1')))


def test_dense_run_copies_the_committed_model(tmp_path):
    cfg = _demo_config(tmp_path, quick=False, progress=False)
    (tmp_path / 'deit').mkdir()
    (tmp_path / 'deit' / 'stale.txt').write_text('from an earlier demo')
    top1, source = dense_run(cfg, train_dense=False)
    assert (top1, source) == (None, 'committed')
    assert sorted(p.name for p in (tmp_path / 'deit').iterdir()) == sorted(DENSE_FILES)
    a, b = create(cfg.out), create(str(DEMO_DENSE_RUN))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.num_classes == 24
