"""Backtest analytics: performance metrics, Monte Carlo, and the Rich, JSON and HTML reports.

This module is the one home of the metric definitions (Sharpe, Sortino, CAGR, Calmar, max
drawdown): the optimiser's scores, the fast path's summary, the status view and the reward
system call them, and the portfolio's running drawdown follows the same definition.

Everything here reads a `trade_simulator.BacktestResult` (from the fast path, or from a
replay through `result_from_summary`): the equity curve recorded at each candle close and
the closed trades. Conventions, stated once:

* The curve starts at the starting balance at the first candle's open; bar returns are
  `E[i] / E[i-1] - 1` over every candle, flat or not.
* Annualisation uses 365 days (crypto trades every day): `periods_per_year = 365 d /
  timeframe`. Sharpe = mean / standard deviation (ddof 1) x sqrt(periods per year), with a
  zero risk-free rate; Sortino divides by the downside deviation (root mean square of the
  negative returns over all periods); CAGR compounds over the calendar span of the curve
  (-1 when everything is lost); Calmar = CAGR / max drawdown.
* Drawdowns are measured from the running peak, the starting balance included; a
  drawdown's duration runs from the peak to the first time equity is back at or above it
  (or to the end of the data).
* Time-weighted forms (`weighted_sharpe`, `weighted_sortino`, `profit_factor` and
  `win_rate` with weights, Kish's `effective_sample_size`) reduce to the plain
  definitions under equal weights; the reward system's score uses them.
* Ratios that do not exist (no losing trade for the profit factor, no variance for
  Sharpe) are `None` in JSON and "-" in the tables, never infinite.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from monte_carlo import PERCENTILES
from monte_carlo import MonteCarloResult as MonteCarloResult
from monte_carlo import monte_carlo as monte_carlo
from report_risk import (
    BENCHMARK_COLOUR,
    breaker_table_html,
    breaker_table_rich,
    buy_and_hold,
    span_bands,
    time_by_state,
)
from utils.progress import progress_bar as _rich_bar
from utils.utilities import atomic_write, ms_to_datetime, timeframe_to_ms


if TYPE_CHECKING:
    from rich.console import Group

    from trade_simulator import BacktestResult


YEAR_MS = 365 * 86_400_000
DAY_MS = 86_400_000


# -- Metrics ---------------------------------------------------------------------------------


def curve(result: BacktestResult) -> tuple[np.ndarray, np.ndarray]:
    """Return the equity curve with its starting point: (ts ms, equity)."""
    start_ts, start, run_ts, run_equity = curve_parts(result)
    # One copy each (a long run's curve is 16 bytes a bar): concatenate already gives the
    # dtype, and a second `astype` copy would double the report's peak.
    ts = np.concatenate([[start_ts], run_ts]).astype(np.int64, copy=False)
    equity = np.concatenate([[start], run_equity]).astype(np.float64, copy=False)
    return ts, equity


def curve_parts(result: BacktestResult) -> tuple[int, float, np.ndarray, np.ndarray]:
    """Return `curve(result)` as its starting point and the run's own points, uncopied.

    (start ts, start equity, ts, equity): the curve is the start followed by `ts` and
    `equity`, which are the result's arrays themselves (a long run's curve is 16 bytes a
    bar: the report's metrics read it in place).
    """
    start = float(result.starting_balance)
    ts = np.asarray(result.ts, dtype=np.int64)
    equity = np.asarray(result.equity, dtype=np.float64)
    if len(ts) == 0:
        return 0, start, ts, equity
    return int(ts[0]) - timeframe_to_ms(result.timeframe), start, ts, equity


@njit(cache=True, error_model="numpy")
def curve_stats(start, equity):  # type: ignore[no-untyped-def]
    """Return (mean, std ddof 1, downside deviation, max drawdown) of a curve's bar returns.

    Bar returns run from `start` through `equity`; the downside deviation is the root mean
    square of the negative returns over all bars; the drawdown is measured from the running
    peak, `start` included. One pass for the mean, the downside and the drawdown, a second
    for the deviation (two passes keep the variance accurate): the optimiser runs this once
    per candidate, and at a million bars numpy's temporaries cost more than the backtest.
    """
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
        if peak > 0.0:
            worst = max(worst, (peak - prev) / peak)
    mean = total / n if n else 0.0
    prev = start
    acc = 0.0
    for i in range(n):
        d = equity[i] / prev - 1.0 - mean
        acc += d * d
        prev = equity[i]
    std = np.sqrt(acc / (n - 1)) if n > 1 else 0.0
    return mean, std, np.sqrt(down / n) if n else 0.0, worst


def drawdown(equity: np.ndarray) -> np.ndarray:
    """Return the drawdown series (fraction below the running peak, >= 0)."""
    peak = np.maximum.accumulate(equity)
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = np.where(peak > 0, (peak - equity) / peak, 0.0)
    return np.asarray(dd, dtype=np.float64)


def max_drawdown(equity: Sequence[float] | np.ndarray, start: float | None = None) -> float:
    """Return the largest fall of `equity` from its running peak, as a fraction of the peak.

    `start` (the starting balance), when given, is the first peak. The one definition:
    the backtest report, the fast path's summary, the status view and the optimiser use
    it; the portfolio and the reward system keep the same figure incrementally.
    """
    values = np.asarray(equity, dtype=np.float64)
    if start is not None:
        values = np.concatenate(([float(start)], values))
    if values.size == 0:
        return 0.0
    return float(drawdown(values).max())


def periods_per_year(timeframe: str) -> float:
    """Return the bars of `timeframe` in a year of 365 days (crypto trades every day)."""
    return YEAR_MS / timeframe_to_ms(timeframe)


def annualised_ratio(mean: float, deviation: float, per_year: float) -> float | None:
    """Return mean / deviation x sqrt(periods per year); None where it does not exist.

    Sharpe passes the standard deviation (ddof 1) of the bar returns, Sortino their
    downside deviation; the risk-free rate is zero.
    """
    ratio = _ratio(mean, deviation)
    return None if ratio is None else ratio * math.sqrt(per_year)


def sharpe(returns: Sequence[float] | np.ndarray, per_year: float = 1.0) -> float | None:
    """Return the Sharpe ratio of `returns` (ddof 1, zero risk-free rate); None below 2."""
    values = np.asarray(returns, dtype=np.float64)
    if values.size < 2:
        return None
    return annualised_ratio(float(values.mean()), float(values.std(ddof=1)), per_year)


def weighted_sharpe(
    returns: Sequence[float] | np.ndarray, weights: np.ndarray, per_year: float = 1.0
) -> float | None:
    """Return the Sharpe ratio of `returns` under observation `weights` (time decay).

    The weighted mean over the weighted standard deviation with reliability weights
    (sum w (r - mean)^2 / (V1 - V2 / V1), V1 = sum w, V2 = sum w^2), which is ddof 1
    when the weights are equal: with equal weights this is `sharpe` up to rounding.
    None with fewer than two observations or no variance.
    """
    values, w = _weighted(returns, weights)
    if values.size < 2:
        return None
    v1, v2 = float(w.sum()), float(np.square(w).sum())
    mean = float(np.dot(w, values) / v1)
    denominator = v1 - v2 / v1
    if denominator <= 0:
        return None
    variance = float(np.dot(w, np.square(values - mean)) / denominator)
    return annualised_ratio(mean, math.sqrt(max(variance, 0.0)), per_year)


def weighted_sortino(
    returns: Sequence[float] | np.ndarray, weights: np.ndarray, per_year: float = 1.0
) -> float | None:
    """Return the Sortino ratio of `returns` under observation `weights`.

    The weighted mean over the weighted downside deviation (root of the weighted mean of
    the squared negative returns over all observations, as `metrics` does unweighted).
    None with no observation or no downside.
    """
    values, w = _weighted(returns, weights)
    if values.size == 0:
        return None
    v1 = float(w.sum())
    mean = float(np.dot(w, values) / v1)
    downside = math.sqrt(float(np.dot(w, np.square(np.minimum(values, 0.0))) / v1))
    return annualised_ratio(mean, downside, per_year)


def effective_sample_size(weights: np.ndarray) -> float:
    """Return Kish's effective sample size, (sum w)^2 / sum w^2 (0 with no weight)."""
    w = np.asarray(weights, dtype=np.float64)
    squares = float(np.square(w).sum())
    return float(w.sum()) ** 2 / squares if squares > 0 else 0.0


def profit_factor(pnl: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Return gross wins / gross losses of trade `pnl` (optionally weighted).

    None with no losing trade (or no trade): the ratio does not exist.
    """
    values = np.asarray(pnl, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    gross_win = float(np.dot(w, np.maximum(values, 0.0)))
    gross_loss = float(-np.dot(w, np.minimum(values, 0.0)))
    return _ratio(gross_win, gross_loss) if gross_win or gross_loss else None


def win_rate(pnl: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Return the (weighted) share of trades with a positive PnL; None with no trade."""
    values = np.asarray(pnl, dtype=np.float64)
    if values.size == 0:
        return None
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    return float(w[values > 0].sum()) / total if total > 0 else None


def _weighted(
    returns: Sequence[float] | np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(returns, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != values.shape:
        raise ValueError(f"{w.shape[0] if w.ndim else 0} weights for {values.size} returns")
    keep = w > 0
    return values[keep], w[keep]


def cagr(growth: float, span_ms: float) -> float | None:
    """Return the compound annual growth rate of a `growth` multiple over `span_ms`.

    The base is calendar time (365-day years), not a count of bars, so missing candles
    do not shorten the year. Everything lost (growth <= 0) is -1; no span is None. The
    power is taken in log space and capped at e^700, so a short steep run cannot overflow.
    """
    if span_ms <= 0 or not math.isfinite(growth):
        return None
    if growth <= 0:
        return -1.0
    return math.expm1(min(math.log(growth) * YEAR_MS / span_ms, 700.0))


def calmar(cagr_value: float | None, max_dd: float) -> float | None:
    """Return CAGR / max drawdown; None where either is missing or the drawdown is 0."""
    return None if cagr_value is None else _ratio(cagr_value, max_dd)


def max_drawdown_duration(ts: np.ndarray, equity: np.ndarray) -> int:
    """Return the longest time (ms) from a peak until equity first regains it (or the end)."""
    ts, equity = np.asarray(ts, np.int64), np.asarray(equity, np.float64)
    if len(ts) == 0:
        return 0
    return int(_max_drawdown_duration(int(ts[0]), float(equity[0]), ts[1:], equity[1:]))


@njit(cache=True)
def _max_drawdown_duration(start_ts, start, ts, equity):  # type: ignore[no-untyped-def]
    # One pass, no per-bar temporaries (the numpy version held ~40 bytes a bar at once),
    # over the curve `start` then `equity` (the run's points read in place). A bar at the
    # running peak (ties included) ends an underwater stretch; a NaN keeps the curve
    # underwater from there on, as a NaN running maximum would.
    longest = 0
    peak = -np.inf
    peak_ts = start_ts
    under = False
    lost = False  # a NaN was met
    for i in range(-1, equity.shape[0]):
        value = start if i < 0 else equity[i]
        at = start_ts if i < 0 else ts[i]
        if lost or np.isnan(value) or value < peak:
            lost = lost or np.isnan(value)
            longest = max(longest, at - peak_ts)
            under = True
        else:
            if under:
                longest = max(longest, at - peak_ts)
            peak = value
            peak_ts = at
            under = False
    return longest


def _ratio(num: float, den: float) -> float | None:
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def exposure(result: BacktestResult, start_ts: int, end_ts: int) -> float:
    """Return the fraction of [start, end) with at least one position open."""
    if end_ts <= start_ts:
        return 0.0
    spans = list(
        zip(result.table["entry_ts"].tolist(), result.table["exit_ts"].tolist(), strict=True)
    )
    spans += [(p.entry_ts, end_ts) for p in result.open_positions]
    spans.sort()
    covered = 0
    current_start, current_end = None, None
    for a, b in spans:
        a, b = max(a, start_ts), min(b, end_ts)
        if b <= a:
            continue
        if current_end is None or a > current_end:
            if current_end is not None and current_start is not None:
                covered += current_end - current_start
            current_start, current_end = a, b
        else:
            current_end = max(current_end, b)
    if current_end is not None and current_start is not None:
        covered += current_end - current_start
    return covered / (end_ts - start_ts)


def trade_stats(pnl: np.ndarray, returns: np.ndarray, fees: np.ndarray) -> dict[str, Any]:
    """Return win rate, profit factor, expectancy and averages of a set of trades."""
    n = len(pnl)
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    gross_win, gross_loss = float(wins.sum()), float(-losses.sum())
    return {
        "n_trades": n,
        "win_rate": len(wins) / n if n else None,
        "profit_factor": _ratio(gross_win, gross_loss) if gross_win or gross_loss else None,
        "expectancy": float(pnl.mean()) if n else None,
        "avg_trade_return": float(returns.mean()) if n else None,
        "avg_win": float(wins.mean()) if len(wins) else None,
        "avg_loss": float(losses.mean()) if len(losses) else None,
        "best_trade": float(pnl.max()) if n else None,
        "worst_trade": float(pnl.min()) if n else None,
        "pnl": float(pnl.sum()),
        "fees": float(fees.sum()),
    }


def metrics(result: BacktestResult) -> dict[str, Any]:
    """Return every performance metric of a run, with a per-pair breakdown.

    Keys: total_return, cagr, volatility, sharpe, sortino, calmar, max_drawdown,
    max_drawdown_duration_days, exposure, trades_per_day, n_trades, win_rate,
    profit_factor, expectancy (mean PnL per trade, quote), avg_trade_return (mean return
    per trade on its notional), avg_win, avg_loss, best_trade, worst_trade, fees, plus the
    run's span and balances, and `per_pair` with the trade statistics of each pair.
    """
    start_ts, start, ts, equity = curve_parts(result)
    end_ts, final = (int(ts[-1]), float(equity[-1])) if len(ts) else (start_ts, start)
    span = end_ts - start_ts
    ppy = periods_per_year(result.timeframe)
    mean, std, downside, max_dd = (
        curve_stats(start, equity) if len(equity) else (0.0, 0.0, 0.0, 0.0)
    )
    total = final / start - 1 if start else 0.0
    growth = cagr(final / start, span) if start > 0 else None
    table = result.table
    notional = table["entry_price"] * table["qty"]
    with np.errstate(divide="ignore", invalid="ignore"):
        trade_returns = np.where(notional > 0, table["pnl"] / notional, 0.0)
    out: dict[str, Any] = {
        "start_ts": start_ts,
        "end_ts": end_ts,
        "days": span / DAY_MS,
        "starting_balance": start,
        "final_equity": final,
        "total_return": total,
        "cagr": growth,
        "volatility": std * math.sqrt(ppy),
        "sharpe": annualised_ratio(mean, std, ppy),
        "sortino": annualised_ratio(mean, downside, ppy),
        "calmar": calmar(growth, max_dd),
        "max_drawdown": max_dd,
        "max_drawdown_duration_days": _max_drawdown_duration(start_ts, start, ts, equity) / DAY_MS,
        "exposure": exposure(result, start_ts, end_ts),
        "trades_per_day": result.n_trades / (span / DAY_MS) if span > 0 else None,
        **trade_stats(table["pnl"], trade_returns, table["fee"]),
        "fees": result.fees,
        # Perpetuals: net funding received (negative: paid) and liquidated trades.
        "funding": result.funding,
        "liquidations": result.liquidations,
        "open_positions": len(result.open_positions),
        "candles": result.candles,
        "timeframe": result.timeframe,
        "strategy": result.strategy,
    }
    per_pair: dict[str, Any] = {}
    pairs = table["pair"]
    for pair in sorted({str(p) for p in pairs} | set(result.pairs)):
        mask = pairs == pair
        per_pair[pair] = trade_stats(table["pnl"][mask], trade_returns[mask], table["fee"][mask])
    out["per_pair"] = per_pair
    return out


def trade_returns(result: BacktestResult) -> np.ndarray:
    """Return each closed trade's PnL as a fraction of the equity just before its entry."""
    _, start, ts, equity = curve_parts(result)
    entry = result.table["entry_ts"]
    # The curve's last point at or before each entry: the start, or one of the run's own.
    index = np.searchsorted(ts, entry, side="right") - 1
    if len(equity):
        before = np.where(index >= 0, equity[np.clip(index, 0, len(equity) - 1)], start)
    else:
        before = np.full(len(entry), start)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(before > 0, result.table["pnl"] / before, 0.0)
    return np.asarray(out, dtype=np.float64)


# -- JSON ------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_clean(v) for v in value]
    return value


def report_dict(
    result: BacktestResult, *, monte_carlo_result: MonteCarloResult | None = None
) -> dict[str, Any]:
    """Return metrics, per-pair breakdown, trades and (optionally) Monte Carlo as a dict."""
    stats = metrics(result)
    per_pair = stats.pop("per_pair")
    out: dict[str, Any] = {
        "metrics": stats,
        "per_pair": per_pair,
        "trades": [t.as_dict() for t in result.trades],
        "open_positions": [p.to_dict() for p in result.open_positions],
        "breaker_trips": [t.to_dict() for t in result.breaker_trips],
        "trading_spans": [s.to_dict() for s in result.trading_spans],
        "time_off_normal_ms": time_by_state(result.trading_spans),
    }
    if monte_carlo_result is not None:
        out["monte_carlo"] = monte_carlo_result.summary()
    return dict(_clean(out))


def to_json(result: BacktestResult, *, monte_carlo_result: MonteCarloResult | None = None) -> str:
    """Return the report as JSON (non-finite numbers become null)."""
    return json.dumps(report_dict(result, monte_carlo_result=monte_carlo_result), indent=2)


# -- Rich ------------------------------------------------------------------------------------


def _fmt(value: Any, kind: str = "num") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:,.0f}"


_ROWS: tuple[tuple[str, str, str], ...] = (
    ("total_return", "Total return", "pct"),
    ("cagr", "CAGR", "pct"),
    ("sharpe", "Sharpe", "num"),
    ("sortino", "Sortino", "num"),
    ("calmar", "Calmar", "num"),
    ("max_drawdown", "Max drawdown", "pct"),
    ("max_drawdown_duration_days", "Max drawdown duration (days)", "num"),
    ("volatility", "Volatility (annual)", "pct"),
    ("exposure", "Exposure", "pct"),
    ("n_trades", "Trades", "int"),
    ("trades_per_day", "Trades per day", "num"),
    ("win_rate", "Win rate", "pct"),
    ("profit_factor", "Profit factor", "num"),
    ("expectancy", "Expectancy (per trade)", "num"),
    ("avg_trade_return", "Average trade", "pct"),
    ("fees", "Fees", "num"),
    ("funding", "Funding (received)", "num"),
    ("liquidations", "Liquidations", "int"),
    ("final_equity", "Final equity", "num"),
)


def render_rich(
    result: BacktestResult, *, monte_carlo_result: MonteCarloResult | None = None
) -> Group:
    """Return a Rich renderable: the summary table, the per-pair table, Monte Carlo."""
    from rich.console import Group
    from rich.table import Table

    stats = metrics(result)
    name = result.strategy.get("name", "strategy")
    title = f"Backtest {name} {result.timeframe}: {', '.join(result.pairs)}"
    summary = Table(title=title, show_header=False)
    summary.add_column("metric", style="bold")
    summary.add_column("value", justify="right")
    for key, label, kind in _ROWS:
        summary.add_row(label, _fmt(stats.get(key), kind))
    pairs = Table(title="Per pair")
    for column in ("pair", "trades", "win rate", "profit factor", "expectancy", "PnL", "fees"):
        pairs.add_column(column, justify="left" if column == "pair" else "right")
    for pair, row in stats["per_pair"].items():
        pairs.add_row(
            pair,
            _fmt(row["n_trades"], "int"),
            _fmt(row["win_rate"], "pct"),
            _fmt(row["profit_factor"]),
            _fmt(row["expectancy"]),
            _fmt(row["pnl"]),
            _fmt(row["fees"]),
        )
    parts: list[Any] = [summary, pairs]
    if result.strategies:
        per_strategy = Table(title="Per strategy")
        for column in _STRATEGY_COLUMNS:
            per_strategy.add_column(column, justify="left" if column == "strategy" else "right")
        for row in _strategy_rows(result):
            per_strategy.add_row(*row)
        parts.append(per_strategy)
    breakers = breaker_table_rich(result)
    if breakers is not None:
        parts.append(breakers)
    if monte_carlo_result is not None:
        mc = monte_carlo_result.summary()
        table = Table(title=f"Monte Carlo ({mc['method']}, {mc['paths']:,} paths)")
        table.add_column("")
        for q in PERCENTILES:
            table.add_column(f"p{q}", justify="right")
        table.add_row("final equity", *(_fmt(mc["final_equity"][f"p{q}"]) for q in PERCENTILES))
        table.add_row(
            "max drawdown", *(_fmt(mc["max_drawdown"][f"p{q}"], "pct") for q in PERCENTILES)
        )
        low, high = mc["probability_of_ruin_95ci"]
        table.caption = (
            f"P(ruin at {mc['ruin_level']:.0%} of start) = {mc['probability_of_ruin']:.2%} "
            f"(95% CI {low:.2%}-{high:.2%})"
        )
        parts.append(table)
    return Group(*parts)


_STRATEGY_COLUMNS = (
    "strategy", "pairs", "share", "sleeve", "trades", "win rate", "PnL", "fees", "score", "lcb",
)  # fmt: skip


def _strategy_rows(result: BacktestResult) -> list[list[str]]:
    """Return one row per strategy of a multi-strategy run, in the ranking's order."""
    return [
        [
            s.name,
            ", ".join(s.pairs),
            _fmt(s.weight, "pct") + (" (probation)" if s.probation else ""),
            _fmt(s.sleeve_equity),
            _fmt(s.n_trades, "int"),
            _fmt(s.win_rate, "pct"),
            _fmt(s.realised_pnl),
            _fmt(s.fees),
            _fmt(s.score),
            _fmt(s.lcb),
        ]
        for s in result.strategies
    ]


@contextmanager
def progress_bar(description: str = "backtest") -> Iterator[Callable[[int, int], None]]:
    """Yield a `progress(done, total)` callback drawing a Rich progress bar (stderr)."""
    with _rich_bar(transient=True, stderr=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        yield update


# -- HTML ------------------------------------------------------------------------------------

_W, _H, _PAD = 960, 260, 64
_BUY, _SELL = "#1a7f37", "#cf222e"


def _downsample(x: np.ndarray, y: np.ndarray, points: int = 1_500) -> tuple[np.ndarray, np.ndarray]:
    """Keep each bucket's first, min and max so peaks and troughs survive."""
    n = len(x)
    if n <= points:
        return x, y
    size = math.ceil(n / (points // 3))
    keep = [np.arange(0, n, size)]
    buckets = np.arange(0, n, size)
    for fn in (np.minimum, np.maximum):
        reduced = fn.reduceat(y, buckets)
        idx = [
            b + int(np.argmax(y[b : b + size] == v)) for b, v in zip(buckets, reduced, strict=True)
        ]
        keep.append(np.array(idx))
    index = np.unique(np.concatenate([*keep, [n - 1]]))
    return x[index], y[index]


def _scale(values: np.ndarray, lo: float, hi: float, out_lo: float, out_hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    return out_lo + (values - lo) / span * (out_hi - out_lo)


def _axis(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1_000 else f"{value:.4g}"


def _date(ts: float) -> str:
    return ms_to_datetime(int(ts)).strftime("%Y-%m-%d %H:%M")


def _svg_chart(
    title: str,
    series: list[tuple[np.ndarray, np.ndarray, str]],
    *,
    markers: Sequence[tuple[float, float, str, str]] = (),
    bands: Sequence[tuple[float, float, str, str]] = (),
    fill: bool = False,
    percent: bool = False,
    x_label: Callable[[float], str] = _date,
) -> str:
    """Return an inline SVG line chart.

    Markers are (x, y, colour, tooltip) triangles; bands are (x from, x to, colour, tooltip)
    shaded vertical stretches (the spans a circuit breaker held trading back).
    """
    xs = np.concatenate([s[0] for s in series]).astype(np.float64)
    ys = np.concatenate([s[1] for s in series]).astype(np.float64)
    finite = np.isfinite(ys)
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = (float(ys[finite].min()), float(ys[finite].max())) if finite.any() else (0.0, 1.0)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    parts = [
        f'<svg viewBox="0 0 {_W} {_H}" width="100%" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{_PAD}" y="18" class="t">{html.escape(title)}</text>',
        f'<rect x="{_PAD}" y="28" width="{_W - 2 * _PAD}" height="{_H - 64}" class="frame"/>',
    ]
    top, bottom = 28.0, float(_H - 36)
    for k in range(5):
        value = y0 + (y1 - y0) * k / 4
        y = _scale(np.array([value]), y0, y1, bottom, top)[0]
        label = f"{value:.1%}" if percent else _axis(value)
        parts.append(f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{_PAD - 4}" y="{y + 4:.1f}" class="yl">{label}</text>')
    for start, end, colour, tip in bands:
        a = float(_scale(np.array([max(start, x0)]), x0, x1, _PAD, _W - _PAD)[0])
        b = float(_scale(np.array([min(end, x1)]), x0, x1, _PAD, _W - _PAD)[0])
        parts.append(
            f'<rect x="{a:.1f}" y="{top:.1f}" width="{max(b - a, 1.0):.1f}" '
            f'height="{bottom - top:.1f}" fill="{colour}" fill-opacity="0.18" class="span">'
            f"<title>{html.escape(tip)}</title></rect>"
        )
    parts.append(f'<text x="{_PAD}" y="{_H - 14}" class="xl">{x_label(x0)}</text>')
    parts.append(f'<text x="{_W - _PAD}" y="{_H - 14}" class="xl end">{x_label(x1)}</text>')
    for x, y, colour in series:
        px = _scale(np.asarray(x, dtype=np.float64), x0, x1, _PAD, _W - _PAD)
        py = _scale(np.asarray(y, dtype=np.float64), y0, y1, bottom, top)
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py, strict=True))
        if fill:
            base = _scale(np.array([0.0]), y0, y1, bottom, top)[0]
            area = f"{px[0]:.1f},{base:.1f} {points} {px[-1]:.1f},{base:.1f}"
            parts.append(f'<polygon points="{area}" fill="{colour}" fill-opacity="0.25"/>')
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.2"/>'
        )
    for at, level, colour, tip in markers:
        mx = float(_scale(np.array([at]), x0, x1, _PAD, _W - _PAD)[0])
        my = float(_scale(np.array([level]), y0, y1, bottom, top)[0])
        # Entries point up from below the price, exits down from above it.
        d = 1.0 if colour == _BUY else -1.0
        shape = f"{mx:.1f},{my + d:.1f} {mx - 4:.1f},{my + 8 * d:.1f} {mx + 4:.1f},{my + 8 * d:.1f}"
        tooltip = f"<title>{html.escape(tip)}</title>"
        parts.append(f'<polygon points="{shape}" fill="{colour}" class="mk">{tooltip}</polygon>')
    parts.append("</svg>")
    return "\n".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1040px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:3px 10px;border-bottom:1px solid #d0d7de;text-align:right}
td:first-child,th:first-child{text-align:left}
.t{font-weight:600;font-size:13px} .frame{fill:none;stroke:#d0d7de}
.grid{stroke:#eaeef2} .yl{font-size:10px;text-anchor:end;fill:#57606a}
.xl{font-size:10px;fill:#57606a} .end{text-anchor:end}
.cards{display:flex;flex-wrap:wrap;gap:8px} .card{border:1px solid #d0d7de;border-radius:6px;
padding:6px 10px;min-width:120px} .card b{display:block;font-size:16px}
"""
_MAX_MARKERS = 4_000
_MAX_TRADE_ROWS = 1_000


def _trade_markers(result: BacktestResult, pair: str) -> list[tuple[float, float, str, str]]:
    t = result.table
    mask = t["pair"] == pair
    out: list[tuple[float, float, str, str]] = []
    for entry_ts, entry, exit_ts, exit_price, pnl in zip(
        t["entry_ts"][mask], t["entry_price"][mask], t["exit_ts"][mask],
        t["exit_price"][mask], t["pnl"][mask], strict=True,
    ):  # fmt: skip
        out.append((float(entry_ts), float(entry), _BUY, f"buy {entry:.6g} {_date(entry_ts)}"))
        out.append(
            (float(exit_ts), float(exit_price), _SELL, f"sell {exit_price:.6g} PnL {pnl:,.2f}")
        )
    return out[-_MAX_MARKERS:]


def _cards(stats: Mapping[str, Any]) -> str:
    cells = []
    for key, label, kind in _ROWS:
        cells.append(
            f'<div class="card">{html.escape(label)}<b>{_fmt(stats.get(key), kind)}</b></div>'
        )
    return '<div class="cards">' + "".join(cells) + "</div>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _equity_chart(result: BacktestResult, ts: np.ndarray, equity: np.ndarray) -> str:
    # The equity curve, buy-and-hold of the same pairs (grey) and the breaker spans shaded.
    series = [(*_downsample(ts, equity), "#0969da")]
    benchmark = buy_and_hold(result, ts)
    title = "Equity"
    if benchmark is not None:
        series.append((*_downsample(ts, benchmark), BENCHMARK_COLOUR))
        title += " (blue) vs buy-and-hold (grey)"
    bands = span_bands(result.trading_spans)
    if bands:
        title += "; shaded: circuit breaker held trading back"
    return _svg_chart(title, series, bands=bands)


def _price_sections(result: BacktestResult) -> list[str]:
    """Return one close-price chart per pair, with its trades marked."""
    sections = []
    for pair, (price_ts, close) in result.prices.items():
        x, y = _downsample(np.asarray(price_ts), np.asarray(close))
        sections.append(
            _svg_chart(
                f"{pair} close with trades",
                [(x, y, "#57606a")],
                markers=_trade_markers(result, pair),
            )
        )
    return sections


def _monte_carlo_sections(mc: MonteCarloResult) -> list[str]:
    """Return the Monte Carlo heading, percentile-band chart, table and ruin line."""
    steps = mc.checkpoints.astype(np.float64)
    colours = {5: "#cf222e", 25: "#bf8700", 50: "#0969da", 75: "#bf8700", 95: "#1a7f37"}
    chart = _svg_chart(
        f"Monte Carlo ({mc.method}, {mc.n_paths:,} paths): equity percentiles by step",
        [(steps, band, colours[q]) for q, band in mc.bands.items()],
        x_label=lambda step: f"step {int(step)}",
    )
    summary = mc.summary()
    low, high = summary["probability_of_ruin_95ci"]
    return [
        "<h2>Monte Carlo</h2>",
        chart,
        _table(
            ["", *(f"p{q}" for q in PERCENTILES)],
            [
                [
                    "final equity",
                    *(_fmt(summary["final_equity"][f"p{q}"]) for q in PERCENTILES),
                ],
                [
                    "max drawdown",
                    *(_fmt(summary["max_drawdown"][f"p{q}"], "pct") for q in PERCENTILES),
                ],
            ],
        ),
        f"<p>P(ruin at {mc.ruin_level:.0%} of start) = {mc.probability_of_ruin:.2%} "
        f"(95% CI {low:.2%} to {high:.2%})</p>",
    ]


def _per_pair_sections(stats: dict[str, Any]) -> list[str]:
    """Return the per-pair heading and table (trades, win rate, profit factor, PnL, fees)."""
    per_pair = [
        [pair, row["n_trades"], _fmt(row["win_rate"], "pct"), _fmt(row["profit_factor"]),
         _fmt(row["expectancy"]), _fmt(row["pnl"]), _fmt(row["fees"])]
        for pair, row in stats["per_pair"].items()
    ]  # fmt: skip
    return [
        "<h2>Per pair</h2>",
        _table(
            ["pair", "trades", "win rate", "profit factor", "expectancy", "PnL", "fees"], per_pair
        ),
    ]


def _trade_sections(result: BacktestResult) -> list[str]:
    """Return the trade-list heading and table (at most `_MAX_TRADE_ROWS` rows)."""
    trades = result.trades[:_MAX_TRADE_ROWS]
    shown = f", first {len(trades):,}" if result.n_trades > len(trades) else ""
    return [
        f"<h2>Trades ({result.n_trades:,}{shown})</h2>",
        _table(
            ["pair", "entry", "exit", "entry price", "exit price", "qty", "fee", "PnL"],
            [
                [
                    t.pair,
                    _date(t.entry_ts),
                    _date(t.exit_ts),
                    f"{t.entry_price:.8g}",
                    f"{t.exit_price:.8g}",
                    f"{t.qty:.8g}",
                    f"{t.fee:.6f}",
                    f"{t.pnl:,.4f}",
                ]
                for t in trades
            ],
        ),
    ]


def render_html(
    result: BacktestResult, *, monte_carlo_result: MonteCarloResult | None = None
) -> str:
    """Return the self-contained HTML report (inline SVG, no scripts, no external assets)."""
    stats = metrics(result)
    ts, equity = curve(result)
    name = str(result.strategy.get("name", "strategy"))
    sections = [
        f"<h1>{html.escape(name)} {html.escape(result.timeframe)} &middot; "
        f"{html.escape(', '.join(result.pairs))}</h1>",
        f"<p>{_date(ts[0])} to {_date(ts[-1])} UTC &middot; {result.candles:,} candles &middot; "
        f"params {html.escape(json.dumps(result.strategy.get('params', {})))}</p>",
        _cards(stats),
        _equity_chart(result, ts, equity),
        _svg_chart(
            "Drawdown", [(*_downsample(ts, -drawdown(equity)), "#cf222e")], fill=True, percent=True
        ),
        *_price_sections(result),
    ]
    if monte_carlo_result is not None and monte_carlo_result.bands:
        sections += _monte_carlo_sections(monte_carlo_result)
    if result.strategies:
        sections += [
            "<h2>Per strategy</h2>",
            _table(list(_STRATEGY_COLUMNS), _strategy_rows(result)),
        ]
    sections.append(breaker_table_html(result))
    sections += _per_pair_sections(stats)
    sections += _trade_sections(result)
    body = "\n".join(sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Kestrel backtest: {html.escape(name)}</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def write_html_report(
    result: BacktestResult, path: Path | str, *, monte_carlo_result: MonteCarloResult | None = None
) -> Path:
    """Write the HTML report to `path` atomically; return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, render_html(result, monte_carlo_result=monte_carlo_result))
    return target
