"""Parameter optimisation: genetic and random search, walk-forward analysis, Dask fan-out.

`--mode optimize` searches a strategy's declared `Param` ranges for the set that maximises
an objective (Sharpe, Sortino, Calmar or total return) of the backtest fast path, and then
asks whether that choice survives out of sample:

* **Search space.** Each `Param` is a `Dimension` on its grid (`integer`, `step`), so two
  candidates on the same grid point are one candidate, backtested once (a cache per
  search). Cross-parameter rules (`fast < slow`) belong to the strategy: a `ConfigError`
  from its constructor makes a candidate infeasible, recorded and never scored.
* **Genetic search** (ask/tell, like optuna's samplers). Generation 0 holds the configured
  parameters plus random grid points; every later generation keeps the elite and fills up
  with children of tournament-selected parents, blend crossover (BLX-0.5) and Gaussian
  mutation of about one gene, each snapped to the grid. Children already seen are redrawn,
  so the budget buys new backtests. All randomness lives in the driver and the evaluation
  is deterministic, so one seed gives one result, in process or on a cluster.
  `RandomSearch` spends the same batches on uniform grid points: the baseline.
* **Overfitting guards.** A candidate with fewer than `min_trades` closed trades ranks
  below every candidate that has enough, whatever its score. `walk_forward` optimises on
  rolling (or anchored) train windows, scores each winner on the following test window,
  and reports in-sample against out-of-sample objective, the walk-forward efficiency (mean
  out-of-sample / mean in-sample) and how much the chosen parameters move between windows.
* **Fan-out.** A generation is one batch of (parameters, time segment) jobs. With one
  worker it runs in process; otherwise on Dask distributed: a `LocalCluster` of processes
  (one thread each), or the cluster at `settings.scheduler` (`tcp://...`, whose workers
  must be able to import Kestrel). The candle frames are scattered once; the jobs go out in
  a few chunks per worker, since a fast-path backtest takes well under a millisecond on a
  day of minutes and a task round trip costs more. Walk-forward windows advance in
  lockstep, so one batch carries every window's generation.
* **Time budget.** Checked before each generation against an injected `Clock`: once
  `time_budget_s` is spent no new generation starts, and the result says `time_budget`
  with the best found so far. The generation in flight finishes.

Scores come from `run_fast` under the `all_in` profile (whole equity per entry, no stops,
taker fee and slippage from `settings.simulation`): the optimiser ranks signal logic, not
risk sizing. The metrics follow `analytics.metrics` (the backtest report), so the Sharpe
an optimisation reports is the Sharpe `--mode backtest` reports for the same parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import functools
import itertools
import json
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import numpy as np
import pandas as pd
import structlog
from numba import njit

from error_handler import ConfigError, InvariantError
from utils.utilities import (
    Clock,
    WallClock,
    atomic_write,
    ms_to_datetime,
    parse_timerange,
    timeframe_to_ms,
)


if TYPE_CHECKING:
    from config import OptimizationSettings, Settings
    from strategy import Param, Strategy
    from trade_simulator import BacktestResult


log = structlog.get_logger(__name__)

Objective = Literal["sharpe", "sortino", "calmar", "return"]
StopReason = Literal["completed", "time_budget", "cancelled"]
Key = tuple[float, ...]
# A worker's answer for one job: ("ok" | "infeasible" | "failed", metrics, error text).
Outcome = tuple[str, dict[str, float], str]
Job = tuple[dict[str, float], "Segment"]

OBJECTIVE_METRIC: Final[Mapping[str, str]] = {
    "sharpe": "sharpe",
    "sortino": "sortino",
    "calmar": "calmar",
    "return": "total_return",
}
# A ratio over nothing (no variance, no downside, no losses) scores this, never infinity.
RATIO_CAP: Final = 1e4
MIN_DRAWDOWN: Final = 1e-4
MIN_TRADES: Final = 5
MAX_TRIES: Final = 64
MAX_ERRORS: Final = 5  # distinct infeasible/failure messages kept for the report
CHUNKS_PER_WORKER: Final = 2
YEAR_MS: Final = 365 * 86_400_000  # crypto trades every day


class Status(enum.StrEnum):
    """How a candidate fared."""

    OK = "ok"
    FEW_TRADES = "few_trades"
    INFEASIBLE = "infeasible"
    FAILED = "failed"


_TIER: Final = {Status.OK: 2, Status.FEW_TRADES: 1, Status.INFEASIBLE: 0, Status.FAILED: 0}


class Evaluate(Protocol):
    """Score one parameter set on one pair's candles.

    `frame` holds the candles up to the end of the scored stretch; rows before `start_ms`
    are history for indicator warm-up only. Returns metrics including `n_trades` and the
    objective's metric (`OBJECTIVE_METRIC`); a `ConfigError` marks the parameters
    infeasible. Must be picklable (a module-level function or a frozen dataclass) to run
    on Dask.
    """

    def __call__(
        self,
        params: Mapping[str, float],
        frame: pd.DataFrame,
        *,
        pair: str,
        start_ms: int | None,
    ) -> Mapping[str, float]:
        """Return the metrics of `params` on `frame` from `start_ms`."""
        ...


# -- Search space ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dimension:
    """One tunable parameter on its grid."""

    name: str
    low: float
    high: float
    integer: bool = True
    step: float | None = None

    @property
    def grid_step(self) -> float | None:
        """Return the grid spacing (`step`, 1 for integers, None when continuous)."""
        if self.step:
            return float(self.step)
        return 1.0 if self.integer else None

    def snap(self, value: float) -> float:
        """Return the grid point nearest to `value`, within range."""
        value = min(max(float(value), self.low), self.high)
        step = self.grid_step
        if step is not None:
            value = self.low + round((value - self.low) / step) * step
            if value > self.high + 1e-12:
                value -= step
        if self.integer:
            value = float(round(value))
        return round(value, 10)  # decimal noise would split one grid point into two keys

    def sample(self, rng: np.random.Generator) -> float:
        """Return a uniformly drawn grid point (a uniform value when continuous)."""
        step = self.grid_step
        if step is None:
            return self.snap(rng.uniform(self.low, self.high))
        points = math.floor((self.high - self.low) / step + 1e-9)
        return self.snap(self.low + int(rng.integers(0, points + 1)) * step)

    def mutate(self, value: float, rng: np.random.Generator, scale: float) -> float:
        """Return `value` moved by a Gaussian step of `scale` x range, at least one grid step."""
        span = self.high - self.low
        if span <= 0:
            return value
        moved = self.snap(value + rng.normal(0.0, scale * span))
        if moved != value:
            return moved
        step = self.grid_step or scale * span
        direction = 1.0 if rng.random() < 0.5 else -1.0
        moved = self.snap(value + direction * step)
        return moved if moved != value else self.snap(value - direction * step)

    def blend(self, a: float, b: float, rng: np.random.Generator, alpha: float = 0.5) -> float:
        """Return a BLX-alpha child of two values (uniform on the widened interval)."""
        lo, hi = min(a, b), max(a, b)
        spread = hi - lo
        if spread == 0:
            return a
        return self.snap(rng.uniform(lo - alpha * spread, hi + alpha * spread))


@dataclass(frozen=True, slots=True)
class SearchSpace:
    """The dimensions searched, plus parameters held fixed."""

    dimensions: tuple[Dimension, ...]
    fixed: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_params(
        cls, parameters: Mapping[str, Param], *, fixed: Mapping[str, float] | None = None
    ) -> SearchSpace:
        """Return the space of a strategy's `parameters`, leaving out the `fixed` ones."""
        fixed = dict(fixed or {})
        dims = tuple(
            Dimension(name, float(p.low), float(p.high), bool(p.integer), p.step)
            for name, p in parameters.items()
            if name not in fixed
        )
        if not dims:
            raise ConfigError("nothing to optimise: every parameter is fixed", component="optimize")
        return cls(dims, tuple(sorted((k, float(v)) for k, v in fixed.items())))

    @property
    def names(self) -> tuple[str, ...]:
        """Return the searched parameter names in order."""
        return tuple(d.name for d in self.dimensions)

    def key(self, params: Mapping[str, float]) -> Key:
        """Return the grid key of a parameter set (missing names take the low end)."""
        return tuple(d.snap(params.get(d.name, d.low)) for d in self.dimensions)

    def params(self, key: Key) -> dict[str, float]:
        """Return the full parameter set of a key (fixed parameters included)."""
        return {**dict(self.fixed), **dict(zip(self.names, key, strict=True))}

    def sample(self, rng: np.random.Generator) -> Key:
        """Return a random grid point."""
        return tuple(d.sample(rng) for d in self.dimensions)


@functools.cache
def _strategy_class(name_or_path: str) -> type[Strategy]:
    # One import of a user strategy file per process, not one per candidate.
    from strategy import BUILTIN, load_strategy

    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    return type(load_strategy(name_or_path))


def strategy_space(name_or_path: str, *, fixed: Mapping[str, float] | None = None) -> SearchSpace:
    """Return the search space of a built-in strategy or a strategy file."""
    return SearchSpace.from_params(_strategy_class(name_or_path).parameters, fixed=fixed)


def strategy_feasibility(name_or_path: str) -> Callable[[Mapping[str, float]], str | None]:
    """Return a check that builds the strategy and returns its ConfigError text, or None."""
    cls = _strategy_class(name_or_path)

    def check(params: Mapping[str, float]) -> str | None:
        try:
            cls(**params)
        except ConfigError as e:
            return e.message
        return None

    return check


# -- Metrics and scores ----------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0 or not math.isfinite(denominator):
        return 0.0 if numerator == 0 else math.copysign(RATIO_CAP, numerator)
    return numerator / denominator


@njit(cache=True)
def _curve_stats(start, equity):  # type: ignore[no-untyped-def]
    # One pass for the mean, the downside and the drawdown, a second for the deviation
    # (two passes keep the variance accurate): at a million bars numpy's temporaries
    # cost more than the backtest itself.
    n = equity.shape[0]
    prev = start
    peak = start
    total = 0.0
    down = 0.0
    worst = 0.0
    for i in range(n):
        r = equity[i] / prev - 1.0
        total += r
        if r < 0.0:
            down += r * r
        prev = equity[i]
        peak = max(peak, prev)
        worst = max(worst, (peak - prev) / peak)
    mean = total / n
    prev = start
    acc = 0.0
    for i in range(n):
        d = equity[i] / prev - 1.0 - mean
        acc += d * d
        prev = equity[i]
    std = np.sqrt(acc / (n - 1)) if n > 1 else 0.0
    return mean, std, np.sqrt(down / n), worst


def equity_metrics(equity: np.ndarray, starting_balance: float, timeframe: str) -> dict[str, float]:
    """Return annualised Sharpe, Sortino, CAGR, Calmar, return and drawdown of a curve.

    The conventions of `analytics.metrics` (the backtest report), computed in one numba
    pass because the optimiser runs this once per candidate: per-bar simple
    returns from `starting_balance`, 365 days of `timeframe` bars a year, Sharpe with ddof
    1, Sortino over the root mean square of the negative returns, CAGR over the span of
    the bars, Calmar = CAGR / max drawdown. Where the report has no value (no variance, no
    drawdown) the score is 0 or uses a drawdown of 0.01%; CAGR is computed in log space so
    a short, steep window cannot overflow; a ratio over zero is +-`RATIO_CAP` (0 over 0
    is 0).
    """
    values = np.ascontiguousarray(equity, dtype=np.float64)
    bars = len(values)
    if bars <= 0:
        return dict.fromkeys(
            ("sharpe", "sortino", "calmar", "total_return", "cagr", "max_drawdown"), 0.0
        )
    mean, std, downside, drawdown = _curve_stats(float(starting_balance), values)
    per_year = YEAR_MS / timeframe_to_ms(timeframe)
    growth = float(values[-1] / starting_balance)
    cagr = math.expm1(min(math.log(growth) * per_year / bars, 700.0)) if growth > 0 else -1.0
    root = math.sqrt(per_year)
    return {
        "sharpe": _ratio(mean * root, std),
        "sortino": _ratio(mean * root, downside),
        "calmar": _ratio(cagr, max(drawdown, MIN_DRAWDOWN)),
        "total_return": growth - 1.0,
        "cagr": cagr,
        "max_drawdown": drawdown,
    }


def backtest_metrics(result: BacktestResult) -> dict[str, float]:
    """Return the optimiser's metrics of a fast-path backtest (see `equity_metrics`)."""
    metrics = equity_metrics(result.equity, result.starting_balance, result.timeframe)
    pnl = np.asarray(result.table["pnl"], dtype=np.float64)
    wins = float(pnl[pnl > 0].sum())
    losses = float(-pnl[pnl < 0].sum())
    metrics["total_return"] = result.final_equity / result.starting_balance - 1.0
    metrics.update(
        n_trades=float(len(pnl)),
        win_rate=float(np.mean(pnl > 0)) if len(pnl) else 0.0,
        profit_factor=_ratio(wins, losses) if len(pnl) else 0.0,
        fees=float(result.fees),
    )
    return metrics


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A scored candidate."""

    params: dict[str, float]
    status: Status
    objective: float = math.nan
    fitness: float = -math.inf
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def rank_key(self) -> tuple[int, float]:
        """Return the sort key: enough trades first, then fitness (higher is better)."""
        return (_TIER[self.status], self.fitness)

    @property
    def n_trades(self) -> int:
        """Return the closed trades of the backtest (0 when not run)."""
        return int(self.metrics.get("n_trades", 0))

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "params": dict(self.params),
            "status": str(self.status),
            "objective": None if math.isnan(self.objective) else self.objective,
            "fitness": self.fitness if math.isfinite(self.fitness) else None,
            "metrics": dict(self.metrics),
            **({"error": self.error} if self.error else {}),
        }


def score(
    params: Mapping[str, float], outcome: Outcome, objective: Objective, min_trades: int
) -> Evaluation:
    """Return the evaluation of a backtest outcome under the trade-count guard.

    Below `min_trades` the status is `few_trades`, ranked under every candidate with
    enough trades; among those, fitness shrinks a positive objective in proportion to
    the missing trades and lowers a negative one by the missing fraction, so the search
    still climbs towards enough trades.
    """
    status, metrics, error = outcome
    params = dict(params)
    if status == "infeasible":
        return Evaluation(params, Status.INFEASIBLE, error=error)
    value = float(metrics.get(OBJECTIVE_METRIC[objective], math.nan))
    if status != "ok" or not math.isfinite(value):
        return Evaluation(params, Status.FAILED, metrics=dict(metrics), error=error or "no score")
    trades = int(metrics.get("n_trades", 0))
    if trades >= min_trades:
        return Evaluation(params, Status.OK, value, value, dict(metrics))
    filled = trades / min_trades
    fitness = value * filled if value > 0 else value - (1.0 - filled)
    return Evaluation(params, Status.FEW_TRADES, value, fitness, dict(metrics))


# -- Evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """The scored stretch of time: candles with start_ms <= open time < end_ms."""

    start_ms: int | None = None
    end_ms: int | None = None


@dataclass(frozen=True, slots=True)
class BacktestEvaluator:
    """Score parameters with the numba fast path (`trade_simulator.run_fast`)."""

    strategy: str
    timeframe: str
    starting_balance: float = 10_000.0
    taker_fee: float = 0.001
    maker_fee: float = 0.001
    slippage_bps: float = 0.0
    fill_at: Literal["next_open", "close"] = "next_open"

    @classmethod
    def from_settings(cls, settings: Settings, strategy: str, timeframe: str) -> BacktestEvaluator:
        """Return an evaluator with the simulation costs of `settings`."""
        sim = settings.simulation
        return cls(
            strategy,
            timeframe,
            starting_balance=sim.starting_balance,
            taker_fee=sim.taker_fee,
            maker_fee=sim.maker_fee,
            slippage_bps=sim.slippage_bps,
            fill_at=sim.fill_at,
        )

    def __call__(
        self,
        params: Mapping[str, float],
        frame: pd.DataFrame,
        *,
        pair: str,
        start_ms: int | None = None,
    ) -> dict[str, float]:
        """Backtest `params` on `frame` from `start_ms` and return `backtest_metrics`."""
        from trade_simulator import run_fast

        strategy = _strategy_class(self.strategy)(**params)
        result = run_fast(
            strategy,
            frame,
            pair=pair,
            timeframe=self.timeframe,
            starting_balance=self.starting_balance,
            taker_fee=self.taker_fee,
            maker_fee=self.maker_fee,
            slippage_bps=self.slippage_bps,
            fill_at=self.fill_at,
            start_ms=start_ms,
        )
        return backtest_metrics(result)


def _history(frame: pd.DataFrame, end_ms: int | None) -> pd.DataFrame:
    if end_ms is None:
        return frame
    ts = frame.index.as_unit("ms").asi8
    return frame.iloc[: int(np.searchsorted(ts, end_ms, side="left"))]


def _combine(per_pair: Sequence[Mapping[str, float]]) -> dict[str, float]:
    # One parameter set across pairs (as freqtrade's hyperopt): counts add up, scores average.
    if len(per_pair) == 1:
        return dict(per_pair[0])
    keys = set().union(*per_pair)
    summed = {"n_trades", "fees"}
    return {
        k: float((np.sum if k in summed else np.mean)([m.get(k, 0.0) for m in per_pair]))
        for k in sorted(keys)
    }


def evaluate_job(
    evaluate: Evaluate,
    frames: Mapping[str, pd.DataFrame],
    params: dict[str, float],
    segment: Segment,
) -> Outcome:
    """Return the outcome of one parameter set on every pair's candles within `segment`."""
    per_pair: list[Mapping[str, float]] = []
    for pair, frame in frames.items():
        history = _history(frame, segment.end_ms)
        if history.empty or (
            segment.start_ms is not None and history.index[-1].value // 1_000_000 < segment.start_ms
        ):
            continue  # this pair has no candles in the segment
        try:
            per_pair.append(evaluate(params, history, pair=pair, start_ms=segment.start_ms))
        except ConfigError as e:
            return ("infeasible", {}, e.message)
        except Exception as e:  # a strategy bug fails one candidate, not the whole search
            return ("failed", {}, f"{type(e).__name__}: {e}")
    if not per_pair:
        return ("failed", {}, "no candles in the segment")
    return ("ok", _combine(per_pair), "")


def _evaluate_chunk(
    evaluate: Evaluate, frames: Mapping[str, pd.DataFrame], jobs: Sequence[Job]
) -> list[Outcome]:
    return [evaluate_job(evaluate, frames, params, segment) for params, segment in jobs]


# -- Backends --------------------------------------------------------------------------------


class Backend(Protocol):
    """Evaluates a batch of jobs, in order."""

    @property
    def workers(self) -> int:
        """Return how many jobs can run at once."""
        ...

    def evaluate(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Return one outcome per job, in job order."""
        ...

    def close(self) -> None:
        """Release workers and connections."""
        ...


class InProcessBackend:
    """Evaluate in the calling thread (one worker; no Dask)."""

    def __init__(self, evaluate: Evaluate, frames: Mapping[str, pd.DataFrame]) -> None:
        self._evaluate = evaluate
        self._frames = dict(frames)

    @property
    def workers(self) -> int:
        """Return 1."""
        return 1

    def evaluate(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Evaluate each job in turn."""
        return _evaluate_chunk(self._evaluate, self._frames, jobs)

    def close(self) -> None:
        """Do nothing: there is nothing to release."""


class DaskBackend:
    """Evaluate on Dask distributed: a local process cluster, or a `tcp://` scheduler.

    The frames are scattered to every worker once; each batch goes out as a few chunks
    per worker and is gathered in order.
    """

    def __init__(
        self,
        evaluate: Evaluate,
        frames: Mapping[str, pd.DataFrame],
        *,
        workers: int = 2,
        scheduler: str | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        import dask
        import dask.distributed

        dist: Any = dask.distributed  # untyped: one Any at the seam, not an ignore per call
        self._evaluate = evaluate
        self._cluster: Any = None
        if scheduler:
            try:
                self._client: Any = dist.Client(scheduler, timeout=f"{connect_timeout_s}s")
            except (OSError, TimeoutError) as e:
                raise ConfigError(
                    f"cannot reach the Dask scheduler at {scheduler}: {e}", component="optimize"
                ) from e
        else:
            # The statistical profiler samples the compute thread every 10 ms under the
            # GIL; for CPU-bound backtests it costs throughput and tells nothing new.
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                self._cluster = dist.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    # A free port: the scheduler's HTTP server otherwise wants 8787 and
                    # warns (an error under -W error) when another cluster holds it.
                    dashboard_address=":0",
                )
            self._client = dist.Client(self._cluster)
        self._workers = int(max(1, sum(self._client.nthreads().values())))
        self._data = self._client.scatter([dict(frames)], broadcast=True)[0]
        log.info(
            "dask_started",
            scheduler=scheduler or "local",
            workers=self._workers,
            address=self._client.scheduler.address,
            dashboard=self._client.dashboard_link,
        )

    @property
    def workers(self) -> int:
        """Return the worker threads of the cluster."""
        return self._workers

    def evaluate(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Submit the jobs in chunks and gather the outcomes in job order."""
        if not jobs:
            return []
        chunks = _split(jobs, self._workers * CHUNKS_PER_WORKER)
        futures = [
            self._client.submit(_evaluate_chunk, self._evaluate, self._data, chunk, pure=False)
            for chunk in chunks
        ]
        parts: list[list[Outcome]] = self._client.gather(futures)
        return [outcome for part in parts for outcome in part]

    def close(self) -> None:
        """Close the client and the local cluster (a remote cluster keeps running)."""
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def _split(items: Sequence[Job], parts: int) -> list[Sequence[Job]]:
    parts = max(1, min(parts, len(items)))
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def resolve_workers(workers: int) -> int:
    """Return the worker count: `workers`, or one per core less one when 0."""
    return workers if workers > 0 else max(1, (os.cpu_count() or 2) - 1)


def open_backend(
    evaluate: Evaluate,
    frames: Mapping[str, pd.DataFrame],
    *,
    workers: int = 1,
    scheduler: str | None = None,
) -> Backend:
    """Return the in-process backend for one local worker, else a Dask backend."""
    count = resolve_workers(workers)
    if scheduler is None and count == 1:
        return InProcessBackend(evaluate, frames)
    return DaskBackend(evaluate, frames, workers=count, scheduler=scheduler)


# -- Searches --------------------------------------------------------------------------------


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


def drive(
    searches: Sequence[tuple[Search, Segment]],
    backend: Backend,
    *,
    time_budget_s: float,
    clock: Clock,
    stop: threading.Event | None = None,
    on_generation: Progress | None = None,
) -> tuple[StopReason, float]:
    """Run the searches in lockstep, one batch per generation; return why and how long.

    The budget is checked before each generation: when `time_budget_s` has passed on
    `clock` no new generation starts. The first search's best objective goes to
    `on_generation(done, planned, best)`.
    """
    started = clock.now_ms()
    planned = max(s.options.generations for s, _ in searches)
    reason: StopReason = "completed"
    while any(not s.done for s, _ in searches):
        elapsed = (clock.now_ms() - started) / 1000
        if stop is not None and stop.is_set():
            reason = "cancelled"
            break
        if elapsed >= time_budget_s:
            reason = "time_budget"
            break
        active = [(s, seg) for s, seg in searches if not s.done]
        asked = [(s, s.ask(), seg) for s, seg in active]
        jobs: list[Job] = [(p, seg) for _, cands, seg in asked for p in cands]
        outcomes = backend.evaluate(jobs) if jobs else []
        at = 0
        for s, cands, _ in asked:
            s.tell(outcomes[at : at + len(cands)])
            at += len(cands)
        lead = searches[0][0]
        best = lead.best
        log.info(
            "generation_done",
            generation=lead.generation,
            planned=planned,
            jobs=len(jobs),
            best=best.objective if best else None,
        )
        if on_generation is not None:
            on_generation(lead.generation, planned, best.objective if best else None)
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


# -- Walk-forward ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """One walk-forward split as row positions [start, end) on the time axis."""

    index: int
    train_start: int
    train_end: int
    test_start: int
    test_end: int


def walk_forward_windows(
    n_rows: int,
    *,
    windows: int | None = 4,
    train_ratio: float = 3.0,
    anchored: bool = False,
    gap: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
) -> list[Window]:
    """Return walk-forward windows: each test window follows its train window.

    Without sizes, `windows` consecutive test windows end at the last row and each train
    window is `train_ratio` times as long (the first absorbs the remainder). With
    `test_size` (and `train_size`, default `train_ratio` x `test_size`) as many windows
    as fit start at row 0, at most `windows`. Rolling train windows slide by one test
    window; anchored ones all start at row 0. `gap` rows between a train window and its
    test window are left out of both (an embargo against leakage through overlapping
    labels or indicator state).

    Raises:
        ConfigError: when the rows cannot hold one window.
    """
    if gap < 0 or train_ratio <= 0:
        raise ConfigError("walk-forward: gap >= 0 and train_ratio > 0", component="optimize")
    if test_size is None and train_size is None:
        count = windows or 4
        test = int((n_rows - gap) // (count + train_ratio))
        train = n_rows - gap - count * test
    else:
        test = test_size or max(1, round((train_size or 0) / train_ratio))
        train = train_size or max(1, round(test * train_ratio))
        count = max(0, (n_rows - train - gap) // test) if test > 0 else 0
        count = min(count, windows) if windows else count
    if test < 1 or train < 1 or count < 1:
        raise ConfigError(
            f"walk-forward: {n_rows} candles cannot hold {windows or 1} window(s) "
            f"(train {train}, test {test}, gap {gap})",
            component="optimize",
        )
    out: list[Window] = []
    for k in range(count):
        test_start = train + gap + k * test
        train_end = test_start - gap
        out.append(
            Window(
                k, 0 if anchored else train_end - train, train_end, test_start, test_start + test
            )
        )
    return out


def time_axis(frames: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """Return the sorted union of the frames' open times (ms), the axis windows index."""
    parts = [f.index.as_unit("ms").asi8 for f in frames.values()]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def window_segments(axis: np.ndarray, window: Window) -> tuple[Segment, Segment]:
    """Return the train and test segments (ms bounds) of a window on `axis`."""

    def bound(row: int) -> int | None:
        return int(axis[row]) if row < len(axis) else None

    return (
        Segment(int(axis[window.train_start]), bound(window.train_end)),
        Segment(int(axis[window.test_start]), bound(window.test_end)),
    )


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One window's winner in sample and its score out of sample."""

    window: Window
    train: Segment
    test: Segment
    in_sample: Evaluation | None
    out_of_sample: Evaluation | None
    evaluated: int
    generations_run: int

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        w = self.window
        return {
            "index": w.index,
            "rows": {
                "train": [w.train_start, w.train_end],
                "test": [w.test_start, w.test_end],
            },
            "train_ms": [self.train.start_ms, self.train.end_ms],
            "test_ms": [self.test.start_ms, self.test.end_ms],
            "params": dict(self.in_sample.params) if self.in_sample else None,
            "in_sample": self.in_sample.as_dict() if self.in_sample else None,
            "out_of_sample": self.out_of_sample.as_dict() if self.out_of_sample else None,
            "evaluated": self.evaluated,
            "generations_run": self.generations_run,
        }


@dataclass(frozen=True, slots=True)
class ParamStability:
    """How one parameter's chosen value moves across windows."""

    mean: float
    std: float
    low: float
    high: float
    range_std: float


@dataclass(frozen=True, slots=True)
class WalkForwardReport:
    """In-sample against out-of-sample objective over the windows, and parameter stability.

    `efficiency` is the mean out-of-sample over the mean in-sample objective (Pardo's
    walk-forward efficiency; None unless the in-sample mean is positive): near 1 the
    choice generalises, near 0 or below it was fitted to noise. `range_std` of a parameter
    is the standard deviation of its chosen values over its searched range: large values
    mean each window picked something else.
    """

    windows: tuple[WindowResult, ...]
    stability: dict[str, ParamStability]
    in_sample_mean: float | None
    out_of_sample_mean: float | None
    efficiency: float | None
    out_of_sample_positive: float
    anchored: bool = False
    gap: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "anchored": self.anchored,
            "gap": self.gap,
            "in_sample_mean": self.in_sample_mean,
            "out_of_sample_mean": self.out_of_sample_mean,
            "efficiency": self.efficiency,
            "out_of_sample_positive": self.out_of_sample_positive,
            "stability": {k: dataclasses.asdict(v) for k, v in self.stability.items()},
            "windows": [w.as_dict() for w in self.windows],
        }


def parameter_stability(
    chosen: Sequence[Mapping[str, float]], space: SearchSpace
) -> dict[str, ParamStability]:
    """Return the spread of each searched parameter over the chosen sets."""
    out: dict[str, ParamStability] = {}
    if not chosen:
        return out
    for d in space.dimensions:
        values = np.array([float(p[d.name]) for p in chosen], dtype=np.float64)
        std = float(np.std(values))
        span = d.high - d.low
        out[d.name] = ParamStability(
            float(np.mean(values)),
            std,
            float(np.min(values)),
            float(np.max(values)),
            std / span if span > 0 else 0.0,
        )
    return out


def _walk_forward_report(results: Sequence[WindowResult], space: SearchSpace) -> WalkForwardReport:
    pairs = [
        (r.in_sample.objective, r.out_of_sample.objective)
        for r in results
        if r.in_sample is not None
        and r.out_of_sample is not None
        and r.out_of_sample.status in (Status.OK, Status.FEW_TRADES)
    ]
    is_mean = float(np.mean([a for a, _ in pairs])) if pairs else None
    oos_mean = float(np.mean([b for _, b in pairs])) if pairs else None
    efficiency = (
        oos_mean / is_mean if is_mean is not None and oos_mean is not None and is_mean > 0 else None
    )
    chosen = [r.in_sample.params for r in results if r.in_sample is not None]
    return WalkForwardReport(
        windows=tuple(results),
        stability=parameter_stability(chosen, space),
        in_sample_mean=is_mean,
        out_of_sample_mean=oos_mean,
        efficiency=efficiency,
        out_of_sample_positive=sum(b > 0 for _, b in pairs) / len(pairs) if pairs else 0.0,
        anchored=len(results) > 1 and all(r.window.train_start == 0 for r in results),
        gap=results[0].window.test_start - results[0].window.train_end if results else 0,
    )


# -- Running a job ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptimizationReport:
    """A full-range search and/or a walk-forward analysis, run together."""

    search: SearchResult | None
    walk_forward: WalkForwardReport | None
    stopped: StopReason
    elapsed_s: float
    workers: int

    def as_dict(self, top: int = 20) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "stopped": self.stopped,
            "elapsed_s": self.elapsed_s,
            "workers": self.workers,
            "search": self.search.as_dict(top) if self.search else None,
            "walk_forward": self.walk_forward.as_dict() if self.walk_forward else None,
        }


def _as_frames(
    data: pd.DataFrame | Mapping[str, pd.DataFrame], pair: str
) -> dict[str, pd.DataFrame]:
    frames = {pair: data} if isinstance(data, pd.DataFrame) else dict(data)
    if not frames or any(f.empty for f in frames.values()):
        raise ConfigError("optimize: no candles to optimise on", component="optimize")
    return frames


def run_optimization(
    evaluate: Evaluate,
    data: pd.DataFrame | Mapping[str, pd.DataFrame],
    space: SearchSpace,
    options: SearchOptions,
    *,
    windows: Sequence[Window] = (),
    full: bool = True,
    pair: str = "BTC/USDT",
    feasible: Feasibility | None = None,
    initial: Iterable[Mapping[str, float]] = (),
    backend: Backend | None = None,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    on_generation: Progress | None = None,
) -> OptimizationReport:
    """Search the whole range (`full`) and each walk-forward train window, in lockstep.

    Each window's winner is then scored on its test window (one more batch, run even when
    the budget is spent, since it is what the report is for). Train windows need at least
    `options.min_trades` trades; test windows the same per candle, at least one.

    Args:
        evaluate: the scorer (`BacktestEvaluator` for strategies).
        data: one frame (for `pair`) or frames by pair (one parameter set for all pairs).
        space: the dimensions searched.
        options: sizes, seed, objective, budget, workers and scheduler.
        windows: walk-forward windows on `time_axis(frames)` (see `walk_forward_windows`).
        full: also search the whole range (the CLI's ranked table).
        pair: the pair name when `data` is one frame.
        feasible: a cheap validity check run before a candidate is sent out.
        initial: parameter sets placed in generation 0 (e.g. the configured ones).
        backend: where batches run; by default one is opened from `options` and closed.
        clock: time for the budget (default the wall clock).
        stop: set it to stop before the next generation (reported as `cancelled`).
        on_generation: called with (generation, planned, best objective) after each one.
    """
    frames = _as_frames(data, pair)
    axis = time_axis(frames)
    searches: list[tuple[Search, Segment]] = []
    if full:
        searches.append(
            (make_search(space, options, feasible=feasible, initial=initial), Segment())
        )
    segments = [window_segments(axis, w) for w in windows]
    for w, (train, _) in zip(windows, segments, strict=True):
        searches.append(
            (
                make_search(space, options, index=w.index + 1, feasible=feasible, initial=initial),
                train,
            )
        )
    if not searches:
        raise ConfigError("optimize: nothing to run (no full search, no windows)")
    owned = backend is None
    backend = backend or open_backend(
        evaluate, frames, workers=options.workers, scheduler=options.scheduler
    )
    try:
        log.info(
            "optimization_started",
            searches=len(searches),
            population=options.population,
            generations=options.generations,
            workers=backend.workers,
            objective=options.objective,
        )
        reason, elapsed = drive(
            searches,
            backend,
            time_budget_s=options.time_budget_s,
            clock=clock or WallClock(),
            stop=stop,
            on_generation=on_generation,
        )
        report = None
        if windows:
            window_searches = [s for s, _ in searches[1 if full else 0 :]]
            results = _score_windows(backend, windows, segments, window_searches, options)
            report = _walk_forward_report(results, space)
    finally:
        if owned:
            backend.close()
    search = searches[0][0].result(reason, elapsed) if full else None
    log.info(
        "optimization_finished",
        stopped=reason,
        elapsed_s=round(elapsed, 3),
        best=search.best.params if search and search.best else None,
    )
    return OptimizationReport(search, report, reason, elapsed, backend.workers)


def _score_windows(
    backend: Backend,
    windows: Sequence[Window],
    segments: Sequence[tuple[Segment, Segment]],
    searches: Sequence[Search],
    options: SearchOptions,
) -> list[WindowResult]:
    winners = [s.best for s in searches]
    jobs: list[Job] = [
        (dict(best.params), test)
        for best, (_, test) in zip(winners, segments, strict=True)
        if best is not None
    ]
    outcomes = iter(backend.evaluate(jobs))
    results: list[WindowResult] = []
    for w, (train, test), search, best in zip(windows, segments, searches, winners, strict=True):
        oos = None
        if best is not None:
            share = (w.test_end - w.test_start) / max(1, w.train_end - w.train_start)
            need = max(1, math.ceil(options.min_trades * share)) if options.min_trades else 0
            oos = score(best.params, next(outcomes), options.objective, need)
        results.append(WindowResult(w, train, test, best, oos, search.evaluated, search.generation))
    return results


def optimize(
    evaluate: Evaluate,
    data: pd.DataFrame | Mapping[str, pd.DataFrame],
    space: SearchSpace,
    options: SearchOptions,
    **kwargs: Any,
) -> SearchResult:
    """Search the whole range and return the result (`run_optimization` keywords apply)."""
    report = run_optimization(evaluate, data, space, options, full=True, **kwargs)
    assert report.search is not None
    return report.search


def walk_forward(
    evaluate: Evaluate,
    data: pd.DataFrame | Mapping[str, pd.DataFrame],
    space: SearchSpace,
    windows: Sequence[Window],
    options: SearchOptions,
    **kwargs: Any,
) -> WalkForwardReport:
    """Optimise on each train window, score the winner on its test window, and report."""
    report = run_optimization(evaluate, data, space, options, windows=windows, full=False, **kwargs)
    assert report.walk_forward is not None
    return report.walk_forward


# -- Command line ----------------------------------------------------------------------------

WF_WINDOWS: Final = 4
WF_TRAIN_RATIO: Final = 3.0
MIN_TEST_ROWS: Final = 100
TOP_ROWS: Final = 10


def load_frames(
    settings: Settings,
    pairs: Sequence[str],
    timeframe: str,
    *,
    data: Path | None = None,
    timerange: str | None = None,
) -> dict[str, tuple[pd.DataFrame, str]]:
    """Return each pair's candles and where they came from: `data`, an archive, the sample.

    Raises:
        ConfigError: `data` with more than one pair, or a malformed timerange.
        DataError: no candles for a pair (in the timerange).
    """
    from data_manager import CandleStore, load_candles, sample_file
    from error_handler import DataError

    start_ms = end_ms = None
    if timerange:
        try:
            start_ms, end_ms = parse_timerange(timerange)
        except ValueError as e:
            raise ConfigError(str(e), component="optimize") from e
    if data is not None and len(pairs) != 1:
        raise ConfigError("--data holds one pair: pass exactly one with --pairs")
    store = CandleStore(settings.storage.data_dir, settings.exchange.name)
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    for pair in pairs:
        if data is not None:
            frame, source = load_candles(data, timeframe=timeframe), str(data)
        elif store.has(pair, timeframe):
            frame, source = (
                store.load(pair, timeframe, start_ms, end_ms),
                str(store.path(pair, timeframe)),
            )
        else:
            path = sample_file(settings.storage.sample_dir, pair, timeframe)
            frame, source = load_candles(path, timeframe=timeframe), str(path)
        ts = frame.index.as_unit("ms").asi8
        keep = np.ones(len(ts), dtype=bool)
        if start_ms is not None:
            keep &= ts >= start_ms
        if end_ms is not None:
            keep &= ts < end_ms
        frame = frame[keep]
        if frame.empty:
            raise DataError(
                f"no {timeframe} candles for {pair} in {timerange or 'the data'}", pair=pair
            )
        out[pair] = (frame, source)
    return out


def _cli_windows(n_rows: int) -> list[Window]:
    try:
        windows = walk_forward_windows(n_rows, windows=WF_WINDOWS, train_ratio=WF_TRAIN_RATIO)
    except ConfigError:
        return []
    return windows if windows[0].test_end - windows[0].test_start >= MIN_TEST_ROWS else []


def _output_path(directory: Path, stem: str, now: datetime) -> Path:
    base = f"{stem}-{now:%Y%m%dT%H%M%SZ}"
    path = directory / f"{base}.json"
    counter = 2
    while path.exists():
        path = directory / f"{base}-{counter}.json"
        counter += 1
    return path


async def run_optimize_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Run `--mode optimize`: search, walk forward, print a ranked table, write JSON.

    Reads `args.strategy`, `args.pairs` (comma-separated), `args.timeframe`, `args.data`,
    `args.timerange` and `args.summary_json`, each defaulting to `settings.strategy`.
    The search runs in a worker thread (its Dask client calls block), so the loop keeps
    drawing the progress bar; a cancelled run stops before the next generation. The
    result goes atomically to `<data_dir>/optimize/<strategy>-<UTC time>.json` and to
    `--summary-json` when given. Returns 0 when a feasible candidate was found, else 1.

    Raises:
        ConfigError: bad strategy, pairs, timerange or scheduler address.
        DataError: no candles to optimise on.
    """
    strategy = getattr(args, "strategy", None) or settings.strategy.name
    pairs_text = getattr(args, "pairs", None)
    pairs = (
        [p.strip() for p in pairs_text.split(",") if p.strip()]
        if pairs_text
        else list(settings.strategy.pairs)
    )
    timeframe = getattr(args, "timeframe", None) or settings.strategy.timeframe
    space = strategy_space(strategy)
    loaded = await asyncio.to_thread(
        load_frames,
        settings,
        pairs,
        timeframe,
        data=getattr(args, "data", None),
        timerange=getattr(args, "timerange", None),
    )
    frames = {pair: frame for pair, (frame, _) in loaded.items()}
    options = SearchOptions.from_settings(settings.optimization)
    evaluator = BacktestEvaluator.from_settings(settings, strategy, timeframe)
    windows = _cli_windows(len(time_axis(frames)))
    configured = {k: v for k, v in settings.strategy.params.items() if k in space.names}
    defaults = {k: float(p.default) for k, p in _strategy_class(strategy).parameters.items()}
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    started = datetime.now(UTC)
    with _progress_bar() as progress:
        task = progress.add_task(f"optimising {strategy}", total=options.generations)

        def on_generation(done: int, planned: int, best: float | None) -> None:
            text = f"optimising {strategy}" + (
                f"  best {options.objective} {best:.4g}" if best is not None else ""
            )
            loop.call_soon_threadsafe(
                functools.partial(
                    progress.update, task, completed=done, total=planned, description=text
                )
            )

        try:
            report = await asyncio.to_thread(
                run_optimization,
                evaluator,
                frames,
                space,
                options,
                windows=windows,
                feasible=strategy_feasibility(strategy),
                initial=[{**defaults, **configured}],
                stop=stop,
                on_generation=on_generation,
            )
        except asyncio.CancelledError:
            stop.set()
            raise
    document = {
        "kind": "kestrel.optimize",
        "version": 1,
        "created": started.isoformat(),
        "strategy": strategy,
        "pairs": pairs,
        "timeframe": timeframe,
        "timerange": getattr(args, "timerange", None),
        "data": {
            pair: {
                "source": source,
                "candles": len(frame),
                "first_ts": int(frame.index[0].value // 1_000_000),
                "last_ts": int(frame.index[-1].value // 1_000_000),
            }
            for pair, (frame, source) in loaded.items()
        },
        "options": {
            "population": options.population,
            "generations": options.generations,
            "seed": options.seed,
            "objective": options.objective,
            "min_trades": options.min_trades,
            "time_budget_s": options.time_budget_s,
            "workers": report.workers,
            "scheduler": options.scheduler,
        },
        "costs": {
            "starting_balance": evaluator.starting_balance,
            "taker_fee": evaluator.taker_fee,
            "slippage_bps": evaluator.slippage_bps,
            "fill_at": evaluator.fill_at,
            "profile": "all_in",
        },
        "best": report.search.best.as_dict() if report.search and report.search.best else None,
        **report.as_dict(),
    }
    text = json.dumps(document, indent=2, default=str)
    stem = Path(strategy).stem if strategy.endswith(".py") else strategy
    path = _output_path(settings.storage.data_dir / "optimize", stem, started)
    await asyncio.to_thread(atomic_write, path, text)
    summary_json = getattr(args, "summary_json", None)
    if summary_json is not None:
        await asyncio.to_thread(atomic_write, Path(summary_json), text)
    print_report(report, space, strategy=strategy, path=path)
    log.info("optimization_written", path=str(path))
    return 0 if report.search is not None and report.search.best is not None else 1


class _progress_bar:  # used like a function: `with _progress_bar() as bar`
    def __enter__(self) -> Any:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._rich = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._rich.__enter__()
        return self._rich

    def __exit__(self, *exc: Any) -> None:
        self._rich.__exit__(*exc)


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2%}" if percent else f"{value:.4g}"


def _scored(e: Evaluation | None) -> str:
    # A dagger marks a score made on fewer trades than the minimum.
    if e is None or e.status not in (Status.OK, Status.FEW_TRADES):
        return "-" if e is None else str(e.status)
    return _fmt(e.objective) + ("\u2020" if e.status is Status.FEW_TRADES else "")


def _span(segment: Segment, fmt: str) -> str:
    start = "start" if segment.start_ms is None else f"{ms_to_datetime(segment.start_ms):{fmt}}"
    end = "end" if segment.end_ms is None else f"{ms_to_datetime(segment.end_ms):{fmt}}"
    return f"{start} \u2192 {end}"


def print_report(
    report: OptimizationReport, space: SearchSpace, *, strategy: str, path: Path | None = None
) -> None:
    """Print the ranked candidates, the walk-forward windows and the stop reason."""
    from rich.console import Console

    console = Console()
    search = report.search
    if search is not None:
        if search.best is None:
            console.print(f"[red]no feasible candidate for {strategy}[/]")
        if search.best is None or search.failed:
            for error in search.errors:
                console.print(f"candidates refused or failed: {error}", markup=False)
        console.print(_ranking_table(search, space, strategy))
        console.print(
            f"{search.evaluated} backtests, {search.infeasible} infeasible, "
            f"{search.failed} failed; {search.generations_run}/{search.generations_planned} "
            f"generations on {report.workers} worker(s) in {report.elapsed_s:.1f} s"
        )
    wf = report.walk_forward
    if wf is not None:
        console.print(_walk_forward_table(wf))
        spread = ", ".join(f"{k} {v.range_std:.0%}" for k, v in wf.stability.items())
        console.print(
            f"walk-forward efficiency {_fmt(wf.efficiency)} (out-of-sample mean "
            f"{_fmt(wf.out_of_sample_mean)} / in-sample mean {_fmt(wf.in_sample_mean)}); "
            f"out of sample positive in {wf.out_of_sample_positive:.0%} of windows; "
            f"chosen parameters' spread (std / range): {spread or '-'}; "
            "\u2020 fewer trades than the minimum"
        )
    if report.stopped == "time_budget":
        console.print("[yellow]time budget spent: stopped early, showing the best found so far[/]")
    elif report.stopped == "cancelled":
        console.print("[yellow]cancelled: showing the best found so far[/]")
    if path is not None:
        console.print(f"written to {path}")


def _ranking_table(search: SearchResult, space: SearchSpace, strategy: str) -> Any:
    from rich.table import Table

    rows = search.leaderboard[:TOP_ROWS]
    table = Table(title=f"{strategy}: best {len(rows)} by {search.objective}")
    extra = [m for m in ("sharpe", "total_return") if m != OBJECTIVE_METRIC[search.objective]]
    names = {"total_return": "return"}
    for column in ("#", *space.names, search.objective, *(names.get(m, m) for m in extra)):
        table.add_column(column, justify="right")
    for column in ("max dd", "trades", "status"):
        table.add_column(column, justify="right")
    for rank, e in enumerate(rows, 1):
        m = e.metrics
        table.add_row(
            str(rank),
            *(f"{e.params[n]:g}" for n in space.names),
            _fmt(e.objective, percent=search.objective == "return"),
            *(_fmt(m.get(k), percent=k == "total_return") for k in extra),
            _fmt(m.get("max_drawdown"), percent=True),
            str(e.n_trades),
            str(e.status),
        )
    return table


def _walk_forward_table(wf: WalkForwardReport) -> Any:
    from rich.table import Table

    first = wf.windows[0].train.start_ms or 0
    last = wf.windows[-1].test.start_ms or 0
    fmt = "%Y-%m-%d" if last - first > 2 * 86_400_000 else "%m-%d %H:%M"
    table = Table(title="walk-forward: in sample vs out of sample")
    for column in ("window", "train", "test", "params", "in sample", "out of sample", "oos trades"):
        # Parameter lists wrap rather than lose their values to an ellipsis.
        table.add_column(
            column, justify="right", overflow="fold" if column == "params" else "ellipsis"
        )
    for r in wf.windows:
        table.add_row(
            str(r.window.index),
            _span(r.train, fmt),
            _span(r.test, fmt),
            " ".join(f"{k}={v:g}" for k, v in r.in_sample.params.items()) if r.in_sample else "-",
            _scored(r.in_sample),
            _scored(r.out_of_sample),
            str(r.out_of_sample.n_trades) if r.out_of_sample else "-",
        )
    return table
