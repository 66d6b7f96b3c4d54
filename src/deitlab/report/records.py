"""One model of a report: :class:`ModelRecord`, the Pareto front of a set of them, and the error of
``deitlab report``. Torch-free and plotly-free: the command line's error types import it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['ReportError', 'ModelRecord', 'pareto_front', 'front_of', 'unique_names', 'WIDTH_KEYS']

#: per-block widths a record may carry, in the order the widths plot shows them, with their labels
WIDTH_KEYS = (('num_heads', 'heads'), ('qk_dim', 'QK dim / head'), ('v_dim', 'V dim / head'),
              ('mlp_hidden', 'MLP hidden'))


class ReportError(ValueError):
    """Sources that ``deitlab report`` cannot read (none given, a file of an unknown kind, a directory
    without runs), or an output it cannot write, with the reason."""


@dataclass
class ModelRecord:
    """What the report shows of one model.

    ``top1`` (%), ``gmacs`` (per image), ``params`` (count) and ``latency_ms`` (batch-1 latency,
    measured; None when the source has no measurement) are the numbers; ``data`` names the dataset
    ``top1`` is on (models are compared, and their Pareto front drawn, per dataset). ``widths`` are
    per-block widths (``num_heads``, ``qk_dim``, ``v_dim``, ``mlp_hidden`` lists, and
    ``embed_dim``) and ``dense_widths`` those of the model it was pruned from, when known; ``curve``
    the training curve (one dict per epoch with ``epoch``, ``val_top1``, ``train_loss``); ``config``
    whatever configuration the source records; ``machine`` the machine and settings its numbers
    come from (shared by all records of one source); ``notes`` a line on how the numbers were
    obtained; ``extra`` further numbers shown in the details (top-5, throughput, ...).
    """
    name: str
    source: str
    kind: str
    data: Optional[str] = None
    top1: Optional[float] = None
    gmacs: Optional[float] = None
    params: Optional[int] = None
    latency_ms: Optional[float] = None
    widths: Optional[dict] = None
    dense_widths: Optional[dict] = None
    curve: Optional[List[dict]] = None
    config: Optional[dict] = None
    machine: Optional[dict] = None
    notes: str = ''
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def has(self, axis: str) -> bool:
        """Whether the record can be drawn against ``axis`` (``'gmacs'`` or ``'latency_ms'``)."""
        return _finite(self.top1) and _finite(getattr(self, axis))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points ``(cost, accuracy)`` that no other point dominates (a point dominates
    another when its cost is lower or equal and its accuracy higher or equal, one of them strictly),
    sorted by cost, then accuracy. Equal points are all on the front."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        cost, acc = points[i]
        if acc > best:
            front.append(i)
            best = acc
        elif acc == best and front and points[front[-1]] == (cost, acc):
            front.append(i)   # the same point again: not dominated either
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def front_of(records: Sequence[ModelRecord], axis: str) -> Dict[Optional[str], List[int]]:
    """Per dataset (``record.data``), the indices into ``records`` of its Pareto front over ``axis``
    (``'gmacs'`` or ``'latency_ms'``) against ``top1``; records without both numbers are left out."""
    groups: Dict[Optional[str], List[int]] = {}
    for i, r in enumerate(records):
        if r.has(axis):
            groups.setdefault(r.data, []).append(i)
    fronts = {}
    for data, members in groups.items():
        pts = [(float(getattr(records[i], axis)), float(records[i].top1)) for i in members]
        fronts[data] = [members[j] for j in pareto_front(pts)]
    return fronts


def unique_names(records: Sequence[ModelRecord]) -> None:
    """Make the records' names unique in place: a repeated name gets its source's name in front, and
    a number after it if that is not enough."""
    seen: Dict[str, int] = {}
    for r in records:
        seen[r.name] = seen.get(r.name, 0) + 1
    repeated = {n for n, c in seen.items() if c > 1}
    for r in records:
        if r.name in repeated:
            r.name = f'{r.source}: {r.name}'
    taken: Dict[str, int] = {}
    for r in records:
        n = taken.get(r.name, 0)
        taken[r.name] = n + 1
        if n:
            r.name = f'{r.name} ({n + 1})'
