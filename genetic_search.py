"""The optimiser's searches (genetic and random, ask/tell) and the driver that runs them.

`GeneticSearch` and `RandomSearch` propose generations of grid points and rank what they
are told; `drive` advances several searches in lockstep through one backend under a time
budget. Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import structlog

from error_handler import ConfigError, InvariantError
from optimization_backends import Backend
from optimization_scoring import (
    MAX_ERRORS,
    MAX_TRIES,
    MIN_TRADES,
    OBJECTIVE_METRIC,
    Evaluation,
    Job,
    Key,
    Objective,
    Outcome,
    Segment,
    Status,
    StopReason,
    score,
)
from search_space import SearchSpace
from utils.utilities import Clock


if TYPE_CHECKING:
    from config import OptimizationSettings


log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """Search limits and genetic operators (`from_settings` maps OptimizationSettings)."""

    population: int = 32
    generations: int = 10
    seed: int = 42
    objective: Objective = "sharpe"
    time_budget_s: float = 600.0
    workers: int = 1
    scheduler: str | None = None
    min_trades: int = MIN_TRADES
    method: Literal["genetic", "random"] = "genetic"
    elite: int | None = None
    tournament: int = 3
    crossover_rate: float = 0.9
    mutation_rate: float | None = None
    mutation_scale: float = 0.15

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 1:
            raise ConfigError(
                "optimize: population >= 2 and generations >= 1", component="optimize"
            )
        if self.time_budget_s <= 0 or self.min_trades < 0:
            raise ConfigError("optimize: time_budget_s > 0 and min_trades >= 0")
        if self.objective not in OBJECTIVE_METRIC:
            raise ConfigError(f"optimize: unknown objective {self.objective!r}")

    @classmethod
    def from_settings(cls, settings: OptimizationSettings, **overrides: Any) -> SearchOptions:
        """Return options from the `optimization` settings group, with overrides."""
        values: dict[str, Any] = {
            "population": settings.population,
            "generations": settings.generations,
            "seed": settings.seed,
            "objective": settings.objective,
            "time_budget_s": float(settings.time_budget_s),
            "workers": settings.workers,
            "scheduler": settings.scheduler,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def elite_count(self) -> int:
        """Return how many of the best survive unchanged (default 10%, at least one)."""
        return self.elite if self.elite is not None else max(1, round(self.population / 10))


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """What one generation of one search did."""

    generation: int
    evaluated: int
    reused: int
    infeasible: int
    best_objective: float | None
    mean_objective: float | None
    best_params: dict[str, float] | None


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The outcome of one search."""

    method: str
    objective: Objective
    best: Evaluation | None
    leaderboard: tuple[Evaluation, ...]
    history: tuple[GenerationStats, ...]
    evaluated: int
    infeasible: int
    failed: int
    generations_run: int
    generations_planned: int
    stopped: StopReason = "completed"
    elapsed_s: float = 0.0
    errors: tuple[str, ...] = ()

    def as_dict(self, top: int = 20) -> dict[str, Any]:
        """Return plain data for the JSON report (the `top` best candidates)."""
        return {
            "method": self.method,
            "errors": list(self.errors),
            "objective": self.objective,
            "stopped": self.stopped,
            "elapsed_s": self.elapsed_s,
            "generations_run": self.generations_run,
            "generations_planned": self.generations_planned,
            "evaluated": self.evaluated,
            "infeasible": self.infeasible,
            "failed": self.failed,
            "best": self.best.as_dict() if self.best else None,
            "leaderboard": [e.as_dict() for e in self.leaderboard[:top]],
            "history": [dataclasses.asdict(g) for g in self.history],
        }


Feasibility = Callable[[Mapping[str, float]], str | None]


class Search(ABC):
    """Ask/tell bookkeeping shared by the searches: cache, feasibility, scores, history."""

    method = "base"

    def __init__(
        self,
        space: SearchSpace,
        options: SearchOptions,
        *,
        rng: np.random.Generator,
        feasible: Feasibility | None = None,
        initial: Iterable[Mapping[str, float]] = (),
        min_trades: int | None = None,
    ) -> None:
        self.space = space
        self.options = options
        self.rng = rng
        self.feasible = feasible
        self.min_trades = options.min_trades if min_trades is None else min_trades
        self.initial = [space.key(p) for p in initial]
        self.cache: dict[Key, Evaluation] = {}
        self.population: list[Key] = []
        self.generation = 0
        self.evaluated = 0
        self.history: list[GenerationStats] = []
        self._proposed: list[Key] = []
        self._pending: list[Key] = []
        self._infeasible_before = 0

    @property
    def done(self) -> bool:
        """Return True once every planned generation has been told."""
        return self.generation >= self.options.generations

    def ask(self) -> list[dict[str, float]]:
        """Return the next generation's candidates that still need a backtest."""
        self._infeasible_before = self._count(Status.INFEASIBLE)
        self._proposed = self._propose()
        self._pending = list(dict.fromkeys(k for k in self._proposed if k not in self.cache))
        return [self.space.params(k) for k in self._pending]

    def tell(self, outcomes: Sequence[Outcome]) -> None:
        """Record the outcomes of the candidates from `ask`, in order."""
        if len(outcomes) != len(self._pending):
            raise InvariantError(
                f"expected {len(self._pending)} outcomes, got {len(outcomes)}",
                component="optimize",
            )
        for key, outcome in zip(self._pending, outcomes, strict=True):
            self.cache[key] = score(
                self.space.params(key), outcome, self.options.objective, self.min_trades
            )
        self.evaluated += len(self._pending)
        self.population = self._proposed
        self.generation += 1
        self.history.append(self._stats())

    def _stats(self) -> GenerationStats:
        scored = [self.cache[k] for k in dict.fromkeys(self.population)]
        ok = [e.objective for e in scored if e.status is Status.OK]
        best = self.best
        return GenerationStats(
            generation=self.generation,
            evaluated=len(self._pending),
            reused=len(set(self._proposed)) - len(self._pending),
            infeasible=self._count(Status.INFEASIBLE) - self._infeasible_before,
            best_objective=best.objective if best else None,
            mean_objective=float(np.mean(ok)) if ok else None,
            best_params=dict(best.params) if best else None,
        )

    def _count(self, status: Status) -> int:
        return sum(e.status is status for e in self.cache.values())

    def leaderboard(self) -> list[Evaluation]:
        """Return every scored candidate, best first."""
        scored = [e for e in self.cache.values() if e.status in (Status.OK, Status.FEW_TRADES)]
        return sorted(scored, key=lambda e: e.rank_key, reverse=True)

    @property
    def best(self) -> Evaluation | None:
        """Return the best candidate so far, or None."""
        board = self.leaderboard()
        return board[0] if board else None

    def result(self, stopped: StopReason = "completed", elapsed_s: float = 0.0) -> SearchResult:
        """Return the search's result."""
        board = self.leaderboard()
        return SearchResult(
            method=self.method,
            objective=self.options.objective,
            best=board[0] if board else None,
            leaderboard=tuple(board),
            history=tuple(self.history),
            evaluated=self.evaluated,
            infeasible=self._count(Status.INFEASIBLE),
            failed=self._count(Status.FAILED),
            generations_run=self.generation,
            generations_planned=self.options.generations,
            stopped=stopped,
            elapsed_s=elapsed_s,
            errors=tuple(dict.fromkeys(e.error for e in self.cache.values() if e.error).keys())[
                :MAX_ERRORS
            ],
        )

    # -- Proposal helpers --------------------------------------------------------------------

    @abstractmethod
    def _propose(self) -> list[Key]:
        """Return the next generation's keys (cached ones included)."""

    def _is_feasible(self, key: Key) -> bool:
        known = self.cache.get(key)
        if known is not None:
            return known.status is not Status.INFEASIBLE
        if self.feasible is None:
            return True
        params = self.space.params(key)
        reason = self.feasible(params)
        if reason is None:
            return True
        self.cache[key] = Evaluation(params, Status.INFEASIBLE, error=reason)
        return False

    def _fresh(self, make: Callable[[int], Key], taken: set[Key]) -> Key:
        # A feasible key neither seen before nor already in this generation; after
        # MAX_TRIES (a small or mostly infeasible space) the last draw is accepted.
        key = make(0)
        for attempt in range(MAX_TRIES):
            if attempt:
                key = make(attempt)
            if key not in taken and key not in self.cache and self._is_feasible(key):
                break
        taken.add(key)
        return key

    def _seed_generation(self) -> list[Key]:
        taken: set[Key] = set()
        keys = [k for k in dict.fromkeys(self.initial) if self._is_feasible(k)]
        keys = keys[: self.options.population]
        taken.update(keys)
        while len(keys) < self.options.population:
            keys.append(self._fresh(lambda _: self.space.sample(self.rng), taken))
        return keys


class GeneticSearch(Search):
    """Elitist genetic search: tournament selection, BLX crossover, Gaussian mutation."""

    method = "genetic"

    def _propose(self) -> list[Key]:
        if self.generation == 0:
            return self._seed_generation()
        ranked = sorted(
            dict.fromkeys(self.population),
            key=lambda k: self.cache[k].rank_key,
            reverse=True,
        )
        elite = [k for k in ranked if self.cache[k].status in (Status.OK, Status.FEW_TRADES)]
        children = elite[: self.options.elite_count]
        taken = set(children)
        while len(children) < self.options.population:
            children.append(self._fresh(self._child, taken))
        return children

    def _tournament(self) -> Key:
        pop = self.population
        picks = self.rng.integers(0, len(pop), size=max(1, self.options.tournament))
        best = max(picks, key=lambda i: (self.cache[pop[i]].rank_key, -int(i)))
        return pop[int(best)]

    def _child(self, attempt: int) -> Key:
        a, b = self._tournament(), self._tournament()
        dims = self.space.dimensions
        if self.rng.random() < self.options.crossover_rate:
            genes = [d.blend(x, y, self.rng) for d, x, y in zip(dims, a, b, strict=True)]
        else:
            genes = list(a)
        rate = self.options.mutation_rate
        rate = 1.0 / len(dims) if rate is None else rate
        for i, d in enumerate(dims):
            if self.rng.random() < rate:
                genes[i] = d.mutate(genes[i], self.rng, self.options.mutation_scale)
        if attempt and tuple(genes) in (a, b):
            # A redraw that copied a parent mutates one gene for sure.
            i = int(self.rng.integers(0, len(dims)))
            genes[i] = dims[i].mutate(genes[i], self.rng, self.options.mutation_scale)
        return tuple(genes)


class RandomSearch(Search):
    """Uniform random grid points in batches of `population`: the baseline."""

    method = "random"

    def _propose(self) -> list[Key]:
        if self.generation == 0:
            return self._seed_generation()
        taken: set[Key] = set()
        return [
            self._fresh(lambda _: self.space.sample(self.rng), taken)
            for _ in range(self.options.population)
        ]


def make_search(
    space: SearchSpace,
    options: SearchOptions,
    *,
    index: int = 0,
    feasible: Feasibility | None = None,
    initial: Iterable[Mapping[str, float]] = (),
    min_trades: int | None = None,
) -> Search:
    """Return the search `options.method` names, seeded with (seed, index)."""
    cls = GeneticSearch if options.method == "genetic" else RandomSearch
    rng = np.random.default_rng([options.seed, index])
    return cls(space, options, rng=rng, feasible=feasible, initial=initial, min_trades=min_trades)


# -- Driver ----------------------------------------------------------------------------------

Progress = Callable[[int, int, float | None], None]


class _Stepped(Protocol):
    """A search driven a generation at a time: ask for candidates, tell their outcomes."""

    @property
    def done(self) -> bool: ...

    def ask(self) -> list[Any]: ...

    def tell(self, outcomes: Sequence[Any]) -> None: ...


def run_generation(searches: Sequence[tuple[_Stepped, Any]], backend: Backend) -> int:
    """Run one generation of every unfinished search as one batch; return the jobs run.

    Each search is paired with the data segment it evaluates on; all candidates go to
    `backend` together (so a cluster sees one batch) and each search is told its share of
    the outcomes, in order. The genetic and the Pareto drivers both step this way.
    """
    asked = [(s, s.ask(), seg) for s, seg in searches if not s.done]
    jobs: list[Job] = [(p, seg) for _, cands, seg in asked for p in cands]
    outcomes = backend.evaluate(jobs) if jobs else []
    at = 0
    for s, cands, _ in asked:
        s.tell(outcomes[at : at + len(cands)])
        at += len(cands)
    return len(jobs)


def drive(
    searches: Sequence[tuple[Any, Segment]],
    backend: Backend,
    *,
    time_budget_s: float,
    clock: Clock,
    stop: threading.Event | None = None,
    on_generation: Progress | None = None,
    best_of: Callable[[Any], float | None] | None = None,
    after_generation: Callable[[], None] | None = None,
    max_generations: int | None = None,
) -> tuple[StopReason, float]:
    """Run the searches in lockstep, one batch per generation; return why and how long.

    The budget is checked before each generation: when `time_budget_s` has passed on
    `clock` no new generation starts; `max_generations` stops after that many generations
    of this call (an interruption, for tests and for slicing a long job). After each
    generation `after_generation()` runs (the Pareto search's checkpoint) and the first
    search's best (`best_of(search)`, by default its best objective) goes to
    `on_generation(done, planned, best)`. The genetic and the Pareto searches both run here.
    """
    best_of = best_of or (lambda search: search.best.objective if search.best else None)
    started = clock.now_ms()
    planned = max(s.options.generations for s, _ in searches)
    reason: StopReason = "completed"
    ran = 0
    while any(not s.done for s, _ in searches):
        if stop is not None and stop.is_set():
            reason = "cancelled"
            break
        if (clock.now_ms() - started) / 1000 >= time_budget_s:
            reason = "time_budget"
            break
        if max_generations is not None and ran >= max_generations:
            reason = "cancelled"
            break
        jobs = run_generation(searches, backend)
        ran += 1
        if after_generation is not None:
            after_generation()
        lead = searches[0][0]
        best = best_of(lead)
        log.info(
            "generation_done", generation=lead.generation, planned=planned, jobs=jobs, best=best
        )
        if on_generation is not None:
            on_generation(lead.generation, planned, best)
    elapsed = (clock.now_ms() - started) / 1000
    if reason != "completed":
        log.warning(
            "optimization_stopped",
            reason=reason,
            generations=searches[0][0].generation,
            planned=planned,
            elapsed_s=elapsed,
        )
    return reason, elapsed
