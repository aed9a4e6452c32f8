"""Running an optimisation job: a search, or a walk-forward analysis, over candle frames.

`run_optimization` opens a backend, drives the searches (one per window) and scores each
window's winner out of sample; `optimize` and `walk_forward` are its two common shapes.
Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import structlog

from error_handler import ConfigError
from genetic_search import (
    Feasibility,
    Progress,
    Search,
    SearchOptions,
    SearchResult,
    drive,
    make_search,
)
from optimization_backends import Backend, backend_for
from optimization_scoring import Evaluate, Job, Segment, StopReason, score
from search_space import SearchSpace
from utils.utilities import Clock, WallClock
from walk_forward_analysis import (
    WalkForwardReport,
    Window,
    WindowResult,
    _walk_forward_report,
    time_axis,
    window_segments,
)


log = structlog.get_logger(__name__)


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


def as_frames(
    data: pd.DataFrame | Mapping[str, pd.DataFrame], pair: str
) -> dict[str, pd.DataFrame]:
    """Return the candles to optimise on by pair (one frame is `pair`'s).

    Raises:
        ConfigError: no candles at all, or an empty frame.
    """
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
    frames = as_frames(data, pair)
    segments = [window_segments(time_axis(frames), w) for w in windows]
    searches = _searches(space, options, windows, segments, full, feasible, initial)
    with backend_for(
        backend, evaluate, frames, workers=options.workers, scheduler=options.scheduler
    ) as running:
        log.info(
            "optimization_started",
            searches=len(searches),
            population=options.population,
            generations=options.generations,
            workers=running.workers,
            objective=options.objective,
        )
        reason, elapsed = drive(
            searches,
            running,
            time_budget_s=options.time_budget_s,
            clock=clock or WallClock(),
            stop=stop,
            on_generation=on_generation,
        )
        report = None
        if windows:
            window_searches = [s for s, _ in searches[1 if full else 0 :]]
            results = _score_windows(running, windows, segments, window_searches, options)
            report = _walk_forward_report(results, space)
    search = searches[0][0].result(reason, elapsed) if full else None
    log.info(
        "optimization_finished",
        stopped=reason,
        elapsed_s=round(elapsed, 3),
        best=search.best.params if search and search.best else None,
    )
    return OptimizationReport(search, report, reason, elapsed, running.workers)


def _searches(
    space: SearchSpace,
    options: SearchOptions,
    windows: Sequence[Window],
    segments: Sequence[tuple[Segment, Segment]],
    full: bool,
    feasible: Feasibility | None,
    initial: Iterable[Mapping[str, float]],
) -> list[tuple[Search, Segment]]:
    # The full-range search first (when asked for), then one per window on its train part.
    searches: list[tuple[Search, Segment]] = []
    if full:
        searches.append(
            (make_search(space, options, feasible=feasible, initial=initial), Segment())
        )
    for w, (train, _) in zip(windows, segments, strict=True):
        searches.append(
            (
                make_search(space, options, index=w.index + 1, feasible=feasible, initial=initial),
                train,
            )
        )
    if not searches:
        raise ConfigError("optimize: nothing to run (no full search, no windows)")
    return searches


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
