"""Running a Pareto optimisation: full-range front, walk-forward folds, overfitting, robustness.

`run_pareto` is what `--mode optimize` runs by default. In one lockstep pass it searches
the whole range (the front shown and the point proposed) and each walk-forward train
window; then, with the same backend:

1. **Folds.** Each window's choice (its front's best scalar score) is backtested on the
   test window that follows. The report compares in-sample with out-of-sample scores per
   fold, the walk-forward efficiency (mean out-of-sample over mean in-sample score,
   Pardo) and stitches the out-of-sample per-period returns into one equity curve: the
   record the procedure would have produced, trading each fold's choice on data it never
   saw. A verdict names what happened (`robust`, `degraded`, `collapsed`, `no edge`).
2. **Plateau.** Among the front's best few by scalar score, the point whose neighbourhood
   scores best is chosen (`sensitivity.plateau_choice`).
3. **Overfitting.** The deflated Sharpe ratio of the chosen point's per-period returns
   given every trial of the full search (against the best of that many no-edge trials,
   whose Sharpe ratios scatter by sampling error, or by the trials' own smaller scatter;
   `dsr_at_trial_variance` shows the textbook figure on the raw scatter), and the
   probability of backtest overfitting by CSCV over a bounded matrix of trials (the
   front, the final population and a reservoir sample), both from `overfitting`.
4. **Sensitivity** around the chosen point (`sensitivity.analyse`).

Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pandas as pd
import structlog

from optimization_backends import Backend, backend_for
from optimization_run import as_frames
from optimization_scoring import Evaluate, Job, Segment, StopReason
from overfitting import deflated_sharpe, pbo, probabilistic_sharpe, sharpe_per_period
from pareto_search import (
    Feasibility,
    ParetoOptions,
    ParetoResult,
    ParetoSearch,
    Progress,
    Trial,
    drive_pareto,
    fingerprint,
    load_checkpoint,
    make_trial,
)
from search_space import SearchSpace
from sensitivity import PlateauCandidate, SensitivityReport, analyse, plateau_choice
from utils.utilities import Clock, WallClock
from walk_forward_analysis import Window, time_axis, window_segments


log = structlog.get_logger(__name__)

Verdict = Literal["robust", "degraded", "collapsed", "no edge", "none"]
DEGRADED: Final = 0.5  # a fold keeps less than this share of its in-sample score
PBO_BLOCKS: Final = 16


def _summary(trial: Trial | None) -> dict[str, Any] | None:
    if trial is None:
        return None
    out = trial.as_dict()
    out.pop("params", None)
    return out


@dataclass(frozen=True, slots=True)
class Fold:
    """One walk-forward window: the in-sample choice and how it did out of sample."""

    window: Window
    train: Segment
    test: Segment
    in_sample: Trial | None
    out_of_sample: Trial | None
    front: int
    evaluated: int

    @property
    def degraded(self) -> bool:
        """Return True when out of sample kept less than half of the in-sample score."""
        if self.in_sample is None or self.out_of_sample is None:
            return True
        oos, ins = self.out_of_sample.score, self.in_sample.score
        if not math.isfinite(oos):
            return True
        return oos <= 0 or (ins > 0 and oos < DEGRADED * ins)

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        w = self.window
        return {
            "index": w.index,
            "train": [self.train.start_ms, self.train.end_ms],
            "test": [self.test.start_ms, self.test.end_ms],
            "rows": {"train": [w.train_start, w.train_end], "test": [w.test_start, w.test_end]},
            "params": dict(self.in_sample.params) if self.in_sample else None,
            "in_sample": _summary(self.in_sample),
            "out_of_sample": _summary(self.out_of_sample),
            "front": self.front,
            "evaluated": self.evaluated,
            "degraded": self.degraded,
        }


@dataclass(frozen=True, slots=True)
class WalkForwardSummary:
    """The folds, their efficiency, the stitched out-of-sample curve and the verdict."""

    folds: tuple[Fold, ...]
    in_sample_mean: float | None
    out_of_sample_mean: float | None
    efficiency: float | None
    stitched: tuple[tuple[int, float], ...]
    verdict: Verdict
    message: str
    anchored: bool

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "folds": [f.as_dict() for f in self.folds],
            "efficiency": self.efficiency,
            "in_sample_mean": self.in_sample_mean,
            "out_of_sample_mean": self.out_of_sample_mean,
            "verdict": self.verdict,
            "message": self.message,
            "recent_out_of_sample_mean": recent_out_of_sample(self.folds),
            "anchored": self.anchored,
            "stitched": [[ts, equity] for ts, equity in self.stitched],
        }


@dataclass(frozen=True, slots=True)
class Overfitting:
    """Deflated Sharpe ratio of the chosen point and PBO of the trials."""

    dsr: float | None
    pbo: float | None
    n_trials: int
    sharpe: float | None
    sharpe_variance: float
    null_variance: float
    observed_variance_dsr: float | None
    probabilistic_sharpe: float | None
    pbo_configurations: int
    pbo_splits: int
    degradation: float | None

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report."""
        return {
            "dsr": self.dsr,
            "pbo": self.pbo,
            "n_trials": self.n_trials,
            "sharpe_per_period": self.sharpe,
            "trial_sharpe_variance": self.sharpe_variance,
            "benchmark_sharpe_variance": self.null_variance,
            "dsr_at_trial_variance": self.observed_variance_dsr,
            "probabilistic_sharpe": self.probabilistic_sharpe,
            "pbo_configurations": self.pbo_configurations,
            "pbo_splits": self.pbo_splits,
            "pbo_degradation": self.degradation,
        }


@dataclass(frozen=True, slots=True)
class ParetoReport:
    """Everything `--mode optimize` reports by default."""

    search: ParetoResult | None
    best: Trial | None
    plateau: tuple[PlateauCandidate, ...]
    walk_forward: WalkForwardSummary | None
    overfitting: Overfitting | None
    sensitivity: SensitivityReport | None
    stopped: StopReason
    elapsed_s: float
    workers: int

    def as_dict(self) -> dict[str, Any]:
        """Return plain data for the JSON report (`pareto`, `best`, `walk_forward`, ...)."""
        best = self.best.as_dict() if self.best else None
        return {
            "stopped": self.stopped,
            "elapsed_s": self.elapsed_s,
            "workers": self.workers,
            "pareto": [t.as_dict() for t in self.search.front] if self.search else [],
            "best": best,
            "search": self.search.as_dict() if self.search else None,
            "walk_forward": self.walk_forward.as_dict() if self.walk_forward else None,
            "overfitting": self.overfitting.as_dict() if self.overfitting else None,
            "sensitivity": (
                {
                    **self.sensitivity.as_dict(),
                    "plateau_candidates": [c.as_dict() for c in self.plateau],
                }
                if self.sensitivity
                else None
            ),
        }


# -- Running ---------------------------------------------------------------------------------


def run_pareto(
    evaluate: Evaluate,
    data: pd.DataFrame | Mapping[str, pd.DataFrame],
    space: SearchSpace,
    options: ParetoOptions,
    *,
    windows: Sequence[Window] = (),
    pair: str = "BTC/USDT",
    feasible: Feasibility | None = None,
    initial: Iterable[Mapping[str, float]] = (),
    backend: Backend | None = None,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    on_generation: Progress | None = None,
    checkpoint: Path | None = None,
    sensitivity: bool = True,
    max_generations: int | None = None,
) -> ParetoReport:
    """Search the front, walk forward, and estimate overfitting and sensitivity.

    Args:
        evaluate: the scorer; it must report `stability` and per-period returns
            (`BacktestEvaluator(periods=...)`) for the default objectives and estimates.
        data: one frame (for `pair`) or frames by pair.
        space: the dimensions searched.
        options: sizes, seed, objectives, scalar score, budget, workers, scheduler.
        windows: walk-forward windows on `time_axis(frames)`; empty for none.
        pair: the pair name when `data` is one frame.
        feasible: the strategy's refusal check (`strategy_feasibility`).
        initial: parameter sets placed in generation 0 (the configured ones).
        backend: where batches run; by default one is opened from `options` and closed.
        clock: time for the budget (default the wall clock).
        stop: set it to stop before the next generation (reported as `cancelled`).
        on_generation: called with (generation, planned, best score) after each one.
        checkpoint: a file written after each generation and resumed from when it holds
            this same job (space, options, candles, windows).
        sensitivity: run the plateau choice and the sensitivity analysis.
        max_generations: stop after this many generations of this call (interruption).
    """
    frames = as_frames(data, pair)
    axis = time_axis(frames)
    segments = [window_segments(axis, w) for w in windows]
    tag = _job_tag(space, options, axis, sorted(frames), windows)
    searches = _searches(space, options, windows, feasible, initial, checkpoint=checkpoint, tag=tag)
    plan = [(searches[0], Segment()), *zip(searches[1:], (t for t, _ in segments), strict=True)]
    with backend_for(
        backend, evaluate, frames, workers=options.workers, scheduler=options.scheduler
    ) as running:
        log.info(
            "optimization_started",
            method="nsga2",
            searches=len(plan),
            population=options.population,
            generations=options.generations,
            workers=running.workers,
        )
        reason, elapsed = drive_pareto(
            plan,
            running,
            time_budget_s=options.time_budget_s,
            clock=clock or WallClock(),
            stop=stop,
            on_generation=on_generation,
            checkpoint=checkpoint,
            tag=tag,
            max_generations=max_generations,
        )
        report = _finish(
            running, space, options, searches, reason, elapsed, windows, segments, axis,
            evaluate=evaluate, feasible=feasible, sensitivity=sensitivity,
        )  # fmt: skip
    log.info(
        "optimization_finished",
        stopped=reason,
        elapsed_s=round(elapsed, 3),
        front=len(report.search.front) if report.search else 0,
        best=report.best.params if report.best else None,
    )
    return report


def _finish(
    backend: Backend,
    space: SearchSpace,
    options: ParetoOptions,
    searches: Sequence[ParetoSearch],
    reason: StopReason,
    elapsed: float,
    windows: Sequence[Window],
    segments: Sequence[tuple[Segment, Segment]],
    axis: np.ndarray,
    *,
    evaluate: Evaluate,
    feasible: Feasibility | None,
    sensitivity: bool,
) -> ParetoReport:
    # After the search: folds out of sample, the robust choice, overfitting estimates.
    result = searches[0].result(reason)
    folds = _folds(backend, options, windows, segments, searches[1:])
    summary = _walk_forward(folds, axis, evaluate) if windows else None
    best = result.best
    plateau: list[PlateauCandidate] = []
    report: SensitivityReport | None = None
    if best is not None and sensitivity and reason == "completed":
        best, plateau, report = _robust_choice(backend, space, options, result, feasible)
    return ParetoReport(
        result,
        best,
        tuple(plateau),
        summary,
        _overfitting(result, best),
        report,
        reason,
        elapsed,
        backend.workers,
    )


def _job_tag(
    space: SearchSpace,
    options: ParetoOptions,
    axis: np.ndarray,
    pairs: list[str],
    windows: Sequence[Window],
) -> str:
    # What makes a checkpoint this job's: the space, the search's sizes and scores, the
    # candles (count, first and last time, pairs) and the windows.
    return fingerprint(
        space,
        (options.population, options.generations, options.seed, options.objectives),
        (options.scalar, options.min_trades, options.reservoir),
        (len(axis), int(axis[0]), int(axis[-1]), pairs),
        tuple(windows),
    )


def _searches(
    space: SearchSpace,
    options: ParetoOptions,
    windows: Sequence[Window],
    feasible: Feasibility | None,
    initial: Iterable[Mapping[str, float]],
    *,
    checkpoint: Path | None,
    tag: str,
) -> list[ParetoSearch]:
    # Resumed from `checkpoint` when it holds this job (`tag`); else new: the full range
    # first (index 0), then one search per window, each with its own seed.
    resumed = load_checkpoint(checkpoint, tag, feasible) if checkpoint else None
    if resumed is not None:
        return resumed
    initial = list(initial)
    return [
        ParetoSearch(space, options, index=index, feasible=feasible, initial=initial)
        for index in (0, *(w.index + 1 for w in windows))
    ]


def _scorer(
    backend: Backend,
    options: ParetoOptions,
    segment: Segment,
    feasible: Feasibility | None,
    min_trades: int,
) -> Any:
    def score_batch(points: Sequence[Mapping[str, float]]) -> list[float]:
        refused = [feasible(p) if feasible else None for p in points]
        jobs: list[Job] = [
            (dict(p), segment) for p, r in zip(points, refused, strict=True) if r is None
        ]
        outcomes = iter(backend.evaluate(jobs))
        return [
            make_trial(p, next(outcomes), options, min_trades).score if r is None else math.nan
            for p, r in zip(points, refused, strict=True)
        ]

    return score_batch


def _robust_choice(
    backend: Backend,
    space: SearchSpace,
    options: ParetoOptions,
    result: ParetoResult,
    feasible: Feasibility | None,
) -> tuple[Trial, list[PlateauCandidate], SensitivityReport]:
    score_batch = _scorer(backend, options, Segment(), feasible, options.min_trades)
    ranked = sorted(
        (t for t in result.front if math.isfinite(t.score)), key=lambda t: t.score, reverse=True
    )
    index, plateau = plateau_choice(space, [(t.params, t.score) for t in ranked], score_batch)
    chosen = ranked[index]
    if index:
        log.info(
            "plateau_preferred",
            chosen=chosen.params,
            over=ranked[0].params,
            neighbourhood=plateau[index].neighbourhood,
        )
    report = analyse(space, chosen.params, chosen.score, score_batch, seed=options.seed)
    if report.knife_edge:
        log.warning("knife_edge_optimum", params=chosen.params, retained=report.retained)
    return chosen, plateau, report


def _folds(
    backend: Backend,
    options: ParetoOptions,
    windows: Sequence[Window],
    segments: Sequence[tuple[Segment, Segment]],
    searches: Sequence[ParetoSearch],
) -> list[Fold]:
    chosen = [s.best for s in searches]
    jobs: list[Job] = [
        (dict(c.params), test) for c, (_, test) in zip(chosen, segments, strict=True) if c
    ]
    outcomes = iter(backend.evaluate(jobs))
    folds: list[Fold] = []
    for w, (train, test), s, c in zip(windows, segments, searches, chosen, strict=True):
        oos = None
        if c is not None:
            share = (w.test_end - w.test_start) / max(1, w.train_end - w.train_start)
            need = max(1, math.ceil(options.min_trades * share)) if options.min_trades else 0
            oos = make_trial(c.params, next(outcomes), options, need)
        folds.append(Fold(w, train, test, c, oos, len(s.front()), s.evaluated))
    return folds


def _walk_forward(
    folds: Sequence[Fold], axis: np.ndarray, evaluate: Evaluate
) -> WalkForwardSummary:
    pairs = [
        (f.in_sample.score, f.out_of_sample.score)
        for f in folds
        if f.in_sample is not None
        and f.out_of_sample is not None
        and math.isfinite(f.out_of_sample.score)
    ]
    is_mean = float(np.mean([a for a, _ in pairs])) if pairs else None
    oos_mean = float(np.mean([b for _, b in pairs])) if pairs else None
    efficiency = (
        oos_mean / is_mean if is_mean is not None and oos_mean is not None and is_mean > 0 else None
    )
    verdict, message = _verdict(folds, is_mean, oos_mean, efficiency)
    return WalkForwardSummary(
        folds=tuple(folds),
        in_sample_mean=is_mean,
        out_of_sample_mean=oos_mean,
        efficiency=efficiency,
        stitched=_stitch(folds, axis, float(getattr(evaluate, "starting_balance", 1.0))),
        verdict=verdict,
        message=message,
        anchored=len(folds) > 1 and all(f.window.train_start == 0 for f in folds),
    )


def _verdict(
    folds: Sequence[Fold],
    is_mean: float | None,
    oos_mean: float | None,
    efficiency: float | None,
) -> tuple[Verdict, str]:
    if is_mean is None or oos_mean is None:
        return "none", "no fold could be scored out of sample"
    bad = [f.window.index for f in folds if f.degraded]
    recent = folds[len(folds) // 2 :]
    where = f"; degraded folds: {', '.join(map(str, bad))}" if bad else ""
    figures = (
        f"in-sample mean {is_mean:.3g}, out-of-sample mean {oos_mean:.3g}, "
        f"efficiency {'-' if efficiency is None else f'{efficiency:.2f}'}{where}"
    )
    if is_mean <= 0:
        return "no edge", f"no in-sample edge to validate ({figures})"
    if oos_mean <= 0:
        return "collapsed", f"out-of-sample collapse: the in-sample edge did not last ({figures})"
    if recent and all(f.degraded for f in recent):
        # What matters for trading tomorrow is the latest data: an edge that held early
        # and is gone in every recent fold has vanished, whatever the average says.
        latest = ", ".join(str(f.window.index) for f in recent)
        return "collapsed", (
            f"the edge vanished: every recent fold ({latest}) lost it out of sample "
            f"while in sample stayed high ({figures})"
        )
    if (efficiency is not None and efficiency < DEGRADED) or len(bad) * 2 >= len(folds):
        return "degraded", f"out of sample kept under half of the in-sample edge ({figures})"
    return "robust", f"out of sample held up ({figures})"


def recent_out_of_sample(folds: Sequence[Fold]) -> float | None:
    """Return the mean out-of-sample score of the latest half of the folds (None if none)."""
    recent = [
        f.out_of_sample.score
        for f in folds[len(folds) // 2 :]
        if f.out_of_sample is not None and math.isfinite(f.out_of_sample.score)
    ]
    return float(np.mean(recent)) if recent else None


def _stitch(folds: Sequence[Fold], axis: np.ndarray, start: float) -> tuple[tuple[int, float], ...]:
    # Each fold's test window contributes its per-period returns, timed evenly over the
    # window; the curve compounds them from the starting balance.
    points: list[tuple[int, float]] = []
    equity = start
    for f in folds:
        trial = f.out_of_sample
        if trial is None or trial.returns.size == 0:
            continue
        first = int(axis[f.window.test_start])
        last = int(axis[min(f.window.test_end, len(axis)) - 1])
        times = np.linspace(first, last, trial.returns.size + 1).round().astype(np.int64)
        if not points:
            points.append((int(times[0]), equity))
        for ts, r in zip(times[1:], trial.returns, strict=True):
            equity *= 1.0 + float(r)
            points.append((int(ts), equity))
    return tuple(points)


def _overfitting(result: ParetoResult, best: Trial | None) -> Overfitting | None:
    if best is None or best.returns.size < 2:
        return None
    n_trials = max(1, result.evaluated)
    periods = best.returns.size
    # The benchmark is the best Sharpe of n_trials configurations with NO edge. Their
    # estimates scatter by sampling error alone, 1 / (T - 1) per-period (Lo; Mertens at a
    # zero Sharpe), or less when the trials are correlated (a GA's neighbours are). The
    # trials' observed dispersion is used when it is smaller; when it is larger, real
    # differences between configurations (some with an edge, some losing) inflate it and
    # it no longer measures luck: a clear edge would read as noise.
    variance = min(result.sharpe_variance, 1.0 / (periods - 1))
    dsr = deflated_sharpe(best.returns, n_trials, variance)
    sharpe = sharpe_per_period(best.returns)
    # The matrix PBO reads: front, final population and reservoir sample, one column each.
    columns: dict[tuple[float, ...], np.ndarray] = {}
    for t in (*result.front, *result.population, *result.sample):
        if t.returns.size == best.returns.size:
            columns.setdefault(tuple(t.params.values()), t.returns)
    blocks = min(PBO_BLOCKS, periods - periods % 2)
    estimate = None
    if len(columns) >= 2 and blocks >= 2:
        estimate = pbo(np.column_stack(list(columns.values())), blocks=blocks)
    return Overfitting(
        dsr=dsr,
        pbo=estimate.pbo if estimate else None,
        n_trials=n_trials,
        sharpe=sharpe,
        sharpe_variance=result.sharpe_variance,
        null_variance=variance,
        observed_variance_dsr=deflated_sharpe(best.returns, n_trials, result.sharpe_variance),
        probabilistic_sharpe=probabilistic_sharpe(sharpe, periods),
        pbo_configurations=len(columns),
        pbo_splits=estimate.splits if estimate else 0,
        degradation=estimate.degradation if estimate else None,
    )
