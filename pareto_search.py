"""Multi-objective search: NSGA-II through pymoo, ask/tell, over the optimiser's backends.

`ParetoSearch` wraps a pymoo algorithm (NSGA-II for several objectives, pymoo's GA for
one: the single-objective special case) in the optimiser's ask/tell contract, so its
candidates go through the same backends as the genetic search (in process, a local Dask
cluster or a `tcp://` scheduler). `drive_pareto` advances several searches in lockstep
(the full range and each walk-forward window) with a checkpoint per generation.

* **Variables.** Every `Dimension` is a real variable on [low, high]; a repair operator
  snaps each offspring onto its grid (integers, `step` grids, numeric choices, continuous
  values), which is
  pymoo's documented treatment of integer and discrete variables next to real ones
  (`RoundingRepair`), and keeps SBX and polynomial mutation meaningful on all of them.
* **Constraints.** One inequality column: 0 when the candidate was scored with enough
  trades; the missing fraction of `min_trades` when it has too few (so the search climbs
  towards enough trades); 2 when the strategy refuses the parameters (`fast < slow` from
  `strategy_feasibility`, never backtested) or the backtest failed. pymoo ranks feasible
  before infeasible and infeasible by violation.
* **Objectives.** Named metrics with a sense: by default total return (max), max drawdown
  (min) and stability (max: the signed R-squared of log equity, see
  `optimization_scoring.stability`). pymoo minimises, so maximised ones are negated.
* **Memory.** Flat in the number of evaluations: a bounded cache of objective rows by grid
  key (duplicates are not backtested twice), the trials of the current population, a
  fixed-size reservoir sample of trials with their per-period returns (for PBO), and a
  running mean/variance of the trials' per-period Sharpe ratios (for the deflated Sharpe
  ratio). No equity curve is kept.
* **Determinism.** pymoo draws from its own generator seeded with (seed, index); the
  reservoir from another. A checkpoint pickles the searches after each generation (an
  atomic write), so a resumed run continues exactly as an uninterrupted one would.

Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import structlog

from error_handler import ConfigError, InvariantError
from genetic_search import drive
from optimization_backends import Backend
from optimization_scoring import (
    MIN_TRADES,
    OBJECTIVE_METRIC,
    Key,
    Objective,
    Outcome,
    Segment,
    Status,
    StopReason,
    score,
    split_periods,
)
from overfitting import sharpe_per_period
from search_space import SearchSpace
from utils.utilities import Clock, atomic_write


if TYPE_CHECKING:
    from config import OptimizationSettings


log = structlog.get_logger(__name__)

Sense = Literal["max", "min"]
ObjectiveSpec = tuple[str, Sense]
Feasibility = Callable[[Mapping[str, float]], str | None]
Progress = Callable[[int, int, float | None], None]

DEFAULT_OBJECTIVES: Final[tuple[ObjectiveSpec, ...]] = (
    ("total_return", "max"),
    ("max_drawdown", "min"),
    ("stability", "max"),
)
# Short names for the JSON report.
OBJECTIVE_NAMES: Final[Mapping[str, str]] = {
    "total_return": "return",
    "max_drawdown": "drawdown",
    "stability": "stability",
}
INFEASIBLE: Final = 2.0  # constraint violation of a refused or failed candidate
WORST: Final = 1e12  # objective value pymoo sees for a candidate that has none
CACHE_SIZE: Final = 512  # trials kept by grid key so a re-proposed point is not re-run
CHECKPOINT_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class ParetoOptions:
    """Sizes, objectives and budget of a Pareto search."""

    population: int = 32
    generations: int = 10
    seed: int = 42
    objectives: tuple[ObjectiveSpec, ...] = DEFAULT_OBJECTIVES
    scalar: Objective = "sharpe"
    min_trades: int = MIN_TRADES
    reservoir: int = 48
    time_budget_s: float = 600.0
    workers: int = 1
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.population < 4 or self.generations < 1:
            raise ConfigError(
                "optimize: population >= 4 and generations >= 1", component="optimize"
            )
        if not self.objectives or self.reservoir < 0 or self.min_trades < 0:
            raise ConfigError("optimize: at least one objective, reservoir >= 0, min_trades >= 0")
        if self.scalar not in OBJECTIVE_METRIC:
            raise ConfigError(f"optimize: unknown objective {self.scalar!r}")

    @classmethod
    def from_settings(cls, settings: OptimizationSettings, **overrides: Any) -> ParetoOptions:
        """Return options from the `optimization` settings group, with overrides."""
        values: dict[str, Any] = {
            "population": max(4, settings.population),
            "generations": settings.generations,
            "seed": settings.seed,
            # The one score ranks the front's members and the folds (the issue's "one
            # definition everywhere"); the evaluator must report it (`one_score`).
            "scalar": "score",
            "time_budget_s": float(settings.time_budget_s),
            "workers": settings.workers,
            "scheduler": settings.scheduler,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Trial:
    """One evaluated candidate: its objectives, scalar score and per-period returns."""

    params: dict[str, float]
    status: Status
    objectives: dict[str, float]
    score: float
    metrics: dict[str, float]
    returns: np.ndarray
    error: str = ""

    @property
    def is_scored(self) -> bool:
        """Return True when the backtest ran (enough trades or not)."""
        return self.status in (Status.OK, Status.FEW_TRADES)

    @property
    def n_trades(self) -> int:
        """Return the backtest's closed trades."""
        return int(self.metrics.get("n_trades", 0))

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report (`params`, `objectives`, score, status)."""
        return {
            "params": dict(self.params),
            "objectives": {OBJECTIVE_NAMES.get(k, k): v for k, v in self.objectives.items()},
            "score": self.score if math.isfinite(self.score) else None,
            "status": str(self.status),
            "n_trades": self.n_trades,
            "metrics": {k: v for k, v in self.metrics.items() if math.isfinite(v)},
            **({"error": self.error} if self.error else {}),
        }


@dataclass(frozen=True, slots=True)
class ParetoResult:
    """What a Pareto search found, and what the overfitting estimates need."""

    front: tuple[Trial, ...]
    population: tuple[Trial, ...]
    sample: tuple[Trial, ...]
    evaluated: int
    infeasible: int
    failed: int
    sharpe_variance: float
    generations_run: int
    generations_planned: int
    history: tuple[dict[str, Any], ...]
    stopped: StopReason = "completed"

    @property
    def best(self) -> Trial | None:
        """Return the front's member with the highest scalar score, or None."""
        scored = [t for t in self.front if math.isfinite(t.score)]
        return max(scored, key=lambda t: t.score) if scored else None

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "evaluated": self.evaluated,
            "infeasible": self.infeasible,
            "failed": self.failed,
            "generations_run": self.generations_run,
            "generations_planned": self.generations_planned,
            "stopped": self.stopped,
            "front": [t.as_dict() for t in self.front],
            "history": list(self.history),
        }


# -- pymoo glue ------------------------------------------------------------------------------


def snap_columns(space: SearchSpace, X: np.ndarray) -> np.ndarray:
    """Return `X` (one row per candidate) with each column on its dimension's grid."""
    out = np.array(X, dtype=np.float64, copy=True)
    for j, d in enumerate(space.dimensions):
        if d.choices:
            # Nearest choice, the lower one on a tie (as Dimension.snap).
            options = np.asarray(d.choices, dtype=np.float64)
            out[:, j] = options[np.abs(out[:, j, None] - options[None, :]).argmin(axis=1)]
            continue
        column = np.clip(out[:, j], d.low, d.high)
        step = d.grid_step
        if step is not None:
            column = d.low + np.round((column - d.low) / step) * step
            column = np.where(column > d.high + 1e-12, column - step, column)
        if d.integer:
            column = np.round(column)
        out[:, j] = np.round(column, 10)  # as Dimension.snap: one grid point, one key
    return out


_REPAIR: list[type] = []


def _repair_class() -> type:
    # Built on first use so importing this module does not import pymoo; published as the
    # module attribute `SnapToGrid` (PEP 562) so checkpoints can pickle it.
    if not _REPAIR:
        from pymoo.core.repair import Repair

        class SnapToGrid(Repair):  # type: ignore[misc]
            """Snap every variable onto its dimension's grid (pymoo's RoundingRepair, mixed)."""

            def __init__(self, space: SearchSpace) -> None:
                super().__init__()
                self.space = space

            def _do(self, problem: Any, X: np.ndarray, **kwargs: Any) -> np.ndarray:
                return snap_columns(self.space, X)

        SnapToGrid.__module__ = __name__
        SnapToGrid.__qualname__ = "SnapToGrid"
        _REPAIR.append(SnapToGrid)
    return _REPAIR[0]


def __getattr__(name: str) -> Any:
    if name == "SnapToGrid":
        return _repair_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _algorithm(space: SearchSpace, options: ParetoOptions, n_constraints: int) -> Any:
    from pymoo.core.problem import Problem

    problem = Problem(
        n_var=len(space.dimensions),
        n_obj=len(options.objectives),
        n_ieq_constr=n_constraints,
        xl=np.array([d.low for d in space.dimensions], dtype=np.float64),
        xu=np.array([d.high for d in space.dimensions], dtype=np.float64),
    )
    repair = _repair_class()(space)
    if len(options.objectives) == 1:
        from pymoo.algorithms.soo.nonconvex.ga import GA

        algorithm: Any = GA(pop_size=options.population, repair=repair, eliminate_duplicates=True)
    else:
        from pymoo.algorithms.moo.nsga2 import NSGA2

        algorithm = NSGA2(pop_size=options.population, repair=repair, eliminate_duplicates=True)
    return algorithm, problem


def make_trial(
    params: Mapping[str, float], outcome: Outcome, options: ParetoOptions, min_trades: int
) -> Trial:
    """Return the trial of a backtest outcome: objectives, scalar score, period returns."""
    status, metrics, error = outcome
    plain, returns = split_periods(metrics)
    evaluation = score(params, (status, plain, error), options.scalar, min_trades)
    objectives = {name: float(plain.get(name, math.nan)) for name, _ in options.objectives}
    if evaluation.status in (Status.OK, Status.FEW_TRADES) and not all(
        math.isfinite(v) for v in objectives.values()
    ):
        evaluation = dataclasses.replace(evaluation, status=Status.FAILED, error="no objective")
    scored = evaluation.status in (Status.OK, Status.FEW_TRADES)
    return Trial(
        dict(params),
        evaluation.status,
        objectives,
        evaluation.objective if scored else math.nan,
        plain,
        returns,
        evaluation.error,
    )


# -- The search ------------------------------------------------------------------------------


class ParetoSearch:
    """NSGA-II (or GA for one objective) over a `SearchSpace`, ask/tell."""

    method = "nsga2"

    def __init__(
        self,
        space: SearchSpace,
        options: ParetoOptions,
        *,
        index: int = 0,
        feasible: Feasibility | None = None,
        initial: Iterable[Mapping[str, float]] = (),
        min_trades: int | None = None,
    ) -> None:
        self.space = space
        self.options = options
        self.index = index
        self.feasible = feasible
        self.min_trades = options.min_trades if min_trades is None else min_trades
        self.algorithm, self.problem = _algorithm(space, options, 1)
        self.algorithm.setup(
            self.problem,
            termination=("n_gen", options.generations),
            seed=int(np.random.SeedSequence([options.seed, index]).generate_state(1)[0]),
            verbose=False,
        )
        self._initial = [space.key(p) for p in initial]
        self._rng = np.random.default_rng([options.seed, index, 1])
        self._cache: OrderedDict[Key, Trial] = OrderedDict()
        self._live: dict[Key, Trial] = {}
        self._sample: list[Trial] = []
        self._pop: Any = None
        self._pending: list[Key] = []
        self._keys: list[Key] = []
        self._front: tuple[Trial, ...] | None = None
        self.generation = 0
        self.evaluated = 0
        self.infeasible = 0
        self.failed = 0
        self.history: list[dict[str, Any]] = []
        # Running mean and M2 of the trials' per-period Sharpe ratios (Welford).
        self._sharpe_n = 0
        self._sharpe_mean = 0.0
        self._sharpe_m2 = 0.0

    # -- Pickling for checkpoints (the feasibility check is a closure: passed again) ------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["feasible"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def done(self) -> bool:
        """Return True once every planned generation has been told."""
        return self.generation >= self.options.generations

    def ask(self) -> list[dict[str, float]]:
        """Return the next generation's candidates that still need a backtest."""
        self._pop = self.algorithm.ask()
        X = np.asarray(self._pop.get("X"), dtype=np.float64)
        if self.generation == 0 and self._initial:
            # The configured parameters take the first places of generation 0.
            for i, key in enumerate(self._initial[: len(X)]):
                X[i] = key
            self._pop.set("X", X)
        self._keys = self._keys_of(X)
        pending: list[Key] = []
        for key in dict.fromkeys(self._keys):
            known = self._known(key)
            if known is not None:
                self._live[key] = known
                continue
            reason = self._refusal(key)
            if reason is not None:
                self._record(key, self._trial(key, ("infeasible", {}, reason)))
                continue
            pending.append(key)
        self._pending = pending
        return [self.space.params(k) for k in pending]

    def tell(self, outcomes: Sequence[Outcome]) -> None:
        """Record the outcomes of the candidates from `ask`, in order, and advance."""
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        if len(outcomes) != len(self._pending):
            raise InvariantError(
                f"expected {len(self._pending)} outcomes, got {len(outcomes)}",
                component="optimize",
            )
        for key, outcome in zip(self._pending, outcomes, strict=True):
            self._record(key, self._trial(key, outcome))
            self.evaluated += 1
        rows = [self._row(self._live[k]) for k in self._keys]
        F = np.array([r[0] for r in rows], dtype=np.float64)
        G = np.array([[r[1]] for r in rows], dtype=np.float64)
        Evaluator().eval(StaticProblem(self.problem, F=F, G=G), self._pop)
        self.algorithm.tell(infills=self._pop)
        self.generation += 1
        survivors = set(self._keys_of(self.algorithm.pop.get("X")))
        self._live = {k: t for k, t in self._live.items() if k in survivors}
        self._pending, self._keys, self._pop = [], [], None
        self._front = None
        best = self.best
        self.history.append(
            {
                "generation": self.generation,
                "evaluated": self.evaluated,
                "front": len(self.front()),
                "best_score": best.score if best else None,
            }
        )

    # -- Results -----------------------------------------------------------------------------

    def front(self) -> list[Trial]:
        """Return the current non-dominated feasible trials (pymoo's `opt`), deduplicated."""
        if self._front is not None:
            return list(self._front)
        opt = self.algorithm.opt
        if opt is None or len(opt) == 0:
            return []
        out: dict[Key, Trial] = {}
        for key, cv in zip(self._keys_of(opt.get("X")), opt.get("CV"), strict=True):
            trial = self._known(key)
            if trial is not None and float(np.max(cv)) <= 0 and trial.is_scored:
                out[key] = trial
        front = sorted(out.values(), key=lambda t: -t.score if math.isfinite(t.score) else math.inf)
        self._front = tuple(front)
        return front

    @property
    def best(self) -> Trial | None:
        """Return the front's member with the highest scalar score, or None."""
        scored = [t for t in self.front() if math.isfinite(t.score)]
        return max(scored, key=lambda t: t.score) if scored else None

    def result(self, stopped: StopReason = "completed") -> ParetoResult:
        """Return the search's result."""
        variance = self._sharpe_m2 / (self._sharpe_n - 1) if self._sharpe_n > 1 else 0.0
        population = [t for t in self._live.values() if t.is_scored]
        return ParetoResult(
            front=tuple(self.front()),
            population=tuple(population),
            sample=tuple(self._sample),
            evaluated=self.evaluated,
            infeasible=self.infeasible,
            failed=self.failed,
            sharpe_variance=variance,
            generations_run=self.generation,
            generations_planned=self.options.generations,
            history=tuple(self.history),
            stopped=stopped,
        )

    # -- Bookkeeping -------------------------------------------------------------------------

    def _known(self, key: Key) -> Trial | None:
        trial = self._live.get(key)
        if trial is None:
            trial = self._cache.get(key)
            if trial is not None:
                self._cache.move_to_end(key)
        return trial

    def _keys_of(self, X: np.ndarray) -> list[Key]:
        # Rows on the grid already (the repair ran); snapping again is cheap and exact.
        snapped = snap_columns(self.space, np.atleast_2d(np.asarray(X, dtype=np.float64)))
        return [tuple(row) for row in snapped.tolist()]

    def _refusal(self, key: Key) -> str | None:
        return None if self.feasible is None else self.feasible(self.space.params(key))

    def _trial(self, key: Key, outcome: Outcome) -> Trial:
        return make_trial(self.space.params(key), outcome, self.options, self.min_trades)

    def _row(self, trial: Trial) -> tuple[np.ndarray, float]:
        if not trial.is_scored:
            return np.full(len(self.options.objectives), WORST), INFEASIBLE
        F = np.array(
            [
                -trial.objectives[name] if sense == "max" else trial.objectives[name]
                for name, sense in self.options.objectives
            ],
            dtype=np.float64,
        )
        missing = 0.0
        if trial.status is Status.FEW_TRADES and self.min_trades > 0:
            missing = max(1e-9, 1.0 - trial.n_trades / self.min_trades)
        return F, missing

    def _record(self, key: Key, trial: Trial) -> None:
        self._cache[key] = trial
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        self._live[key] = trial
        if trial.status is Status.INFEASIBLE:
            self.infeasible += 1
        elif trial.status is Status.FAILED:
            self.failed += 1
        if trial.is_scored and trial.returns.size >= 2:
            self._observe(trial)

    def _observe(self, trial: Trial) -> None:
        sharpe = sharpe_per_period(trial.returns)
        self._sharpe_n += 1
        delta = sharpe - self._sharpe_mean
        self._sharpe_mean += delta / self._sharpe_n
        self._sharpe_m2 += delta * (sharpe - self._sharpe_mean)
        # Reservoir sampling (Algorithm R): every scored trial has the same chance to be in.
        size = self.options.reservoir
        if len(self._sample) < size:
            self._sample.append(trial)
        elif size:
            slot = int(self._rng.integers(0, self._sharpe_n))
            if slot < size:
                self._sample[slot] = trial


# -- Driver with checkpoints -----------------------------------------------------------------


def fingerprint(*parts: Any) -> str:
    """Return a short digest of what a checkpoint belongs to (space, options, data, windows)."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def save_checkpoint(path: Path, tag: str, searches: Sequence[ParetoSearch]) -> None:
    """Write the searches atomically to `path`, tagged with their fingerprint."""
    payload = {"version": CHECKPOINT_VERSION, "fingerprint": tag, "searches": list(searches)}
    atomic_write(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(
    path: Path, tag: str, feasible: Feasibility | None = None
) -> list[ParetoSearch] | None:
    """Return the searches saved at `path` for `tag`, or None when absent or for other work.

    Only load checkpoints this optimiser wrote: they are pickles.
    """
    if not path.exists():
        return None
    try:
        payload = pickle.loads(path.read_bytes())  # noqa: S301 - our own checkpoint file
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        log.warning("checkpoint_unreadable", path=str(path), error=str(e))
        return None
    if payload.get("version") != CHECKPOINT_VERSION or payload.get("fingerprint") != tag:
        log.warning("checkpoint_ignored", path=str(path), reason="different job")
        return None
    searches: list[ParetoSearch] = payload["searches"]
    for s in searches:
        s.feasible = feasible
    log.info("checkpoint_resumed", path=str(path), generation=searches[0].generation)
    return searches


def drive_pareto(
    searches: Sequence[tuple[ParetoSearch, Segment]],
    backend: Backend,
    *,
    time_budget_s: float,
    clock: Clock,
    stop: threading.Event | None = None,
    on_generation: Progress | None = None,
    checkpoint: Path | None = None,
    tag: str = "",
    max_generations: int | None = None,
) -> tuple[StopReason, float]:
    """Run the searches in lockstep, one backend batch per generation; return why and how long.

    After each generation the searches are checkpointed to `checkpoint` (when given).
    `max_generations` stops after that many generations of this call (an interruption,
    for tests and for slicing a long job).
    """
    return drive(
        searches,
        backend,
        time_budget_s=time_budget_s,
        clock=clock,
        stop=stop,
        on_generation=on_generation,
        best_of=lambda search: search.best.score if search.best else None,
        after_generation=(
            None
            if checkpoint is None
            else lambda: save_checkpoint(checkpoint, tag, [s for s, _ in searches])
        ),
        max_generations=max_generations,
    )
