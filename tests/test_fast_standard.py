"""The standard-profile fast path takes the replay's decisions and books its money exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import talib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backtest_fast import backtest_window, fast_engine_blockers
from candle_store import CandleStore
from config import load_settings
from fast_kernels import stop_atr
from fast_path import BacktestResult
from fast_standard import run_standard
from signal_sources import replay_flags
from strategy import load_strategy
from tests.test_backtest_support import (
    minute_walk,
    replay_in_process,
    run_cli,
    sample_frame,
)


PAIR = "BTC/USDT"
# Risk settings whose span is longer than the data window (300 bars by default): the ATR's
# ten periods, the correlation guard's and the volatility's returns. Drawn by the properties.
_WINDOWS: list[dict[str, str]] = [
    {},
    {},
    {"KESTREL_RISK__ATR_PERIOD": "45"},
    {"KESTREL_RISK__CORRELATION_WINDOW": "350"},
]


def _walk(n: int, seed: int, *, start: float, sigma: float, gap: float, grid: bool) -> pd.DataFrame:
    """Return `n` 1m candles of a random walk with gaps between bars (on a tick grid or not)."""
    rng = np.random.default_rng(seed)
    close = start * np.exp(np.cumsum(rng.normal(0, sigma, n)))
    open_ = np.concatenate(([close[0]], close[:-1])) * np.exp(rng.normal(0, gap, n))
    high = np.maximum(open_, close) * (1 + rng.random(n) * sigma)
    low = np.minimum(open_, close) * (1 - rng.random(n) * sigma)
    columns = [open_, high, low, close]
    if grid:  # the simulated market's own tick (`sim_market`)
        tick = 10.0 ** (math.floor(math.log10(close[0])) - 5)
        columns = [np.round(x / tick) * tick for x in columns]
        columns[1] = np.maximum.reduce(columns)
        columns[2] = np.minimum.reduce(columns)
    index = pd.date_range("2024-03-01", periods=n, freq="1min", tz="UTC", name="ts")
    frame = dict(zip(("open", "high", "low", "close"), columns, strict=True))
    frame["volume"] = rng.gamma(2.0, 3.0, n)
    return pd.DataFrame(frame, index=index.as_unit("ms"))


def _fast(df: pd.DataFrame, name: str, params: dict[str, float], **kwargs: Any) -> BacktestResult:
    s = load_settings(env_file=None)
    kwargs.setdefault("fill_at", s.simulation.fill_at)
    return run_standard(
        load_strategy(name, params),
        df,
        pair=PAIR,
        timeframe="1m",
        risk=s.risk,
        window=backtest_window(s),
        starting_balance=s.simulation.starting_balance,
        taker_fee=s.simulation.taker_fee,
        slippage_bps=s.simulation.slippage_bps,
        **kwargs,
    )


async def _both(
    df: pd.DataFrame, path: Path, name: str, params: dict[str, float], *extra: str
) -> tuple[dict[str, Any], list[tuple[int, float]], BacktestResult]:
    # The replay (in process) and the fast path on the same archive and settings.
    df.to_parquet(path)
    cli = ["--mode", "backtest", "--strategy", name, "--pairs", PAIR, "--timeframe", "1m"]
    cli += ["--data", str(path), *extra]
    for key, value in params.items():
        cli += ["--param", f"{key}={value}"]
    summary, curve = await replay_in_process(*cli)
    return summary, curve, _fast(df, name, params)


def _assert_same(
    summary: dict[str, Any], curve: list[tuple[int, float]], fast: BacktestResult
) -> None:
    """Assert the whole summary equal, the curve to float rounding (1e-13)."""
    ours = fast.summary().to_dict()
    summary = dict(summary)
    summary.pop("timings", None)
    assert summary.pop("dropped_candles") == 0
    assert ours.pop("timings", None) is None
    ours.pop("dropped_candles", None)
    assert ours["trades"] == summary["trades"]
    assert ours == summary
    ts, values = np.array(curve).T
    assert np.array_equal(ts.astype(np.int64), fast.ts)
    np.testing.assert_allclose(fast.equity, values, rtol=1e-13, atol=0)


def _kinds(fast: BacktestResult) -> set[str]:
    return {str(r).split(" ")[0] for r in fast.table["reason"]}


def test_stop_atr_is_talibs_bit_for_bit() -> None:
    """The stops' ATR over each tail of ten periods equals TA-Lib's to the last bit."""
    for df in (sample_frame(), minute_walk(1500, 3, sigma=0.02, wick=0.02)):
        high, low, close = (df[c].to_numpy(np.float64) for c in ("high", "low", "close"))
        for period in (14, 5):
            for end in range(period, len(close)):
                start = max(0, end + 1 - 10 * period)
                bars = slice(start, end + 1)
                want = talib.ATR(high[bars], low[bars], close[bars], period)[-1]
                assert stop_atr(high, low, close, start, end, period) == want


async def test_the_sample_gives_the_replays_summary_and_curve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bundled sample, default standard profile: every field of the summary is the replay's."""
    monkeypatch.setenv("KESTREL_SIMULATION__SLIPPAGE_BPS", "2")
    summary, curve, fast = await _both(
        sample_frame(), tmp_path / "c.parquet", "sma_cross", {"fast": 10, "slow": 30}
    )
    assert fast.n_trades == 29
    assert {"stop-loss", "take-profit", "sma_cross:"} <= _kinds(fast)
    assert summary["vetoes"] > 0  # the loss streak's cooldown refused entries
    _assert_same(summary, curve, fast)


@pytest.mark.parametrize(
    ("name", "params", "env"),
    [
        ("ema_cross", {}, {"KESTREL_SIMULATION__TAKER_FEE": "0.00055"}),
        ("rsi_bb", {}, {"KESTREL_RISK__TAKE_PROFIT_ATR_MULTIPLE": "1.5"}),
        ("breakout", {"period": 30, "exit_period": 15}, {"KESTREL_RISK__TRAILING_STOP": "false"}),
        ("sma_cross", {"fast": 5, "slow": 20}, {"KESTREL_RISK__BREAK_EVEN_AT_R": "0.5"}),
        ("sma_cross", {"fast": 5, "slow": 20}, {"KESTREL_RISK__STOP_ATR_MULTIPLE": "0.7"}),
        # Under a candle, a latency delays no fill: every order is live for the next candle.
        ("sma_cross", {"fast": 5, "slow": 20}, {"KESTREL_SIMULATION__LATENCY_MS": "59999"}),
    ],
)
async def test_each_builtin_and_stop_rule_gives_the_replays_run(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    params: dict[str, float],
    env: dict[str, str],
) -> None:
    """Strategies, fees, take-profits, trailing off, break-even: the same trades and breakers."""
    for key, value in {"KESTREL_RISK__MAX_DRAWDOWN": "0.4", **env}.items():
        monkeypatch.setenv(key, value)
    df = _walk(6000, 11, start=2500.0, sigma=0.003, gap=0.0005, grid=True)
    summary, curve, fast = await _both(df, tmp_path / "c.parquet", name, params)
    assert fast.n_trades > 20
    _assert_same(summary, curve, fast)


@pytest.mark.parametrize(
    ("sizing", "drift"),
    [
        ("kelly", 0.0),  # no edge on a driftless walk: Kelly's own veto
        ("kelly", 0.0006),  # an edge: sized by the capped Kelly fraction
        ("volatility_target", 0.0),
    ],
)
async def test_kelly_and_volatility_sizing_give_the_replays_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sizing: str, drift: float
) -> None:
    """Kelly on the closed trades' returns, volatility on the pair's: the replay's sizes."""
    monkeypatch.setenv("KESTREL_RISK__MAX_DRAWDOWN", "0.6")
    monkeypatch.setenv("KESTREL_RISK__MAX_CONSECUTIVE_LOSSES", "50")
    df = _walk(6000, 5, start=2500.0, sigma=0.003, gap=0.0005, grid=True)
    trend = np.exp(drift * np.arange(len(df)))
    for column in ("open", "high", "low", "close"):
        df[column] = np.round(df[column] * trend, 2)
    params: dict[str, float] = {"fast": 5, "slow": 20}
    fixed = _fast(df, "sma_cross", params)
    monkeypatch.setenv("KESTREL_RISK__SIZING", sizing)
    summary, curve, fast = await _both(df, tmp_path / "c.parquet", "sma_cross", params)
    _assert_same(summary, curve, fast)
    assert fast.n_trades >= 20  # Kelly's sample (20 trades) is reached
    # The rule sized (or refused) entries its own way: not fixed fractional's run.
    qty = {round(t["qty"], 12) for t in summary["trades"]}
    assert qty != {round(t["qty"], 12) for t in fixed.summary().to_dict()["trades"]}
    if sizing == "kelly" and drift == 0.0:
        # Its sample, then "no edge": every later entry refused, and no trade to change that.
        assert fast.n_trades == 20
        assert fast.vetoes > fixed.vetoes


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({"KESTREL_RISK__TAKE_PROFIT_ATR_MULTIPLE": "1.5"}, "take-profit"),
        (
            {
                "KESTREL_RISK__BREAK_EVEN_AT_R": "0.5",
                "KESTREL_RISK__MAX_DRAWDOWN": "0.03",
                "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.02",
            },
            "circuit",  # the flatten's exit
        ),
    ],
)
async def test_fills_at_the_close_give_the_replays_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], kind: str
) -> None:
    """`fill_at=close`: entries, exits, take-profits and a flatten fill at the deciding close."""
    monkeypatch.setenv("KESTREL_SIMULATION__SLIPPAGE_BPS", "2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    df = _walk(6000, 11, start=2500.0, sigma=0.003, gap=0.0005, grid=True)
    params: dict[str, float] = {"fast": 5, "slow": 20}
    at_open = _fast(df, "sma_cross", params)
    monkeypatch.setenv("KESTREL_SIMULATION__FILL_AT", "close")
    summary, curve, fast = await _both(df, tmp_path / "c.parquet", "sma_cross", params)
    _assert_same(summary, curve, fast)
    assert fast.n_trades > 20
    assert {kind, "stop-loss", "sma_cross:"} <= _kinds(fast)
    # Every entry filled at its signal bar's close (slipped up 2 bp), not the next open.
    close = pd.Series(df["close"].to_numpy(), index=df.index.asi8 + 60_000)
    entries = [(t["entry_ts"], t["entry_price"]) for t in summary["trades"]]
    assert all(price == pytest.approx(close[ts] * 1.0002, rel=1e-9) for ts, price in entries)
    assert fast.summary() != at_open.summary()


async def test_an_entry_filled_at_the_last_close_stays_at_its_price(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Filled at the archive's last close, a position is valued at its fill: no close after."""
    monkeypatch.setenv("KESTREL_SIMULATION__SLIPPAGE_BPS", "2")
    monkeypatch.setenv("KESTREL_SIMULATION__FILL_AT", "close")
    df = _walk(3000, 11, start=2500.0, sigma=0.003, gap=0.0005, grid=True)
    params: dict[str, float] = {"fast": 5, "slow": 20}
    opened = int(_fast(df, "sma_cross", params).table["entry_ts"][4])
    df = df.iloc[: int(np.searchsorted(df.index.asi8 + 60_000, opened)) + 1]  # ends on it
    summary, curve, fast = await _both(df, tmp_path / "c.parquet", "sma_cross", params)
    _assert_same(summary, curve, fast)
    (position,) = summary["open_positions"]
    assert position["entry_ts"] == opened
    assert position["mark_price"] == position["entry_price"] != df["close"].iloc[-1]


async def test_every_breaker_rung_is_the_replays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Reduced, the loss streak's cooldown, the daily halt and the flatten: the same history."""
    for key, value in {
        "KESTREL_RISK__RISK_PER_TRADE": "0.05",
        "KESTREL_RISK__MAX_POSITION_FRACTION": "1.0",
        "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.04",
        "KESTREL_RISK__MAX_CONSECUTIVE_LOSSES": "3",
    }.items():
        monkeypatch.setenv(key, value)
    df = _walk(8000, 3, start=180.0, sigma=0.004, gap=0.001, grid=False)
    summary, curve, fast = await _both(
        df, tmp_path / "c.parquet", "sma_cross", {"fast": 5, "slow": 20}
    )
    rungs = {trip.to_state for trip in fast.breaker_trips}
    assert rungs == {"reduced", "reducing", "halted", "flatten"}
    assert "circuit" in _kinds(fast)
    _assert_same(summary, curve, fast)


async def test_a_timerange_simulates_its_rows_on_the_whole_archives_signals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--timerange: the window and the ATR start with the range, the signals do not."""
    monkeypatch.setenv("KESTREL_RISK__MAX_DRAWDOWN", "0.5")
    df = _walk(4 * 1440, 8, start=40.0, sigma=0.003, gap=0.0, grid=True)
    df.to_parquet(tmp_path / "c.parquet")
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--pairs", PAIR, "--timeframe", "1m"]
    cli += ["--data", str(tmp_path / "c.parquet"), "--timerange", "20240302-20240304"]
    summary, curve = await replay_in_process(*cli)
    start, end = (
        int(pd.Timestamp(d, tz="UTC").value // 1_000_000) for d in ("2024-03-02", "2024-03-04")
    )
    fast = _fast(df, "sma_cross", {}, start_ms=start, end_ms=end)
    assert fast.candles == 2 * 1440
    _assert_same(summary, curve, fast)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    start=st.sampled_from([0.0123, 3.7, 250.0, 41_000.0]),
    sigma=st.sampled_from([0.001, 0.004, 0.01]),
    gap=st.sampled_from([0.0, 0.002]),
    grid=st.booleans(),
    stop_atr=st.sampled_from(["1", "2", "3.5"]),
    take_profit=st.sampled_from(["2", "4"]),
    slippage=st.sampled_from(["0", "2"]),
    sizing=st.sampled_from(["fixed_fractional", "fixed_fractional", "kelly", "volatility_target"]),
    fill_at=st.sampled_from(["next_open", "next_open", "close"]),
    latency=st.sampled_from(["0", "0", "250", "59999"]),
    windows=st.sampled_from(_WINDOWS),
)
async def test_random_runs_equal_the_replay(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    start: float,
    sigma: float,
    gap: float,
    grid: bool,
    stop_atr: str,
    take_profit: str,
    slippage: str,
    sizing: str,
    fill_at: str,
    latency: str,
    windows: dict[str, str],
) -> None:
    """Random walks (gaps, on the grid or off it, any price level); stops, sizing, fills."""
    for key, value in {
        **windows,
        "KESTREL_SIMULATION__LATENCY_MS": latency,
        "KESTREL_RISK__SIZING": sizing,
        "KESTREL_SIMULATION__FILL_AT": fill_at,
        "KESTREL_RISK__STOP_ATR_MULTIPLE": stop_atr,
        "KESTREL_RISK__TAKE_PROFIT_ATR_MULTIPLE": take_profit,
        "KESTREL_SIMULATION__SLIPPAGE_BPS": slippage,
        "KESTREL_RISK__MAX_DRAWDOWN": "0.3",
    }.items():
        monkeypatch.setenv(key, value)
    df = _walk(2500, seed, start=start, sigma=sigma, gap=gap, grid=grid)
    path = tmp_path_factory.mktemp("walk") / "c.parquet"
    summary, curve, fast = await _both(df, path, "sma_cross", {"fast": 5, "slow": 20})
    _assert_same(summary, curve, fast)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    start=st.sampled_from([0.5, 97.0, 30_000.0]),
    sigma=st.sampled_from([0.0007, 0.002, 0.006]),
    grid=st.booleans(),
    break_even=st.sampled_from(["0.3", "1"]),
)
def test_the_numba_pass_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    start: float,
    sigma: float,
    grid: bool,
    break_even: str,
) -> None:
    """Held bars through the numba pass or every bar in Decimal: the same result, all of it."""
    monkeypatch.setenv("KESTREL_RISK__BREAK_EVEN_AT_R", break_even)
    monkeypatch.setenv("KESTREL_RISK__MAX_DRAWDOWN", "0.5")
    df = _walk(20_000, seed, start=start, sigma=sigma, gap=0.0005, grid=grid)
    exact = _fast(df, "sma_cross", {"fast": 10, "slow": 30}, accelerate=False)
    fast = _fast(df, "sma_cross", {"fast": 10, "slow": 30})
    assert exact.summary() == fast.summary()
    assert exact.n_trades > 50
    np.testing.assert_allclose(fast.equity, exact.equity, rtol=1e-13, atol=0)


def test_the_cli_runs_the_fast_path_by_default_with_the_same_summary(tmp_path: Path) -> None:
    """`--mode backtest` takes the fast path where it may (no replay phase), the same summary."""
    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=10"]
    cli += ["--param", "slow=30", "--pairs", PAIR, "--timeframe", "1m"]
    (tmp_path / "auto").mkdir()
    (tmp_path / "replay").mkdir()
    auto = run_cli(tmp_path / "auto", *cli)
    replay = run_cli(tmp_path / "replay", *cli, "--engine", "replay")
    assert "prepare_s" not in auto["timings"]  # the replay's own phase: not run
    assert "prepare_s" in replay["timings"]
    auto.pop("timings")
    replay.pop("timings")
    assert auto["n_trades"] == 29
    assert auto == replay


def test_what_only_the_replay_models_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candle's latency, perpetuals: reasons for the replay; sizing, fills, windows are not."""
    assert fast_engine_blockers(load_settings(env_file=None)) == []
    for key, value in (
        ("KESTREL_RISK__SIZING", "kelly"),
        ("KESTREL_RISK__SIZING", "volatility_target"),
        ("KESTREL_SIMULATION__FILL_AT", "close"),
        ("KESTREL_SIMULATION__LATENCY_MS", "59999"),  # under a candle: live for the next
        ("KESTREL_RISK__ATR_PERIOD", "50"),  # the window (300 bars) under ten periods
        ("KESTREL_RISK__CORRELATION_WINDOW", "400"),  # more returns than the window holds
    ):
        with monkeypatch.context() as m:
            m.setenv(key, value)
            assert fast_engine_blockers(load_settings(env_file=None)) == []
    for env, words in (
        ({"KESTREL_STRATEGY__PAIRS": "BTC/USDT:USDT"}, "perpetual"),
        ({"KESTREL_SIMULATION__LATENCY_MS": "60000"}, "latency"),
        ({"KESTREL_ANOMALY__IN_REPLAY": "true"}, "anomaly"),
        ({"KESTREL_STRATEGY__PATTERN_FILTER": "true"}, "pattern filter"),
        ({"KESTREL_STRATEGY__NAME": "rl"}, "champion"),
    ):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            reasons = fast_engine_blockers(load_settings(env_file=None))
        assert any(words in r for r in reasons), (env, reasons)


@pytest.mark.parametrize(
    ("spike", "env"),
    [
        (1.05, {}),  # the fill bar reaches the take-profit, then closes far below
        (1.0, {"KESTREL_RISK__MAX_DRAWDOWN": "0.04", "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.03"}),
    ],
)
async def test_an_exit_under_the_minimum_notional_is_refused_as_in_the_replay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spike: float, env: dict[str, str]
) -> None:
    """A small account's take-profit or flatten exit below 5 USDT: refused, retried, counted."""
    for key, value in {
        "KESTREL_SIMULATION__STARTING_BALANCE": "20",
        "KESTREL_RISK__MAX_POSITION_FRACTION": "0.3",
        "KESTREL_RISK__RISK_PER_TRADE": "0.2",
        "KESTREL_SIMULATION__SLIPPAGE_BPS": "0",
        "KESTREL_RISK__MAX_DAILY_LOSS": "0.5",
        "KESTREL_RISK__MAX_DRAWDOWN": "0.6",
        "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.5",
        **env,
    }.items():
        monkeypatch.setenv(key, value)
    df = minute_walk(120, 1, sigma=0.002, wick=0.002)
    opened = df["open"].iloc[36]
    df.iloc[36, df.columns.get_indexer(["high", "low", "close"])] = (
        round(opened * spike, 2),
        round(opened * 0.8, 2),
        round(opened * 0.8, 2),
    )
    df.iloc[37, df.columns.get_indexer(["open", "low"])] = round(opened * 0.8, 2)
    df.iloc[37, df.columns.get_loc("high")] = max(df["high"].iloc[37], opened)
    summary, curve, fast = await _both(
        df, tmp_path / "c.parquet", "sma_cross", {"fast": 5, "slow": 20}
    )
    assert fast.rejections >= 1
    _assert_same(summary, curve, fast)


def test_an_archive_with_a_refused_candle_runs_on_the_replay(tmp_path: Path) -> None:
    """A damaged archive of ours (a high under the open): auto runs the replay, which refuses it."""
    import pyarrow.parquet as pq

    cli = ["--mode", "backtest", "--strategy", "sma_cross", "--pairs", PAIR, "--timeframe", "1m"]
    summaries = []
    for engine in ("auto", "replay"):
        store = CandleStore(tmp_path / engine / "data", "bybit")
        store.append(PAIR, "1m", _walk(3000, 4, start=100.0, sigma=0.003, gap=0.0, grid=True))
        path = store.path(PAIR, "1m")
        table = pq.read_table(path)
        frame = table.to_pandas()
        frame.loc[1500, "high"] = frame["open"].iloc[1500] * 0.99
        damaged = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(damaged.cast(table.schema), path)
        summaries.append(run_cli(tmp_path / engine, *cli, "--engine", engine))
    auto, replay = summaries
    assert "prepare_s" in auto["timings"]  # the replay ran
    auto.pop("timings")
    replay.pop("timings")
    assert auto == replay
    assert auto["candles"] == 3000 - 1


SHORT_COLUMN = '''
import pandas as pd
from strategy import Param, Strategy


class ShortColumn(Strategy):
    """SMA cross long; its enter_short column (it cannot short) closes longs too."""

    name = "short_column"
    parameters = {"fast": Param(10, 2, 50), "slow": Param(30, 5, 200)}

    def populate(self, df):
        c = df["close"]
        f = c.rolling(int(self.params["fast"])).mean()
        s = c.rolling(int(self.params["slow"])).mean()
        up = (f > s) & (f.shift() <= s.shift())
        down = (f < s) & (f.shift() >= s.shift())
        burst = c.pct_change().rolling(5).sum() > 0.004
        return pd.DataFrame({"enter_long": up, "exit_long": down, "enter_short": burst})
'''


def test_a_strategy_file_with_a_short_column_trades_as_in_the_replay(tmp_path: Path) -> None:
    """A .py strategy whose enter_short column closes longs: the fast path reads the same flags."""
    (tmp_path / "short_column.py").write_text(SHORT_COLUMN)
    cli = ["--mode", "backtest", "--pairs", PAIR, "--timeframe", "1m"]
    cli += ["--strategy", str(tmp_path / "short_column.py")]
    summaries = []
    for engine in ("auto", "replay"):
        (tmp_path / engine).mkdir()
        summaries.append(run_cli(tmp_path / engine, *cli, "--engine", engine))
    auto, replay = summaries
    assert "prepare_s" not in auto["timings"]
    strategy = load_strategy(str(tmp_path / "short_column.py"))
    _, exits = replay_flags(strategy, sample_frame())
    assert exits.sum() > strategy.entries_exits(sample_frame())[1].sum()  # the column counts
    auto.pop("timings")
    replay.pop("timings")
    assert auto == replay
    assert auto["n_trades"] > 10


def _store_pairs(
    data: Path, seed: int, pairs: int, n: int, *, ragged: bool
) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """Write `pairs` archives of correlated walks (one starting late, one with a gap)."""
    from candle_store import load_candles

    store = CandleStore(data, "bybit")
    rng = np.random.default_rng(seed)
    names = [f"{chr(65 + i) * 2}/USDT" for i in range(pairs)]
    common = _walk(n, seed, start=100.0, sigma=0.003, gap=0.0, grid=False)["close"].to_numpy()
    for i, pair in enumerate(names):
        df = _walk(n, seed * 100 + i, start=float(rng.choice([0.9, 37.0, 2000.0])), sigma=0.003,
                   gap=0.0005, grid=True)  # fmt: skip
        if i % 2:  # half the pairs move with a common factor: the correlation guard acts
            scale = common / common[0]
            for column in ("open", "high", "low", "close"):
                df[column] = np.round(df[column] * scale, 6)
            df["high"] = df[["open", "high", "low", "close"]].max(axis=1)
            df["low"] = df[["open", "high", "low", "close"]].min(axis=1)
        if ragged and i == 1:
            df = df.iloc[n // 6 :]
        if ragged and i == 2:
            df = pd.concat([df.iloc[: n // 3], df.iloc[n // 3 + 50 :]])
        store.append(pair, "1m", df)
    return names, {p: load_candles(store.path(p, "1m"), timeframe="1m") for p in names}


async def _portfolio_both(
    monkeypatch: pytest.MonkeyPatch, data: Path, names: list[str], frames: dict[str, pd.DataFrame]
) -> tuple[dict[str, Any], list[tuple[int, float]], BacktestResult]:
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(data))
    monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", ",".join(names))
    cli = ["--mode", "backtest", "--engine", "replay", "--strategy", "sma_cross"]
    cli += ["--param", "fast=5", "--param", "slow=20", "--timeframe", "1m"]
    summary, curve = await replay_in_process(*cli)
    return summary, curve, fast_portfolio(frames, {"fast": 5, "slow": 20})


def fast_portfolio(frames: dict[str, pd.DataFrame], params: dict[str, float]) -> BacktestResult:
    """Return the multi-pair fast path's run of sma_cross over `frames` (the settings')."""
    from fast_portfolio import run_portfolio

    s = load_settings(env_file=None)
    strategy = load_strategy("sma_cross", params)
    return run_portfolio(
        strategy,
        frames,
        timeframe="1m",
        risk=s.risk,
        window=backtest_window(s),
        starting_balance=s.simulation.starting_balance,
        taker_fee=s.simulation.taker_fee,
        slippage_bps=s.simulation.slippage_bps,
        returns_window=s.risk.correlation_window,
        signals={pair: replay_flags(strategy, frame) for pair, frame in frames.items()},
        fill_at=s.simulation.fill_at,
    )


@pytest.mark.parametrize(
    ("sizing", "fill_at", "env"),
    [
        ("fixed_fractional", "next_open", {}),
        ("kelly", "next_open", {}),
        ("volatility_target", "next_open", {}),
        ("fixed_fractional", "close", {}),
        # The data window (300 bars) holds fewer bars than the ATR's ten periods and than
        # the correlation guard's and the volatility's returns: both read what it holds.
        (
            "volatility_target",
            "next_open",
            {"KESTREL_RISK__ATR_PERIOD": "45", "KESTREL_RISK__CORRELATION_WINDOW": "400"},
        ),
    ],
)
async def test_several_pairs_share_the_account_as_in_the_replay(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    sizing: str,
    fill_at: str,
    env: dict[str, str],
) -> None:
    """Four pairs (one late, one with a gap): trades, vetoes, breakers, curve: the replay's."""
    for key, value in {
        "KESTREL_SIMULATION__SLIPPAGE_BPS": "2",
        "KESTREL_RISK__MAX_DRAWDOWN": "0.6",
        "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.05",
        "KESTREL_RISK__MAX_OPEN_POSITIONS": "3",
        "KESTREL_RISK__SIZING": sizing,
        "KESTREL_SIMULATION__FILL_AT": fill_at,
        **env,
    }.items():
        monkeypatch.setenv(key, value)
    names, frames = _store_pairs(tmp_path / "data", 3, 4, 3000, ragged=True)
    names = names[::-1]  # the summary lists them in the settings' order, not by name
    frames = {pair: frames[pair] for pair in names}
    summary, curve, fast = await _portfolio_both(monkeypatch, tmp_path / "data", names, frames)
    _assert_same(summary, curve, fast)
    assert summary["pairs"] == names
    assert fast.vetoes > 0
    assert fast.n_trades >= 20  # Kelly's sample
    if sizing == "fixed_fractional":
        assert len({t["pair"] for t in summary["trades"]}) == 4
        assert fast.n_trades > 60


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    pairs=st.integers(2, 5),
    ragged=st.booleans(),
    positions=st.sampled_from(["2", "5"]),
    correlation=st.sampled_from(["0.5", "0.8"]),
    drawdown=st.sampled_from(["0.5", "0.03"]),
    sizing=st.sampled_from(["fixed_fractional", "fixed_fractional", "kelly", "volatility_target"]),
    fill_at=st.sampled_from(["next_open", "next_open", "close"]),
    latency=st.sampled_from(["0", "0", "250", "59999"]),
    windows=st.sampled_from(_WINDOWS),
)
async def test_random_portfolios_equal_the_replay(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    pairs: int,
    ragged: bool,
    positions: str,
    correlation: str,
    drawdown: str,
    sizing: str,
    fill_at: str,
    latency: str,
    windows: dict[str, str],
) -> None:
    """Random pairs, position and correlation limits, sizing, fills, a flatten: the replay's."""
    for key, value in {
        **windows,
        "KESTREL_SIMULATION__LATENCY_MS": latency,
        "KESTREL_RISK__SIZING": sizing,
        "KESTREL_SIMULATION__FILL_AT": fill_at,
        "KESTREL_RISK__MAX_DRAWDOWN": drawdown,
        "KESTREL_RISK__REDUCE_SIZE_DRAWDOWN": "0.02",
        "KESTREL_RISK__MAX_OPEN_POSITIONS": positions,
        "KESTREL_RISK__MAX_CORRELATION": correlation,
        "KESTREL_RISK__MAX_POSITION_FRACTION": "0.5",
    }.items():
        monkeypatch.setenv(key, value)
    data = tmp_path_factory.mktemp("portfolio") / "data"
    names, frames = _store_pairs(data, seed, pairs, 1500, ragged=ragged)
    summary, curve, fast = await _portfolio_both(monkeypatch, data, names, frames)
    _assert_same(summary, curve, fast)
