"""NViT: global structural pruning of a DeiT with Hessian-aware saliency and a latency budget.

Yang, Yin, Molchanov, Li, Kautz: "Global Vision Transformer Pruning with Hessian-Aware Saliency",
CVPR 2023. The procedure (``prune_nvit``, ``deitlab prune nvit``):

1. Load the dense DeiT (run directory, deitlab name or timm ViT/DeiT), keep a frozen copy as the
   distillation target, and measure (or load) a latency table of its blocks on this device.
2. Train the model on with ``L = ce_weight * CE(y) + kl_weight * T^2 * KL(p_dense^T || p^T)``
   (plus an optional hard/soft DeiT teacher) while accumulating the saliency of every unit. Before
   and after every optimizer step the masks are enforced: removed weights, their gradients and
   their AdamW moments stay exactly zero. The training runs on the shared
   :class:`~deitlab.train.loop.Trainer`, step-driven; these parts are its hooks (hooks.py).
3. Every ``interval`` steps, rank all groups of all layers by ``I - lambda * dLat`` and remove the
   lowest, one at a time, stopping as soon as the target (latency, GMACs or parameter fraction of
   the dense model) is met: as many as a goal falling linearly to the target over ``prune_steps``
   asks for (``schedule='linear'``, the default, over a budget derived from the data unless given),
   or NViT's ``groups_per_event`` per event (``schedule='nvit'``); see schedule.py. The plan
   (schedule, steps, events, fine-tune steps, expected duration) is logged before the first step.
4. Densify into the compact non-uniform DeiT (widths optionally rounded up to multiples), save it
   as a run directory, and fine-tune it with soft distillation from the dense model.

The same loop prunes the token-mixer families PoolFormer and SpectFormer (deitlab's), in their
MLP hidden widths only (families.py): the masks, saliency, ranking, budget and latency table follow
the model's layout, whose only unit type is ``mlp``. Settings that name the other unit types
(``prune_types``, ``group_sizes``, ``min_keep``, ``lut_grid`` entries for emb / head / qk / v)
raise ``PruneError`` for them; the default ``prune_types`` (all five) means every type the model has.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bench.common import synchronize
from ..console import log as _log
from ..distributed import DistInfo, barrier, init_distributed
from ..rundir import create, is_run_dir, save_run_dir
from ..train.loop import Trainer
from .config import NViTConfig
from .compact import densify, rounded_masks
from .families import layout_of
from .groups import Masks, PruneError, check_prunable, use_masked_layernorm
from .hooks import PruningHooks
from .latency import LatencyTable, MLPLatencyTable, grid_for, load_latency_table, lut_path
from .ranking import Budget, default_group_sizes, rank_groups, remove_group
from .saliency import Saliency, per_sample_sq_grads
from .schedule import (NVIT_GROUPS, NVIT_INTERVAL, estimate_nvit_events, expected_seconds, linear_goal, make_plan,
                       plan_line, resolve_schedule)
from .timing import build_latency_table, busy_warning

PRUNE_LOG = 'prune_log.jsonl'
LUT_NAME = 'latency_table.json'
CHECKPOINT = 'prune_checkpoint.pt'   # the pruning phase at its last event (``--resume``)


def load_dense(spec: str) -> nn.Module:
    """A trained deitlab DeiT, PoolFormer or SpectFormer: from a run directory, or a timm / deitlab
    name with released weights (downloaded by timm; a timm ViT/DeiT is converted with ``from_timm``)."""
    from ..models.deit import from_timm
    if not is_run_dir(spec) and not str(spec).startswith('local-dir:'):
        import timm
        cfg = timm.models.get_pretrained_cfg(str(spec).split('.')[0]) if timm.is_model(str(spec)) else None
        if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise PruneError(f'{spec} has no released weights and pruning a random model means nothing; '
                             f'train it first (deitlab train ... --out RUN_DIR) and prune the run directory')
    model = create(spec, pretrained=not is_run_dir(spec))
    try:
        layout_of(model)
    except PruneError:
        try:
            model = from_timm(model)
        except ValueError as e:
            raise PruneError(f'{spec}: {e}; the pruner takes deitlab DeiT models, and deitlab PoolFormer / '
                             f'SpectFormer models (their MLP widths)') from None
    check_prunable(model)
    return model


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch."""
    return F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction='batchmean',
                    log_target=True) * tau * tau


def _loaders(cfg: NViTConfig, model: nn.Module, di: DistInfo):
    from ..data.for_model import eval_loader, model_datasets, stream_loader
    train_set, val_set = model_datasets(model, cfg.data, aug=cfg.aug, is_main=di.is_main)
    n = cfg.batch_size * di.world_size
    if len(train_set) < n:
        raise PruneError(f'the training split has {len(train_set)} images, fewer than one batch of {n}')
    return (stream_loader(train_set, cfg.batch_size, cfg.seed, rank=di.rank, world_size=di.world_size),
            eval_loader(val_set, max(64, cfg.batch_size), rank=di.rank, world_size=di.world_size), train_set)


def _forever(loader):
    while True:
        yield from loader


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:   # an iterable-style dataset without a length
        return None


class NViTPruner:
    """The pruning phase on a model in memory: ``run()`` trains, scores and removes groups until
    the budget is met, and returns the masks. ``densified()`` gives the compact model."""

    def __init__(self, model: nn.Module, cfg: NViTConfig, lut: Optional[Union[LatencyTable, MLPLatencyTable]],
                 device: torch.device):
        cfg.validate()
        self.layout = layout_of(model)
        self.prune_types = cfg.unit_types(self.layout)
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.dense = copy.deepcopy(model).eval()
        for p in self.dense.parameters():
            p.requires_grad_(False)
        self.lut = lut
        self.budget = Budget(model, lut, cfg.target_latency, cfg.target_gmacs, cfg.target_params)
        self.group_sizes = {**default_group_sizes(model), **cfg.group_sizes}
        self.min_keep = {k: max(1, int(cfg.min_keep.get(k, self.group_sizes[k]))) for k in self.layout.types}
        if cfg.masked_ln:
            use_masked_layernorm(self.model, True)
        self.masks = Masks(self.model)
        self.saliency = Saliency(cfg.criterion, cfg.momentum, cfg.divisors, depth=self.layout.depth)
        self.scores: Optional[dict] = None
        self.events = 0
        self.steps = 0
        self.log: list = []
        self.schedule = resolve_schedule(cfg)
        self.plan: Optional[dict] = None     # schedule.make_plan's dict, set by make_plan() / run()
        self._check_reachable()

    def state_dict(self) -> dict:
        """What the pruning phase has decided and accumulated: masks, saliency windows and scores,
        step and event counters, the log and the plan."""
        sal = {k: v for k, v in vars(self.saliency).items() if k != 'rule'}
        return dict(masks=self.masks.state_dict(), saliency=sal, scores=self.scores, events=self.events,
                    steps=self.steps, log=self.log, plan=self.plan)

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state['masks'])
        vars(self.saliency).update(state['saliency'])
        self.scores, self.events, self.steps = state['scores'], state['events'], state['steps']
        self.log, self.plan = list(state['log']), state['plan']

    def floor_widths(self) -> dict:
        """The widths with every prunable layer down to what whole groups and ``min_keep`` allow."""
        floor = self.masks.copy()
        for kind, b in floor.layers():
            if kind in self.prune_types:
                layer = floor.layer(kind, b)
                active = layer.nonzero().flatten()
                n, size = active.numel(), int(self.group_sizes[kind])
                layer[active[n - max(0, (n - self.min_keep[kind]) // size) * size:]] = False
        return floor.kept()

    def _check_reachable(self) -> None:
        """``PruneError`` before any training when the target lies below the floor: e.g. a latency
        target under the part of a PoolFormer's latency that its MLP widths do not touch."""
        floor = self.floor_widths()
        if not self.budget.reached(floor):
            only = '' if 'emb' in self.layout.types else f' ({self.layout.family} models prune MLP widths only)'
            raise PruneError(f'the {self.budget.kind} target {self.budget.target} cannot be reached: with every '
                             f'prunable layer at its minimum{only} the model keeps '
                             f'{self.budget.fraction(floor):.3f} of the dense {self.budget.kind}; raise the target')

    def widths(self) -> dict:
        return self.masks.kept()

    def estimate(self) -> dict:
        rel = self.budget.relative(self.widths())
        ab = self.budget.absolute(self.widths())
        return dict(rel, gmacs_abs=ab['gmacs'], params_abs=ab['params'], **(
            {'latency_ms': ab['latency_ms']} if 'latency_ms' in ab else {}))

    def done(self) -> bool:
        return self.budget.reached(self.widths())

    def make_plan(self, batches_per_epoch: Optional[int] = None) -> dict:
        """The schedule this pruner follows (``schedule.make_plan``) for a training loader of
        ``batches_per_epoch`` batches: steps, interval, events, fine-tune steps."""
        events = None
        if self.schedule == 'nvit':
            interval = self.cfg.interval or NVIT_INTERVAL
            events = estimate_nvit_events(self, max(1, self.cfg.max_prune_steps // interval))
        self.plan = make_plan(self.cfg, batches_per_epoch, events)
        if self.schedule == 'linear' and self.plan['prune_steps'] > self.cfg.max_prune_steps:
            raise PruneError(f'the linear schedule needs {self.plan["prune_steps"]} steps, more than --max-prune-steps '
                             f'({self.cfg.max_prune_steps}); raise it or lower --prune-steps')
        return self.plan

    @property
    def interval(self) -> int:
        return self.plan['interval'] if self.plan else (self.cfg.interval or NVIT_INTERVAL)

    def event_goal(self) -> Optional[float]:
        """Linear schedule: the budget fraction this event should reach, falling linearly from 1 at
        step 0 to the target at the plan's ``prune_steps``. None: NViT's fixed number of groups per
        event."""
        if self.schedule == 'nvit':
            return None
        steps = self.plan['goal_steps'] if self.plan else self.cfg.prune_steps
        return linear_goal(self.steps, steps, self.budget.target)

    def event(self) -> list:
        """Score and rank all groups, then remove the lowest: ``groups_per_event`` of them (``nvit``),
        or as many as the linear schedule asks for; never past the target."""
        self.scores = self.saliency.event(self.model)
        goal = self.event_goal()
        per_event = self.cfg.groups_per_event or NVIT_GROUPS
        removed = []
        while not self.done():
            savings = self.lut.unit_savings(self.widths()) if (self.lut is not None and self.cfg.lam) else None
            groups = rank_groups(self.scores, savings, self.masks, self.cfg.lam, self.group_sizes, self.min_keep,
                                 self.prune_types)
            if not groups:
                break
            # savings change as widths shrink: re-rank after each small batch of removals
            for g in groups[:max(1, per_event if goal is None else 4)]:
                if self.done() or (goal is not None and self.budget.fraction(self.widths()) <= goal):
                    break
                remove_group(self.masks, g)
                removed.append(g)
            if goal is None or self.budget.fraction(self.widths()) <= goal:
                break
        self.events += 1
        return removed

    def _loss(self, out, teacher_out, y, extra_loss=None, x=None):
        loss = self.cfg.kl_weight * kd_kl(out, teacher_out, self.cfg.kl_tau) if self.cfg.kl_weight else 0.0
        if self.cfg.ce_weight:
            if extra_loss is not None:
                loss = loss + self.cfg.ce_weight * extra_loss(x, out, y)
            else:
                loss = loss + self.cfg.ce_weight * F.cross_entropy(out, y, label_smoothing=self.cfg.smoothing)
        return loss

    def run(self, train_loader, val_loader=None, on_event=None, dist: Optional[DistInfo] = None,
            checkpoint: Optional[Path] = None, resume: Optional[dict] = None) -> Masks:
        """Train with the dense model as KL teacher, accumulate saliency, and remove groups every
        ``interval`` steps until the budget is met (:class:`PruningHooks` on the shared
        :class:`~deitlab.train.loop.Trainer`, stepping an endless stream over ``train_loader``).
        ``on_event`` gets every event's row. Under ``torchrun`` (``dist``) the student runs in DDP:
        every process sees the gradients averaged over all of them, so all compute the same
        saliency and remove the same units. With ``checkpoint`` the state after every event is saved
        there (main process); ``resume`` (such a saved state) continues from it: the data stream is
        replayed up to its step (no training), so the run goes on as if it had not stopped.
        Returns the masks."""
        cfg = self.cfg
        self.model.eval()  # NViT prunes with the student in eval mode (no dropout / drop path)
        # bf16 autocast on CUDA (the saliency is read from fp32 parameters and gradients); no schedule
        trainer = Trainer(self.model, dict(opt='adamw', lr=cfg.lr, weight_decay=cfg.weight_decay), device=self.device,
                          dist=dist, train_mode=False, progress=cfg.progress is not False)
        extra = None
        if cfg.teacher:
            from ..train.distill import DistillationLoss
            teacher = create(cfg.teacher, pretrained=not is_run_dir(cfg.teacher)).to(self.device).eval()
            extra = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=cfg.smoothing), teacher, cfg.distill)
        hooks = PruningHooks(self, extra, val_loader, on_event, checkpoint)
        trainer.add_hooks(hooks)
        batches = _forever(train_loader)
        if resume is not None:
            self.load_state_dict(resume['pruner'])
            trainer.load_state_dict(resume['trainer'])
            hooks.pmasks = self.masks.param_masks(self.model)
            for _ in range(self.steps):   # the stream as far as the checkpoint
                next(batches)
        hooks.apply_masks()
        t0 = time.perf_counter()
        first = next(batches)
        fetch_s = time.perf_counter() - t0
        if self.plan is None:
            self.make_plan(_length(train_loader))
        if resume is None:
            self._time_step(first, fetch_s, trainer, hooks, val_loader)
        _log(plan_line(self.plan, self.budget.kind, self.budget.target), trainer.is_main)
        hooks.t0 = time.perf_counter()
        total = self.plan['prune_steps'] and self.plan['prune_steps'] - self.steps   # None: not known
        trainer.run_steps(itertools.chain([first], batches), total=total, desc='nvit prune')
        if not self.done():
            est = self.estimate()[self.budget.kind]
            raise PruneError(f'the {self.budget.kind} target {self.budget.target} was not reached within '
                             f'{cfg.max_prune_steps} steps (now {est:.3f}); raise --max-prune-steps or '
                             f'--groups-per-event, or lower --interval, or use --schedule linear')
        self.plan['prune_s_measured'] = round(time.perf_counter() - hooks.t0, 1)   # against expected_prune_s
        return self.masks

    def _reestimate(self, bar) -> None:
        """The nvit schedule's remaining steps again, ranked by the first event's saliencies (the plan
        used random ones): the bar's total and ``plan['prune_steps_after_first_event']``."""
        cap = max(1, (self.cfg.max_prune_steps - self.steps) // self.interval)
        left = estimate_nvit_events(self, cap, self.scores)
        if left is not None:
            self.plan['prune_steps_after_first_event'] = self.steps + left * self.interval
            bar.total = self.plan['prune_steps_after_first_event']
            bar.refresh()

    def _per_sample_sq_grads(self, x, y, teacher_out):
        """``fisher``: the squared per-sample gradients of the first ``fisher_samples`` samples, and their count."""
        k = min(self.cfg.fisher_samples, x.shape[0])
        sq = per_sample_sq_grads(self.model, lambda o, yi, ti: self._loss(o, ti, yi), x[:k], y[:k], teacher_out[:k])
        return sq, k

    def _time_step(self, batch, fetch_s: float, trainer: Trainer, hooks: 'PruningHooks', val_loader) -> None:
        """Put the expected seconds per pruning step (``step_s``) and per event (``event_s``:
        validation) into the plan: the second of two forward + backward passes on the first batch
        (per-sample gradients too for ``fisher``; no update, gradients cleared), plus the loader's
        time for that batch. Optimizer steps and saliency updates are not counted."""
        x, y = batch[0].to(self.device), batch[1].to(self.device)
        for _ in range(2):
            synchronize(self.device)
            t0 = time.perf_counter()
            _, loss = trainer.forward_loss(x, y)
            loss.backward()
            if self.saliency.needs_per_sample:
                self._per_sample_sq_grads(x, y, hooks.teacher_out)
            hooks.apply_masks()
            hooks.apply_masks()
            synchronize(self.device)
            step_s = time.perf_counter() - t0
        trainer.optimizer.zero_grad(set_to_none=True)
        event_s = 0.0
        if val_loader is not None and self.cfg.val_batches:
            synchronize(self.device)
            t0 = time.perf_counter()
            with torch.no_grad(), trainer.autocast():
                self.model(x)
            synchronize(self.device)
            per_image = (time.perf_counter() - t0 + fetch_s) / x.shape[0]
            val_bs = getattr(val_loader, 'batch_size', None) or x.shape[0]
            event_s = self.cfg.val_batches * val_bs * per_image
        self.plan.update(step_s=round(step_s + fetch_s, 4), event_s=round(event_s, 4))
        self.plan['expected_s'] = expected_seconds(self.plan)
        self.plan['expected_prune_s'] = expected_seconds(dict(self.plan, finetune_steps=0))

    def densified(self) -> nn.Module:
        masks = rounded_masks(self.masks, self.cfg.round_to, self.scores) if self.cfg.round_to else self.masks
        return densify(self.model, masks).eval()


def latency_table(cfg: NViTConfig, dense: nn.Module, di: Optional[DistInfo] = None, out: Optional[Path] = None):
    """The table ``prune_nvit`` prunes against: loaded when ``cfg.lut`` names a file or a committed
    table (checked to cover ``dense``), timed on this device when it is None or ``'measure'`` and
    a latency target or penalty needs one, else None. Under ``torchrun`` the main process times it
    and saves it to ``out``, where the others load it (every process prunes against one table)."""
    di = di or DistInfo()
    path = lut_path(cfg.lut)
    if path is not None:
        lut = load_latency_table(path)
        lut.check_covers(dense)
        lut.meta['source'] = str(path)
        return lut
    if cfg.target_latency is None and not cfg.lam:
        return None
    if not di.is_main:
        barrier()   # the main process times the table
        return load_latency_table(out / LUT_NAME)
    grid = grid_for(dense, cfg.lut_grid) if cfg.lut_grid else None
    lut = build_latency_table(dense, batch_size=cfg.lut_batch, grid=grid, passes=cfg.lut_passes, progress=cfg.progress)
    lut.meta['source'] = 'measure'
    if busy_warning(lut.meta):
        _log(busy_warning(lut.meta))
    if di.distributed:
        lut.save(out / LUT_NAME)
        barrier()
    return lut


def _finetune(cfg: NViTConfig, out: Path, pruned_steps: int, per_epoch: int, pruned_dir: str,
              dense_dir: str) -> Optional[dict]:
    """Fine-tune the densified model into ``out`` with soft distillation from the dense one, for
    ``finetune_epochs`` or the rest of ``total_steps``; None when there is nothing to train."""
    epochs, step_cap = cfg.finetune_epochs, cfg.finetune_steps
    if cfg.total_steps is not None:
        rest = cfg.total_steps - pruned_steps
        if rest < 1:
            raise PruneError(f'pruning took {pruned_steps} steps, the whole --total-steps budget '
                             f'({cfg.total_steps}); raise it or prune faster')
        epochs = -(-rest // per_epoch)
        step_cap = -(-rest // epochs)
    if not epochs:
        return None
    from ..train import TrainConfig, train
    return train(TrainConfig(
        model=pruned_dir, data=cfg.data, out=str(out), overwrite=True, epochs=epochs, batch_size=cfg.batch_size,
        lr=cfg.finetune_lr, warmup_epochs=0.0, min_lr=cfg.finetune_lr / 20, weight_decay=cfg.weight_decay,
        smoothing=cfg.smoothing, mixup=0.0, cutmix=0.0, drop_path=0.0, aug=cfg.aug, teacher=dense_dir,
        distill='soft', distill_alpha=cfg.finetune_alpha, distill_tau=cfg.finetune_tau, kd_norm='batch',
        seed=cfg.seed, device=cfg.device, progress=cfg.progress, tensorboard=False, max_steps_per_epoch=step_cap))


def prune_nvit(cfg: NViTConfig) -> dict:
    """Prune, densify, fine-tune and report (see the module docstring). Writes into ``cfg.out``:
    the fine-tuned run directory, ``pruned/`` (densified, before fine-tuning), ``dense/`` when the
    dense model was not a run directory, ``prune_log.jsonl``, ``latency_table.json``,
    ``report.json`` and ``widths.png``."""
    from ..distributed import seed_all
    from .report import finish_report

    cfg.validate()
    di = init_distributed(cfg.device)
    out = Path(cfg.out)
    resume = None
    if cfg.resume:
        if not (out / CHECKPOINT).is_file():
            raise PruneError(f'{out} has no {CHECKPOINT} to resume from (it is written at every pruning event)')
        try:
            resume = torch.load(out / CHECKPOINT, map_location='cpu', weights_only=True)
        except Exception as e:   # truncated or overwritten
            raise PruneError(f'{out / CHECKPOINT} is damaged ({type(e).__name__}); start the pruning again '
                             f'in a new --out') from None
    elif (out / 'config.json').exists() or (out / PRUNE_LOG).exists():
        raise PruneError(f'{out} already holds a pruning run; choose another --out, or --resume it')
    barrier()   # every process has checked before the main one writes
    out.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)
    device = di.device
    dense = load_dense(cfg.model).to(device)
    cfg.unit_types(layout_of(dense))   # settings for unit types the family does not prune: fail early
    label_names = (dense.pretrained_cfg or {}).get('label_names')
    dense_dir = cfg.model if is_run_dir(cfg.model) else str(out / 'dense')
    if dense_dir != cfg.model and di.is_main:
        save_run_dir(dense, dense_dir, label_names)
    train_loader, val_loader, train_set = _loaders(cfg, dense, di)
    if getattr(train_set, 'classes', None) is not None and len(train_set.classes) != dense.num_classes:
        raise PruneError(f'{cfg.model} predicts {dense.num_classes} classes but {cfg.data} has {len(train_set.classes)}')

    if resume is not None and (out / LUT_NAME).is_file():
        lut = load_latency_table(out / LUT_NAME)   # the table the run started with, not a new timing
    else:
        lut = latency_table(cfg, dense, di, out)
    if lut is not None and di.is_main:
        lut.save(out / LUT_NAME)

    pruner = NViTPruner(dense, cfg, lut, device)
    t0 = time.perf_counter()
    with open(out / PRUNE_LOG, 'w') if di.is_main else contextlib.nullcontext() as f:
        def write(row):
            f.write(json.dumps(row) + '\n')
            f.flush()
        for row in (resume or {}).get('pruner', {}).get('log', []) if di.is_main else []:
            write(row)
        pruner.run(train_loader, val_loader, on_event=write if di.is_main else None, dist=di,
                   checkpoint=out / CHECKPOINT, resume=resume)
    prune_s = time.perf_counter() - t0
    masked = pruner.model
    compact = pruner.densified()
    check = next(iter(val_loader))[0][:16].to(device)
    with torch.no_grad():
        gap = float((masked(check) - compact(check)).abs().max())
    pruned_dir = out / 'pruned'
    if di.is_main:
        save_run_dir(compact, pruned_dir, label_names)
    barrier()

    finetune = _finetune(cfg, out, pruner.steps, len(train_loader), str(pruned_dir), dense_dir)
    if finetune is None and di.is_main:
        save_run_dir(compact, out, label_names)
    barrier()
    final = create(str(out)).to(device).eval()
    return finish_report(cfg, out, pruner.dense, final, pruner, val_loader, device, di.is_main,
                         dict(prune_steps=pruner.steps, events=pruner.events, prune_time_s=round(prune_s, 1),
                              masked_vs_dense_max_abs=gap, finetune=finetune, dense_dir=dense_dir,
                              config=asdict(cfg)))
