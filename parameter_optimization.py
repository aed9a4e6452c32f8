"""Parameter optimisation: a Pareto front validated out of sample, then approved or not.

`--mode optimize` runs by default (`optimization.method = "nsga2"`) a multi-objective
search whose choice must survive out of sample before sim or live may use it:

* **Pareto front** (`pareto_search`): NSGA-II through pymoo over total return, max
  drawdown and stability (pymoo's GA when one objective is asked: the single-objective
  special case), integer and stepped variables snapped onto their grids, the strategy's
  refusals (`fast < slow`) and too few trades as constraints, a checkpoint per
  generation, memory bounded whatever the number of evaluations.
* **Walk-forward by default** (`pareto_run`): the same search on each rolling (or
  anchored) train window, its choice scored on the test window after it, the folds'
  out-of-sample returns stitched into one curve, the walk-forward efficiency and a
  verdict (`robust`, `degraded`, `collapsed`, `no edge`).
* **One score.** The front's members, the folds and the plateau are ranked by the one
  score (`optimization_scoring.score_result`: `reward_system.score_backtest`'s total under
  `settings.reward`), the number `/score` and the dashboard show for a live record.
* **Robust choice** (`sensitivity`): among the front's best by the one score, the
  point whose neighbourhood scores best; Morris screening (SALib), one-at-a-time curves
  and pairwise heatmaps around it, and a knife-edge flag.
* **Overfitting** (`overfitting`, analytics' part): the deflated Sharpe ratio of the
  chosen point given every trial, and PBO by CSCV over the front, the last population and
  a reservoir sample of trials.
* **Approval** (`approved_params`): `<data_dir>/approved/<strategy>.json` is written only
  when the gate passes (OOS score, efficiency, DSR, PBO thresholds in settings), or with
  `--force` (logged as a warning and marked in the file); sim and live read their
  strategy parameters from it. JSON and a self-contained HTML report
  (`optimization_report`) go to `<data_dir>/optimize/`.

With `optimization.method = "genetic"` the one-score search below runs instead. It
searches a strategy's declared `Param` ranges for the set that maximises
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
* `pareto_search`: `ParetoOptions`, `ParetoSearch`, `Trial`, `ParetoResult`, `drive_pareto`.
* `pareto_run`: `run_pareto`, `ParetoReport`, `Fold`, `WalkForwardSummary`, `Overfitting`.
* `sensitivity`: `analyse`, `plateau_choice`, `neighbours`, `SensitivityReport`.
* `approved_params`: `evaluate_gate`, `write_approved`, `load_approved`, `approved_path`.
* `optimization_report`: `render_html`; `pareto_cli`: `run_pareto_cli`.
* `data_manager`: `load_frames` (the one candle loader of the replays).
"""

from __future__ import annotations

from approved_params import (
    ApprovedParams,
    GateResult,
    approved_path,
    evaluate_gate,
    load_approved,
    write_approved,
)
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
from optimization_report import render_html
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
from pareto_cli import run_pareto_cli
from pareto_run import Fold, Overfitting, ParetoReport, WalkForwardSummary, run_pareto
from pareto_search import (
    ParetoOptions,
    ParetoResult,
    ParetoSearch,
    Trial,
    drive_pareto,
    load_checkpoint,
)
from search_space import (
    Dimension,
    SearchSpace,
    strategy_feasibility,
    strategy_space,
)
from sensitivity import SensitivityReport, analyse, neighbours, plateau_choice
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
    "ApprovedParams",
    "Backend",
    "BacktestEvaluator",
    "DaskBackend",
    "Dimension",
    "Evaluate",
    "Evaluation",
    "Feasibility",
    "Fold",
    "GateResult",
    "GenerationStats",
    "GeneticSearch",
    "InProcessBackend",
    "Job",
    "Key",
    "Objective",
    "OptimizationReport",
    "Outcome",
    "Overfitting",
    "ParamStability",
    "ParetoOptions",
    "ParetoReport",
    "ParetoResult",
    "ParetoSearch",
    "Progress",
    "RandomSearch",
    "Search",
    "SearchOptions",
    "SearchResult",
    "SearchSpace",
    "Segment",
    "SensitivityReport",
    "Status",
    "StopReason",
    "Trial",
    "WalkForwardReport",
    "WalkForwardSummary",
    "Window",
    "WindowResult",
    "analyse",
    "approved_path",
    "backtest_metrics",
    "drive",
    "drive_pareto",
    "equity_metrics",
    "evaluate_gate",
    "evaluate_job",
    "load_approved",
    "load_checkpoint",
    "load_frames",
    "make_search",
    "neighbours",
    "open_backend",
    "optimize",
    "parameter_stability",
    "plateau_choice",
    "print_report",
    "render_html",
    "resolve_workers",
    "run_optimization",
    "run_optimize_cli",
    "run_pareto",
    "run_pareto_cli",
    "score",
    "strategy_feasibility",
    "strategy_space",
    "time_axis",
    "walk_forward",
    "walk_forward_windows",
    "window_segments",
    "write_approved",
]
