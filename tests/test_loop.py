"""The shared training loop (deitlab.train.loop): hook order, single forward/loss, stop conditions,
non-finite losses, epochs and resumed update counts, clipping, model replacement."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from deitlab.train.loop import Hooks, Trainer, TrainingDiverged


def _batches(n=4, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randint(0, 2, (batch,), generator=g)) for _ in range(n)]


def _trainer(*hooks, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return Trainer(model, dict(opt='sgd', lr=0.1, weight_decay=0.0), hooks=hooks, progress=False, **kw)


class Recorder(Hooks):
    def __init__(self):
        self.calls = []

    def before_epoch(self, epoch):
        self.calls.append(('before_epoch', epoch))

    def on_batch(self, x, y):
        self.calls.append('on_batch')
        return x, y

    @contextlib.contextmanager
    def _ctx(self):
        self.calls.append('enter')
        yield
        self.calls.append('exit')

    def forward_context(self, x, y):
        return self._ctx()

    def forward(self, model, x, y):
        self.calls.append('forward')
        return model(x)

    def loss(self, x, outputs, y):
        self.calls.append('loss')
        return nn.functional.cross_entropy(outputs, y)

    def after_backward(self):
        self.calls.append('after_backward')

    def before_optimizer_step(self):
        self.calls.append('before_optimizer_step')

    def after_optimizer_step(self):
        self.calls.append('after_optimizer_step')

    def after_step(self, step, loss):
        self.calls.append(('after_step', step))

    def after_epoch(self, epoch, row):
        self.calls.append(('after_epoch', epoch))


def test_one_update_calls_the_hooks_in_order():
    rec = Recorder()
    trainer = _trainer(rec)
    assert rec.trainer is trainer
    trainer.run_steps(_batches(1))
    assert rec.calls == ['on_batch', 'enter', 'forward', 'loss', 'exit', 'after_backward', 'before_optimizer_step',
                         'after_optimizer_step', ('after_step', 1)]


def test_fit_frames_epochs_and_resumes_at_the_update_count():
    rec = Recorder()
    steps = []
    trainer = _trainer(rec, scheduler=lambda opt: SimpleNamespace(step_update=steps.append))
    rows = trainer.fit(_batches(4), epochs=3, start_epoch=1, steps_per_epoch=3)
    assert [r['epoch'] for r in rows] == [2, 3] and rows[0]['step'] == 6
    assert all(math.isfinite(r['train_loss']) and r['lr'] == 0.1 for r in rows)
    assert steps == [4, 5, 6, 7, 8, 9]                    # epoch 1 starts after 3 updates
    assert rec.calls.count('forward') == 6                # 3 of the 4 batches per epoch
    assert rec.calls[0] == ('before_epoch', 1) and rec.calls[-1] == ('after_epoch', 2)


def test_forward_and_loss_belong_to_one_hook():
    class Loss(Hooks):
        def loss(self, x, outputs, y):
            return outputs.sum()
    with pytest.raises(ValueError, match=r'only one hook may define loss\(\)'):
        _trainer(Loss(), Loss())
    _trainer(Loss(), Hooks())    # hooks that do not define it do not count


def test_should_stop_ends_a_step_driven_run_before_the_next_batch():
    class Budget(Hooks):
        steps = 0

        def should_stop(self):
            return self.steps >= 3

        def after_step(self, step, loss):
            self.steps = step
    budget = Budget()
    endless = (b for _ in range(100) for b in _batches(2))
    assert _trainer(budget).run_steps(endless) == 3 and budget.steps == 3


def test_a_nonfinite_loss_raises_the_hooks_error_or_training_diverged():
    nan = SimpleNamespace(loss=lambda x, outputs, y: outputs.sum() * float('nan'))   # a duck-typed hook
    trainer = _trainer(nan)
    before = trainer.model.weight.detach().clone()
    with pytest.raises(TrainingDiverged, match='loss became nan at update 1'):
        trainer.run_steps(_batches(1))
    assert torch.equal(trainer.model.weight, before)       # no update

    class Own(Hooks):
        def on_nonfinite(self, loss):
            raise KeyError('mine')
    with pytest.raises(KeyError, match='mine'):
        _trainer(nan, Own()).run_steps(_batches(1))


def test_after_backward_sees_the_gradients_before_clipping():
    norms = []

    class Norm(Hooks):
        def after_backward(self):
            norms.append(float(torch.cat([p.grad.flatten() for p in self.trainer.model.parameters()]).norm()))

        def before_optimizer_step(self):
            norms.append(float(torch.cat([p.grad.flatten() for p in self.trainer.model.parameters()]).norm()))
    _trainer(Norm(), grad_clip=1e-3).run_steps(_batches(1))
    assert norms[0] > 1e-3 and norms[1] == pytest.approx(1e-3, rel=1e-3)


def test_state_dict_round_trip_and_replace_model():
    trainer = _trainer(ema_decay=0.5)
    trainer.run_steps(_batches(2))
    state = trainer.state_dict()
    assert set(state) == {'model', 'optimizer', 'scheduler', 'ema'} and state['scheduler'] is None
    other = _trainer(ema_decay=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.model.weight, trainer.model.weight)
    assert torch.equal(other.ema.module.weight, trainer.ema.module.weight)
    wider = nn.Linear(3, 2)
    old_optimizer = trainer.optimizer
    trainer.replace_model(wider)
    assert trainer.model is wider and trainer.run_model is wider and trainer.optimizer is not old_optimizer
    assert trainer.optimizer.param_groups[0]['params'][0] is wider.weight
    trainer.run_steps(_batches(1))
    assert trainer.global_step == 3
