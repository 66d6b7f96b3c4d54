"""Multi-level training on the loop (train/multilevel.py): the plan, the V-cycle hook, training
FLOPs, resume across a stage boundary, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from deitlab.rundir import create
from deitlab.train import ConfigError, TrainConfig, train
from deitlab.train import engine
from deitlab.train.config import Stage, parse_multilevel
from deitlab.train.loop import Trainer
from deitlab.train.multilevel import VCycle

DATA = 'glyphs:train=128,val=64,size=32,seed=1'
MODEL = 'deitlab_deit_pico_patch4_32'   # embed 64, depth 4, 2 heads: one coalescing to 32 / 2 / 1
PLAN = 'levels=2,down=1,small=1,up=1'


def tiny_cfg(out, **kw):
    base = dict(model=MODEL, data=DATA, out=str(out), epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0,
                drop_path=0.0, mixup=0.0, cutmix=0.0, mix='none', aug='none', tensorboard=False, progress=False,
                multilevel=PLAN)
    base.update(kw)
    return TrainConfig(**base)


def test_the_plan_is_a_v_cycle():
    plan = parse_multilevel('levels=3,down=1,small=2,up=3,alpha=0.5,lr_scale=2')
    assert plan.stages() == [Stage(1, 0, 1), Stage(2, 1, 1), Stage(3, 2, 2), Stage(2, 4, 3), Stage(1, 7, 3)]
    assert plan.total_epochs == 10 and plan.alpha == 0.5
    assert [plan.stage_index(e) for e in range(10)] == [0, 1, 2, 2, 3, 3, 3, 4, 4, 4]
    assert parse_multilevel({'levels': 2, 'down': 1, 'small': 1, 'up': 1}) == parse_multilevel(PLAN)


@pytest.mark.parametrize('spec, match', [
    ('levels=1,down=1,small=1,up=1', 'levels must be >= 2'),
    ('levels=2,down=1,small=1,up=1,alpha=1.5', r'alpha must be in \[0, 1\], got 1.5'),
    ('levels=2,down=1,small=0,up=1', 'small must be >= 1 epoch'),
    ('levels=2,dwn=1', "unknown key 'dwn' \\(did you mean 'down'\\?\\)"),
    ('levels=2,pairing=zigzag', 'pairing must be one of adjacent, half'),
    ('levels,down=1', 'key=value pairs separated by commas'),
    ('levels=two', 'levels must be int'),
])
def test_bad_plans_are_refused_with_the_reason(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_multilevel(spec)


def test_budgets_that_do_not_add_up_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r'add up to 3 epochs .* but --epochs is 4'):
        tiny_cfg(tmp_path / 'r', epochs=4).validate()
    with pytest.raises(ConfigError, match='does not compose with --token-fusion'):
        tiny_cfg(tmp_path / 'r', token_fusion='tome').validate()
    with pytest.raises(ConfigError, match='--mix transmix reads the attention'):
        tiny_cfg(tmp_path / 'r', mix='transmix').validate()


def test_a_model_that_cannot_be_halved_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match='levels=3: level 3 halves the level-2 model, but block 0 has 1 head'):
        train(tiny_cfg(tmp_path / 'r', epochs=5, multilevel='levels=3,down=1,small=1,up=1'))
    assert not (tmp_path / 'r' / 'checkpoint.pt').exists()


def test_v_cycle_run_ends_large_with_its_trace_and_flops(tmp_path):
    out = tmp_path / 'ml'
    summary = train(tiny_cfg(out))
    model = create(str(out))
    assert model.embed_dim == 64 and len(model.blocks) == 4          # back at level 1
    trace = json.loads((out / 'multilevel.json').read_text())
    assert [s['level'] for s in trace['stages']] == [1, 2, 1]
    rows = [json.loads(r) for r in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['multilevel_level'] for r in rows] == [1, 2, 1]
    per_epoch = [b['train_gflops'] - a for a, b in zip([0.0] + [r['train_gflops'] for r in rows], rows)]
    # the coalesced model (half width, half depth) costs far less per epoch than the large one
    assert per_epoch[1] < 0.4 * per_epoch[0] and per_epoch[2] == pytest.approx(per_epoch[0], abs=2e-3)
    assert summary['train_gflops'] == pytest.approx(rows[-1]['train_gflops'], abs=1e-3)
    assert trace['gflops_by_level']['2'] == pytest.approx(per_epoch[1], abs=2e-3)
    assert all('val_top1_end' in s for s in trace['stages'])
    assert 'val_top1_mapped' in trace['stages'][1] and 'val_top1_mapped' in trace['stages'][2]
    plain = train(tiny_cfg(tmp_path / 'plain', multilevel=None))
    assert plain['train_gflops'] == pytest.approx(3 * per_epoch[0], abs=5e-3)


def test_each_stage_starts_a_fresh_optimizer():
    torch.manual_seed(0)
    model = create(MODEL, num_classes=5, img_size=16)
    plan = parse_multilevel(PLAN)
    from deitlab.train.flops import TrainFlops
    from timm.scheduler import CosineLRScheduler
    flops = TrainFlops()
    vc = VCycle(plan, 2, 1e-3, lambda opt, steps, warm: CosineLRScheduler(opt, t_initial=steps, t_in_epochs=False),
                dict(opt='adamw', lr=1e-3, weight_decay=0.05), lambda m: dict(top1=0.0), flops)
    t = Trainer(model, dict(opt='adamw', lr=1e-3, weight_decay=0.05), scheduler=vc.scheduler, hooks=[flops, vc],
                progress=False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    t.train_step(x, y)
    assert len(t.optimizer.state) > 0
    for epoch, width in ((1, 32), (2, 64)):
        vc.before_epoch(epoch)
        assert t.model.embed_dim == width and len(t.optimizer.state) == 0
        params = {id(p) for g in t.optimizer.param_groups for p in g['params']}
        assert params == {id(p) for p in t.model.parameters()}
        t.train_step(x, y)
        assert all(s['exp_avg'].shape == p.shape for p, s in t.optimizer.state.items())


@pytest.mark.parametrize('stop_after', [0, 1])
def test_resume_across_a_stage_boundary_equals_an_unbroken_run(tmp_path, monkeypatch, stop_after):
    full = tmp_path / 'full'
    train(tiny_cfg(full))
    part = tmp_path / 'part'
    original = engine._RunDirEpochs.after_epoch

    def stop(self, epoch, row):
        original(self, epoch, row)
        if epoch == stop_after:
            raise KeyboardInterrupt
    monkeypatch.setattr(engine._RunDirEpochs, 'after_epoch', stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(part))
    monkeypatch.setattr(engine._RunDirEpochs, 'after_epoch', original)
    train(tiny_cfg(part, resume=True))
    a, b = load_file(str(full / 'model.safetensors')), load_file(str(part / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(r).items() if 'time' not in k and 'per_s' not in k and 'cpu_s' not in k}
                       for r in (p / 'metrics.jsonl').read_text().splitlines()]
    assert strip(full) == strip(part)
