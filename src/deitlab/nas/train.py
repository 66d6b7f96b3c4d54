"""Training the ViT-ResNAS supernet on the shared training loop (``deitlab nas train-supernet``).

:func:`train_supernet` builds the :class:`~deitlab.nas.supernet.Supernet` of a named search space
(its classifier sized for the data), holds ``holdout`` images of every class out of the training
split (for the search's fitness; their indices go to ``holdout.json``), and trains with one
:class:`~deitlab.train.loop.Trainer` and two hooks:

* :class:`SupernetSampling` (``before_epoch``, ``forward``, ``loss``): every epoch reseeds Python,
  NumPy, torch, the sampler and the architecture draws from ``(seed, epoch)``; every step draws
  ``batch_size / ex_per_arch`` architectures, distinct within the step, from the choices allowed
  at this point of the width warm-up (:func:`~deitlab.nas.warmup.allowed_space`), and runs them
  in one pass, ``supernet(x, archs)`` (sub-batch i is architecture i); the loss is cross-entropy
  with label smoothing (with a distillation token: the mean over both heads, both on the labels).
* :class:`SupernetEpochs` (``after_epoch``): after each warm-up epoch the heads and MLP units are
  rewired by L1 norm (weights and AdamW moments permuted); then the largest and the smallest
  sub-networks are evaluated on the validation split, the epoch's row goes to ``metrics.jsonl``
  and the weights to ``supernet.safetensors`` and an atomic ``supernet_checkpoint.pt`` (model,
  optimizer, schedule, epoch, the space's name and definition, the rewiring state, the
  architecture counts).

AdamW with a per-step cosine schedule (timm), as ``deitlab train``. ``resume=True`` continues from
the checkpoint to the same weights as an unbroken run; a checkpoint of another search space (or of
a space defined otherwise) is refused with both named. One process only (no ``torchrun``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.loss import LabelSmoothingCrossEntropy
from timm.scheduler import CosineLRScheduler
from torch.utils.data import Subset

from ..bench import count_params
from ..console import log as _log
from ..data import dataset_info
from ..data.for_model import eval_loader, model_datasets, train_loader
from ..distributed import init_distributed, seed_all
from ..evaluate import evaluate
from ..rundir import atomic_torch_save, atomic_write_bytes, load_resume_checkpoint
from ..train.config import ConfigError, check_resume_settings
from ..train.loop import Hooks, Trainer
from .config import SupernetConfig
from .space import SPACES, Arch, SearchSpace, SearchSpaceError
from .supernet import Supernet
from .warmup import allowed_counts, allowed_space, new_rewiring_state, rewire

__all__ = ['train_supernet', 'holdout_indices', 'SupernetSampling', 'SupernetEpochs', 'CHECKPOINT_NAME',
           'WEIGHTS_NAME']

CHECKPOINT_NAME = 'supernet_checkpoint.pt'
WEIGHTS_NAME = 'supernet.safetensors'
SPACE_NAME = 'space.json'
HOLDOUT_NAME = 'holdout.json'
METRICS_NAME = 'metrics.jsonl'
SUMMARY_NAME = 'summary.json'
_OWN_FILES = {SPACE_NAME, HOLDOUT_NAME, METRICS_NAME}   # written before the first checkpoint
# settings a resumed run must share with the run it continues (the space is checked on its own)
_RESUME_KEYS = ('data', 'epochs', 'batch_size', 'ex_per_arch', 'lr', 'weight_decay', 'warmup_epochs',
                'width_warmup_epochs', 'drop_path', 'smoothing', 'aug', 'holdout', 'max_steps_per_epoch', 'seed')


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100003 + epoch * 1009


def holdout_indices(targets: torch.Tensor, per_class: int, seed: int,
                    classes: Optional[Sequence[str]] = None) -> List[int]:
    """``per_class`` indices of every class present in ``targets``, drawn by one generator seeded
    with ``seed`` (classes in order), sorted. ``ConfigError`` when a class has no image left to train on."""
    targets = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(int(seed))
    held: List[int] = []
    if per_class <= 0:
        return held
    for c in torch.unique(targets).tolist():
        idx = (targets == c).nonzero().flatten()
        if len(idx) <= per_class:
            name = classes[c] if classes is not None and c < len(classes) else c
            raise ConfigError(f'holdout {per_class}: class {name!r} has only {len(idx)} training images, so none would '
                              f'be left to train on; hold out fewer images per class (--holdout)')
        held += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    return sorted(held)


def arch_key(space: SearchSpace, arch: Arch) -> int:
    """A 64-bit fingerprint of the network ``arch`` names (its canonical form)."""
    text = json.dumps(space.canonical(arch).to_dict(), sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), 'little', signed=True)


class SupernetSampling(Hooks):
    """Reseeding per epoch; per step the architectures of the sub-batches, the forward and the loss.

    ``step_archs`` holds the last step's architectures (sub-batch i ran ``step_archs[i]``),
    ``archs_trained`` the number of sub-batches so far and ``distinct`` the fingerprints of the
    networks trained."""

    def __init__(self, space: SearchSpace, per_step: int, seed: int, warm_steps: int, sampler, criterion: nn.Module):
        self.space, self.per_step, self.seed, self.warm_steps = space, per_step, seed, warm_steps
        self.sampler, self.criterion = sampler, criterion
        self.rng = random.Random(seed)
        self.step_archs: List[Arch] = []
        self.archs_trained = 0
        self.distinct: set = set()
        self._allowed: dict = {}

    def progress(self, step: int) -> float:
        """Width warm-up progress in [0, 1] before update ``step + 1``."""
        return 1.0 if self.warm_steps <= 0 else min(1.0, step / self.warm_steps)

    def allowed(self, step: int) -> SearchSpace:
        t = self.progress(step)
        key = repr(allowed_counts(self.space, t))
        if key not in self._allowed:
            self._allowed[key] = allowed_space(self.space, t)
        return self._allowed[key]

    def before_epoch(self, epoch: int) -> None:
        seed_all(_epoch_seed(self.seed, epoch))
        self.sampler.set_epoch(epoch)
        self.rng = random.Random(_epoch_seed(self.seed, epoch) + 7919)

    def forward(self, model: nn.Module, x: torch.Tensor, y):
        archs = self.allowed(self.trainer.global_step).sample_distinct(self.per_step, self.rng)
        self.step_archs = archs
        self.archs_trained += len(archs)
        self.distinct.update(arch_key(self.space, a) for a in archs)
        return model(x, archs)

    def loss(self, x: torch.Tensor, outputs, y: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):   # distillation token: both heads on the labels
            return sum(self.criterion(o, y) for o in outputs) / len(outputs)
        return self.criterion(outputs, y)

    def state_dict(self) -> dict:
        return dict(archs_trained=self.archs_trained, distinct=torch.tensor(sorted(self.distinct), dtype=torch.int64))

    def load_state_dict(self, state: dict) -> None:
        self.archs_trained = int(state['archs_trained'])
        self.distinct = set(state['distinct'].tolist())


class SupernetEpochs(Hooks):
    """After each epoch: rewiring (warm-up epochs), evaluation of the largest and the smallest
    sub-networks, one metrics row, the weights and the checkpoint."""

    def __init__(self, cfg: SupernetConfig, space: SearchSpace, out: Path, val_loader, sampling: SupernetSampling,
                 rewiring: dict, time_before: float):
        self.cfg, self.space, self.out, self.val_loader, self.sampling = cfg, space, out, val_loader, sampling
        self.rewiring, self.time_before = rewiring, time_before
        self.t_start = time.perf_counter()
        self.last_eval: dict = {}

    def train_time(self) -> float:
        return self.time_before + time.perf_counter() - self.t_start

    def evaluate(self) -> dict:
        """Top-1 and loss of the largest and the smallest sub-networks (physically sliced)."""
        t, out = self.trainer, {}
        for name, arch in (('largest', self.space.largest()), ('smallest', self.space.smallest())):
            res = evaluate(t.model.subnet(arch), self.val_loader, t.device, t.device.type == 'cuda', self.cfg.progress)
            out.update({f'val_top1_{name}': res['top1'], f'val_loss_{name}': res['loss']})
        return out

    def after_epoch(self, epoch: int, row: dict) -> None:
        t = self.trainer
        if epoch < self.cfg.width_warmup:
            self.rewiring = rewire(t.model, t.optimizer, self.rewiring)
        row.update(rewirings=self.rewiring['rewirings'],
                   width_warmup=round(self.sampling.progress(t.global_step), 4),
                   archs_trained=self.sampling.archs_trained, distinct_archs=len(self.sampling.distinct))
        self.last_eval = self.evaluate()
        row.update(self.last_eval)
        _log(f'epoch {epoch + 1}: loss {row["train_loss"]:.4f}  val top-1 largest {row["val_top1_largest"]:.2f}  '
             f'smallest {row["val_top1_smallest"]:.2f}  ({row["train_img_per_s"]:.0f} img/s)')
        with open(self.out / METRICS_NAME, 'a') as f:
            f.write(json.dumps(row) + '\n')
        save_weights(t.model, self.out / WEIGHTS_NAME)
        atomic_torch_save(dict(t.state_dict(), epoch=epoch, space=self.cfg.space, space_def=self.space.to_dict(),
                               rewiring=self.rewiring, sampling=self.sampling.state_dict(),
                               config=self.cfg.to_dict(), train_time_s=self.train_time()),
                          self.out / CHECKPOINT_NAME)


def save_weights(supernet: Supernet, path: Path) -> None:
    """The supernet's ViTRes weights as safetensors (atomically); rebuild with ``space.json``."""
    sd = {k: v.detach().contiguous().cpu() for k, v in supernet.model.state_dict().items()}
    tmp = path.with_name(path.name + '.tmp')
    try:
        save_file(sd, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_out(cfg: SupernetConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f'--out {out} is a file, not a directory')
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not cfg.resume:
        raise ConfigError(f'{out} already holds a supernet checkpoint; pass --resume to continue it or choose '
                          f'another --out')
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES) if out.is_dir() else []
    if foreign and not (cfg.resume and ckpt.exists()):
        shown = ', '.join(foreign[:4]) + (', ...' if len(foreign) > 4 else '')
        raise ConfigError(f'--out {out} is not empty ({shown}) and holds no supernet checkpoint to --resume; choose '
                          f'another --out')
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_checkpoint(ckpt: dict, cfg: SupernetConfig, space: SearchSpace, path: Path) -> None:
    """Refuse a checkpoint of another search space, of a space defined otherwise, or of other settings."""
    saved = ckpt.get('space')
    if saved != cfg.space:
        raise SearchSpaceError(f'cannot resume {path}: it holds a supernet of search space {saved!r}, but --space is '
                               f'{cfg.space!r}; resume with --space {saved}, or train {cfg.space!r} into a new --out')
    check_resume_settings(ckpt.get('config', {}), cfg, _RESUME_KEYS, path,
                          'resume with its settings or train into a new --out')
    before, now = ckpt.get('space_def') or {}, space.to_dict()
    before = {'stem': 'linear', **before}   # checkpoints from before the stem option had the linear stem
    if before != now:
        keys = [k for k in now if before.get(k) != now[k]]
        detail = '; '.join(f'{k}: saved {before.get(k)!r} vs now {now[k]!r}' for k in keys)
        raise SearchSpaceError(f'cannot resume {path}: search space {cfg.space!r} is defined differently from the '
                               f'one the checkpoint was trained in ({detail}); train into a new --out')


def _load_checkpoint(cfg: SupernetConfig, space: SearchSpace, out: Path) -> Optional[dict]:
    """The checkpoint to resume from (checked against the settings and the space), or None."""
    path = out / CHECKPOINT_NAME
    ckpt = load_resume_checkpoint(path, cfg.resume, ConfigError, _log)
    if ckpt is None:
        return None
    check_checkpoint(ckpt, cfg, space, path)
    return ckpt


def _resume(ckpt: Optional[dict], trainer: Trainer, sampling: SupernetSampling, out: Path) -> tuple:
    """(first epoch, rewiring state, training seconds so far): from ``ckpt``, else a new run."""
    metrics = out / METRICS_NAME
    if ckpt is None:
        metrics.unlink(missing_ok=True)
        return 0, new_rewiring_state(trainer.model.model.blocks), 0.0
    trainer.load_state_dict(ckpt)
    sampling.load_state_dict(ckpt['sampling'])
    start = int(ckpt['epoch']) + 1
    if metrics.exists():
        keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln).get('epoch', 0) <= start]
        metrics.write_text(''.join(ln + '\n' for ln in keep))
    _log(f'resuming {out} after epoch {start}')
    return start, ckpt['rewiring'], float(ckpt.get('train_time_s', 0.0))


def train_supernet(cfg: SupernetConfig, hooks: Sequence = ()) -> dict:
    """Train the supernet of ``cfg.space`` (see the module docstring); returns the summary, also
    written to ``summary.json``. ``hooks``: more :class:`Hooks` for the trainer, run after the
    method's own (a test records the architectures of every step with one)."""
    cfg.validate()
    di = init_distributed(cfg.device)
    if di.world_size > 1:
        raise ConfigError('nas train-supernet runs in one process (sub-networks skip blocks, so some weights get '
                          'no gradient in a step, which DDP does not allow); run it without torchrun')
    device = di.device
    out = _prepare_out(cfg)
    info = dataset_info(cfg.data)
    space = dataclasses.replace(SPACES[cfg.space], num_classes=info.num_classes)
    ckpt = _load_checkpoint(cfg, space, out)
    seed_all(cfg.seed)
    supernet = Supernet(space, drop_path_rate=cfg.drop_path)
    train_set, val_set = model_datasets(supernet.model, cfg.data, aug=cfg.aug, info=info)
    held = holdout_indices(train_set.targets, cfg.holdout, cfg.seed, info.classes)
    held_set = set(held)
    train_idx = [i for i in range(len(train_set)) if i not in held_set]
    if len(train_idx) < cfg.batch_size:
        raise ConfigError(f'the training split has {len(train_idx)} images after holding {len(held)} out, fewer than '
                          f'one batch of {cfg.batch_size}')
    loader = train_loader(Subset(train_set, train_idx), cfg.batch_size, cfg.seed, pin=device.type == 'cuda')
    val_loader = eval_loader(val_set, 2 * cfg.batch_size, pin=device.type == 'cuda')
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    total, warm = cfg.epochs * steps, int(cfg.warmup_epochs * steps)

    def schedule(opt):
        return CosineLRScheduler(opt, t_initial=total, lr_min=cfg.lr * 1e-2, warmup_t=warm,
                                 warmup_lr_init=cfg.lr * 1e-3, t_in_epochs=False)

    supernet.to(device)
    if space.distilled:
        supernet.set_distilled_training(True)
    criterion = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
    sampling = SupernetSampling(space, cfg.archs_per_step, cfg.seed, round(cfg.width_warmup * steps), loader.sampler,
                                criterion)
    trainer = Trainer(supernet, dict(opt='adamw', lr=cfg.lr, weight_decay=cfg.weight_decay), hooks=[sampling],
                      scheduler=schedule, device=device, dist=di, progress=cfg.progress, postfix_every=20)
    start, rewiring, time_before = _resume(ckpt, trainer, sampling, out)
    del ckpt
    atomic_write_bytes(out / SPACE_NAME, json.dumps(dict(name=cfg.space, space=space.to_dict()), indent=2).encode())
    atomic_write_bytes(out / HOLDOUT_NAME, json.dumps(dict(
        data=cfg.data, split='train', seed=cfg.seed, per_class=cfg.holdout, num_images=len(train_set),
        indices=held)).encode())
    epochs = SupernetEpochs(cfg, space, out, val_loader, sampling, rewiring, time_before)
    trainer.add_hooks(epochs, *hooks)
    n_params = count_params(supernet)
    _log(f'{cfg.space} supernet: {n_params / 1e6:.2f}M params, {space.num_archs():.3g} sub-networks; '
         f'{len(train_idx)} train ({len(held)} held out) / {len(val_set)} val images; {cfg.archs_per_step} '
         f'sub-networks of {cfg.ex_per_arch} images per step, {steps} steps per epoch, width warm-up '
         f'{cfg.width_warmup:g} epochs; on {device}')
    trainer.fit(loader, cfg.epochs, start, steps)
    last = epochs.last_eval or epochs.evaluate()
    if space.distilled:
        supernet.set_distilled_training(False)
    summary = dict(run_dir=str(out), space=cfg.space, data=cfg.data, epochs=cfg.epochs,
                   largest_top1=last['val_top1_largest'], smallest_top1=last['val_top1_smallest'],
                   largest_gmacs=space.macs(space.largest()) / 1e9, smallest_gmacs=space.macs(space.smallest()) / 1e9,
                   archs_trained=sampling.archs_trained, distinct_archs=len(sampling.distinct),
                   rewirings=epochs.rewiring['rewirings'], params=n_params, held_out=len(held),
                   train_images=len(train_idx), train_time_s=epochs.train_time(), weights=str(out / WEIGHTS_NAME))
    atomic_write_bytes(out / SUMMARY_NAME, json.dumps(summary, indent=2).encode())
    return summary
