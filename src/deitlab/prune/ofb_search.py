"""The OFB search on the one training loop (``train/loop.py``), and ``prune_ofb``: search, fold, cut
to the chosen widths, fine-tune, report.

``OFBHooks`` is the method: the forward runs the dense model (the KL teacher) and then the masked
student; the loss is ``kl_weight * KL(dense || student) + ce_weight * CE`` plus OFB's one-hot,
score-sparsity and FLOPs losses (ofb.py) and, with PMIM (ofb.py), the reconstruction loss of the
masked patches rescaled to the classification loss each step. After every update ``lambda`` and
PMIM's kept fraction follow the warm-up, the budget weight takes its dual-ascent step
(``OFBSearch.adapt_budget``, unless ``adapt_budget`` is off) and, ``eliminations_per_epoch`` times an epoch (the paper:
3, from the first epoch on) or at least ``MIN_EVENTS`` times in a search of a few epochs,
improbable candidates are eliminated and a module whose largest candidates went is cut to the
largest left (``OFBSearch.shrink``); the run stops once every module has one candidate left (or
at the step budget, when the open modules are settled jointly on the budget, ``_force_choice``,
and the report says how many were still open). One optimiser with the paper's three optimisers as parameter groups:
weights and PMIM's decoder (AdamW, weight decay on matrices), the scores and the other 1-d
parameters (AdamW, no decay), the candidate logits (Adam betas (0.5, 0.999), decoupled weight
decay 1e-3, ``arch_lr``).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..console import log as _log
from ..distributed import DistInfo, barrier, init_distributed
from ..rundir import atomic_torch_save, create, is_run_dir, save_run_dir
from ..train.loop import Hooks, Trainer
from .base import PruneError
from .compact import densify
from .config import OFBConfig
from .families import layout_of
from .nvit import LUT_NAME, _finetune, _forever, _loaders, kd_kl, latency_table, load_dense
from .ofb import BUDGET_BAND, OFBSearch, check_target, lambda_at
from .ofb_pmim import PMIM

__all__ = ['OFBHooks', 'prune_ofb', 'search_optimizer', 'TRACE_NAME']

TRACE_NAME = 'search_trace.json'
CHECKPOINT = 'ofb_checkpoint.pt'   # the search at its last elimination event (``--resume``)
BUDGET_GROWTH = 1000.0   # how far the budget weight can grow over the warm-up
MAX_COMBOS = 4096   # joint choices tried for the modules a search leaves open (_force_choice)
MIN_EVENTS = 40   # eliminations in a search shorter than the paper's: at least this many


def search_optimizer(model: nn.Module, search: OFBSearch, cfg: OFBConfig,
                     pmim: Optional[PMIM] = None) -> torch.optim.Optimizer:
    """AdamW with the paper's groups (module docstring), PMIM's decoder and mask token included."""
    decay, no_decay = [], []
    named = list(model.named_parameters()) + ([] if pmim is None else list(pmim.named_parameters()))
    for name, p in named:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') or 'token' in name or 'pos_embed' in name
             else decay).append(p)
    return torch.optim.AdamW([
        dict(params=decay, lr=cfg.lr, weight_decay=cfg.weight_decay),
        dict(params=no_decay + search.score_parameters(), lr=cfg.lr, weight_decay=0.0),
        dict(params=search.arch_parameters(), lr=cfg.arch_lr, betas=(0.5, 0.999), weight_decay=1e-3)])


class OFBHooks(Hooks):
    """OFB's search as hooks on the ``Trainer`` (module docstring)."""

    def __init__(self, search: OFBSearch, dense: nn.Module, cfg: OFBConfig, steps: int, steps_per_epoch: int,
                 pmim: Optional[PMIM] = None, checkpoint: Optional[Path] = None):
        self.search, self.dense, self.cfg, self.pmim = search, dense, cfg, pmim
        self.checkpoint = checkpoint
        self.max_steps, self.steps = steps, 0
        self.warmup_steps = max(1, round(cfg.warmup * steps))
        # the budget weight can grow BUDGET_GROWTH-fold over the warm-up (OFBSearch.adapt_budget)
        self.budget_rate = math.log(BUDGET_GROWTH) / self.warmup_steps
        self.elim_every = max(1, min(steps_per_epoch // cfg.eliminations_per_epoch, steps // MIN_EVENTS))
        self.trace: List[dict] = []
        self.last: dict = {}
        self.shrinks = 0

    def forward(self, model, x, y):
        with torch.no_grad():
            self.teacher_out = self.dense(x)
        return model(x)

    def loss(self, x, outputs, y):
        cfg, out = self.cfg, outputs.float()
        task = cfg.kl_weight * kd_kl(out, self.teacher_out.float(), cfg.kl_tau) if cfg.kl_weight else out.new_zeros(())
        if cfg.ce_weight:
            task = task + cfg.ce_weight * F.cross_entropy(out, y, label_smoothing=cfg.smoothing)
        parts = self.search.losses(cfg.target[1])
        if self.pmim is not None:
            rec = self.pmim.loss(x)
            # rescaled to the classification loss every step (the paper's w_decoder)
            parts['pmim'] = rec * (task.detach() / rec.detach()) if float(rec.detach()) > 0 else rec
        self.last = dict(task=float(task.detach()), **{k: float(v.detach()) for k, v in parts.items()})
        return task + sum(parts.values())

    def on_nonfinite(self, loss) -> None:
        raise PruneError(f'the loss became {loss.item()} at search step {self.steps + 1} ({self.last}); '
                         f'try a lower --lr or --arch-lr')

    def after_step(self, step, loss) -> None:
        self.steps += 1
        self.search.lam = lambda_at(self.steps / self.warmup_steps)
        if self.cfg.adapt_budget:
            self.search.adapt_budget(self.cfg.target[1], self.budget_rate)
        if self.pmim is not None:
            self.pmim.keep = self.pmim.keep_at(self.steps / self.warmup_steps)
        if self.steps % self.elim_every == 0:
            dropped = self.search.eliminate()
            if dropped:
                self.shrink()
            self.record(dropped)
            if self.checkpoint is not None and self.trainer.is_main:
                atomic_torch_save(self.state(), self.checkpoint)

    def state(self) -> dict:
        """Everything ``--resume`` needs: the model's widths and weights, the optimizer (its three
        groups), the search and PMIM states, the step, trace and RNG."""
        t = self.trainer
        return dict(widths=layout_of(t.model).widths(), trainer=t.state_dict(), search=self.search.search_state(),
                    pmim=None if self.pmim is None else self.pmim.search_state(),
                    hooks=dict(steps=self.steps, shrinks=self.shrinks, trace=self.trace),
                    rng=torch.get_rng_state())

    def load_state(self, state: dict) -> None:
        """The hooks' part of ``state()`` (the trainer, search and PMIM load theirs)."""
        h = state['hooks']
        self.steps, self.shrinks, self.trace = int(h['steps']), int(h['shrinks']), list(h['trace'])
        torch.set_rng_state(state['rng'])

    def shrink(self) -> None:
        """Cut out the units no active candidate keeps any more and go on with the narrower model
        (the same optimizer, re-indexed; ``OFBSearch.shrink``)."""
        t = self.trainer
        new = self.search.shrink(t.model, t.optimizer, self.pmim)
        if new is not t.model:
            t.replace_model(new, t.optimizer)
            self.shrinks += 1

    def should_stop(self) -> bool:
        return self.search.done() or self.steps >= self.max_steps

    @torch.no_grad()
    def record(self, dropped: Optional[dict] = None) -> dict:
        """One row of the trace: step, lambda, expected MACs (fraction), the losses, and per module
        the candidate widths, their probabilities, the expected width and the widths eliminated."""
        s = self.search
        row = dict(step=self.steps, lam=round(s.lam, 4), macs_fraction=round(float(s.macs()) / s.dense_macs, 4),
                   budget_fraction=round(float(s.fraction()), 4), budget_weight=round(s.budget_weight, 3),
                   losses={k: round(v, 5) for k, v in self.last.items()},
                   modules={m.name: [round(float(p), 4) for p in m.probs()] for m in s.modules_list()},
                   widths={m.name: [int(w) for w in m.widths] for m in s.modules_list()},
                   expected={m.name: round(float(m.expected_width()), 3) for m in s.modules_list()},
                   dropped=dropped or {})
        self.trace.append(row)
        return row


TARGET_TOLERANCE = 0.05   # a search that ends more than 5% above its target says so


def budget_warning(kind: str, target: float, reached: float) -> Optional[str]:
    """A line when the searched model is over its budget by more than ``TARGET_TOLERANCE``: the
    budget term loses to the task loss when the search is short or the target far below where the
    candidate logits settle (raise --search-epochs, or prune further with deitlab prune nvit)."""
    if reached <= target * (1 + TARGET_TOLERANCE):
        return None
    return (f'warning: the search ended at {reached:.3f} of the dense {kind}, above the target {target:g}: the '
            f'budget term did not hold it in this search; a longer search (--search-epochs) or deitlab prune nvit '
            f'reaches it')


def _force_choice(search: OFBSearch, target: float) -> int:
    """Settle the modules still searching at the step budget; how many there were.

    The budget term holds the *expected* cost at the target, but a module can end with its mass on
    two distant widths (Fashion-MNIST DeiT-nano, 400 steps to 0.35: the embedding at 51 or 87 with
    p = 0.61 / 0.39, expected cost 0.340; the most probable candidates of the four open modules cost
    0.276). So the open modules' candidates are chosen jointly: the most probable combination (by
    the product of their probabilities) whose cost is within ``BUDGET_BAND`` of the target, or if
    none is, the combination nearest the target. At most ``MAX_COMBOS`` combinations are tried: the
    least probable candidates of the modules with the most are left out first."""
    open_ = [m for m in search.modules_list() if m.searching()]
    if not open_:
        return 0
    with torch.no_grad():
        probs = [m.probs().detach() for m in open_]
        options = [sorted(torch.nonzero(m.active).flatten().tolist(), key=lambda i, p=p: -float(p[i]))
                   for m, p in zip(open_, probs)]
        while math.prod(len(o) for o in options) > MAX_COMBOS:
            max(options, key=len).pop()
        best, best_key = None, None
        for combo in itertools.product(*options):
            pick = {id(m): int(m.widths[i]) for m, i in zip(open_, combo)}
            cost = float(search.fraction(search.widths_by(lambda m: pick.get(id(m), m.chosen()))))
            off = abs(cost - target)
            logp = sum(math.log(max(float(p[i]), 1e-30)) for p, i in zip(probs, combo))
            key = (0, -logp) if off <= BUDGET_BAND * target else (1, off)
            if best_key is None or key < best_key:
                best, best_key = combo, key
        for m, i in zip(open_, best):
            keep = torch.zeros_like(m.active)
            keep[i] = True
            m.active.copy_(keep)
    return len(open_)


def plot_trace(trace: List[dict], search: OFBSearch, target: float, path: Path) -> Path:
    """Expected MACs (and latency, with a table) over the search against the target, and each
    module's expected width as a fraction of its units."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = [r['step'] for r in trace]
    a.plot(steps, [r['macs_fraction'] for r in trace], 'o-', label='expected MACs')
    if search.lut is not None:
        a.plot(steps, [r['budget_fraction'] for r in trace], 's-', label='expected latency (table)')
    a.axhline(target, color='k', ls='--', label=f'target {target:g}')
    a.plot(steps, [r['lam'] for r in trace], color='0.6', label='lambda')
    a.set_xlabel('search step')
    a.set_ylabel('fraction of the dense model')
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    colors = dict(emb='k', head='tab:blue', qk='tab:orange', v='tab:green', mlp='tab:red')
    units = {m.name: max(r['widths'][m.name][-1] for r in trace) for m in search.modules_list()}
    for m in search.modules_list():
        frac = [r['expected'][m.name] / units[m.name] for r in trace]
        b.plot(steps, frac, color=colors[m.kind], alpha=0.6, lw=1.5 if m.kind == 'emb' else 0.8,
               label=m.kind if m.block in (None, 0) else None)
    b.set_xlabel('search step')
    b.set_ylabel('expected width / units')
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle('OFB search')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prune_ofb(cfg: OFBConfig) -> dict:
    """Search, fold, cut, fine-tune and report. Writes into ``cfg.out``: the fine-tuned run
    directory, ``searched/`` (cut to the chosen widths, before fine-tuning), ``dense/`` when the dense
    model was not a run directory, ``search_trace.json`` and ``.png``, ``report.json`` and
    ``widths.png``."""
    from ..distributed import seed_all
    from .report import plot_widths, widths_of

    cfg.validate()
    di: DistInfo = init_distributed(cfg.device)
    out = Path(cfg.out)
    resume = _load_checkpoint(out) if cfg.resume else None
    if resume is None and any((out / f).exists() for f in ('config.json', TRACE_NAME, CHECKPOINT)):
        raise PruneError(f'{out} already holds a run; choose another --out, or --resume it')
    seed_all(cfg.seed)
    device = di.device
    dense = load_dense(cfg.model).to(device).eval()
    if layout_of(dense).family != 'DeiT':
        raise PruneError(f'OFB searches the widths of DeiT-family models; {cfg.model} is a {layout_of(dense).family} '
                         f'(prune its MLP widths with deitlab prune nvit)')
    search = OFBSearch(copy.deepcopy(dense), cfg.grid, cfg.seed)
    kind, target = cfg.target
    lut = None
    if kind == 'latency':
        lut = latency_table(cfg, dense, di, out)
        search.use_latency_table(lut, dense)
    check_target(search, target)
    if resume is None:
        model = copy.deepcopy(dense)
    else:   # the narrower model the search had reached, and the search's state
        model = layout_of(dense).build(resume['widths'], device=device)
        search.restore(resume['search'])
    train_loader, val_loader, train_set = _loaders(cfg, dense, di)
    if getattr(train_set, 'classes', None) is not None and len(train_set.classes) != dense.num_classes:
        raise PruneError(f'{cfg.model} predicts {dense.num_classes} classes but {cfg.data} has {len(train_set.classes)}')
    barrier()
    out.mkdir(parents=True, exist_ok=True)
    if lut is not None and di.is_main:
        lut.save(out / LUT_NAME)
    label_names = (dense.pretrained_cfg or {}).get('label_names')
    dense_dir = cfg.model if is_run_dir(cfg.model) else str(out / 'dense')
    if dense_dir != cfg.model and di.is_main:
        save_run_dir(dense, dense_dir, label_names)

    per_epoch = len(train_loader)
    steps = cfg.search_steps or max(1, round(cfg.search_epochs * per_epoch))
    if cfg.total_steps is not None and cfg.total_steps <= steps:
        raise PruneError(f'total_steps ({cfg.total_steps}) must exceed the search ({steps} steps)')
    search.install(model)
    pmim = None
    if cfg.pmim:
        pmim = PMIM(model, cfg.seed)
        if resume is not None:
            pmim.restore(resume['pmim'])
        pmim.install(model)   # after the search's hooks, which swap the final norm
    hooks = OFBHooks(search, dense, cfg, steps, per_epoch, pmim, out / CHECKPOINT)
    trainer = Trainer(model, search_optimizer(model, search, cfg, pmim), hooks=[hooks], device=device, dist=di,
                      progress=cfg.progress)
    batches = _forever(train_loader)
    if resume is not None:
        trainer.load_state_dict(resume['trainer'])
        hooks.load_state(resume)
        for _ in range(hooks.steps):   # the stream as far as the checkpoint
            next(batches)
    _log(f'OFB search to {target:g} of the dense {"GMACs" if lut is None else "latency"}: up to {steps} steps, '
         f'lambda 0.99 -> 0.1 over '
         f'{hooks.warmup_steps}, eliminations every {hooks.elim_every}'
         + ('' if resume is None else f'; resumed at step {hooks.steps}'))
    t0 = time.perf_counter()
    if resume is None:
        hooks.record()
    trainer.run_steps(batches, total=steps - hooks.steps, desc='ofb search')
    model = trainer.model   # narrower than at the start when modules were shrunk
    forced = _force_choice(search, cfg.target[1])
    hooks.record()
    reached = float(search.fraction(search.chosen_widths()))
    warning = budget_warning({'gmacs': 'GMACs'}.get(kind, kind), target, reached)
    if warning:
        _log(warning)
    if pmim is not None:
        pmim.remove()
    search_s = time.perf_counter() - t0
    model.eval()
    check = next(iter(val_loader))[0][:16].to(device)
    search.finish(model)
    with torch.no_grad():
        masked_out = model(check)
    masks = search.fold(model)
    compact = densify(model, masks).eval()
    with torch.no_grad():
        gap = float((masked_out - compact(check)).abs().max())
    searched_dir = out / 'searched'
    if di.is_main:
        save_run_dir(compact, searched_dir, label_names)
        (out / TRACE_NAME).write_text(json.dumps(hooks.trace, indent=1))
        plot_trace(hooks.trace, search, target, out / 'search_trace.png')
    barrier()
    finetune = _finetune(cfg, out, hooks.steps, per_epoch, str(searched_dir), dense_dir)
    if finetune is None and di.is_main:
        save_run_dir(compact, out, label_names)
    barrier()
    final = create(str(out)).to(device).eval()
    return _report(cfg, out, dense, final, val_loader, device, di, lut,
                   dict(search_steps=hooks.steps, search_time_s=round(search_s, 1), forced_modules=forced,
                        shrinks=hooks.shrinks, budget_reached=round(reached, 4), warning=warning,
                        search_forward_passes=2 * hooks.steps * cfg.batch_size,
                        masked_vs_cut_max_abs=gap, finetune=finetune, dense_dir=dense_dir,
                        widths_plot=str(plot_widths(widths_of(dense), widths_of(final), out / 'widths.png',
                                                    title=f'OFB target {kind} {target:g}'))
                        if di.is_main else None,
                        config=asdict(cfg)))


def _load_checkpoint(out: Path) -> dict:
    path = out / CHECKPOINT
    if not path.is_file():
        raise PruneError(f'{out} has no {CHECKPOINT} to resume from (it is written at every elimination event)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # truncated or overwritten
        raise PruneError(f'{path} is damaged ({type(e).__name__}); start the search again in a new --out') from None


def _report(cfg: OFBConfig, out: Path, dense: nn.Module, final: nn.Module, val_loader, device, di: DistInfo,
            lut, extra: dict) -> dict:
    from ..bench import count_params, format_table
    from ..evaluate import evaluate
    from .report import speed_rows, widths_of
    acc = {name: evaluate(m, val_loader, device, progress=False)['top1'] for name, m in (('dense', dense),
                                                                                      ('ofb', final))}
    if not di.is_main:
        return dict(rows=[dict(name=k, top1=v) for k, v in acc.items()], run_dir=str(out))
    if cfg.measure:
        rows = speed_rows({'dense': dense, 'ofb': final}, 'dense', cfg.lut_batch, lut)
    else:
        rows = [dict(name=n, params_m=count_params(m) / 1e6, gmacs=layout_of(m).gmacs())
                for n, m in (('dense', dense), ('ofb', final))]
    for r in rows:
        r['top1'] = acc[r['name']]
    report = dict(rows=rows, dense_widths=widths_of(dense), searched_widths=widths_of(final),
                  target=dict(kind=cfg.target[0], value=cfg.target[1]),
                  gmacs_fraction=layout_of(final).gmacs() / layout_of(dense).gmacs(), run_dir=str(out), **extra)
    (out / 'report.json').write_text(json.dumps(report, indent=2, default=str))
    cols = ['name', 'top1', 'params_m', 'gmacs', 'latency_ms', 'images_per_s', 'latency_speedup', 'throughput_ratio',
            'predicted_speedup', 'prediction_error']
    report['table'] = format_table(rows, [c for c in cols if any(c in r for r in rows)])
    return report
