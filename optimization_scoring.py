"""The optimiser's vocabulary and scores: objectives, statuses, segments, metrics, rankings.

The types and limits every part of the optimiser shares (`Status`, `Segment`, `Outcome`,
`Job`, the `Evaluate` protocol), the optimiser's metrics of an equity curve (`analytics`'
definitions) and `score`, which turns a worker's outcome into a ranked `Evaluation`.
Part of `parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import numpy as np
import pandas as pd

import analytics
from config import RewardSettings
from reward_system import score_backtest
from utils.utilities import timeframe_to_ms


if TYPE_CHECKING:
    from trade_simulator import BacktestResult


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
YEAR_MS: Final = analytics.YEAR_MS  # crypto trades every day


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


# -- Metrics and scores ----------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0 or not math.isfinite(denominator):
        return 0.0 if numerator == 0 else math.copysign(RATIO_CAP, numerator)
    return numerator / denominator


def _score(value: float | None, numerator: float) -> float:
    # A ratio analytics cannot give (no variance, no downside) scores +-RATIO_CAP by the
    # numerator's sign, 0 over 0: ranked, never infinite. A non-finite numerator stays NaN,
    # which `score` marks failed.
    if value is not None:
        return value
    if not math.isfinite(numerator):
        return math.nan
    return 0.0 if numerator == 0 else math.copysign(RATIO_CAP, numerator)


def score_result(result: BacktestResult, settings: RewardSettings | None = None) -> float:
    """Return the one score of a backtest: `reward_system.score_backtest(...).total`.

    The same number `/score`, the dashboard and the ranking show for a live record, so an
    optimiser maximising it optimises what the operator sees (default weights unless given).
    """
    return score_backtest(result, settings or RewardSettings()).total


def equity_metrics(
    equity: np.ndarray, starting_balance: float, timeframe: str, *, span_ms: int | None = None
) -> dict[str, float]:
    """Return annualised Sharpe, Sortino, CAGR, Calmar, return and drawdown of a curve.

    The definitions are `analytics`' (the backtest report's), with the one-pass numba
    `analytics.curve_stats` because the optimiser runs this once per candidate: per-bar
    simple returns from `starting_balance`, 365 days of `timeframe` bars a year, Sharpe
    with ddof 1, Sortino over the root mean square of the negative returns, CAGR over the
    calendar `span_ms` the curve covers (default: its bars x `timeframe`, a curve with no
    missing candle), Calmar = CAGR / max drawdown. Where the report has no value the
    optimiser still needs a number: a ratio over zero is +-`RATIO_CAP` (0 over 0 is 0),
    Calmar uses a drawdown of at least 0.01%.
    """
    values = np.ascontiguousarray(equity, dtype=np.float64)
    bars = len(values)
    if bars <= 0:
        return dict.fromkeys(
            ("sharpe", "sortino", "calmar", "total_return", "cagr", "max_drawdown"), 0.0
        )
    mean, std, downside, drawdown = analytics.curve_stats(float(starting_balance), values)
    per_year = analytics.periods_per_year(timeframe)
    growth = float(values[-1] / starting_balance)
    span = bars * timeframe_to_ms(timeframe) if span_ms is None else span_ms
    cagr = analytics.cagr(growth, span)
    cagr = -1.0 if cagr is None else cagr
    return {
        "sharpe": _score(analytics.annualised_ratio(mean, std, per_year), mean),
        "sortino": _score(analytics.annualised_ratio(mean, downside, per_year), mean),
        "calmar": _score(analytics.calmar(cagr, max(drawdown, MIN_DRAWDOWN)), cagr),
        "total_return": growth - 1.0,
        "cagr": cagr,
        "max_drawdown": drawdown,
    }


def backtest_metrics(result: BacktestResult) -> dict[str, float]:
    """Return the optimiser's metrics of a fast-path backtest (see `equity_metrics`)."""
    step = timeframe_to_ms(result.timeframe)
    # The calendar span of the curve, as analytics.curve sees it: from the first
    # candle's open to the last one's close.
    span = int(result.ts[-1]) - int(result.ts[0]) + step if len(result.ts) else 0
    metrics = equity_metrics(result.equity, result.starting_balance, result.timeframe, span_ms=span)
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
