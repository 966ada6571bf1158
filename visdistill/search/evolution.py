"""Exhaustive ranking and regularised (aging) evolution over a :class:`SearchSpace`.

Regularised evolution (Real et al., AAAI 2019), as DisWOT's NAS-Bench-201 search runs it:
a population of ``population`` members; each cycle samples ``sample`` of them, picks the
parent at random among the **best** ``parent_top_k`` of the sample, adds its mutated (or,
where the space allows, crossed-over) child and removes the oldest member. The official
script sorts the sample ascending and so breeds from the *worst* five; here
the sample is sorted by score, highest first.

Everything random draws from one ``random.Random(seed)``, and score functions are called
once per distinct candidate (cached), so a search is deterministic given its seed and a
deterministic score function.
"""

from __future__ import annotations

import functools
import random
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..formatting import format_count
from .scores import DisWOTScore
from .spaces import (
    Candidate,
    CandidateList,
    Constraints,
    Cost,
    GeneSpace,
    SearchSpace,
)

ScoreFn = Callable[[Candidate], "float | DisWOTScore"]


class CandidateError(ConfigError):
    """A candidate that cannot be built or run (e.g. a fixed-size model at the data's size).
    Raised by a score or cost function, it makes the search skip that candidate with a
    warning instead of stopping."""


CostFn = Callable[..., Cost]


@dataclass
class Evaluated:
    """A scored candidate: ``score`` (higher = better), its components, its cost (when
    measured) and ``order``, its position in the evaluation sequence."""

    candidate: Candidate
    score: float
    components: dict[str, float | None] = field(default_factory=dict)
    cost: Cost | None = None
    order: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.candidate.label,
            "arch": self.candidate.arch,
            "model_kwargs": self.candidate.model_kwargs,
            "score": self.score,
            **{k: v for k, v in self.components.items() if k != "score"},
            "order": self.order,
        }
        if self.cost is not None:
            out.update(params=self.cost.params, flops=self.cost.flops)
            out["latency_ms"] = self.cost.latency_ms
        return out


@dataclass
class SearchResult:
    """``ranking``: every scored candidate, best first (ties: first evaluated first);
    ``history``: in evaluation order."""

    ranking: list[Evaluated]
    history: list[Evaluated]
    method: str
    seconds: float
    space: str
    rejected: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def best(self) -> Evaluated:
        return self.ranking[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "space": self.space,
            "evaluated": len(self.history),
            "rejected": self.rejected,
            "failed": self.failed,
            "seconds": self.seconds,
            "ranking": [e.as_dict() for e in self.ranking],
        }


def rank(evaluated: Sequence[Evaluated]) -> list[Evaluated]:
    """Best first; equal scores keep evaluation order."""
    return sorted(evaluated, key=lambda e: (-e.score, e.order))


def select_parent(sample: Sequence[Evaluated], top_k: int, rng: random.Random) -> Evaluated:
    """A member drawn uniformly from the ``top_k`` highest-scoring of ``sample``."""
    if not sample:
        raise ValueError("cannot select a parent from an empty sample")
    return rng.choice(rank(sample)[: max(1, top_k)])


class _Evaluator:
    """Scores and costs, each computed once per candidate; constraint checks."""

    def __init__(
        self,
        score_fn: ScoreFn,
        constraints: Constraints | None,
        cost_fn: CostFn | None,
        progress: Any = None,
    ) -> None:
        self.score_fn, self.constraints, self.cost_fn = score_fn, constraints, cost_fn
        self.scores: dict[Candidate, Evaluated] = {}
        self.costs: dict[Candidate, Cost] = {}
        self.history: list[Evaluated] = []
        self.rejected: set[Candidate] = set()
        self.failed: dict[Candidate, str] = {}
        self.progress = progress

    def cost(self, c: Candidate, flops: bool = False, latency: bool = False) -> Cost | None:
        if self.cost_fn is None:
            return None
        known = self.costs.get(c)
        if (
            known is None
            or (flops and known.flops is None)
            or (latency and known.latency_ms is None)
        ):
            known = self.cost_fn(c, flops=flops, latency=latency)
            self.costs[c] = known
        return known

    def violations(self, c: Candidate) -> list[str]:
        cons = self.constraints
        if cons is None or not cons.active or self.cost_fn is None:
            return []
        cost = self.cost(c, flops=cons.max_flops is not None)
        found = cons.violations(cost)
        if not found and cons.max_latency_ms is not None:
            # Latency is measured on the real model: only for those that pass the rest.
            found = cons.violations(self.cost(c, flops=cons.max_flops is not None, latency=True))
        return found

    def feasible(self, c: Candidate) -> bool:
        if c in self.scores:
            return True
        if c in self.rejected:
            return False
        try:
            if self.violations(c):
                self.rejected.add(c)
                return False
        except CandidateError as e:
            self._skip(c, e)
            return False
        return True

    def _skip(self, c: Candidate, error: Exception) -> None:
        warnings.warn(f"skipping {c.label}: {error}", stacklevel=3)
        self.rejected.add(c)
        self.failed[c] = str(error)

    def evaluate(self, c: Candidate) -> tuple[Evaluated | None, bool]:
        """``(evaluated, new)``; ``new`` is False for a cached candidate; ``(None, False)``
        for a candidate whose score function raised :class:`CandidateError`."""
        if c in self.scores:
            return self.scores[c], False
        if c in self.failed:
            return None, False
        try:
            result = self.score_fn(c)
        except CandidateError as e:
            self._skip(c, e)
            return None, False
        if isinstance(result, DisWOTScore):
            score, components = result.total, result.as_dict()
        else:
            score, components = float(result), {}
        e = Evaluated(c, score, components, self.costs.get(c), order=len(self.history))
        self.scores[c] = e
        self.history.append(e)
        if self.progress is not None:
            self.progress(e)
        return e, True


def _no_feasible_error(space: SearchSpace, constraints: Constraints, costs: dict[Candidate, Cost]):
    known = [(c, cost) for c, cost in costs.items() if cost is not None]
    lines = [
        f"no candidate of {space.describe()} satisfies the constraints ({constraints_text(constraints)})"
    ]
    for attr, limit, unit in (
        ("params", constraints.max_params, "params"),
        ("flops", constraints.max_flops, "FLOPs"),
        ("latency_ms", constraints.max_latency_ms, "ms"),
    ):
        values = [(getattr(cost, attr), c) for c, cost in known if getattr(cost, attr) is not None]
        if limit is None or not values:
            continue
        value, c = min(values, key=lambda v: v[0])
        shown = f"{value:.1f}" if attr == "latency_ms" else format_count(value)
        if value > limit:
            lines.append(
                f"the smallest candidate by {unit} is {c.label} with {shown} {unit} "
                f"(limit {format_count(limit) if attr != 'latency_ms' else limit})"
            )
    lines.append("raise the limits or choose a space with smaller models")
    return ConfigError("; ".join(lines))


def constraints_text(c: Constraints) -> str:
    parts = []
    if c.max_params is not None:
        parts.append(f"max params {format_count(c.max_params)}")
    if c.max_flops is not None:
        parts.append(f"max FLOPs {format_count(c.max_flops)}")
    if c.max_latency_ms is not None:
        parts.append(f"max latency {c.max_latency_ms:g} ms")
    return ", ".join(parts) or "none"


class RegularizedEvolution:
    """Aging evolution with top-k parent selection.

    Args:
        space: the search space.
        score_fn: ``candidate -> float | DisWOTScore`` (higher = better).
        population: members kept (DisWOT NB201: 36); ``None``: ``min(36, budget // 2)``.
        sample: tournament size (NB201: 8).
        parent_top_k: the parent is drawn from the best ``parent_top_k`` of the sample
            (NB201: 5).
        crossover_prob: chance that a child is a crossover of the two best-ranked parents
            drawn from the sample (spaces without structure always mutate).
        constraints, cost_fn: candidates whose cost exceeds ``constraints`` are never
            scored; ``cost_fn(candidate, flops=..., latency=...)`` measures them.
        seed: seeds every random choice.
        max_attempts: draws tried to find a feasible initial member or child.
    """

    def __init__(
        self,
        space: SearchSpace,
        score_fn: ScoreFn,
        population: int | None = None,
        sample: int = 8,
        parent_top_k: int = 5,
        crossover_prob: float = 0.5,
        constraints: Constraints | None = None,
        cost_fn: CostFn | None = None,
        seed: int = 0,
        max_attempts: int = 200,
    ) -> None:
        if sample < 1 or parent_top_k < 1 or (population is not None and population < 1):
            raise ConfigError("population, sample and parent_top_k must be at least 1")
        if not 0 <= crossover_prob <= 1:
            raise ConfigError(f"crossover_prob must be in [0, 1], got {crossover_prob}")
        self.space, self.score_fn = space, score_fn
        self.population, self.sample, self.parent_top_k = population, sample, parent_top_k
        self.crossover_prob, self.seed, self.max_attempts = crossover_prob, seed, max_attempts
        self.constraints, self.cost_fn = constraints, cost_fn

    def run(self, budget: int, progress: Any = None) -> SearchResult:
        """Score up to ``budget`` distinct candidates; stops early when the space is used up."""
        if budget < 1:
            raise ConfigError(f"budget must be at least 1 evaluation, got {budget}")
        start = time.perf_counter()
        rng = random.Random(self.seed)
        ev = _Evaluator(self.score_fn, self.constraints, self.cost_fn, progress)
        size = _size(self.space)
        limit = min(budget, size) if size is not None else budget
        population = self.population or min(36, max(2, budget // 2))
        members: deque[Evaluated] = deque()

        def feasible_draw(draw: Callable[[], Candidate]) -> Candidate | None:
            for _ in range(self.max_attempts):
                c = draw()
                if ev.feasible(c):
                    return c
            return None

        space = self.space
        if self.constraints is not None and self.constraints.active:
            smallest = space.smallest()
            if smallest is not None and not ev.feasible(smallest):
                raise _no_feasible_error(space, self.constraints, ev.costs)
            if not isinstance(space, GeneSpace) and size is not None:
                # An unstructured list: filter it once, so sampling never wastes draws.
                space = CandidateList(feasible_candidates(space, ev), space.describe())
                size = len(space)
                limit = min(budget, size)
        while len(members) < population and len(ev.history) < limit:
            c = feasible_draw(lambda: space.sample(rng))
            if c is None:
                if not ev.history:
                    raise _no_feasible_error(space, self.constraints or Constraints(), ev.costs)
                break
            e, new = ev.evaluate(c)
            if new:
                members.append(e)
            elif len(ev.scores) + len(ev.failed) >= (size or float("inf")):
                break
        stale = 0
        while len(ev.history) < limit and members and stale < 20 * self.max_attempts:
            tournament = rng.sample(list(members), min(self.sample, len(members)))
            parent = select_parent(tournament, self.parent_top_k, rng)
            use_crossover = (
                len(tournament) > 1
                and rng.random() < self.crossover_prob
                and isinstance(space, GeneSpace)
            )
            if use_crossover:
                rest = [m for m in tournament if m is not parent]
                other = select_parent(rest, self.parent_top_k, rng)
                draw = functools.partial(space.crossover, parent.candidate, other.candidate, rng)
            else:
                draw = functools.partial(space.mutate, parent.candidate, rng)
            child = feasible_draw(draw)
            if child is None:
                stale += 1
                continue
            e, new = ev.evaluate(child)
            stale = 0 if new else stale + 1
            if e is None:
                continue
            members.append(e)
            members.popleft()
        return _result(ev, "evolution", start, self.space)


def _result(ev: _Evaluator, method: str, start: float, space: SearchSpace) -> SearchResult:
    if not ev.history:
        failures = "; ".join(f"{c.label}: {msg}" for c, msg in list(ev.failed.items())[:5])
        raise ConfigError(f"no candidate of {space.describe()} could be scored ({failures})")
    return SearchResult(
        ranking=rank(ev.history),
        history=ev.history,
        method=method,
        seconds=time.perf_counter() - start,
        space=space.describe(),
        rejected=len(ev.rejected),
        failed=dict((c.label, msg) for c, msg in ev.failed.items()),
    )


def _size(space: SearchSpace) -> int | None:
    try:
        return len(space)
    except NotImplementedError:
        return None


def exhaustive_search(
    space: SearchSpace,
    score_fn: ScoreFn,
    constraints: Constraints | None = None,
    cost_fn: CostFn | None = None,
    progress: Any = None,
    check_progress: Any = None,
) -> SearchResult:
    """Score every feasible candidate of a finite space and rank them."""
    start = time.perf_counter()
    ev = _Evaluator(score_fn, constraints, cost_fn, progress)
    feasible = feasible_candidates(space, ev, check_progress)
    for c in feasible:
        ev.evaluate(c)
    return _result(ev, "exhaustive", start, space)


def feasible_candidates(space: SearchSpace, ev: _Evaluator, check_progress: Any = None):
    candidates = space.candidates()
    feasible = []
    for c in candidates:
        if ev.feasible(c):
            feasible.append(c)
        if check_progress is not None:
            check_progress(c)
    if not feasible:
        raise _no_feasible_error(space, ev.constraints or Constraints(), ev.costs)
    return feasible


def search(
    space: SearchSpace,
    score_fn: ScoreFn,
    budget: int = 50,
    constraints: Constraints | None = None,
    cost_fn: CostFn | None = None,
    seed: int = 0,
    method: str = "auto",
    progress: Any = None,
    **evolution_kwargs: Any,
) -> SearchResult:
    """Rank the space's candidates by ``score_fn``.

    Args:
        method: ``"exhaustive"``, ``"evolution"`` or ``"auto"`` (exhaustive when the space
            has at most ``budget`` candidates, else evolution).
        budget: most candidates scored (evolution).
        progress: ``callable(Evaluated)`` called after each new score (progress bars).
        **evolution_kwargs: :class:`RegularizedEvolution` options.
    """
    if method not in ("auto", "exhaustive", "evolution"):
        raise ConfigError(f"method must be auto, exhaustive or evolution, got {method!r}")
    if budget < 1:
        raise ConfigError(f"budget must be at least 1 evaluation, got {budget}")
    size = _size(space)
    if method == "auto":
        method = "exhaustive" if size is not None and size <= budget else "evolution"
    if method == "exhaustive":
        return exhaustive_search(space, score_fn, constraints, cost_fn, progress)
    evo = RegularizedEvolution(
        space, score_fn, constraints=constraints, cost_fn=cost_fn, seed=seed, **evolution_kwargs
    )
    return evo.run(budget, progress)
