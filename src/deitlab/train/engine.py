"""The DeiT training engine, run by ``deitlab train`` and :func:`train`: the DeiT recipe as
hooks of the shared :class:`~deitlab.train.loop.Trainer`.

Per step (``_DeiTBatches``, then the trainer): optional defence and batch mixing (``--mix``: timm
Mixup/CutMix, TransMix, MixPro or patchmix) -> forward (bf16 autocast on CUDA) -> label loss plus optional
DeiT distillation (and MCTF's consistency loss) -> NaN check -> backward -> optional clipping ->
AdamW -> per-step cosine schedule (timm) -> optional EMA (timm). Per epoch (``_RunDirEpochs``):
top-1/top-5 on the validation split, one line of ``metrics.jsonl``, TensorBoard scalars, an atomic
``checkpoint.pt`` (model, optimizer, schedule, EMA) and the run directory's ``config.json`` +
``model.safetensors``. ``--dcal`` wraps the student in DCAL and weighs its branches' losses
(``train/dcal_train.py``); ``--pk P,K`` draws batches of P labels x K images.

Determinism: every epoch reseeds Python/NumPy/torch from ``(seed, epoch, rank)`` and the sampler
from ``(seed, epoch)``, so ``--resume`` from an epoch checkpoint continues to the same weights as an
uninterrupted run. Under ``torchrun`` each process takes ``batch_size / world_size`` samples of
the same global batch and DDP averages the gradients.

``model_input``, ``norm_stats``, ``model_datasets`` (:mod:`deitlab.data.for_model`), ``evaluate``
(:mod:`deitlab.evaluate`) and ``TrainingDiverged`` (:mod:`deitlab.train.loop`) are importable from
here too.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy
from timm.scheduler import CosineLRScheduler

from ..bench import count_params
from ..console import log as _log
from ..data import dataset_info
from ..data.for_model import eval_loader, model_datasets, model_input, norm_stats, pk_loader, train_loader
from ..distributed import DistInfo, barrier, init_distributed, seed_all
from ..evaluate import evaluate
from ..registry import TOKEN_FUSION
from ..rundir import atomic_torch_save, create, is_run_dir, save_run_dir
from . import dcal_train, triplet
from .config import (ConfigError, TrainConfig, check_resume_settings, parse_multilevel, short_run_warning,
                     with_defaults)
from .dcal_config import DCAL_RESUME_KEYS
from .distill import DistillationLoss
from .flops import TrainFlops
from ..unlearnable.defences import build_defence
from .loop import Hooks, Trainer, TrainingDiverged
from .mixing import BatchMixer, MixLoss

CHECKPOINT_NAME = 'checkpoint.pt'
METRICS_NAME = 'metrics.jsonl'
RUN_CONFIG_NAME = 'train_config.json'
# what a training run writes into --out before its first checkpoint (a run killed that early left them)
_OWN_FILES = {METRICS_NAME, RUN_CONFIG_NAME, 'tb'}
# settings a resumed run must share with the run it continues: the data, the model, and everything that
# shapes the schedule and the updates (a changed lr or epoch count would be recorded as if used from the start)
_RESUME_KEYS = ('model', 'data', 'batch_size', 'seed', 'img_size', 'in_chans', 'distill', 'teacher', 'epochs', 'lr',
                'base_lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'weight_decay', 'opt', 'grad_clip', 'smoothing',
                'mix', 'mixup', 'cutmix', 'mixup_prob', 'drop_path', 'drop', 'ema', 'ema_decay', 'distill_alpha',
                'distill_tau', 'aug', 'token_fusion', 'r', 'defence', 'multilevel') + DCAL_RESUME_KEYS


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 100003 + epoch * 1009 + rank


def build_student(cfg: TrainConfig, num_classes: int, data_chans: int, data_size: Optional[int]) -> nn.Module:
    """The model to train: a run directory (its architecture and weights) or a timm/deitlab name.

    Its input size, the one rule of ``deitlab train``:

    1. A run directory keeps the size it was saved with (``--img-size`` other than it is an error:
       its position embedding is sized for it).
    2. A name with ``--img-size S`` (``cfg.img_size``) is built at S.
    3. A name with ``patchN`` in it, on data that declares a size D (``data_size``, i.e.
       :attr:`DatasetInfo.img_size`: glyphs' ``size=``, Fashion-MNIST's 28) that N divides, is built
       at D: a patch-4 model trains on Fashion-MNIST at 28 px.
    4. Otherwise the model's registered input size: ``folder:`` data declares no size, so a user's
       28-px images train ``deitlab_deit_pico_patch4_32`` at 32 px.

    The data is then fed at the model's size (:func:`model_datasets`, which logs any resizing).
    """
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path:
        kwargs['drop_path_rate'] = cfg.drop_path
    if cfg.drop:
        kwargs['drop_rate'] = cfg.drop
    if is_run_dir(cfg.model) or str(cfg.model).startswith('local-dir:'):
        model = create(cfg.model, **kwargs)
        size = model_input(model)[1]
        if cfg.img_size and cfg.img_size != size:
            raise ConfigError(f'img_size {cfg.img_size} (--img-size): the run directory {cfg.model} takes '
                              f'{size}x{size} inputs and its weights are sized for them; leave --img-size out')
        if model.num_classes != num_classes:
            model.reset_classifier(num_classes)
        return model
    kwargs['num_classes'] = num_classes
    kwargs['in_chans'] = cfg.in_chans or data_chans
    patch = re.search(r'patch(\d+)', str(cfg.model))
    if cfg.img_size:
        kwargs['img_size'] = cfg.img_size
    elif patch and data_size and data_size % int(patch.group(1)) == 0:
        kwargs['img_size'] = data_size
    if cfg.pretrained_file:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(cfg.pretrained_file))
    pretrained = cfg.pretrained or bool(cfg.pretrained_file)
    try:
        return create(cfg.model, pretrained=pretrained, **kwargs)
    except TypeError as e:  # a CNN without img_size (e.g. timm's ResNet): its input size goes in pretrained_cfg
        if 'img_size' not in kwargs or 'img_size' not in str(e):
            raise
        size = kwargs.pop('img_size')
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {},
                                                input_size=(kwargs['in_chans'], size, size))
        return create(cfg.model, pretrained=pretrained, **kwargs)


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get('epoch', 0) <= last_epoch]
    path.write_text(''.join(ln + '\n' for ln in keep))


class _Writer:
    """metrics.jsonl plus TensorBoard (when installed and enabled), on the main process only."""

    def __init__(self, out: Path, enabled_tb: bool, is_main: bool):
        self.path = out / METRICS_NAME
        self.is_main = is_main
        self.tb = None
        if is_main and enabled_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(out / 'tb'))
            except ImportError:
                _log('tensorboard is not installed: writing metrics.jsonl only (pip install tensorboard)')

    def write(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != 'epoch':
                    self.tb.add_scalar(k, v, row['epoch'])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _load_teacher(cfg: TrainConfig, num_classes: int, device: torch.device) -> Optional[nn.Module]:
    if not cfg.teacher:
        return None
    teacher = create(cfg.teacher, pretrained=not is_run_dir(cfg.teacher))
    if getattr(teacher, 'num_classes', num_classes) != num_classes:
        raise ConfigError(f'teacher {cfg.teacher} predicts {teacher.num_classes} classes but the data has '
                          f'{num_classes}')
    return teacher.to(device).eval()


def _check_resume(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    check_resume_settings(with_defaults(ckpt.get('config', {})), cfg, _RESUME_KEYS, path,
                          f'resume with its settings, or start a new run from its weights (--model {path.parent} '
                          f'--out NEW)')


def _mixer(cfg: TrainConfig, model: nn.Module, num_classes: int, size: int) -> BatchMixer:
    try:
        return BatchMixer(cfg.mix, model, num_classes, (size, size), smoothing=cfg.smoothing,
                          mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, mixup_prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, maskmix_prob=cfg.maskmix_prob,
                          maskmix_alpha=cfg.maskmix_alpha, mask_size=cfg.mask_size,
                          transmix_area_weight=cfg.transmix_area_weight)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _criterion(cfg: TrainConfig, mixer: BatchMixer, num_classes: int, device: torch.device):
    """(label loss, full criterion): the label loss for the mixing mode, DeiT distillation around
    it, and MCTF's consistency loss around that when its teacher pass is on."""
    if mixer.active:
        base_loss = MixLoss(cfg.transmix_area_weight, cfg.pal_detach_alpha, cfg.patch_loss_weight)
    elif cfg.smoothing > 0:
        base_loss = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        base_loss = nn.CrossEntropyLoss()
    teacher = _load_teacher(cfg, num_classes, device)
    criterion = DistillationLoss(base_loss, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau, cfg.kd_norm)
    if cfg.token_fusion != 'none' and TOKEN_FUSION[cfg.token_fusion]['consistency'] and cfg.r_teacher_max > 0:
        from ..tokens.mctf import ConsistencyLoss
        criterion = ConsistencyLoss(criterion, cfg.consistency_weight, cfg.consistency_gate)
    return base_loss, criterion


class _DeiTBatches(Hooks):
    """Each epoch reseeded from ``(seed, epoch, rank)``; each batch defended and mixed, its loss the
    recipe's criterion; the mixing statistics (PAL alpha, TransMix lambda, patchmix losses) in the epoch's row."""

    def __init__(self, cfg: TrainConfig, rank: int, sampler, defence, mixer: BatchMixer, base_loss, criterion):
        self.cfg, self.rank, self.sampler = cfg, rank, sampler
        self.defence, self.mixer, self.base_loss, self.criterion = defence, mixer, base_loss, criterion

    def before_epoch(self, epoch: int) -> None:
        seed_all(_epoch_seed(self.cfg.seed, epoch, self.rank))
        self.sampler.set_epoch(epoch)

    def on_batch(self, x, y):
        if self.defence is not None:
            x = self.defence(self.trainer.model, x, y)
        return self.mixer(x, y)

    def forward_context(self, x, y):
        return self.mixer.capture(y)

    def loss(self, x, outputs, y):
        return self.criterion(x, outputs, y)

    def after_epoch(self, epoch: int, row: dict) -> None:
        if isinstance(self.base_loss, MixLoss):
            row.update(self.base_loss.pop_stats())  # this process's means: PAL alpha, TransMix lambda, patchmix losses


class _RunDirEpochs(Hooks):
    """After each epoch: validation (every ``eval_every`` epochs and the last), one metrics row, the
    run directory and an atomic checkpoint; a NaN loss names the last good checkpoint."""

    def __init__(self, cfg: TrainConfig, out: Path, val_loader, writer: '_Writer', classes, start_epoch: int,
                 best: float, extras: Optional[dict] = None):
        self.cfg, self.out, self.val_loader, self.writer, self.classes = cfg, out, val_loader, writer, classes
        self.last_saved, self.best = start_epoch, best   # epochs finished and checkpointed
        self.extras = extras or {}   # name -> a hook whose state_dict() goes into the checkpoint
        self.last_eval: dict = {}

    def evaluate(self, model: nn.Module) -> dict:
        t = self.trainer
        return evaluate(model, self.val_loader, t.device, self.cfg.amp and t.device.type == 'cuda', self.cfg.progress,
                        t.is_main)

    def on_nonfinite(self, loss) -> None:
        t = self.trainer
        path = self.out / CHECKPOINT_NAME
        last = f'{path} (after epoch {self.last_saved})' if self.last_saved else 'none (no epoch had finished)'
        raise TrainingDiverged(
            f'loss became {loss.item()} at epoch {t.epoch + 1}, step {t.batch_index + 1} (global step '
            f'{t.global_step + 1}); training stopped. Last good checkpoint: {last}. '
            f'Try a lower --lr or --grad-clip.')

    def after_epoch(self, epoch: int, row: dict) -> None:
        cfg, t = self.cfg, self.trainer
        model, ema, main = t.model, t.ema, t.is_main
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            self.last_eval = self.evaluate(model)
            row.update(val_top1=self.last_eval['top1'], val_top5=self.last_eval['top5'], val_loss=self.last_eval['loss'])
            if ema is not None:
                ema_eval = self.evaluate(ema.module)
                row.update(ema_top1=ema_eval['top1'], ema_top5=ema_eval['top5'])
            self.best = max(self.best, self.last_eval['top1'])
            _log(f'epoch {epoch + 1}: loss {row["train_loss"]:.4f}  val top-1 {self.last_eval["top1"]:.2f}  '
                 f'top-5 {self.last_eval["top5"]:.2f}  ({row["train_img_per_s"]:.0f} img/s)', main)
        self.writer.write(row)
        if main:
            save_run_dir(model, self.out, label_names=list(self.classes))
            if ema is not None:
                save_run_dir(ema.module, self.out / 'ema', label_names=list(self.classes))
            atomic_torch_save(dict(t.state_dict(), epoch=epoch, best_top1=self.best, config=cfg.to_dict(),
                                   **{k: h.state_dict() for k, h in self.extras.items()}),
                              self.out / CHECKPOINT_NAME)
        self.last_saved = epoch + 1
        barrier()


def _resume(cfg: TrainConfig, trainer: Trainer, out: Path, main: bool, extras: dict) -> tuple:
    """(first epoch, best top-1 so far): from the checkpoint with ``--resume``, else (0, 0.0). The
    ``extras`` hooks get their state first (a V-cycle rebuilds the model at the checkpoint's level)."""
    ckpt_path = out / CHECKPOINT_NAME
    if cfg.resume and ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        except Exception as e:   # truncated or overwritten
            raise ConfigError(f'{ckpt_path} is damaged ({type(e).__name__}: {str(e)[:120]}); the run cannot be '
                              f'resumed from it: train again into a new --out') from None
        _check_resume(ckpt, cfg, ckpt_path)
        for name, hook in extras.items():
            hook.load_state_dict(ckpt.get(name))
        trainer.load_state_dict(ckpt)
        start_epoch, best = int(ckpt['epoch']) + 1, float(ckpt.get('best_top1', 0.0))
        if main:
            _truncate_metrics(out / METRICS_NAME, start_epoch)
        _log(f'resuming {out} after epoch {start_epoch}', main)
        return start_epoch, best
    if cfg.resume:
        _log(f'no checkpoint in {out}: starting a new run', main)
    elif main and (out / METRICS_NAME).exists():
        (out / METRICS_NAME).unlink()
    return 0, 0.0


def _prepare_out(cfg: TrainConfig, di: DistInfo) -> Path:
    if cfg.batch_size % di.world_size:
        raise ConfigError(f'batch size {cfg.batch_size} is not divisible by the {di.world_size} processes')
    local_bs = cfg.batch_size // di.world_size
    if cfg.mixing_active and local_bs % 2:
        raise ConfigError(f'--mix {cfg.mix} needs an even batch size per process, got {local_bs}; '
                          f'use an even --batch-size or turn mixing off (--mix none)')
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f'--out {out} is a file, not a directory')
    if (out / CHECKPOINT_NAME).exists() and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f'{out} already holds a training checkpoint; pass --resume to continue it '
                          f'or choose another --out')
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES) if out.is_dir() else []
    if foreign and not cfg.overwrite and not (cfg.resume and (out / CHECKPOINT_NAME).exists()):
        shown = ', '.join(foreign[:4]) + (', ...' if len(foreign) > 4 else '')
        raise ConfigError(f'--out {out} is not empty ({shown}) and holds no checkpoint of this run to --resume; '
                          f'choose another --out, or pass --overwrite to replace what is there')
    if cfg.overwrite and not cfg.resume and di.is_main:
        (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    if di.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out


def train(cfg: TrainConfig) -> dict:
    """Train a model with the DeiT recipe; returns a summary (final and best accuracy, run dir)."""
    cfg.validate()
    di: DistInfo = init_distributed(cfg.device)
    device, main = di.device, di.is_main
    out = _prepare_out(cfg, di)
    local_bs = cfg.batch_size // di.world_size

    seed_all(cfg.seed)
    info = dataset_info(cfg.data)
    model = build_student(cfg, info.num_classes, info.in_chans, info.img_size)
    if cfg.dcal or isinstance(model, dcal_train.DCAL):
        model = dcal_train.dcal_student(model, cfg)
    if cfg.triplet and not cfg.pk:
        _log('warning: --triplet without --pk: a shuffled batch may hold one image of most labels, and an anchor '
             'without another image of its label adds no triplet term; --pk P,K makes batches of P labels x K '
             'images', main)
    chans, size = model_input(model)
    mean, std = norm_stats(model, chans)
    train_set, val_set = model_datasets(model, cfg.data, aug=cfg.aug, hflip=cfg.hflip, info=info, is_main=main)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f'the training split has {len(train_set)} images, fewer than one batch of '
                          f'{cfg.batch_size}')
    shard = dict(rank=di.rank, world_size=di.world_size, workers=cfg.workers, pin=device.type == 'cuda')
    loader = pk_loader(train_set, *cfg.pk_shape(), cfg.seed, **shard) if cfg.pk else \
        train_loader(train_set, local_bs, cfg.seed, **shard)
    val_loader = eval_loader(val_set, cfg.eval_batch_size or local_bs * 2, **shard)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    model.to(device)
    if cfg.token_fusion != 'none':
        from ..tokens.fuse import apply_token_fusion, parse_r_arg
        options = dict(r_teacher_max=cfg.r_teacher_max) if TOKEN_FUSION[cfg.token_fusion]['consistency'] else {}
        apply_token_fusion(model, cfg.token_fusion, None if cfg.r is None else parse_r_arg(cfg.r), **options)
    is_distilled = hasattr(model, 'set_distilled_training')
    if cfg.triplet and not cfg.dcal and (is_distilled or not hasattr(model, 'forward_head')):
        raise ConfigError(f'--triplet needs a model with one head and pre-logits features (forward_head); '
                          f'{cfg.model} is {"a distilled architecture" if is_distilled else "not one"}')
    if is_distilled:
        model.set_distilled_training(True)
    lr = cfg.resolved_lr()
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    def schedule(opt, steps=total_steps, warm_up=True):
        return CosineLRScheduler(opt, t_initial=steps, lr_min=cfg.min_lr, warmup_t=warmup_steps if warm_up else 0,
                                 warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)

    opt_spec = dict(opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay)
    mixer = _mixer(cfg, model, info.num_classes, size)
    defence = build_defence(cfg.defence, mean, std)
    base_loss, criterion = _criterion(cfg, mixer, info.num_classes, device)
    extra_hooks = []
    if cfg.dcal:   # each branch's loss is the label loss (+ the triplet loss)
        criterion = dcal_train.DCALCriterion(model, base_loss, cfg.triplet_margin if cfg.triplet else None)
        extra_hooks.append(dcal_train.DCALHooks(cfg.triplet))
    elif cfg.triplet:   # the label loss + the triplet loss on the pre-logits features
        criterion = triplet.TripletCriterion(criterion, cfg.triplet_margin)
        extra_hooks.append(triplet.TripletHooks(criterion))
    flops = TrainFlops(di.world_size, getattr(criterion, 'teacher', None))
    extras = dict(train_flops=flops)
    vcycle = None
    if cfg.multilevel:
        from .multilevel import VCycle, check_plan
        plan = parse_multilevel(cfg.multilevel)
        check_plan(model, plan)
        vcycle = VCycle(plan, steps_per_epoch, lr, schedule, opt_spec,
                        lambda m: evaluate(m, val_loader, device, cfg.amp and device.type == 'cuda', False, main),
                        flops, out)
        extras['multilevel'] = vcycle
    trainer = Trainer(
        model, opt_spec, device=device, amp=cfg.amp, scheduler=schedule if vcycle is None else vcycle.scheduler,
        ema_decay=cfg.ema_decay if cfg.ema else None, grad_clip=cfg.grad_clip, dist=di, progress=cfg.progress,
        postfix_every=20)
    sampler = loader.batch_sampler if cfg.pk else loader.sampler
    trainer.add_hooks(_DeiTBatches(cfg, di.rank, sampler, defence, mixer, base_loss, criterion), *extras.values(),
                      *extra_hooks)
    start_epoch, best = _resume(cfg, trainer, out, main, extras)

    resolved = dict(cfg.to_dict(), lr_resolved=lr, world_size=di.world_size, device=str(device),
                    steps_per_epoch=steps_per_epoch, input=[chans, size, size], num_classes=info.num_classes)
    if main:
        (out / RUN_CONFIG_NAME).write_text(json.dumps(resolved, indent=2))
    writer = _Writer(out, cfg.tensorboard, main)
    epochs = _RunDirEpochs(cfg, out, val_loader, writer, info.classes, start_epoch, best, extras)
    trainer.add_hooks(epochs)
    n_params = count_params(model)
    _log(f'{cfg.model}: {n_params / 1e6:.2f}M params, input {chans}x{size}x{size}, {len(train_set)} train / '
         f'{len(val_set)} val images, {di.world_size} process(es) on {device}, recipe {cfg.recipe}, lr {lr:.2e}, '
         f'mix: {mixer.describe()}'
         + (f', defence: {cfg.defence}' if defence is not None else ''), main)
    warning = short_run_warning(cfg.recipe, total_steps, warmup_steps, mixer.active)
    if warning:
        _log(warning, main)

    t_start = time.perf_counter()
    trainer.fit(loader, cfg.epochs, start_epoch, steps_per_epoch)
    writer.close()
    model = trainer.model
    last_eval = epochs.last_eval or epochs.evaluate(model)
    summary = dict(run_dir=str(out), model=cfg.model, data=cfg.data, epochs=cfg.epochs,
                   val_top1=last_eval['top1'], val_top5=last_eval['top5'], best_top1=max(epochs.best, last_eval['top1']),
                   params=n_params, train_time_s=time.perf_counter() - t_start, world_size=di.world_size,
                   train_gflops=round(flops.total_gflops, 3))
    if vcycle is not None:
        vcycle.finish(last_eval['top1'])
        summary.update(multilevel=str(out / 'multilevel.json'), gflops_by_level=vcycle.gflops_by_level())
    if cfg.dcal:
        summary.update(dcal_train.dcal_summary(model))
    if is_distilled:
        model.set_distilled_training(False)
    return summary
