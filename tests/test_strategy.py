"""Strategies: parameters, known signals, TA-Lib equality, causality, incremental = batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from error_handler import ConfigError
from models import Side
from strategy import (
    BUILTIN,
    Breakout,
    EmaCross,
    KernelStrategy,
    Param,
    RsiBollinger,
    SmaCross,
    Strategy,
    load_strategy,
)
from tests.test_backtest_support import frame, random_walk, sample_frame


ALL = sorted(BUILTIN)
SIGNALS = ["enter_long", "exit_long"]


def _small(name: str) -> Strategy:
    # Short periods so that a few hundred candles exercise every branch.
    params: dict[str, dict[str, float]] = {
        "sma_cross": {"fast": 3, "slow": 8},
        "ema_cross": {"fast": 3, "slow": 8, "adx_period": 5, "adx_min": 15},
        "rsi_bb": {"rsi_period": 5, "bb_period": 10, "bb_std": 1.5, "rsi_low": 40, "rsi_high": 60},
        "breakout": {"period": 10, "exit_period": 5, "volume_factor": 1.2},
    }
    return load_strategy(name, params[name])


def test_builtins_include_the_four_shipped_strategies() -> None:
    """sma_cross, ema_cross, rsi_bb and breakout are registered."""
    assert {"sma_cross", "ema_cross", "rsi_bb", "breakout"} <= set(BUILTIN)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (Param(10, 2, 100), 500, 100.0),
        (Param(10, 2, 100), 7.6, 8.0),
        (Param(1.0, 0.5, 4.0, False), 0.1, 0.5),
    ],
)
def test_param_clip_keeps_values_in_range(spec: Param, value: float, expected: float) -> None:
    """Out-of-range values are clipped and integer parameters rounded."""
    assert spec.clip(value) == expected


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sma_cross", {"fast": 30, "slow": 10}),
        ("ema_cross", {"fast": 26, "slow": 12}),
        ("rsi_bb", {"rsi_low": 50, "rsi_high": 50}),
        ("sma_cross", {"nope": 1}),
        ("no_such_strategy", {}),
    ],
)
def test_bad_parameters_or_names_are_config_errors(name: str, params: dict[str, float]) -> None:
    """Cross-parameter rules, unknown parameters and unknown names raise ConfigError."""
    with pytest.raises(ConfigError):
        load_strategy(name, params)


def test_sma_cross_signals_on_a_constructed_cross() -> None:
    """Falling then rising closes: the entry is the first bar the fast SMA is above the slow."""
    closes = [10.0 - i * 0.1 for i in range(20)] + [8.0 + i * 0.3 for i in range(10)]
    closes += [closes[-1] - i * 0.5 for i in range(1, 11)]
    df = frame(closes)
    cols = SmaCross(fast=3, slow=8).populate(df)
    fast = talib.SMA(np.asarray(closes), 3)
    slow = talib.SMA(np.asarray(closes), 8)
    above = fast > slow
    first_above = int(np.argmax(above))
    assert np.flatnonzero(cols["enter_long"]).tolist() == [first_above]
    first_below_after = first_above + int(np.argmax(~above[first_above:]))
    assert np.flatnonzero(cols["exit_long"]).tolist() == [first_below_after]


def test_breakout_needs_the_volume_filter() -> None:
    """A close above the 10-bar high enters only when its volume is 1.5x the average."""
    closes = [100.0] * 15 + [101.0] + [100.5] * 5 + [102.0]
    volumes = [10.0] * 15 + [12.0] + [10.0] * 5 + [20.0]
    df = frame(closes, volumes=volumes)
    cols = Breakout(period=10, exit_period=5, volume_factor=1.5).populate(df)
    # Bar 15 breaks the high on 1.2x volume (filtered); bar 21 breaks it on 2x volume.
    assert np.flatnonzero(cols["enter_long"]).tolist() == [21]
    unfiltered = Breakout(period=10, exit_period=5, volume_factor=0).populate(df)
    assert np.flatnonzero(unfiltered["enter_long"]).tolist() == [15, 21]


def test_breakout_exits_below_the_exit_channel() -> None:
    """A close below the lowest low of the previous 5 bars is an exit."""
    closes = [100.0] * 12 + [99.0]
    cols = Breakout(period=10, exit_period=5, volume_factor=0).populate(frame(closes))
    assert np.flatnonzero(cols["exit_long"]).tolist() == [12]


def test_rsi_bb_buys_an_oversold_close_below_the_band_and_exits_at_the_middle() -> None:
    """A sharp drop after a calm stretch enters; the rebound above the middle band exits."""
    rng = np.random.default_rng(3)
    calm = list(100 + rng.normal(0, 0.05, 40))
    drop = [calm[-1] - 1.5 * (i + 1) for i in range(3)]
    rebound = [drop[-1] + 2.0 * (i + 1) for i in range(4)]
    closes = np.array(calm + drop + rebound)
    cols = RsiBollinger(rsi_period=14, bb_period=20, bb_std=2, rsi_low=30, rsi_high=70).populate(
        frame(closes)
    )
    _, mid, lower = talib.BBANDS(closes, 20, 2, 2)
    rsi = talib.RSI(closes, 14)
    assert np.flatnonzero(cols["enter_long"]).tolist() == [40, 41, 42]  # the three drop bars
    assert np.flatnonzero((closes < lower) & (rsi < 30)).tolist() == [40, 41, 42]
    exits = np.flatnonzero(cols["exit_long"].to_numpy() & (np.arange(len(closes)) > 42))
    expected = np.flatnonzero(((closes > mid) | (rsi > 70)) & (np.arange(len(closes)) > 42))
    assert exits.tolist() == expected.tolist()
    assert exits.size > 0


def test_indicators_equal_talib() -> None:
    """SMA, EMA and ADX are TA-Lib's bit for bit; RSI and Bollinger to 1e-9."""
    df = sample_frame()
    c, h, lo = (df[k].to_numpy() for k in ("close", "high", "low"))
    sma = SmaCross(fast=10, slow=30).populate(df)
    assert np.array_equal(sma["sma_fast"].to_numpy(), talib.SMA(c, 10), equal_nan=True)
    assert np.array_equal(sma["sma_slow"].to_numpy(), talib.SMA(c, 30), equal_nan=True)
    ema = EmaCross(fast=12, slow=26, adx_period=14, adx_min=0).populate(df)
    assert np.array_equal(ema["ema_fast"].to_numpy(), talib.EMA(c, 12), equal_nan=True)
    assert np.array_equal(ema["ema_slow"].to_numpy(), talib.EMA(c, 26), equal_nan=True)
    assert np.array_equal(ema["adx"].to_numpy(), talib.ADX(h, lo, c, 14), equal_nan=True)
    rb = RsiBollinger(rsi_period=14, bb_period=20, bb_std=2).populate(df)
    np.testing.assert_allclose(rb["rsi"], talib.RSI(c, 14), rtol=1e-9, equal_nan=True)
    upper, mid, lower = talib.BBANDS(c, 20, 2, 2)
    np.testing.assert_allclose(rb["bb_mid"], mid, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(rb["bb_upper"], upper, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(rb["bb_lower"], lower, rtol=1e-9, equal_nan=True)


def test_sma_cross_signals_equal_the_talib_crossing_rule() -> None:
    """On the sample, entries/exits are exactly the crossings of talib.SMA(10) and SMA(30)."""
    df = sample_frame()
    c = df["close"].to_numpy()
    fast, slow = talib.SMA(c, 10), talib.SMA(c, 30)
    prev_f, prev_s = np.roll(fast, 1), np.roll(slow, 1)
    enter = (fast > slow) & (prev_f <= prev_s)
    exit_ = (fast < slow) & (prev_f >= prev_s)
    enter[0] = exit_[0] = False
    got_enter, got_exit = SmaCross(fast=10, slow=30).entries_exits(df)
    assert np.array_equal(got_enter, enter)
    assert np.array_equal(got_exit, exit_)
    assert got_enter.sum() == 32


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("cut", [45, 200, 777, 1439])
def test_truncating_the_future_never_changes_past_signals(name: str, cut: int) -> None:
    """populate(df[:cut]) equals populate(df)[:cut]: no look-ahead anywhere."""
    strategy = _small(name)
    df = sample_frame()
    full = strategy.populate(df)
    part = strategy.populate(df.iloc[:cut])
    pd.testing.assert_frame_equal(part, full.iloc[:cut])


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(ALL),
    seed=st.integers(0, 10_000),
    cut=st.integers(1, 299),
)
def test_truncation_property_on_random_walks(name: str, seed: int, cut: int) -> None:
    """For any random walk and cut point, earlier signal columns never change."""
    strategy = _small(name)
    df = random_walk(300, seed=seed)
    full = strategy.populate(df)[SIGNALS]
    part = strategy.populate(df.iloc[:cut])[SIGNALS]
    pd.testing.assert_frame_equal(part, full.iloc[:cut])


@pytest.mark.parametrize("name", ALL)
def test_incremental_rows_on_a_rolling_window_equal_the_batch(name: str) -> None:
    """Feeding a 60-candle rolling window one candle at a time gives populate's rows exactly."""
    strategy = _small(name)
    assert isinstance(strategy, KernelStrategy)
    df = sample_frame().iloc[:500]
    batch = strategy.populate(df)
    window = 60
    for i in range(len(df)):
        row = strategy.last_row("BTC/USDT", df.iloc[max(0, i - window + 1) : i + 1])
        expected = batch.iloc[i]
        for key, value in row.items():
            want = expected[key]
            assert value == want or (np.isnan(value) and np.isnan(want)), (i, key, value, want)


def test_incremental_arrays_api_matches_frames() -> None:
    """last_row_arrays on (ts, o, h, l, c, v) views gives the same rows as last_row."""
    a, b = _small("ema_cross"), _small("ema_cross")
    df = sample_frame().iloc[:300]
    ts = df.index.as_unit("ms").asi8
    cols = [df[k].to_numpy() for k in ("open", "high", "low", "close", "volume")]
    for i in range(1, len(df) + 1):
        lo = max(0, i - 50)
        row_a = a.last_row("X/USDT", df.iloc[lo:i])
        row_b = b.last_row_arrays("X/USDT", (ts[lo:i], *(c[lo:i] for c in cols)))
        assert row_a.keys() == row_b.keys()
        assert all(
            row_a[k] == row_b[k] or (np.isnan(row_a[k]) and np.isnan(row_b[k])) for k in row_a
        )


def test_a_gap_longer_than_the_window_restarts_the_state() -> None:
    """After a jump past the window, the rows equal a fresh run on that window."""
    strategy = _small("sma_cross")
    df = sample_frame()
    strategy.last_row("P", df.iloc[:40])
    later = df.iloc[400:440]
    fresh = SmaCross(fast=3, slow=8).populate(later).iloc[-1]
    row = strategy.last_row("P", later)
    assert row["sma_fast"] == fresh["sma_fast"]
    assert row["sma_slow"] == fresh["sma_slow"]


def test_time_going_backwards_starts_a_new_run() -> None:
    """Replaying from the start again (a new run) does not reuse the old state."""
    strategy = _small("ema_cross")
    df = sample_frame().iloc[:200]
    first = [strategy.last_row("P", df.iloc[: i + 1])["ema_fast"] for i in range(len(df))]
    again = [strategy.last_row("P", df.iloc[: i + 1])["ema_fast"] for i in range(len(df))]
    assert np.array_equal(np.array(first), np.array(again), equal_nan=True)


@pytest.mark.parametrize(("holding", "side"), [(False, Side.BUY), (True, Side.SELL)])
def test_signal_turns_the_last_row_into_an_entry_or_exit(holding: bool, side: Side) -> None:
    """signal() returns a BUY on an entry row when flat and a SELL on an exit row when held."""
    strategy = SmaCross(fast=10, slow=30)
    df = sample_frame()
    enter, exit_ = strategy.entries_exits(df)
    flags = exit_ if holding else enter
    i = int(np.flatnonzero(flags)[0])
    signal = SmaCross(fast=10, slow=30).signal("BTC/USDT", df.iloc[: i + 1], holding=holding)
    assert signal is not None
    assert signal.side is side
    assert signal.exit_only is holding
    assert signal.ts == int(df.index[i].value // 1_000_000)
    assert signal.features["sma_fast"] == pytest.approx(
        talib.SMA(df["close"].to_numpy()[: i + 1], 10)[-1]
    )
    none = SmaCross(fast=10, slow=30).signal("BTC/USDT", df.iloc[: i + 1], holding=not holding)
    assert none is None


def test_signal_waits_for_the_warmup() -> None:
    """Fewer candles than warmup give no signal."""
    strategy = SmaCross(fast=10, slow=30)
    assert strategy.warmup == 31
    assert strategy.signal("P", sample_frame().iloc[:30], holding=False) is None


USER_STRATEGY = '''
from typing import ClassVar, Mapping
import pandas as pd
from strategy import Param, Strategy


class EveryNth(Strategy):
    """Enter on every n-th bar, exit on the next one."""

    name = "every_nth"
    parameters: ClassVar[Mapping[str, Param]] = {"n": Param(5, 2, 50)}

    @property
    def warmup(self) -> int:
        return 1

    def populate(self, df: pd.DataFrame) -> pd.DataFrame:
        n = int(self.params["n"])
        i = pd.Series(range(len(df)), index=df.index)
        return pd.DataFrame({"enter_long": i % n == 0, "exit_long": i % n == 1}, index=df.index)
'''


def test_user_strategy_loads_from_a_file(tmp_path: Path) -> None:
    """A .py file with one Strategy subclass loads with its parameters and runs."""
    path = tmp_path / "my_strategy.py"
    path.write_text(USER_STRATEGY)
    strategy = load_strategy(str(path), {"n": 4})
    assert strategy.name == "every_nth"
    assert strategy.params == {"n": 4.0}
    enter, exit_ = strategy.entries_exits(frame([1.0] * 9))
    assert np.flatnonzero(enter).tolist() == [0, 4, 8]
    assert np.flatnonzero(exit_).tolist() == [1, 5]
    signal = strategy.signal("P", frame([1.0] * 5), holding=False)
    assert signal is not None
    assert signal.side is Side.BUY


@pytest.mark.parametrize(
    "text",
    [
        "raise RuntimeError('boom')",
        "x = 1",
        USER_STRATEGY + USER_STRATEGY.replace("EveryNth", "Other"),
    ],
)
def test_broken_user_strategy_files_are_config_errors(tmp_path: Path, text: str) -> None:
    """Import errors, no subclass or two subclasses are reported as ConfigError."""
    path = tmp_path / "broken.py"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_strategy(str(path))


@pytest.mark.parametrize("name", ALL)
def test_rolling_data_manager_windows_give_the_archive_values(name: str) -> None:
    """Fed one candle at a time, last_row_arrays(DataManager.arrays) equals populate on all."""
    from data_manager import DataManager, frame_to_candles

    strategy = load_strategy(name)
    df = sample_frame()
    batch = strategy.populate(df)
    data = DataManager(window=max(strategy.warmup * 2, 300))
    for i, candle in enumerate(frame_to_candles(df, "BTC/USDT", "1m")):
        assert data.on_candle(candle)
        row = strategy.last_row_arrays("BTC/USDT", data.arrays("BTC/USDT", "1m"))
        if i >= strategy.warmup - 1:
            assert row["enter_long"] == batch["enter_long"].iloc[i]
            assert row["exit_long"] == batch["exit_long"].iloc[i]
            for key in strategy.features:  # type: ignore[attr-defined]
                want = batch[key].iloc[i]
                assert row[key] == want or (np.isnan(row[key]) and np.isnan(want)), (i, key)
