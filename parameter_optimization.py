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

This module is the entry point; the parts live in their own modules and are re-exported
here, so `from parameter_optimization import X` works for all of them:

* `optimization_scoring`: objectives, `Status`, `Segment`, metrics, `Evaluation`, `score`.
* `search_space`: `Dimension`, `SearchSpace`, `strategy_space`, `strategy_feasibility`.
* `optimization_backends`: `BacktestEvaluator`, `evaluate_job`, in-process and Dask backends.
* `genetic_search`: `GeneticSearch`, `RandomSearch`, `SearchOptions`, `SearchResult`, `drive`.
* `walk_forward_analysis`: `Window`, `walk_forward_windows`, `WalkForwardReport`.
* `optimization_run`: `run_optimization`, `optimize`, `walk_forward`, `OptimizationReport`.
* `optimization_cli`: `run_optimize_cli`, `print_report`.
* `data_manager`: `load_frames` (the one candle loader of the replays).
"""

from __future__ import annotations

from data_manager import load_frames
from genetic_search import (
    Feasibility,
    GenerationStats,
    GeneticSearch,
    Progress,
    RandomSearch,
    Search,
    SearchOptions,
    SearchResult,
    drive,
    make_search,
)
from optimization_backends import (
    Backend,
    BacktestEvaluator,
    DaskBackend,
    InProcessBackend,
    evaluate_job,
    open_backend,
    resolve_workers,
)
from optimization_cli import (
    MIN_TEST_ROWS,
    TOP_ROWS,
    WF_TRAIN_RATIO,
    WF_WINDOWS,
    print_report,
    run_optimize_cli,
)
from optimization_run import (
    OptimizationReport,
    optimize,
    run_optimization,
    walk_forward,
)
from optimization_scoring import (
    CHUNKS_PER_WORKER,
    MAX_ERRORS,
    MAX_TRIES,
    MIN_DRAWDOWN,
    MIN_TRADES,
    OBJECTIVE_METRIC,
    RATIO_CAP,
    YEAR_MS,
    Evaluate,
    Evaluation,
    Job,
    Key,
    Objective,
    Outcome,
    Segment,
    Status,
    StopReason,
    backtest_metrics,
    equity_metrics,
    score,
)
from search_space import (
    Dimension,
    SearchSpace,
    strategy_feasibility,
    strategy_space,
)
from walk_forward_analysis import (
    ParamStability,
    WalkForwardReport,
    Window,
    WindowResult,
    parameter_stability,
    time_axis,
    walk_forward_windows,
    window_segments,
)


__all__ = [
    "CHUNKS_PER_WORKER",
    "MAX_ERRORS",
    "MAX_TRIES",
    "MIN_DRAWDOWN",
    "MIN_TEST_ROWS",
    "MIN_TRADES",
    "OBJECTIVE_METRIC",
    "RATIO_CAP",
    "TOP_ROWS",
    "WF_TRAIN_RATIO",
    "WF_WINDOWS",
    "YEAR_MS",
    "Backend",
    "BacktestEvaluator",
    "DaskBackend",
    "Dimension",
    "Evaluate",
    "Evaluation",
    "Feasibility",
    "GenerationStats",
    "GeneticSearch",
    "InProcessBackend",
    "Job",
    "Key",
    "Objective",
    "OptimizationReport",
    "Outcome",
    "ParamStability",
    "Progress",
    "RandomSearch",
    "Search",
    "SearchOptions",
    "SearchResult",
    "SearchSpace",
    "Segment",
    "Status",
    "StopReason",
    "WalkForwardReport",
    "Window",
    "WindowResult",
    "backtest_metrics",
    "drive",
    "equity_metrics",
    "evaluate_job",
    "load_frames",
    "make_search",
    "open_backend",
    "optimize",
    "parameter_stability",
    "print_report",
    "resolve_workers",
    "run_optimization",
    "run_optimize_cli",
    "score",
    "strategy_feasibility",
    "strategy_space",
    "time_axis",
    "walk_forward",
    "walk_forward_windows",
    "window_segments",
]
