"""Analytics on constructed equity curves and trade lists whose answers are computed by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from analytics import (
    _downsample,
    curve,
    drawdown,
    max_drawdown_duration,
    metrics,
    monte_carlo,
    render_rich,
    to_json,
    trade_returns,
    write_html_report,
)
from run_summary import OpenPosition
from strategy import load_strategy
from tests.test_backtest_support import sample_frame
from trade_simulator import TRADE_COLUMNS, BacktestResult, run_fast


DAY = 86_400_000
T0 = 1_700_006_400_000 - 1_700_006_400_000 % DAY


# A position opened on day 3 and still open at the end.
OPEN_SINCE_DAY_3 = OpenPosition("A/USDT", "long", 1.0, 100.0, T0 + 3 * DAY, None)


def result(
    equity: list[float],
    *,
    trades: list[dict[str, Any]] | None = None,
    start: float = 100.0,
    timeframe: str = "1d",
    step: int = DAY,
    open_positions: tuple[OpenPosition, ...] = (),
) -> BacktestResult:
    """Return a result whose curve is `equity` at the closes of daily candles from T0."""
    rows = trades or []
    table: dict[str, np.ndarray] = {
        name: np.array(
            [t.get(name, 0) for t in rows], dtype=np.int64 if name.endswith("_ts") else float
        )
        for name in TRADE_COLUMNS
    }
    table["pair"] = np.array([t.get("pair", "BTC/USDT") for t in rows], dtype=np.str_)
    table["side"] = np.array(["long"] * len(rows), dtype=np.str_)
    return BacktestResult(
        strategy={"name": "constructed", "params": {}},
        pairs=("BTC/USDT",),
        timeframe=timeframe,
        starting_balance=start,
        ts=T0 + step * np.arange(1, len(equity) + 1, dtype=np.int64),
        equity=np.array(equity, dtype=float),
        table=table,
        final_equity=equity[-1],
        fees=float(table["fee"].sum()),
        candles=len(equity),
        open_positions=open_positions,
    )


def test_returns_ratios_and_drawdown_on_a_three_day_curve() -> None:
    """100 -> 110 -> 99 -> 121 daily: every ratio equals its formula by hand."""
    m = metrics(result([110.0, 99.0, 121.0]))
    r = np.array([0.1, -0.1, 121 / 99 - 1])
    assert m["total_return"] == pytest.approx(0.21)
    assert m["max_drawdown"] == pytest.approx(0.1)
    assert m["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(365))
    assert m["sortino"] == pytest.approx(r.mean() / math.sqrt(0.01 / 3) * math.sqrt(365))
    assert m["volatility"] == pytest.approx(r.std(ddof=1) * math.sqrt(365))
    assert m["cagr"] == pytest.approx(1.21 ** (365 / 3) - 1)
    assert m["calmar"] == pytest.approx((1.21 ** (365 / 3) - 1) / 0.1)
    assert m["max_drawdown_duration_days"] == pytest.approx(2.0)  # peak day 1, back day 3
    assert m["days"] == pytest.approx(3.0)


def test_unrecovered_drawdown_lasts_to_the_end() -> None:
    """100 -> 120 -> 90 -> 100 -> 110: 25% down from the day-1 peak, still under at day 4."""
    m = metrics(result([120.0, 90.0, 100.0, 110.0]))
    assert m["max_drawdown"] == pytest.approx(0.25)
    assert m["max_drawdown_duration_days"] == pytest.approx(3.0)


def test_drawdown_helpers_on_a_known_series() -> None:
    """drawdown() is the fall from the running peak; the duration is peak to recovery."""
    equity = np.array([100, 90, 95, 100, 80, 120], dtype=float)
    ts = np.arange(6, dtype=np.int64) * 10
    np.testing.assert_allclose(drawdown(equity), [0, 0.1, 0.05, 0, 0.2, 0])
    # Peak at t=0, back at t=30 (30 ms); then peak t=30, back at t=50 (20 ms).
    assert max_drawdown_duration(ts, equity) == 30
    assert max_drawdown_duration(ts[:5], equity[:5]) == 30  # the open stretch 30 -> 40 is 10


def test_trade_statistics_by_hand() -> None:
    """PnL 10, -5, 20, -5, 0: win rate 40%, profit factor 3, expectancy 4."""
    trades = [
        {"pnl": p, "entry_price": 100.0, "qty": 1.0, "fee": 0.5, "entry_ts": T0, "exit_ts": T0}
        for p in (10.0, -5.0, 20.0, -5.0, 0.0)
    ]
    m = metrics(result([120.0], trades=trades))
    assert m["n_trades"] == 5
    assert m["win_rate"] == pytest.approx(0.4)
    assert m["profit_factor"] == pytest.approx(3.0)
    assert m["expectancy"] == pytest.approx(4.0)
    assert m["avg_win"] == pytest.approx(15.0)
    assert m["avg_loss"] == pytest.approx(-5.0)
    assert m["avg_trade_return"] == pytest.approx(0.04)
    assert m["best_trade"] == 20.0
    assert m["worst_trade"] == -5.0
    assert m["per_pair"]["BTC/USDT"]["fees"] == pytest.approx(2.5)


def test_profit_factor_without_losses_is_null_in_json() -> None:
    """No losing trade: the profit factor does not exist; JSON says null, never Infinity."""
    trades = [{"pnl": 5.0, "entry_price": 100.0, "qty": 1.0, "entry_ts": T0, "exit_ts": T0 + DAY}]
    report = result([105.0], trades=trades)
    assert metrics(report)["profit_factor"] is None
    text = to_json(report)
    assert "Infinity" not in text
    assert "NaN" not in text
    parsed = json.loads(text)
    assert parsed["metrics"]["profit_factor"] is None
    assert parsed["trades"][0]["pnl"] == 5.0


def test_exposure_is_the_union_of_position_time() -> None:
    """Overlapping trades on two pairs count once: 2 of 4 days in the market, plus an open one."""
    trades = [
        {"pair": "A/USDT", "entry_ts": T0, "exit_ts": T0 + DAY, "pnl": 1.0},
        {"pair": "B/USDT", "entry_ts": T0 + DAY // 2, "exit_ts": T0 + 2 * DAY, "pnl": -1.0},
    ]
    m = metrics(result([100.0] * 4, trades=trades))
    assert m["exposure"] == pytest.approx(0.5)
    assert m["trades_per_day"] == pytest.approx(0.5)
    assert set(m["per_pair"]) == {"A/USDT", "B/USDT", "BTC/USDT"}
    assert m["per_pair"]["A/USDT"]["win_rate"] == 1.0
    held = result(
        [100.0] * 4,
        trades=trades,
        open_positions=(OPEN_SINCE_DAY_3,),
    )
    assert metrics(held)["exposure"] == pytest.approx(0.75)


def test_annualisation_follows_the_timeframe() -> None:
    """The same per-bar returns on 1h bars scale Sharpe by sqrt(365 x 24)."""
    daily = metrics(result([110.0, 99.0, 121.0]))
    hourly = metrics(result([110.0, 99.0, 121.0], timeframe="1h", step=3_600_000))
    assert hourly["sharpe"] == pytest.approx(daily["sharpe"] * math.sqrt(24))
    assert hourly["days"] == pytest.approx(3 / 24)


def test_trade_returns_divide_by_equity_before_entry() -> None:
    """A 10 PnL trade entered when equity was 200 is a 5% trade."""
    trades = [{"pnl": 10.0, "entry_ts": T0 + DAY + 1, "exit_ts": T0 + 2 * DAY}]
    report = result([200.0, 210.0], trades=trades)
    np.testing.assert_allclose(trade_returns(report), [0.05])


# -- Monte Carlo -----------------------------------------------------------------------------


def test_shuffling_keeps_final_equity_and_varies_the_path() -> None:
    """Permuting trades: every path ends at start x prod(1 + r); drawdowns differ by order."""
    returns = np.array([0.1, -0.2, 0.05, -0.1, 0.3, 0.02])
    mc = monte_carlo(returns, n_paths=2_000, method="shuffle", start=100.0, seed=1)
    np.testing.assert_allclose(mc.final_equity, 100.0 * np.prod(1 + returns))
    assert mc.max_drawdown.min() < mc.max_drawdown.max()
    # The smallest drawdown is the single worst trade when losses never follow each other.
    assert mc.max_drawdown.min() == pytest.approx(0.2)
    assert mc.max_drawdown.max() == pytest.approx(1 - 0.8 * 0.9)


def test_one_block_of_everything_replays_the_original_sequence() -> None:
    """A block as long as the data has one possible start: the path is the original."""
    returns = np.array([0.1, -0.2, 0.05, 0.2])
    mc = monte_carlo(returns, n_paths=10, method="block", block=4, start=1.0)
    path = np.concatenate([[1.0], np.cumprod(1 + returns)])
    np.testing.assert_allclose(mc.final_equity, path[-1])
    np.testing.assert_allclose(mc.max_drawdown, drawdown(path).max())


def test_probability_of_ruin_matches_the_binomial_answer() -> None:
    """One step drawing 0% or -60% (ruin at -50%): P(ruin) = 1/2, inside the Wilson interval."""
    mc = monte_carlo([0.0, -0.6], n_paths=10_000, n_steps=1, ruin=0.5, seed=7)
    low, high = mc.ruin_interval()
    assert low < 0.5 < high
    assert abs(mc.probability_of_ruin - 0.5) < 0.02
    assert high - low < 0.03
    two = monte_carlo([0.0, -0.3], n_paths=10_000, n_steps=2, ruin=0.5, seed=7)
    assert two.probability_of_ruin == pytest.approx(0.25, abs=0.02)  # ruin needs both losses


def test_constant_returns_have_no_spread_and_no_ruin() -> None:
    """Bootstrapping a constant 1% gives 1.01^n everywhere, no drawdown, no ruin."""
    mc = monte_carlo([0.01] * 5, n_paths=500, n_steps=30, start=10.0)
    np.testing.assert_allclose(mc.final_equity, 10.0 * 1.01**30)
    assert mc.max_drawdown.max() == 0.0
    assert mc.probability_of_ruin == 0.0
    summary = mc.summary()
    assert summary["final_equity"]["p5"] == pytest.approx(summary["final_equity"]["p95"])


def test_monte_carlo_is_seeded_and_bands_are_ordered() -> None:
    """The same seed gives the same paths; percentile bands never cross."""
    rng = np.random.default_rng(0)
    returns = rng.normal(0.001, 0.02, 500)
    a = monte_carlo(returns, n_paths=1_000, seed=3, checkpoints=50)
    b = monte_carlo(returns, n_paths=1_000, seed=3, checkpoints=50)
    c = monte_carlo(returns, n_paths=1_000, seed=4, checkpoints=50)
    assert np.array_equal(a.final_equity, b.final_equity)
    assert not np.array_equal(a.final_equity, c.final_equity)
    assert len(a.checkpoints) == 50
    assert a.checkpoints[-1] == 500
    for lo, hi in ((5, 25), (25, 50), (50, 75), (75, 95)):
        assert np.all(a.bands[lo] <= a.bands[hi])


@pytest.mark.parametrize("method", ["bootstrap", "shuffle", "block"])
def test_monte_carlo_paths_do_not_depend_on_the_threads(
    method: Literal["bootstrap", "shuffle", "block"],
) -> None:
    """Each path has its own generator stream: one thread or several, the same paths."""
    returns = np.random.default_rng(5).normal(0.0, 0.03, 97)
    runs = [
        monte_carlo(returns, n_paths=301, method=method, seed=9, checkpoints=20, threads=k)
        for k in (1, 2, 7)
    ]
    for other in runs[1:]:
        for field in ("final_equity", "max_drawdown", "ruined"):
            assert np.array_equal(getattr(runs[0], field), getattr(other, field)), field
        for q in runs[0].bands:
            assert np.array_equal(runs[0].bands[q], other.bands[q])
    # and the paths differ from one another (each its own stream, not one repeated)
    assert len(np.unique(runs[0].max_drawdown)) > 250


def test_monte_carlo_of_ten_thousand_paths_on_a_real_backtest() -> None:
    """10,000 bootstrapped paths of the sample backtest's trades give a sane distribution."""
    report = run_fast(load_strategy("sma_cross"), sample_frame(), exact=True)
    returns = trade_returns(report)
    mc = monte_carlo(returns, n_paths=10_000, start=report.starting_balance, ruin=0.97)
    assert mc.final_equity.shape == (10_000,)
    compounded = report.starting_balance * np.prod(1 + returns)
    assert compounded == pytest.approx(report.final_equity, rel=1e-9)
    median = np.median(mc.final_equity)
    assert median == pytest.approx(compounded, rel=0.02)
    assert 0.0 < mc.probability_of_ruin < 1.0


# -- Reports ---------------------------------------------------------------------------------


def test_rich_summary_shows_the_metrics() -> None:
    """The Rich tables name each metric and show its value."""
    trades = [{"pnl": 10.0, "entry_price": 100.0, "qty": 1.0, "entry_ts": T0, "exit_ts": T0}]
    report = result([110.0, 99.0, 121.0], trades=trades)
    console = Console(record=True, width=120)
    mc = monte_carlo([0.1, -0.05], n_paths=100)
    console.print(render_rich(report, monte_carlo_result=mc))
    text = console.export_text()
    for label in ("Total return", "Sharpe", "Sortino", "Calmar", "Max drawdown", "Per pair"):
        assert label in text
    assert "21.00%" in text
    assert "Monte Carlo (bootstrap, 100 paths)" in text


def test_html_report_is_self_contained_with_charts_and_trade_markers(tmp_path: Path) -> None:
    """The HTML has equity, drawdown and price charts, one marker per fill, and no URLs."""
    report = run_fast(load_strategy("sma_cross"), sample_frame(), exact=True)
    mc = monte_carlo(trade_returns(report), n_paths=200)
    path = write_html_report(report, tmp_path / "r" / "report.html", monte_carlo_result=mc)
    text = path.read_text()
    assert text.startswith("<!doctype html>")
    assert text.count("<svg") == 4  # equity, drawdown, price with trades, Monte Carlo
    assert len(re.findall(r'class="mk"', text)) == 2 * report.n_trades
    assert "http://" not in text
    assert "https://" not in text
    assert "<script" not in text
    assert "Equity" in text
    assert "Drawdown" in text
    assert f"Trades ({report.n_trades})" in text


def test_downsampling_keeps_the_extremes() -> None:
    """A one-point spike in 100,000 points survives downsampling to ~1,500."""
    x = np.arange(100_000, dtype=float)
    y = np.zeros(100_000)
    y[54_321] = 5.0
    y[12_345] = -3.0
    dx, dy = _downsample(x, y)
    assert len(dx) <= 1_600
    assert dy.max() == 5.0
    assert dy.min() == -3.0
    assert dx[-1] == x[-1]


def _drawdown_duration_reference(ts: np.ndarray, equity: np.ndarray) -> int:
    # The whole-array numpy formulation the one-pass kernel replaced (the oracle).
    peak = np.maximum.accumulate(equity)
    at_peak = equity >= peak
    peak_ts = np.maximum.accumulate(np.where(at_peak, ts, ts[0]))
    under = ~at_peak
    if not under.any():
        return 0
    longest = int(np.where(under, ts - peak_ts, 0).max())
    recovered = np.flatnonzero(at_peak[1:] & under[:-1]) + 1
    if recovered.size:
        longest = max(longest, int((ts[recovered] - peak_ts[recovered - 1]).max()))
    return longest


@given(
    st.lists(
        st.one_of(st.sampled_from([100.0, 99.0, 101.0, float("nan")]), st.floats(1, 200)),
        min_size=1,
        max_size=60,
    ),
    st.lists(st.integers(1, 5_000), min_size=60, max_size=60),
)
def test_drawdown_duration_kernel_matches_the_array_formulation(
    values: list[float], gaps: list[int]
) -> None:
    """Ties, recoveries, open stretches and NaN: the one-pass kernel gives the same duration."""
    equity = np.array(values, dtype=np.float64)
    ts = np.cumsum(np.array(gaps[: len(values)], dtype=np.int64))
    with np.errstate(invalid="ignore"):
        expected = _drawdown_duration_reference(ts, equity)
    assert max_drawdown_duration(ts, equity) == expected


@given(
    equity=st.lists(st.floats(1, 500), max_size=40),
    entries=st.lists(st.integers(-3, 45), max_size=8),
    start=st.floats(1, 500),
)
def test_metrics_and_trade_returns_read_the_curve_in_place_as_the_whole_curve_gives(
    equity: list[float], entries: list[int], start: float
) -> None:
    """Read in place (the start point apart), a run's curve gives the span, drawdown
    duration and each trade's equity before entry that the copied whole curve gives,
    entries before the first point and empty curves included."""
    r = result(
        equity or [start],
        trades=[{"entry_ts": T0 + day * DAY, "pnl": 1.0} for day in entries],
        start=start,
    )
    if not equity:  # a run without a point: only the start
        r = dataclasses.replace(r, ts=r.ts[:0], equity=r.equity[:0])
    ts, full = curve(r)
    stats = metrics(r)
    assert (stats["start_ts"], stats["end_ts"]) == (int(ts[0]), int(ts[-1]))
    assert stats["final_equity"] == full[-1]
    assert stats["max_drawdown_duration_days"] == max_drawdown_duration(ts, full) / DAY
    index = np.clip(np.searchsorted(ts, r.table["entry_ts"], side="right") - 1, 0, None)
    assert trade_returns(r).tolist() == (r.table["pnl"] / full[index]).tolist()


def test_metrics_and_trade_returns_hold_no_copy_of_a_long_curve() -> None:
    """A 2,000,000-point curve (32 MB) is read where it lies: the report's metrics and the
    trade returns allocate a few kilobytes, not another 16 bytes a point."""
    import tracemalloc

    n = 2_000_000
    r = result([100.0, 101.0], trades=[{"entry_ts": T0 + DAY, "pnl": 1.0}])
    curve_ts = T0 + DAY * np.arange(1, n + 1, dtype=np.int64)
    values = 100.0 + np.sin(np.arange(n) / 1000.0)
    r = dataclasses.replace(r, ts=curve_ts, equity=values, candles=n)
    metrics(r), trade_returns(r)  # numba's first calls load their code
    tracemalloc.start()
    try:
        stats, returns = metrics(r), trade_returns(r)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a copy of the curve would be 32,000,016 bytes
    assert stats["end_ts"] == int(curve_ts[-1])
    assert returns.tolist() == [1.0 / 100.0]
