"""Kestrel's own indicators against their published definitions, computed independently."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

import technical_indicators as ti
from tests.test_indicators_support import (
    NAN,
    assert_close,
    atr,
    columns,
    ema,
    frame,
    highest,
    isnan,
    linreg,
    load_sample,
    lowest,
    pstdev,
    roc,
    rsi,
    sma,
    true_range,
)


@pytest.fixture(scope="module")
def btc() -> pd.DataFrame:
    """Return the first 400 Bybit BTC/USDT 1m candles of the sample."""
    return load_sample().iloc[:400]


def test_references_match_talib_primitives(btc: pd.DataFrame) -> None:
    """The plain-python EMA, ATR, RSI and linear regression match TA-Lib (they feed the rest)."""
    _, high, low, close, _ = columns(btc)
    arr = btc["close"].to_numpy()
    assert_close(talib.EMA(arr, 10), ema(close, 10))
    assert_close(
        talib.ATR(btc["high"].to_numpy(), btc["low"].to_numpy(), arr, 14), atr(high, low, close, 14)
    )
    assert_close(talib.RSI(arr, 14), rsi(close, 14))
    assert_close(talib.LINEARREG(arr, 20), linreg(close, 20))


def test_session_vwap_restarts_each_utc_day() -> None:
    """Session VWAP is the day's sum(tp*v)/sum(v), restarting at 00:00 UTC (hand computed)."""
    df = frame(
        [(10, 10, 10, 10, 1), (20, 20, 20, 20, 3), (30, 30, 30, 30, 2), (40, 40, 40, 40, 0)],
        freq="12h",
        start="2024-01-01 00:00",
    )
    assert_close(ti.compute(df, "session_vwap"), [10.0, 17.5, 30.0, 30.0])


def test_session_vwap_uses_typical_price() -> None:
    """Typical price is (high + low + close) / 3."""
    df = frame([(1, 12, 6, 9, 2), (9, 15, 9, 12, 2)])
    assert_close(ti.compute(df, "session_vwap"), [9.0, (9.0 * 2 + 12.0 * 2) / 4])


@pytest.mark.parametrize(
    ("anchor", "expected"),
    [
        (0, [10.0, 17.5, 130 / 6, 130 / 6]),
        (pd.Timestamp("2024-01-01 12:00", tz="UTC"), [NAN, 20.0, 24.0, 24.0]),
        ("2024-01-01T12:00:00+00:00", [NAN, 20.0, 24.0, 24.0]),
    ],
)
def test_anchored_vwap_starts_at_anchor(anchor: object, expected: list[float]) -> None:
    """Anchored VWAP accumulates from the first candle opening at or after the anchor."""
    df = frame(
        [(10, 10, 10, 10, 1), (20, 20, 20, 20, 3), (30, 30, 30, 30, 2), (40, 40, 40, 40, 0)],
        freq="12h",
    )
    assert_close(ti.compute(df, "anchored_vwap", anchor=anchor), expected)


def test_ichimoku_lines_match_definition(btc: pd.DataFrame) -> None:
    """Tenkan/kijun are 9/26-bar midpoints; the cloud is the value of 26 bars earlier."""
    _, high, low, close, _ = columns(btc)
    out = ti.compute(btc, "ichimoku")
    n = len(close)

    def mid(period: int, i: int) -> float:
        return NAN if i < period - 1 else (highest(high, period, i) + lowest(low, period, i)) / 2

    tenkan = [mid(9, i) for i in range(n)]
    kijun = [mid(26, i) for i in range(n)]
    senkou_a = [NAN if i < 26 else (tenkan[i - 26] + kijun[i - 26]) / 2 for i in range(n)]
    senkou_b = [NAN if i < 26 else mid(52, i - 26) for i in range(n)]
    assert list(out.columns) == ["tenkan", "kijun", "senkou_a", "senkou_b", "chikou"]
    assert_close(out["tenkan"], tenkan)
    assert_close(out["kijun"], kijun)
    assert_close(out["senkou_a"], senkou_a)
    assert_close(out["senkou_b"], senkou_b)
    assert_close(out["chikou"], close)  # known-at-t convention: never close.shift(-26)


def test_chandelier_exit_matches_definition(btc: pd.DataFrame) -> None:
    """Long stop = 22-bar highest high - 3 ATR(22); short stop = lowest low + 3 ATR(22)."""
    _, high, low, close, _ = columns(btc)
    a = atr(high, low, close, 22)
    out = ti.compute(btc, "chandelier")
    assert_close(
        out["long_stop"],
        [NAN if isnan(a[i]) else highest(high, 22, i) - 3 * a[i] for i in range(len(a))],
    )
    assert_close(
        out["short_stop"],
        [NAN if isnan(a[i]) else lowest(low, 22, i) + 3 * a[i] for i in range(len(a))],
    )


ZIGZAG_PRICES = [100, 102, 106, 110, 108, 104, 103, 107, 109]


def test_zigzag_confirms_pivots_only_when_price_has_reversed() -> None:
    """A 5% ZigZag reports each pivot from its confirmation bar, never from the pivot bar."""
    df = frame([(p, p, p, p, 1) for p in ZIGZAG_PRICES])
    out = ti.compute(df, "zigzag", deviation=5.0)
    # low 100 (bar 0) is confirmed at bar 2 (106 >= 105); high 110 (bar 3) at bar 5
    # (104 <= 104.5); low 103 (bar 6) at bar 8 (109 >= 108.15)
    assert_close(out["pivot"], [NAN, NAN, 100, 100, 100, 110, 110, 110, 103])
    assert_close(out["direction"], [NAN, NAN, 1, 1, 1, -1, -1, -1, 1])
    assert_close(out["age"], [NAN, NAN, 2, 3, 4, 2, 3, 4, 2])


def test_zigzag_pivots_draws_pivots_at_their_own_bars() -> None:
    """The chart version places the confirmed pivots at the bars where they happened."""
    df = frame([(p, p, p, p, 1) for p in ZIGZAG_PRICES])
    assert_close(ti.zigzag_pivots(df, 5.0), [100, NAN, NAN, 110, NAN, NAN, 103, NAN, NAN])


def test_zigzag_is_not_in_hindsight_on_real_data() -> None:
    """ZigZag values on a prefix equal the values on the whole series (no repainting)."""
    df = load_sample()
    whole = ti.compute(df, "zigzag", deviation=0.3)
    assert whole["pivot"].notna().sum() > 1000
    for cut in (300, 777, 1200):
        part = ti.compute(df.iloc[:cut], "zigzag", deviation=0.3)
        pd.testing.assert_frame_equal(part, whole.iloc[:cut])


def test_fisher_transform_matches_ehlers(btc: pd.DataFrame) -> None:
    """Fisher follows Ehlers' recursion on hl2 with the +-0.999 clamp; signal lags one bar."""
    _, high, low, _, _ = columns(btc)
    hl2 = [(h + lo) / 2 for h, lo in zip(high, low, strict=True)]
    fish, signal = [NAN] * len(hl2), [NAN] * len(hl2)
    value = prev = 0.0
    for i in range(8, len(hl2)):
        top, bottom = highest(hl2, 9, i), lowest(hl2, 9, i)
        x = (hl2[i] - bottom) / (top - bottom) - 0.5 if top > bottom else 0.0
        value = 0.66 * x + 0.67 * value
        value = 0.999 if value > 0.99 else -0.999 if value < -0.99 else value
        current = 0.5 * math.log((1 + value) / (1 - value)) + 0.5 * prev
        fish[i] = current
        signal[i] = prev if i > 8 else NAN
        prev = current
    out = ti.compute(btc, "fisher")
    assert_close(out["fisher"], fish)
    assert_close(out["signal"], signal)


def test_choppiness_matches_definition() -> None:
    """CHOP = 100 log10(sum TR / (max high - min low)) / log10(n), by hand on 4 bars."""
    df = frame(
        [(10, 11, 9, 10, 1), (10, 12, 10, 11, 1), (11, 11.5, 9.5, 10, 1), (10, 13, 10, 12, 1)]
    )
    out = ti.compute(df, "chop", timeperiod=3)
    # TR = 2 (12-10 vs |12-10|, |10-10|), 2 (11.5-9.5), 3 (13-10); range = 13 - 9.5
    assert_close(out, [NAN, NAN, NAN, 100 * math.log10(7 / 3.5) / math.log10(3)])


def test_choppiness_on_sample(btc: pd.DataFrame) -> None:
    """CHOP(14) on real candles equals the definition computed in plain Python."""
    _, high, low, close, _ = columns(btc)
    tr = true_range(high, low, close)
    expected = [
        NAN
        if i < 14
        else 100
        * math.log10(sum(tr[i - 13 : i + 1]) / (highest(high, 14, i) - lowest(low, 14, i)))
        / math.log10(14)
        for i in range(len(close))
    ]
    assert_close(ti.compute(btc, "chop"), expected)


def test_squeeze_matches_ttm_definition(btc: pd.DataFrame) -> None:
    """Squeeze is on when Bollinger(20, 2) sits inside Keltner(EMA 20 +- 1.5 ATR 20)."""
    _, high, low, close, _ = columns(btc)
    n = 20
    basis, mid, a = sma(close, n), ema(close, n), atr(high, low, close, n)
    on = []
    for i in range(len(close)):
        if i < n:
            on.append(NAN)
            continue
        dev = pstdev(close[i - n + 1 : i + 1])
        inside = (
            basis[i] - 2 * dev > mid[i] - 1.5 * a[i] and basis[i] + 2 * dev < mid[i] + 1.5 * a[i]
        )
        on.append(1.0 if inside else 0.0)
    delta = [
        NAN
        if i < n - 1
        else close[i] - ((highest(high, n, i) + lowest(low, n, i)) / 2 + basis[i]) / 2
        for i in range(len(close))
    ]
    out = ti.compute(btc, "squeeze")
    assert_close(out["squeeze_on"], on)
    assert_close(out["momentum"], linreg(delta, n), rtol=1e-7)
    assert 0 < np.nansum(out["squeeze_on"]) < out["squeeze_on"].notna().sum()


def test_zscore_by_hand() -> None:
    """z = (x - mean) / population stdev: 3 in [1, 2, 3] scores 1.2247..."""
    df = frame([(x, x, x, x, 1) for x in (1.0, 2.0, 3.0, 3.0, 3.0, 3.0)])
    assert_close(
        ti.compute(df, "zscore", timeperiod=3),
        [NAN, NAN, 1 / math.sqrt(2 / 3), 1 / math.sqrt(2), 0.0, 0.0],
    )


def test_zscore_on_sample_stays_exact_over_long_runs() -> None:
    """The rolling z-score equals a fresh per-window computation on all 1,440 BTC candles."""
    df = load_sample()
    close = df["close"].tolist()
    expected = [
        NAN
        if i < 19
        else (close[i] - sum(close[i - 19 : i + 1]) / 20) / pstdev(close[i - 19 : i + 1])
        for i in range(len(close))
    ]
    assert_close(ti.compute(df, "zscore"), expected, rtol=1e-7)


def test_alma_matches_gaussian_weights(btc: pd.DataFrame) -> None:
    """ALMA weights exp(-(k - 0.85 (n-1))^2 / (2 (n/6)^2)), oldest bar k = 0."""
    close = btc["close"].tolist()
    n, m, s = 9, 0.85 * 8, 9 / 6
    weights = [math.exp(-((k - m) ** 2) / (2 * s * s)) for k in range(n)]
    expected = [
        NAN
        if i < n - 1
        else sum(w * close[i - n + 1 + k] for k, w in enumerate(weights)) / sum(weights)
        for i in range(len(close))
    ]
    assert_close(ti.compute(btc, "alma"), expected)


def test_wavetrend_matches_lazybear(btc: pd.DataFrame) -> None:
    """WaveTrend: ci = (ap - esa) / (0.015 d), wt1 = EMA(ci, 21), wt2 = SMA(wt1, 4)."""
    _, high, low, close, _ = columns(btc)
    ap = [(h + lo + c) / 3 for h, lo, c in zip(high, low, close, strict=True)]
    esa = ema(ap, 10)
    d = ema([abs(a - e) for a, e in zip(ap, esa, strict=True)], 10)
    ci = [(a - e) / (0.015 * dd) for a, e, dd in zip(ap, esa, d, strict=True)]
    wt1 = ema(ci, 21)
    out = ti.compute(btc, "wavetrend")
    assert_close(out["wt1"], wt1, rtol=1e-8)
    assert_close(out["wt2"], sma(wt1, 4), rtol=1e-8)


def test_schaff_trend_cycle_matches_definition(btc: pd.DataFrame) -> None:
    """STC: stochastic of MACD(23, 50) over 10 bars, smoothed by 0.5, twice."""
    close = btc["close"].tolist()
    fast, slow = ema(close, 23), ema(close, 50)
    macd = [f - s for f, s in zip(fast, slow, strict=True)]
    first = 49
    pf, out = [NAN] * len(close), [NAN] * len(close)
    f1 = f2 = 0.0
    pff = NAN
    for i in range(first + 9, len(close)):
        window = macd[i - 9 : i + 1]
        if max(window) > min(window):
            f1 = (macd[i] - min(window)) / (max(window) - min(window)) * 100
        pf[i] = f1 if isnan(pf[i - 1]) else pf[i - 1] + 0.5 * (f1 - pf[i - 1])
        if i < first + 18:
            continue
        window = pf[i - 9 : i + 1]
        if max(window) > min(window):
            f2 = (pf[i] - min(window)) / (max(window) - min(window)) * 100
        pff = f2 if isnan(pff) else pff + 0.5 * (f2 - pff)
        out[i] = pff
    result = ti.compute(btc, "stc")
    assert_close(result, out, rtol=1e-7)
    assert ti.lookback("stc") == first + 18 == int(result.isna().sum())


def test_ulcer_index_matches_martin(btc: pd.DataFrame) -> None:
    """Ulcer = sqrt(mean of squared % drawdowns from the 14-bar highest close)."""
    close = btc["close"].tolist()
    dd = [
        NAN if i < 13 else 100 * (close[i] - highest(close, 14, i)) / highest(close, 14, i)
        for i in range(len(close))
    ]
    expected = [
        NAN if i < 26 else math.sqrt(sum(v * v for v in dd[i - 13 : i + 1]) / 14)
        for i in range(len(close))
    ]
    assert_close(ti.compute(btc, "ulcer_index"), expected, rtol=1e-7)


def test_pivot_points_by_hand() -> None:
    """Floor pivots come from the previous day with data: H 12, L 7, C 10 -> pp 29/3."""
    rows = [
        (9, 10, 8, 9, 1),
        (9, 12, 9, 11, 1),
        (11, 11, 7, 10, 1),
        (10, 10.5, 9.5, 10, 1),
        (10, 20, 1, 5, 1),
    ]
    index = pd.DatetimeIndex(
        [
            "2024-01-01 00:00",
            "2024-01-01 08:00",
            "2024-01-01 16:00",
            "2024-01-02 00:00",
            "2024-01-04 00:00",
        ],
        tz="UTC",
    )
    df = pd.DataFrame(
        rows, columns=["open", "high", "low", "close", "volume"], index=index, dtype="float64"
    )
    out = ti.compute(df, "pivot_points")
    p = 29 / 3
    assert out.iloc[:3].isna().all().all()
    assert_close(
        out.iloc[3], [p, 2 * p - 7, 2 * p - 12, p + 5, p - 5, 12 + 2 * (p - 7), 7 - 2 * (12 - p)]
    )
    q = (10.5 + 9.5 + 10) / 3  # 2024-01-03 has no candles: the 2nd is the previous session
    assert_close(
        out.iloc[4],
        [q, 2 * q - 9.5, 2 * q - 10.5, q + 1, q - 1, 10.5 + 2 * (q - 9.5), 9.5 - 2 * (10.5 - q)],
    )


def test_mcginley_dynamic_matches_definition(btc: pd.DataFrame) -> None:
    """md += (x - md) / (n (x/md)^4), seeded with the SMA of the first n closes."""
    close = btc["close"].tolist()
    out = [NAN] * len(close)
    md = sum(close[:14]) / 14
    out[13] = md
    for i in range(14, len(close)):
        md = md + (close[i] - md) / max(1.0, 14 * (close[i] / md) ** 4)
        out[i] = md
    assert_close(ti.compute(btc, "mcginley"), out)


def test_mcginley_survives_a_gap_crash() -> None:
    """A 70% one-bar drop (a data gap) does not make the dynamic overshoot below price."""
    df = frame([(100, 100, 100, 100, 1)] * 14 + [(30, 30, 30, 30, 1)] * 5)
    out = ti.compute(df, "mcginley").to_numpy()
    assert np.all(out[14:] >= 30)
    assert np.all(np.isfinite(out[13:]))


def test_supersmoother_matches_ehlers(btc: pd.DataFrame) -> None:
    """Two-pole filter: c1 (x + x[1]) / 2 + c2 f[1] + c3 f[2], seeded with the price."""
    close = btc["close"].tolist()
    a1 = math.exp(-1.414 * math.pi / 10)
    c2 = 2 * a1 * math.cos(1.414 * math.pi / 10)
    c3 = -a1 * a1
    c1 = 1 - c2 - c3
    out = close[:2]
    for i in range(2, len(close)):
        out.append(c1 * (close[i] + close[i - 1]) / 2 + c2 * out[i - 1] + c3 * out[i - 2])
    assert_close(ti.compute(btc, "supersmoother"), out)


def test_garman_klass_matches_definition(btc: pd.DataFrame) -> None:
    """sigma^2 = mean(0.5 ln(H/L)^2 - (2 ln 2 - 1) ln(C/O)^2) over 20 bars."""
    open_, high, low, close, _ = columns(btc)
    term = [
        0.5 * math.log(h / lo) ** 2 - (2 * math.log(2) - 1) * math.log(c / o) ** 2
        for o, h, lo, c in zip(open_, high, low, close, strict=True)
    ]
    expected = [
        NAN if i < 19 else math.sqrt(sum(term[i - 19 : i + 1]) / 20) for i in range(len(term))
    ]
    assert_close(ti.compute(btc, "garman_klass"), expected)


def test_connors_rsi_matches_definition(btc: pd.DataFrame) -> None:
    """CRSI = (RSI(3) + RSI(streak, 2) + percent rank of ROC(1) among 100 previous) / 3."""
    close = btc["close"].tolist()
    streak = [0.0]
    for i in range(1, len(close)):
        if close[i] > close[i - 1]:
            streak.append(max(streak[-1], 0) + 1)
        elif close[i] < close[i - 1]:
            streak.append(min(streak[-1], 0) - 1)
        else:
            streak.append(0.0)
    change = roc(close, 1)
    rank = [
        NAN if i < 101 else 100 * sum(1 for v in change[i - 100 : i] if v < change[i]) / 100
        for i in range(len(close))
    ]
    r1, r2 = rsi(close, 3), rsi(streak, 2)
    expected = [(a + b + c) / 3 for a, b, c in zip(r1, r2, rank, strict=True)]
    assert_close(ti.compute(btc, "connors_rsi"), expected, rtol=1e-8)


def test_kst_matches_pring(btc: pd.DataFrame) -> None:
    """KST = SMA10(ROC10) + 2 SMA10(ROC15) + 3 SMA10(ROC20) + 4 SMA15(ROC30); signal SMA9."""
    close = btc["close"].tolist()
    parts = [sma(roc(close, r), s) for r, s in ((10, 10), (15, 10), (20, 10), (30, 15))]
    line = [a + 2 * b + 3 * c + 4 * d for a, b, c, d in zip(*parts, strict=True)]
    out = ti.compute(btc, "kst")
    assert_close(out["kst"], line, rtol=1e-8)
    assert_close(out["signal"], sma(line, 9), rtol=1e-8)


def test_own_indicators_are_at_least_fifteen_and_not_in_talib() -> None:
    """Kestrel adds at least 15 indicators, none of which TA-Lib already has."""
    own = [name for name, info in ti.available().items() if info.source == "kestrel"]
    assert len(own) >= 15
    assert not {name.upper() for name in own} & set(talib.get_functions())


@given(st.lists(st.sampled_from([1.0, 1.5, 2.0, 2.5]), min_size=0, max_size=60))
@settings(deadline=None)
def test_streak_counts_runs_of_rises_and_falls(closes: list[float]) -> None:
    """The branch-free streak: +n after n rises in a row, -n after n falls, 0 when unchanged."""
    streak, ratio = ti._streak_kernel(np.array(closes, dtype=np.float64))
    expected, run = [], 0.0
    for i, close in enumerate(closes):
        if i > 0 and close > closes[i - 1]:
            run = max(run, 0.0) + 1.0
        elif i > 0 and close < closes[i - 1]:
            run = min(run, 0.0) - 1.0
        elif i > 0:
            run = 0.0
        expected.append(run)
    assert streak.tolist() == expected
    assert np.isnan(ratio[:1]).all()
    np.testing.assert_array_equal(ratio[1:], np.array(closes[1:]) / np.array(closes[:-1]))
