"""Exact ties: built-in strategies decide crossings as exact arithmetic on the decimal prices.

Prices are drawn on a coarse decimal tick grid with few distinct values, so averages tie
often, while the doubles of those decimals (0.1 is not a binary fraction) make the float
sums land a bit either side of the tie. The references below are written plainly in
`fractions.Fraction` on the decimal strings. SMA crosses, Bollinger bands, Donchian
channels and the volume filter are decided exactly; EMA crosses and the RSI and ADX
thresholds, whose exact values have denominators growing every bar, are decided with the
kernels' tie bands, which the references apply to the exact values.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from strategy import Breakout, EmaCross, KernelStrategy, RsiBollinger, SmaCross
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
    return _incremental_frame(strategy, frame(closes))


def _incremental_frame(strategy: KernelStrategy, df: pd.DataFrame) -> tuple[list[bool], ...]:
    # The same on a full frame (highs, lows and volumes given).
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


EMA_TIE = Fraction(1e-11)  # strategy._EMA_TIE: EMAs this close (relative) are tied


def ema_reference(x: list[Fraction], n: int) -> list[Fraction | None]:
    """Return TA-Lib's EMA (seeded with the SMA of the first n) in exact fractions."""
    out: list[Fraction | None] = [None] * len(x)
    if len(x) >= n:
        out[n - 1] = prev = sum(x[:n], Fraction(0)) / n
        for i in range(n, len(x)):
            out[i] = prev = prev + Fraction(2, n + 1) * (x[i] - prev)
    return out


def dx_reference(plus: Fraction, minus: Fraction, tr_sum: Fraction) -> Fraction | None:
    """Return TA-Lib's DX from the smoothed sums, None where a sum is zero."""
    if abs(tr_sum) < ZERO_EPS:
        return None
    minus_di, plus_di = 100 * minus / tr_sum, 100 * plus / tr_sum
    if abs(minus_di + plus_di) < ZERO_EPS:
        return None
    return 100 * abs(minus_di - plus_di) / (minus_di + plus_di)


def adx_reference(
    high: list[Fraction], low: list[Fraction], close: list[Fraction], n: int
) -> list[Fraction | None]:
    """Return TA-Lib's ADX recurrence in exact fractions (tied moves count for neither)."""
    out: list[Fraction | None] = [None] * len(close)
    plus = minus = tr_sum = dx_sum = adx = Fraction(0)
    for i in range(1, len(close)):
        up, down = high[i] - high[i - 1], low[i - 1] - low[i]
        tr = max(high[i] - low[i], abs(high[i] - close[i - 1]), abs(low[i] - close[i - 1]))
        if i >= n:
            plus, minus = plus - plus / n, minus - minus / n
        if down > 0 and up < down:
            minus += down
        elif up > 0 and up > down:
            plus += up
        if i < n:
            tr_sum += tr
            continue
        tr_sum = tr_sum - tr_sum / n + tr
        dx = dx_reference(plus, minus, tr_sum)
        if i < 2 * n:
            dx_sum += dx if dx is not None else 0
            if i == 2 * n - 1:
                out[i] = adx = dx_sum / n
        else:
            if dx is not None:
                adx = (adx * (n - 1) + dx) / n
            out[i] = adx
    return out


def ema_cross_reference(
    df: pd.DataFrame, fast: int, slow: int, adx_n: int, adx_min: int
) -> tuple[list[bool], ...]:
    """Return ema_cross entries and exits computed in exact fractions, with the tie bands."""
    h, lo, c = (_exact(df[col].tolist()) for col in ("high", "low", "close"))
    ema_f, ema_s, adx = (
        ema_reference(c, fast),
        ema_reference(c, slow),
        adx_reference(h, lo, c, adx_n),
    )
    sides: list[int | None] = []
    for f, s in zip(ema_f, ema_s, strict=True):
        if f is None or s is None:
            sides.append(None)
            continue
        band = EMA_TIE * max(abs(f), abs(s))
        sides.append((f - s > band) - (f - s < -band))
    enter, exit_ = _cross_decisions(sides)
    trend = [(a if a is not None else 0) >= adx_min - TIE for a in adx]
    return [e and t for e, t in zip(enter, trend, strict=True)], exit_


flat_runs = st.lists(st.tuples(st.integers(0, 4), st.integers(1, 12)), min_size=1, max_size=12).map(
    lambda runs: [float(f"{100 + t / 10:.1f}") for t, k in runs for _ in range(k)]
)


@settings(max_examples=300, deadline=None)
@given(
    closes=flat_runs,
    fast=st.integers(2, 4),
    extra=st.integers(1, 4),
    adx_n=st.integers(5, 6),
    adx_min=st.sampled_from([0, 0, 10, 20, 30, 50]),
)
def test_ema_cross_decisions_equal_the_exact_reference(
    closes: list[float], fast: int, extra: int, adx_n: int, adx_min: int
) -> None:
    """On a 0.1 grid with flat runs, ema_cross decisions equal the Fraction reference."""
    slow = max(5, fast + extra)  # the parameter's range starts at 5
    params = {"fast": fast, "slow": slow, "adx_period": adx_n, "adx_min": adx_min}
    df = frame(closes)
    want = ema_cross_reference(df, fast, slow, adx_n, adx_min)
    enter, exit_ = EmaCross(**params).entries_exits(df)
    assert (enter.tolist(), exit_.tolist()) == want
    assert _incremental(EmaCross(**params), closes) == want


@settings(max_examples=100, deadline=None)
@given(
    bars=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 2), st.integers(0, 2)), min_size=12, max_size=50
    ),
    n=st.integers(5, 6),
)
def test_adx_equals_the_exact_reference_where_moves_tie(
    bars: list[tuple[int, int, int]], n: int
) -> None:
    """On a 0.1 grid, where up and down moves tie often, ema_cross's ADX is the exact ADX."""
    closes = [float(f"{100 + c / 10:.1f}") for c, _, _ in bars]
    highs = [float(f"{100 + (c + a) / 10:.1f}") for c, a, _ in bars]
    lows = [float(f"{100 + (c - b) / 10:.1f}") for c, _, b in bars]
    df = frame(closes, highs=highs, lows=lows)
    high, low, close = (_exact(df[col].tolist()) for col in ("high", "low", "close"))
    want = adx_reference(high, low, close, n)
    got = EmaCross(fast=2, slow=5, adx_period=n, adx_min=0).populate(df)["adx"].tolist()
    for g, w in zip(got, want, strict=True):
        assert (w is None and np.isnan(g)) or abs(g - float(w or 0)) < 1e-9


def test_a_tie_of_the_two_moves_counts_for_neither() -> None:
    """An up move equal to the down move is no directional move, whatever the float gap says."""
    closes = [100.2, 100.1, 100.2, 100.2, 100.2, 100.2, 100.2, 100.3, 100.1, 100.4, 100.2]
    highs = [100.3, 100.3, 100.3, 100.4, 100.2, 100.3, 100.2, 100.4, 100.2, 100.4, 100.4]
    lows = [100.0, 100.0, 100.0, 100.0, 100.2, 100.1, 100.2, 100.2, 100.1, 100.3, 100.0]
    df = frame(closes, highs=highs, lows=lows)
    h, lo, c = (df[col].to_numpy() for col in ("high", "low", "close"))
    # The float noise this guards against: moves equal in decimals, unequal in float.
    ties = [
        i
        for i in range(1, len(h))
        if Fraction(repr(highs[i])) - Fraction(repr(highs[i - 1]))
        == Fraction(repr(lows[i - 1])) - Fraction(repr(lows[i]))
        > 0
        and h[i] - h[i - 1] != lo[i - 1] - lo[i]
    ]
    assert ties
    want = float(adx_reference(_exact(highs), _exact(lows), _exact(closes), 5)[-1] or 0)
    got = EmaCross(fast=2, slow=5, adx_period=5, adx_min=0).populate(df)["adx"].to_numpy()
    assert abs(got[-1] - want) < 1e-9
    assert abs(talib.ADX(h, lo, c, 5)[-1] - want) > 1.0  # TA-Lib's float tie-break


def test_flat_prices_tie_the_emas_so_the_first_move_up_crosses() -> None:
    """After six flat closes the EMAs are equal (the float seed is below), so the move up enters."""
    closes = [100.4] * 6 + [100.5]
    fast, slow = talib.EMA(np.array(closes), 2), talib.EMA(np.array(closes), 6)
    assert fast[5] > slow[5]  # the float noise this guards against: the seed sum rounds down
    want_enter, _ = ema_cross_reference(frame(closes), 2, 6, 5, 0)
    assert np.flatnonzero(want_enter).tolist() == [6]
    enter, _ = EmaCross(fast=2, slow=6, adx_period=5, adx_min=0).entries_exits(frame(closes))
    assert np.flatnonzero(enter).tolist() == [6]
