"""When the pruner removes groups, and the plan it announces before it starts.

Two schedules (``NViTConfig.schedule``, ``deitlab prune nvit --schedule``):

- ``linear``: every ``interval`` steps the budget fraction the model must reach falls linearly,
  from 1 at step 0 to the target at ``prune_steps``; each event removes groups until its goal is
  met. The target is reached at a known step.
- ``nvit``: NViT's ImageNet schedule, ``groups_per_event`` groups (default 2) every ``interval``
  steps (default 100) until the target is met (at most ``max_prune_steps``). How long that takes
  depends on the model, the group sizes and the target: the plan estimates it by removing groups
  in the order of the dense model's weight magnitudes (``estimate_nvit_events``).

Which one runs when the config does not name it (``resolve_schedule``): ``linear`` when
``prune_steps`` is given, ``nvit`` when ``groups_per_event`` is given (NViT's knob), and otherwise
``linear`` over a budget derived from the data (``auto_prune_steps``): ``AUTO_EPOCHS`` epochs of the
training split, clamped to ``[AUTO_MIN_STEPS, AUTO_MAX_STEPS]`` steps and to half of
``total_steps`` when that is given, in about ``AUTO_EVENTS`` events (``interval`` = steps / 40
unless given; the steps are rounded down to whole intervals).
"""
from __future__ import annotations

from typing import Optional

from .base import PruneError

SCHEDULES = ('linear', 'nvit')
NVIT_INTERVAL = 100          # NViT's ImageNet schedule: 2 groups every 100 steps
NVIT_GROUPS = 2
AUTO_EPOCHS = 2              # the default linear schedule prunes over two epochs of the training split...
AUTO_MIN_STEPS = 200         # ...but at least this many steps (tiny data sets)...
AUTO_MAX_STEPS = 2000        # ...and at most this many (large ones)...
AUTO_EVENTS = 40             # ...in about this many pruning events


def check_schedule(cfg) -> None:
    """``PruneError`` for an unknown schedule or settings that belong to the other schedule."""
    if cfg.schedule is None:
        return
    if cfg.schedule not in SCHEDULES:
        raise PruneError(f'unknown schedule {cfg.schedule!r}; choose linear (reach the target linearly over '
                         f'--prune-steps, by default a budget derived from the data) or nvit (the paper\'s '
                         f'--groups-per-event groups every --interval steps until the target)')
    if cfg.schedule == 'nvit' and cfg.prune_steps is not None:
        raise PruneError('--prune-steps sets the linear schedule; the nvit schedule removes --groups-per-event '
                         'groups every --interval steps until the target is met (drop one of the two)')
    if cfg.schedule == 'linear' and cfg.groups_per_event is not None:
        raise PruneError('--groups-per-event sets the nvit schedule; the linear schedule removes as many groups '
                         'as its falling goal needs (drop one of the two)')


def resolve_schedule(cfg) -> str:
    """The schedule a config runs: its ``schedule``, else ``linear`` with ``prune_steps``, ``nvit``
    with ``groups_per_event``, and ``linear`` over a derived budget otherwise."""
    if cfg.schedule is not None:
        return cfg.schedule
    if cfg.prune_steps is None and cfg.groups_per_event is not None:
        return 'nvit'
    return 'linear'


def auto_prune_steps(batches_per_epoch: Optional[int], total_steps: Optional[int] = None) -> int:
    """The default linear schedule's length: ``AUTO_EPOCHS`` epochs, clamped to
    ``[AUTO_MIN_STEPS, AUTO_MAX_STEPS]`` and to half of ``total_steps`` (at least 1). Without a
    known epoch length (a loader without ``len``): ``AUTO_MIN_STEPS``."""
    steps = AUTO_MIN_STEPS if not batches_per_epoch else AUTO_EPOCHS * int(batches_per_epoch)
    steps = min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, steps))
    if total_steps is not None:
        steps = min(steps, max(1, int(total_steps) // 2))
    return steps


def finetune_steps(cfg, prune_steps: int, batches_per_epoch: Optional[int]) -> Optional[int]:
    """Optimizer steps of the fine-tune that follows ``prune_steps`` of pruning (as ``prune_nvit``
    runs it): the rest of ``total_steps``, or ``finetune_epochs`` epochs capped at
    ``finetune_steps`` per epoch. None when the epoch length is unknown."""
    if cfg.total_steps is not None:
        rest = cfg.total_steps - prune_steps
        if rest < 1:
            return 0
        if not batches_per_epoch:
            return rest
        epochs = -(-rest // batches_per_epoch)
        return epochs * min(batches_per_epoch, -(-rest // epochs))
    if not batches_per_epoch:
        return None
    per_epoch = batches_per_epoch if cfg.finetune_steps is None else min(batches_per_epoch, cfg.finetune_steps)
    return cfg.finetune_epochs * per_epoch


def make_plan(cfg, batches_per_epoch: Optional[int], nvit_events: Optional[int] = None) -> dict:
    """The schedule a run will follow: ``schedule``, ``source`` (``given``: the config names it or
    its length; ``auto``: derived from the data), ``interval``, ``prune_steps`` (the step at which
    the target is met, a whole number of intervals; for ``nvit`` an estimate from ``nvit_events``),
    ``events``, ``goal_steps`` (linear: where the goal reaches the target), ``groups_per_event``
    (``nvit`` only), ``finetune_steps`` and ``batches_per_epoch``."""
    schedule = resolve_schedule(cfg)
    if schedule == 'nvit':
        interval = cfg.interval or NVIT_INTERVAL
        cap = max(1, cfg.max_prune_steps // interval)
        events = min(cap, nvit_events) if nvit_events is not None else None
        steps = events * interval if events is not None else None
        plan = dict(schedule='nvit', source='given', interval=interval, prune_steps=steps, events=events,
                    estimated=True, groups_per_event=cfg.groups_per_event or NVIT_GROUPS)
    elif cfg.prune_steps is not None:
        interval = cfg.interval or NVIT_INTERVAL
        if cfg.prune_steps < interval:
            raise PruneError(f'prune_steps ({cfg.prune_steps}) must be at least one interval ({interval}); '
                             f'lower --interval')
        events = -(-cfg.prune_steps // interval)
        plan = dict(schedule='linear', source='given', interval=interval, prune_steps=events * interval,
                    events=events, estimated=False, goal_steps=cfg.prune_steps)
    else:
        budget = auto_prune_steps(batches_per_epoch, cfg.total_steps)
        interval = cfg.interval or max(1, budget // AUTO_EVENTS)
        events = max(1, budget // interval)
        plan = dict(schedule='linear', source='auto', interval=interval, prune_steps=events * interval,
                    events=events, estimated=False, goal_steps=events * interval)
    plan['batches_per_epoch'] = batches_per_epoch
    plan['finetune_steps'] = finetune_steps(cfg, plan['prune_steps'], batches_per_epoch) \
        if plan['prune_steps'] is not None else None
    return plan


def linear_goal(step: int, prune_steps: int, target: float) -> float:
    """The linear schedule's budget fraction at ``step``: 1 at step 0, ``target`` from ``prune_steps`` on."""
    frac = min(1.0, step / prune_steps)
    return 1.0 - (1.0 - target) * frac


def estimate_nvit_events(pruner, cap: int, scores: Optional[dict] = None) -> Optional[int]:
    """Events the ``nvit`` schedule needs from the pruner's current masks to its target: removing
    ``groups_per_event`` groups per event, ranked by ``scores`` with the latency penalty, on a copy of
    the masks; None when not reached within ``cap`` events. Before any training there are no
    saliencies: random ones (seeded) stand in, which spread removals over the layers as the real
    ones tend to (the weight magnitudes, tried instead, overestimated the steps up to 3x on small
    DeiTs). ``NViTPruner.run`` re-estimates with the real scores after the first event."""
    import torch
    from .ranking import rank_groups, remove_group
    from .saliency import Saliency
    if scores is None:
        shapes = Saliency('magnitude', 0.0, None).event(pruner.model)   # the layout of the scores
        g = torch.Generator().manual_seed(0)
        scores = {k: (torch.rand(v.shape, generator=g) if torch.is_tensor(v) else
                      [torch.rand(t.shape, generator=g) for t in v]) for k, v in shapes.items()}
    masks = pruner.masks.copy()
    per_event = pruner.cfg.groups_per_event or NVIT_GROUPS
    lut, lam = pruner.lut, pruner.cfg.lam
    for event in range(1, cap + 1):
        savings = lut.unit_savings(masks.kept()) if (lut is not None and lam) else None
        groups = rank_groups(scores, savings, masks, lam, pruner.group_sizes, pruner.min_keep, pruner.prune_types)
        if not groups:
            return None
        for g in groups[:per_event]:
            remove_group(masks, g)
            if pruner.budget.reached(masks.kept()):
                return event
    return None


def _minutes(seconds: float) -> str:
    return f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.0f} s'


def plan_line(plan: dict, kind: str, target: float) -> str:
    """One line: schedule, steps, events, fine-tune steps and the expected duration."""
    if plan['schedule'] == 'nvit':
        head = f'nvit schedule: {plan["groups_per_event"]} groups every {plan["interval"]} steps until {kind} {target}'
        if plan['prune_steps'] is None:
            head += ' (not reached within the step cap by the estimate)'
        else:
            head += f', about {plan["events"]} events = {plan["prune_steps"]} steps (estimated)'
    else:
        why = ''
        if plan['source'] == 'auto':
            why = (f' ({AUTO_EPOCHS} epochs of {plan["batches_per_epoch"]} batches, clamped to '
                   f'{AUTO_MIN_STEPS}-{AUTO_MAX_STEPS}; --prune-steps or --schedule nvit to change)'
                   if plan['batches_per_epoch'] else ' (epoch length unknown)')
        head = (f'linear schedule to {kind} {target} over {plan["prune_steps"]} steps{why}, '
                f'{plan["events"]} events every {plan["interval"]} steps')
    ft = plan.get('finetune_steps')
    if ft is not None:
        head += f'; then {ft} fine-tune steps'
    step_s = plan.get('step_s')
    if step_s and plan['prune_steps'] is not None:
        prune_s = plan['prune_steps'] * step_s + (plan['events'] or 0) * plan.get('event_s', 0.0)
        head += f'; ~{step_s:.3g} s/step: pruning ~{_minutes(prune_s)}'
        if ft:
            head += f', fine-tuning ~{_minutes(ft * step_s)}'
    return head


def expected_seconds(plan: dict) -> Optional[float]:
    """Pruning plus fine-tuning time the plan expects (None without a step time or known length)."""
    step_s = plan.get('step_s')
    if not step_s or plan['prune_steps'] is None:
        return None
    return plan['prune_steps'] * step_s + (plan['events'] or 0) * plan.get('event_s', 0.0) + \
        (plan.get('finetune_steps') or 0) * step_s

