"""Exact ties: built-in strategies decide crossings as exact arithmetic on the decimal prices.

Prices are drawn on a coarse decimal tick grid with few distinct values, so averages tie
often, while the doubles of those decimals (0.1 is not a binary fraction) make the float
sums land a bit either side of the tie. The references below are written plainly in
`fractions.Fraction` on the decimal strings.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from strategy import Breakout, KernelStrategy, RsiBollinger, SmaCross
from tests.test_backtest_support import frame


# A regression series: at row 5 SMA(2) = (100.0 + 100.2) / 2 = 100.1 equals SMA(5) =
# 500.5 / 5 exactly, while TA-Lib's float sums give 100.10000000000002 against 100.1; the
# real cross up is at row 6.
TIE_CLOSES = [100.1, 100.2, 100.1, 100.0, 100.0, 100.2, 100.0, 100.2, 100.0]
TIE_ROW = 5


def _exact(values: list[float]) -> list[Fraction]:
    # The decimal each archive double stands for (repr is the shortest round trip).
    return [Fraction(repr(v)) for v in values]


def _cross_decisions(sides: list[int | None]) -> tuple[list[bool], list[bool]]:
    # Enter on fast > slow after fast <= slow; exit on fast < slow after fast >= slow.
    enter, exit_ = [False] * len(sides), [False] * len(sides)
    for i in range(1, len(sides)):
        now, before = sides[i], sides[i - 1]
        if now is None or before is None:
            continue
        enter[i] = now > 0 and before <= 0
        exit_[i] = now < 0 and before >= 0
    return enter, exit_


def sma_cross_reference(closes: list[float], fast: int, slow: int) -> tuple[list[bool], ...]:
    """Return sma_cross entries and exits computed in exact fractions."""
    x = _exact(closes)
    sides: list[int | None] = []
    for i in range(len(x)):
        if i < slow - 1:
            sides.append(None)
            continue
        diff = sum(x[i - fast + 1 : i + 1]) / fast - sum(x[i - slow + 1 : i + 1]) / slow
        sides.append((diff > 0) - (diff < 0))
    return _cross_decisions(sides)


def _incremental(strategy: KernelStrategy, closes: list[float]) -> tuple[list[bool], ...]:
    # The live path: one row at a time on a growing window, state carried per pair.
    df = frame(closes)
    rows = [strategy.last_row("P", df.iloc[: i + 1]) for i in range(len(df))]
    return [r["enter_long"] for r in rows], [r["exit_long"] for r in rows]


grid_closes = st.lists(st.integers(0, 4), min_size=2, max_size=80).map(
    lambda ticks: [float(f"{100 + t / 10:.1f}") for t in ticks]
)


@settings(max_examples=150, deadline=None)
@given(closes=grid_closes, fast=st.integers(2, 5), extra=st.integers(1, 6))
def test_sma_cross_decisions_equal_the_exact_reference(
    closes: list[float], fast: int, extra: int
) -> None:
    """On a 0.1 grid, sma_cross entries and exits equal the Fraction reference, batch and live."""
    slow = max(5, fast + extra)  # the parameter's range starts at 5
    enter, exit_ = SmaCross(fast=fast, slow=slow).entries_exits(frame(closes))
    want_enter, want_exit = sma_cross_reference(closes, fast, slow)
    assert enter.tolist() == want_enter
    assert exit_.tolist() == want_exit
    live_enter, live_exit = _incremental(SmaCross(fast=fast, slow=slow), closes)
    assert (live_enter, live_exit) == (want_enter, want_exit)


def test_an_exact_sma_tie_is_not_a_cross_whatever_the_float_sums_say() -> None:
    """At the tie row the float rule enters; the exact rule waits for the real cross a row later."""
    c = np.array(TIE_CLOSES)
    fast, slow = talib.SMA(c, 2), talib.SMA(c, 5)
    assert fast[TIE_ROW] > slow[TIE_ROW]  # the float noise this guards against
    assert fast[TIE_ROW - 1] < slow[TIE_ROW - 1]
    want_enter, _ = sma_cross_reference(TIE_CLOSES, 2, 5)
    assert np.flatnonzero(want_enter).tolist() == [TIE_ROW + 1]
    enter, _ = SmaCross(fast=2, slow=5).entries_exits(frame(TIE_CLOSES))
    assert np.flatnonzero(enter).tolist() == [TIE_ROW + 1]


@settings(max_examples=40, deadline=None)
@given(history=st.lists(st.integers(-3000, 3000), min_size=0, max_size=60))
def test_the_tie_is_decided_the_same_after_any_history(history: list[int]) -> None:
    """Any earlier closes (any running-sum drift) leave every decision, the tie's too, exact."""
    prefix = [float(f"{100 + t / 100:.2f}") for t in history]
    closes = prefix + TIE_CLOSES
    enter, exit_ = SmaCross(fast=2, slow=5).entries_exits(frame(closes))
    want_enter, want_exit = sma_cross_reference(closes, 2, 5)
    assert enter.tolist() == want_enter
    assert exit_.tolist() == want_exit
    assert not enter[len(prefix) + TIE_ROW]


def breakout_reference(
    closes: list[float], volumes: list[float], period: int, exit_period: int, factor: float
) -> tuple[list[bool], ...]:
    """Return breakout entries and exits computed in exact fractions."""
    c, v, k = _exact(closes), _exact(volumes), Fraction(repr(factor))
    high = [max(a, b) for a, b in zip([c[0], *c[:-1]], c, strict=True)]  # frame()'s highs
    low = [min(a, b) for a, b in zip([c[0], *c[:-1]], c, strict=True)]
    enter, exit_ = [False] * len(c), [False] * len(c)
    for i in range(len(c)):
        if i >= period:
            volume_ok = factor <= 0 or v[i] >= k * sum(v[i - period : i]) / period
            enter[i] = c[i] > max(high[i - period : i]) and volume_ok
        if i >= exit_period:
            exit_[i] = c[i] < min(low[i - exit_period : i])
    return enter, exit_


def _incremental_frame(strategy: KernelStrategy, df: pd.DataFrame) -> tuple[list[bool], ...]:
    # The live path on a full frame (volumes included), one row at a time.
    rows = [strategy.last_row("P", df.iloc[: i + 1]) for i in range(len(df))]
    return [r["enter_long"] for r in rows], [r["exit_long"] for r in rows]


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(-2, 3), st.booleans()), min_size=4, max_size=60),
    base=st.integers(1, 3),
    period=st.integers(3, 6),
    exit_period=st.integers(2, 6),
    factor=st.sampled_from([0.0, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5]),
)
def test_breakout_decisions_equal_the_exact_reference(
    data: list[tuple[int, bool]], base: int, period: int, exit_period: int, factor: float
) -> None:
    """On 0.1 price and volume grids, breakout entries and exits equal the Fraction reference."""
    # A walk on the price grid breaks out often; the volume is mostly one value, so the
    # volume filter ties (volume == factor x mean) often.
    walk = np.cumsum([step for step, _ in data])
    closes = [float(f"{100 + t / 10:.1f}") for t in walk]
    volumes = [float(f"{(base if usual else 2 * base) / 10:.1f}") for _, usual in data]
    strategy = Breakout(period=period, exit_period=exit_period, volume_factor=factor)
    df = frame(closes, volumes=volumes)
    want = breakout_reference(closes, volumes, period, exit_period, factor)
    enter, exit_ = strategy.entries_exits(df)
    assert (enter.tolist(), exit_.tolist()) == want
    live = Breakout(period=period, exit_period=exit_period, volume_factor=factor)
    assert _incremental_frame(live, df) == want


def test_an_exact_volume_tie_passes_the_breakout_filter_whatever_the_float_mean_says() -> None:
    """Volume 0.1 against 1.0 x the mean of three 0.1s is a tie, so the breakout enters."""
    volumes = [0.1, 0.1, 0.1, 0.1]
    assert volumes[3] < 1.0 * ((0.1 + 0.1 + 0.1) / 3)  # the float noise this guards against
    df = frame([100.0, 100.0, 100.0, 100.1], volumes=volumes)
    enter, _ = Breakout(period=3, exit_period=2, volume_factor=1.0).entries_exits(df)
    assert enter.tolist() == [False, False, False, True]


TIE = Fraction(1, 100_000)  # strategy._INDEX_TIE: an index this close to its threshold ties
ZERO_EPS = Fraction(1e-8)  # TA-Lib's TA_IS_ZERO, as the double the kernels compare with


def rsi_reference(x: list[Fraction], n: int) -> list[Fraction | None]:
    """Return TA-Lib's RSI recurrence in exact fractions (None before it exists)."""
    out: list[Fraction | None] = [None] * len(x)
    gain = loss = Fraction(0)
    for i in range(1, len(x)):
        change = x[i] - x[i - 1]
        if i > n:
            gain, loss = gain * (n - 1), loss * (n - 1)
        gain, loss = gain + max(change, Fraction(0)), loss + max(-change, Fraction(0))
        if i >= n:
            gain, loss = gain / n, loss / n
            total = gain + loss
            out[i] = Fraction(0) if abs(total) < ZERO_EPS else 100 * gain / total
    return out


def rsi_bb_reference(
    closes: list[float], rsi_n: int, bb_n: int, k: float, low: int, high: int
) -> tuple[list[bool], ...]:
    """Return rsi_bb entries and exits computed in exact fractions (bands squared out)."""
    x, kk = _exact(closes), Fraction(repr(k)) ** 2
    rsi = rsi_reference(x, rsi_n)
    enter, exit_ = [False] * len(x), [False] * len(x)
    for i in range(len(x)):
        above_mid = below_lower = False
        if i >= bb_n - 1:
            window = x[i - bb_n + 1 : i + 1]
            mid = sum(window) / bb_n
            var = sum((w - mid) ** 2 for w in window) / bb_n
            above_mid = x[i] > mid
            below_lower = mid - x[i] > 0 and (mid - x[i]) ** 2 > kk * var  # x < mid - k sd
        r = rsi[i]
        enter[i] = below_lower and r is not None and r < low - TIE
        exit_[i] = above_mid or (r is not None and r > high + TIE)
    return enter, exit_


@settings(max_examples=300, deadline=None)
@given(
    closes=grid_closes,
    rsi_n=st.integers(2, 5),
    bb_n=st.integers(5, 8),
    k=st.sampled_from([0.5, 1.0, 1.5, 2.0]),
    low=st.sampled_from([25, 40, 50]),
    high=st.sampled_from([50, 60, 75]),
)
def test_rsi_bb_decisions_equal_the_exact_reference(
    closes: list[float], rsi_n: int, bb_n: int, k: float, low: int, high: int
) -> None:
    """On a 0.1 grid, rsi_bb entries and exits equal the Fraction reference, batch and live."""
    if low >= high:
        low = 40
    params = {"rsi_period": rsi_n, "bb_period": bb_n, "bb_std": k, "rsi_low": low}
    params["rsi_high"] = high
    want = rsi_bb_reference(closes, rsi_n, bb_n, k, low, high)
    enter, exit_ = RsiBollinger(**params).entries_exits(frame(closes))
    assert (enter.tolist(), exit_.tolist()) == want
    assert _incremental(RsiBollinger(**params), closes) == want


def test_a_close_exactly_at_the_middle_band_is_not_above_it() -> None:
    """100.2 is the mean of the window exactly; the float middle band sits a bit below it."""
    closes = [100.3, 100.1, 100.0, 100.4, 100.2]
    strategy = RsiBollinger(rsi_period=2, bb_period=5, bb_std=1.0, rsi_low=25, rsi_high=95)
    cols = strategy.populate(frame(closes))
    assert closes[-1] > cols["bb_mid"].iloc[-1]  # the float noise this guards against
    assert cols["rsi"].iloc[-1] < 95
    assert not cols["exit_long"].iloc[-1]


def test_a_close_exactly_at_the_lower_band_is_not_below_it() -> None:
    """100.0 is exactly mid - 0.5 sd (100.02 - 0.5 x 0.04); the float lower band sits above it."""
    closes = [100.5, 100.4, 100.3, 100.2, 100.0, 100.1, 100.0, 100.0, 100.0]
    strategy = RsiBollinger(rsi_period=3, bb_period=5, bb_std=0.5, rsi_low=40, rsi_high=95)
    cols = strategy.populate(frame(closes))
    assert closes[-1] < cols["bb_lower"].iloc[-1]  # the float noise this guards against
    assert cols["rsi"].iloc[-1] < 40
    assert not cols["enter_long"].iloc[-1]
    assert rsi_bb_reference(closes, 3, 5, 0.5, 40, 95)[0][-1] is False
