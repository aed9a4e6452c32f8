"""Where the optimiser's candidates are backtested: in process or fanned out on Dask.

`BacktestEvaluator` scores one parameter set with the fast path; `evaluate_job` runs one
(parameters, segment) job over every pair; `InProcessBackend` and `DaskBackend` run a
generation's batch of jobs. Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd
import structlog

from error_handler import ConfigError
from optimization_scoring import (
    CHUNKS_PER_WORKER,
    Evaluate,
    Job,
    Outcome,
    Segment,
    backtest_metrics,
    period_returns,
    score_result,
    with_periods,
)
from search_space import _strategy_class


if TYPE_CHECKING:
    from config import RewardSettings, Settings


log = structlog.get_logger(__name__)


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
    periods: int = 0
    reward: RewardSettings | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        strategy: str,
        timeframe: str,
        *,
        periods: int = 0,
        one_score: bool = False,
    ) -> BacktestEvaluator:
        """Return an evaluator with the simulation costs of `settings`.

        With `periods` > 0 the metrics also hold `stability` and that many per-period
        returns (`optimization_scoring.with_periods`), for the Pareto search; with
        `one_score` they hold `score`, the one score under `settings.reward`
        (`optimization_scoring.score_result`), a few times the backtest's own cost.
        """
        sim = settings.simulation
        return cls(
            strategy,
            timeframe,
            starting_balance=sim.starting_balance,
            taker_fee=sim.taker_fee,
            maker_fee=sim.maker_fee,
            slippage_bps=sim.slippage_bps,
            fill_at=sim.fill_at,
            periods=periods,
            reward=settings.reward if one_score else None,
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
        metrics = backtest_metrics(result)
        if self.reward is not None:
            metrics["score"] = score_result(result, self.reward)
        if self.periods <= 0:
            return metrics
        return with_periods(
            metrics, period_returns(result.equity, result.starting_balance, self.periods)
        )


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


@contextlib.contextmanager
def backend_for(
    backend: Backend | None,
    evaluate: Evaluate,
    frames: Mapping[str, pd.DataFrame],
    *,
    workers: int,
    scheduler: str | None,
) -> Iterator[Backend]:
    """Yield the caller's `backend`, or one opened for this job and closed when it ends.

    A caller's backend stays open (it may run the next job); one opened here
    (`open_backend`) is closed however the job ends.
    """
    if backend is not None:
        yield backend
        return
    opened = open_backend(evaluate, frames, workers=workers, scheduler=scheduler)
    try:
        yield opened
    finally:
        opened.close()
