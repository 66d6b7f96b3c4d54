"""The ViT-ResNAS search algorithms over a search space: evolution, random search, NSGA-II.

An architecture is a vector of integer genes (:func:`encode` / :func:`decode`): the index of the
width choice of every stage, the index of the heads and of the MLP choice of every block, and a
keep bit for every skippable block. A :class:`Budget` bounds the candidates: a MACs window
``window * C <= MACs <= C`` (the paper's 0.975) and / or a predicted latency ``<= L`` ms (a
:class:`~deitlab.nas.latency.LatencyTable`).

* :func:`evolve` (the paper's evolutionary search): an initial population of ``population``
  random networks within the budget; then ``iterations`` times, the ``parents`` fittest networks
  evaluated so far give ``mutations`` children by mutation (every gene, with probability
  ``prob``, takes another of its choices) and ``crossovers`` children by uniform crossover of
  two parents (every gene from either). A child that names a network evaluated already (same
  canonical form) or that is outside the budget is drawn again, up to ``max_tries`` times.
* :func:`random_search`: ``n`` random networks within the budget (the baseline).
* :func:`nsga2_search`: NSGA-II (pymoo, optional) on two objectives, fitness up and predicted
  latency (or MACs) down, the budget's upper bounds as constraints; its result's ``front`` is the
  non-dominated set of every feasible network evaluated.

``fitness`` is any function of an :class:`~deitlab.nas.space.Arch` (the search's is the top-1 of
the sub-network on the supernet's held-out images); every algorithm is seeded and reproducible.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..console import log as _log
from .cost import arch_macs
from .space import Arch, SearchSpace, SearchSpaceError

__all__ = ['Budget', 'SearchResult', 'gene_sizes', 'encode', 'decode', 'evolve', 'random_search', 'nsga2_search',
           'pareto_front', 'require_pymoo', 'PYMOO_HINT']

Fitness = Callable[[Arch], float]
PYMOO_HINT = "pip install pymoo (or pip install 'deitlab[nas]')"


# ----------------------------------------------------------------------------- genes

def gene_sizes(space: SearchSpace) -> List[int]:
    """The number of choices of every gene: widths per stage, heads per block, MLP per block, then a
    keep bit per skippable block."""
    return ([len(w) for w in space.widths] + [len(h) for h in space.heads] + [len(m) for m in space.mlp_hidden]
            + [2] * len(space.skippable))


def encode(space: SearchSpace, arch: Arch) -> List[int]:
    space.validate(arch)
    return ([space.widths[s].index(w) for s, w in enumerate(arch.widths)]
            + [space.heads[i].index(h) for i, h in enumerate(arch.heads)]
            + [space.mlp_hidden[i].index(m) for i, m in enumerate(arch.mlp_hidden)]
            + [int(arch.keep[i]) for i in space.skippable])


def decode(space: SearchSpace, genes: Sequence[int]) -> Arch:
    S, n = len(space.widths), space.num_blocks
    g = [int(v) for v in genes]
    if len(g) != S + 2 * n + len(space.skippable):
        raise SearchSpaceError(f'{len(g)} genes, but the space has {S + 2 * n + len(space.skippable)}')
    keep = [True] * n
    for j, i in enumerate(space.skippable):
        keep[i] = bool(g[S + 2 * n + j])
    return Arch([space.widths[s][g[s]] for s in range(S)], [space.heads[i][g[S + i]] for i in range(n)],
                [space.mlp_hidden[i][g[S + n + i]] for i in range(n)], keep)


# ----------------------------------------------------------------------------- budget

def _m(macs: float) -> str:
    return f'{macs / 1e6:.3f}M MACs ({int(macs)})'


@dataclass
class Budget:
    """``macs``: the upper end C of the window ``window * C <= MACs <= C`` (``window`` None: no
    lower end); ``latency``: the largest predicted latency in ms (needs ``table``). Either may be
    None (no bound)."""

    macs: Optional[float] = None
    window: Optional[float] = 0.975
    latency: Optional[float] = None
    table: Optional[object] = None   # a LatencyTable

    def __post_init__(self):
        if self.latency is not None and self.table is None:
            raise SearchSpaceError('a latency budget needs a latency table to predict with')
        if self.window is not None and not 0 < self.window <= 1:
            raise SearchSpaceError(f'the MACs window must be in (0, 1], got {self.window}')

    def cost(self, space: SearchSpace, arch: Arch) -> Tuple[int, Optional[float]]:
        """(MACs, predicted ms or None without a table)."""
        return arch_macs(space, arch), (self.table.predict(space, arch) if self.table is not None else None)

    def ok(self, macs: float, latency: Optional[float]) -> bool:
        if self.macs is not None and not (self.window or 0) * self.macs <= macs <= self.macs:
            return False
        return self.latency is None or latency <= self.latency

    def check(self, space: SearchSpace, name: str) -> None:
        """``SearchSpaceError`` when no network of ``space`` can meet the budget: the smallest is
        above it, or the largest below the MACs window."""
        small, large = space.smallest(), space.largest()
        if self.macs is not None:
            lo = arch_macs(space, small)
            if lo > self.macs:
                raise SearchSpaceError(f'the smallest network of space {name!r} has {_m(lo)}, above the budget of '
                                       f'{_m(self.macs)}; raise --macs')
            hi = arch_macs(space, large)
            if self.window is not None and hi < self.window * self.macs:
                raise SearchSpaceError(f'the largest network of space {name!r} has {_m(hi)}, below the MACs window '
                                       f'{self.window:g} x {_m(self.macs)}: no network fits; lower --macs')
        if self.latency is not None:
            lo = self.table.predict(space, small)
            if lo > self.latency:
                raise SearchSpaceError(f'the smallest network of space {name!r} is predicted at {lo:.3f} ms, above '
                                       f'the latency budget of {self.latency:g} ms; raise --latency')

    def to_dict(self) -> dict:
        low = self.window * self.macs if self.macs is not None and self.window is not None else None
        return dict(macs=self.macs, window=self.window if low is not None else None, macs_low=low,
                    latency_ms=self.latency)


# ----------------------------------------------------------------------------- bookkeeping

@dataclass
class SearchResult:
    """``history``: every network evaluated, in order (arch, macs, latency_ms, fitness,
    generation, origin); ``best``: the fittest (fewer MACs on a tie); ``front``: NSGA-II's
    non-dominated set; ``stats``: draws, duplicates and budget rejections."""

    method: str
    objective: Optional[str] = None   # the cost key of NSGA-II's front: 'macs' or 'latency_ms'
    history: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    front: List[dict] = field(default_factory=list)
    stats: Dict[str, int] = field(default_factory=lambda: dict(draws=0, duplicates=0, over_budget=0, gave_up=0))

    def to_dict(self) -> dict:
        return dict(method=self.method, evaluated=self.history, best=self.best, front=self.front,
                    front_objective=self.objective, stats=self.stats)


class _Book:
    """The networks seen (canonical form), the evaluations and the counters of one search."""

    def __init__(self, space: SearchSpace, fitness: Fitness, budget: Budget, result: SearchResult):
        self.space, self.fitness, self.budget, self.result = space, fitness, budget, result
        self.seen: Dict[Arch, dict] = {}

    def admit(self, arch: Arch) -> Optional[Tuple[int, Optional[float]]]:
        """(MACs, latency) if ``arch`` is new and within the budget, else None (counted)."""
        st = self.result.stats
        st['draws'] += 1
        if self.space.canonical(arch) in self.seen:
            st['duplicates'] += 1
            return None
        macs, lat = self.budget.cost(self.space, arch)
        if not self.budget.ok(macs, lat):
            st['over_budget'] += 1
            return None
        return macs, lat

    def evaluate(self, arch: Arch, cost: Tuple[int, Optional[float]], generation: int, origin: str) -> dict:
        key = self.space.canonical(arch)
        entry = dict(arch=key.to_dict(), macs=int(cost[0]), latency_ms=cost[1], fitness=float(self.fitness(key)),
                     generation=generation, origin=origin)
        self.seen[key] = entry
        self.result.history.append(entry)
        return entry

    def draw(self, make: Callable[[], Arch], tries: int) -> Optional[Tuple[Arch, tuple]]:
        for _ in range(tries):
            arch = make()
            cost = self.admit(arch)
            if cost is not None:
                return arch, cost
        self.result.stats['gave_up'] += 1
        return None


def _best(entries: Sequence[dict]) -> Optional[dict]:
    return max(entries, key=lambda e: (e['fitness'], -e['macs']), default=None)


def _initial(book: _Book, n: int, rng: random.Random, max_tries: int, origin: str = 'random') -> List[dict]:
    """``n`` random networks within the budget, evaluated; an error when none is found."""
    out = []
    for _ in range(n):
        got = book.draw(lambda: book.space.sample(rng), max_tries)
        if got is not None:
            out.append(book.evaluate(*got, generation=0, origin=origin))
    if not out:
        raise SearchSpaceError(f'no network within the budget ({book.budget.to_dict()}) was found in {n * max_tries} '
                               f'random draws; widen the budget (--macs-window, --macs, --latency) or raise '
                               f'--max-tries')
    if len(out) < n:
        _log(f'warning: only {len(out)} of {n} random networks within the budget were found ({max_tries} draws each)')
    return out


# ----------------------------------------------------------------------------- evolution and random search

def _mutate(space: SearchSpace, sizes: List[int], parent: Arch, prob: float, rng: random.Random) -> Arch:
    genes = encode(space, parent)
    for i, n in enumerate(sizes):
        if n > 1 and rng.random() < prob:
            genes[i] = rng.choice([v for v in range(n) if v != genes[i]])
    return decode(space, genes)


def _crossover(space: SearchSpace, a: Arch, b: Arch, rng: random.Random) -> Arch:
    return decode(space, [x if rng.random() < 0.5 else y for x, y in zip(encode(space, a), encode(space, b))])


def evolve(space: SearchSpace, fitness: Fitness, budget: Budget, *, population: int = 16, iterations: int = 3,
           parents: int = 4, mutations: int = 4, crossovers: int = 4, prob: float = 0.3, seed: int = 0,
           max_tries: int = 500, name: str = 'space', log: bool = True) -> SearchResult:
    """The evolutionary search (see the module docstring); the best is the fittest network
    evaluated, so it is at least as fit as the initial population's best."""
    if parents < 1 or population < 1 or iterations < 0 or mutations < 0 or crossovers < 0 or not 0 <= prob <= 1:
        raise SearchSpaceError(f'evolution needs population >= 1, parents >= 1, iterations / mutations / crossovers '
                               f'>= 0 and prob in [0, 1]; got {population}, {parents}, {iterations} / {mutations} / '
                               f'{crossovers}, {prob}')
    budget.check(space, name)
    rng = random.Random(seed)
    result = SearchResult('evolution')
    book = _Book(space, fitness, budget, result)
    sizes = gene_sizes(space)
    _initial(book, population, rng, max_tries)
    if log:
        _log(f'generation 0: {len(result.history)} networks, best top-1 {_best(result.history)["fitness"]:.2f}')
    for gen in range(1, iterations + 1):
        top = sorted(result.history, key=lambda e: (-e['fitness'], e['macs']))[:parents]
        archs = [Arch.from_dict(e['arch']) for e in top]
        before = len(result.history)
        makers = ([('mutation', lambda: _mutate(space, sizes, rng.choice(archs), prob, rng))] * mutations
                  + [('crossover', lambda: _crossover(space, *rng.sample(archs, 2), rng))] *
                  (crossovers if len(archs) > 1 else 0))
        for origin, make in makers:   # the parents stay those of the generation's start
            got = book.draw(make, max_tries)
            if got is not None:
                book.evaluate(*got, generation=gen, origin=origin)
        if log:
            _log(f'generation {gen}: {len(result.history) - before} new networks, best top-1 '
                 f'{_best(result.history)["fitness"]:.2f}')
    result.best = _best(result.history)
    return result


def random_search(space: SearchSpace, fitness: Fitness, budget: Budget, n: int, *, seed: int = 0,
                  max_tries: int = 500, name: str = 'space') -> SearchResult:
    """The best of ``n`` distinct random networks within the budget."""
    if n < 1:
        raise SearchSpaceError(f'random search needs n >= 1, got {n}')
    budget.check(space, name)
    result = SearchResult('random')
    _initial(_Book(space, fitness, budget, result), n, random.Random(seed), max_tries)
    result.best = _best(result.history)
    return result


# ----------------------------------------------------------------------------- NSGA-II

def pareto_front(entries: Sequence[dict], cost: str = 'macs') -> List[dict]:
    """The entries no other entry dominates (fitness higher or equal and ``cost`` lower or equal,
    one of them strictly), by increasing cost; of entries with equal objectives, the first."""
    front, best = [], None
    for e in sorted(entries, key=lambda e: (e[cost], -e['fitness'])):
        if best is None or e['fitness'] > best:
            front.append(e)
            best = e['fitness']
    return front


def require_pymoo() -> None:
    """``SearchSpaceError`` naming the pip command when pymoo (NSGA-II) is not installed."""
    import importlib.util
    try:
        found = importlib.util.find_spec('pymoo') is not None
    except (ImportError, ValueError):   # a stub module without a spec
        found = False
    if not found:
        raise SearchSpaceError(f'NSGA-II needs pymoo, which is not installed: {PYMOO_HINT}')


def nsga2_search(space: SearchSpace, fitness: Fitness, budget: Budget, *, population: int = 16, iterations: int = 3,
                 seed: int = 0, objective: Optional[str] = None, name: str = 'space', log: bool = True) -> SearchResult:
    """NSGA-II (pymoo) over the integer genes: maximise fitness, minimise ``objective``
    ('latency', the table's prediction, or 'macs'; default: latency when the budget has a table);
    the budget's upper bounds (MACs <= C, latency <= L) are constraints, and an infeasible
    candidate is not evaluated. ``iterations`` generations follow the initial population, each of
    ``population`` offspring. ``front``: the non-dominated feasible networks; ``best``: the
    fittest of them."""
    require_pymoo()
    import numpy as np
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling
        from pymoo.optimize import minimize
    except ImportError as e:   # installed but broken or of an unknown version
        raise SearchSpaceError(f'NSGA-II needs pymoo, which cannot be imported ({e}): {PYMOO_HINT}') from None
    objective = objective or ('latency' if budget.table is not None else 'macs')
    if objective not in ('latency', 'macs'):
        raise SearchSpaceError(f"the NSGA-II objective must be 'latency' or 'macs', got {objective!r}")
    if objective == 'latency' and budget.table is None:
        raise SearchSpaceError('NSGA-II on latency needs a latency table (--lut or --latency)')
    if population < 2 or iterations < 0:
        raise SearchSpaceError(f'NSGA-II needs population >= 2 and iterations >= 0, got {population}, {iterations}')
    budget = dataclasses.replace(budget, window=None)   # the front spans the trade-off below the budget
    budget.check(space, name)
    key = 'latency_ms' if objective == 'latency' else 'macs'
    result = SearchResult('nsga2', key)
    book = _Book(space, fitness, budget, result)
    sizes = gene_sizes(space)
    bounds = [b for b in (budget.macs, budget.latency) if b is not None]

    class _Problem(Problem):
        def __init__(self):
            super().__init__(n_var=len(sizes), n_obj=2, n_ieq_constr=len(bounds), xl=0,
                             xu=np.array(sizes) - 1, vtype=int)
            self.generation = 0

        def _evaluate(self, X, out, *args, **kwargs):
            F, G = [], []
            for row in np.asarray(X):
                arch = space.canonical(decode(space, [int(round(v)) for v in row]))
                macs, lat = budget.cost(space, arch)
                cons = [v / b - 1 for v, b in ((macs, budget.macs), (lat, budget.latency)) if b is not None]
                result.stats['draws'] += 1
                if arch in book.seen:
                    result.stats['duplicates'] += 1
                    entry = book.seen[arch]
                elif budget.ok(macs, lat):
                    entry = book.evaluate(arch, (macs, lat), self.generation, 'nsga2')
                else:
                    result.stats['over_budget'] += 1
                    entry = dict(fitness=0.0)
                F.append([-entry['fitness'], lat if objective == 'latency' else macs])
                G.append(cons)
            out['F'] = np.array(F, dtype=float)
            if bounds:
                out['G'] = np.array(G, dtype=float)
            if log:
                _log(f'NSGA-II generation {self.generation}: {len(result.history)} networks evaluated')
            self.generation += 1

    algorithm = NSGA2(pop_size=population, sampling=IntegerRandomSampling(),
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    minimize(_Problem(), algorithm, ('n_gen', iterations + 1), seed=seed, verbose=False)
    if not result.history:
        raise SearchSpaceError(f'NSGA-II found no network within the budget ({budget.to_dict()}); widen it')
    result.front = pareto_front(result.history, key)
    result.best = _best(result.front)
    return result
