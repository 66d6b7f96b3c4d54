"""``prune nvit --resume``: a pruning run stopped after an event and resumed from its checkpoint
removes the same units and ends with the same weights as a run that was never stopped."""
import json

import pytest
import torch
from safetensors.torch import load_file

from deitlab.prune import NViTConfig, PruneError, prune_nvit
from deitlab.prune.hooks import PruningHooks
from deitlab.rundir import save_run_dir

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py: bitwise-comparable runs
DATA = 'glyphs:train=96,val=32,size=32,seed=3'


def _cfg(dense, out, **kw):
    return NViTConfig(model=str(dense), data=DATA, out=str(out), target_gmacs=0.7, interval=2, prune_steps=8,
                      lam=0, measure=False, val_batches=0, group_sizes=dict(mlp=16, head=1), finetune_epochs=0,
                      progress=False, device='cpu', batch_size=8, **kw)


class Stop(Exception):
    pass


def test_a_resumed_run_ends_where_an_unbroken_one_does(tmp_path, monkeypatch):
    import timm
    torch.manual_seed(0)
    dense = save_run_dir(timm.create_model('deitlab_deit_pico_patch4_32', num_classes=24), tmp_path / 'dense')
    whole = prune_nvit(_cfg(dense, tmp_path / 'whole'))

    original, calls = PruningHooks.event, []

    def event_then_stop(self, loss):
        original(self, loss)
        calls.append(self.pruner.steps)
        if len(calls) == 2:
            raise Stop
    monkeypatch.setattr(PruningHooks, 'event', event_then_stop)
    with pytest.raises(Stop):
        prune_nvit(_cfg(dense, tmp_path / 'broken'))
    with pytest.raises(PruneError, match='already holds a pruning run; choose another --out, or --resume it'):
        prune_nvit(_cfg(dense, tmp_path / 'broken'))
    after = []

    def event_and_count(self, loss):
        original(self, loss)
        after.append(self.pruner.steps)
    monkeypatch.setattr(PruningHooks, 'event', event_and_count)
    resumed = prune_nvit(_cfg(dense, tmp_path / 'broken', resume=True))

    assert calls == [2, 4] and after[0] == 6, 'the resumed run goes on from step 4, not from the start'
    assert resumed['prune_steps'] == whole['prune_steps'] > 4
    logs = [[json.loads(r)['removed'] for r in (tmp_path / d / 'prune_log.jsonl').read_text().splitlines()]
            for d in ('whole', 'broken')]
    assert logs[0] == logs[1] and len(logs[0]) >= 3
    assert resumed['pruned_widths'] == whole['pruned_widths']
    a, b = (load_file(tmp_path / d / 'pruned' / 'model.safetensors') for d in ('whole', 'broken'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(PruneError, match='has no prune_checkpoint.pt to resume from'):
        prune_nvit(_cfg(tmp_path / 'dense', tmp_path / 'nothing', resume=True))
