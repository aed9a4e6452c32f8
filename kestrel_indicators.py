"""Kestrel's own indicators, the ones TA-Lib lacks, as array functions over numba kernels.

Each is registered by `@_own` with its inputs, outputs, warm-up and memory; the resumable
ones (session and anchored VWAP, ZigZag, daily pivots) also open O(1)-per-bar live handles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import talib

from indicator_base import DAY_MS, IndicatorInfo, Memory, Output, ParamValue, _col, _Spec
from indicator_kernels import (
    FloatArray,
    _abs_diff,
    _alma_kernel,
    _anchored_vwap_kernel,
    _chop_kernel,
    _fisher_kernel,
    _garman_klass_kernel,
    _mcginley_kernel,
    _mean3,
    _pivot_kernel,
    _session_vwap_kernel,
    _shift,
    _squeeze_kernel,
    _stochastic_smooth,
    _streak_kernel,
    _supersmoother_kernel,
    _wavetrend_ci,
    _zigzag_kernel,
    _zscore_kernel,
)


# -- Kestrel's own indicators: array functions ------------------------------------------------
# Each takes its input columns as float64 arrays (ts as int64 ms) plus its parameters, and
# returns one array or a tuple in the order of its declared outputs.


class _KernelStream:
    """A talib.stream-like handle over a resumable Kestrel kernel: O(1) per closed bar."""

    def __init__(
        self,
        step: Callable[..., Output],
        initial: Callable[[], FloatArray],
        *arrays: npt.NDArray[Any],
        **params: Any,
    ) -> None:
        self._step = step
        self._params = params
        self._state = initial()
        self._count = len(arrays[0])
        self.value = self._last(step(self._state, 0, *arrays, **params))

    def update(self, *bar: float) -> float | tuple[float, ...]:
        """Advance by one closed bar and return its value(s)."""
        arrays = [np.array([value]) for value in bar]
        self.value = self._last(self._step(self._state, self._count, *arrays, **self._params))
        self._count += 1
        return self.value

    @staticmethod
    def _last(out: Output) -> float | tuple[float, ...]:
        if isinstance(out, np.ndarray):
            return float(out[-1]) if len(out) else math.nan
        return tuple(float(o[-1]) if len(o) else math.nan for o in out)


_OWN: list[_Spec] = []  # filled by @_own below, in definition order


def _own(
    columns: Sequence[str],
    outputs: Sequence[str],
    warmup: Callable[[Mapping[str, Any]], int],
    memory: Memory,
    description: str,
    sessions: int = 0,
    resumable: tuple[Callable[..., Output], Callable[[], FloatArray]] | None = None,
) -> Callable[[Callable[..., Output]], Callable[..., Output]]:
    """Register the decorated array function as one of Kestrel's indicators.

    `resumable` is (step, initial state) for a kernel that can carry its state from one
    call to the next; live updates then advance it bar by bar instead of recomputing.
    """

    def decorate(func: Callable[..., Output]) -> Callable[..., Output]:
        spec = _kestrel(func, columns, outputs, warmup, memory, description, sessions)
        if resumable is not None:
            spec = dataclasses.replace(spec, stream=functools.partial(_KernelStream, *resumable))
        _OWN.append(spec)
        return func

    return decorate


def _kestrel(
    func: Callable[..., Output],
    columns: Sequence[str],
    outputs: Sequence[str],
    warmup: Callable[[Mapping[str, Any]], int],
    memory: Memory,
    description: str,
    sessions: int,
) -> _Spec:
    name = func.__name__
    slots = (("price", tuple(columns)),) if columns == ("close",) else (("prices", tuple(columns)),)
    params = _defaults(func, skip=sum(len(cols) for _, cols in slots))
    info = IndicatorInfo(
        name=name,
        group="Kestrel",
        source="kestrel",
        inputs=tuple((slot, tuple(cols)) for slot, cols in slots),
        params=MappingProxyType(params),
        outputs=tuple(outputs),
        warmup=warmup(params),
        memory=memory,
        description=description,
    )
    return _Spec(
        info=info,
        func=func,
        warmup_fn=warmup,
        slot_names=frozenset(slot for slot, _ in slots),
        param_names=frozenset(params),
        sessions=sessions,
    )


def _defaults(func: Callable[..., Any], skip: int) -> dict[str, ParamValue]:
    code = func.__code__
    names = code.co_varnames[skip : code.co_argcount]
    values = func.__defaults__ or ()
    return dict(zip(names, values, strict=True))


def _session_vwap_step(
    state: FloatArray, start: int, high: Any, low: Any, close: Any, volume: Any, ts: Any
) -> FloatArray:
    return _session_vwap_kernel(high, low, close, volume, ts, DAY_MS, state)


@_own(
    ("high", "low", "close", "volume", "ts"),
    ("session_vwap",),
    lambda p: 0,
    Memory.SESSION,
    "Session VWAP (UTC day)",
    sessions=1,
    resumable=(_session_vwap_step, lambda: np.array([np.nan, 0.0, 0.0])),
)
def session_vwap(
    high: FloatArray, low: FloatArray, close: FloatArray, volume: FloatArray, ts: Any
) -> FloatArray:
    """Return the VWAP of typical price (h+l+c)/3 restarted at each UTC midnight.

    TA-Lib's `vwap` accumulates from the first row of the frame instead, so its level depends
    on where the data starts; this one only on the current day's candles.
    """
    return _session_vwap_step(np.array([np.nan, 0.0, 0.0]), 0, high, low, close, volume, ts)


def _anchored_vwap_step(
    state: FloatArray,
    start: int,
    high: Any,
    low: Any,
    close: Any,
    volume: Any,
    ts: Any,
    anchor: int = 0,
) -> FloatArray:
    return _anchored_vwap_kernel(high, low, close, volume, ts, int(anchor), state)


@_own(
    ("high", "low", "close", "volume", "ts"),
    ("anchored_vwap",),
    lambda p: 0,
    Memory.PATH,
    "Anchored VWAP",
    resumable=(_anchored_vwap_step, lambda: np.zeros(2)),
)
def anchored_vwap(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    volume: FloatArray,
    ts: Any,
    anchor: int = 0,
) -> FloatArray:
    """Return the VWAP of typical price from the first candle opening at or after `anchor`.

    `anchor` is epoch ms (a Timestamp or ISO string is accepted by `compute`); rows before
    it are NaN.
    """
    return _anchored_vwap_step(np.zeros(2), 0, high, low, close, volume, ts, anchor=anchor)


@_own(
    ("high", "low", "close"),
    ("tenkan", "kijun", "senkou_a", "senkou_b", "chikou"),
    lambda p: max(p["tenkan"], p["kijun"], p["senkou"]) - 1 + p["displacement"],
    Memory.FINITE,
    "Ichimoku Kinko Hyo",
)
def ichimoku(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    tenkan: int = 9,
    kijun: int = 26,
    senkou: int = 52,
    displacement: int = 26,
) -> tuple[FloatArray, ...]:
    """Return Ichimoku Kinko Hyo lines, each aligned to the bar at which it is known.

    tenkan/kijun are the (highest high + lowest low)/2 midpoints over 9/26 bars. The cloud
    spans are computed `displacement` bars earlier and drawn at t, so `senkou_a[t]` is
    (tenkan+kijun)/2 of bar t-26 and `senkou_b[t]` the 52-bar midpoint of bar t-26: exactly
    the cloud a chart shows above bar t, with no future data.

    Chikou convention: the lagging span is today's close drawn 26 bars back. At bar t the only
    chikou value that exists is close[t] (its newest point), so `chikou[t] = close[t]`; to
    test "chikou above price" compare it with `close.shift(displacement)`. Libraries that
    return `close.shift(-26)` at row t leak 26 bars of the future into a strategy.
    """
    tenkan_line = talib.MIDPRICE(high, low, tenkan)
    kijun_line = talib.MIDPRICE(high, low, kijun)
    senkou_a = _shift((tenkan_line + kijun_line) / 2.0, displacement)
    senkou_b = _shift(talib.MIDPRICE(high, low, senkou), displacement)
    return tenkan_line, kijun_line, senkou_a, senkou_b, close.copy()


@_own(
    ("high", "low", "close"),
    ("long_stop", "short_stop"),
    lambda p: p["timeperiod"],
    Memory.CONVERGING,
    "Chandelier Exit",
)
def chandelier(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    timeperiod: int = 22,
    multiplier: float = 3.0,
) -> tuple[FloatArray, FloatArray]:
    """Return Chuck LeBeau's Chandelier exit: highest high - k*ATR and lowest low + k*ATR."""
    atr = talib.ATR(high, low, close, timeperiod)
    long_stop = talib.MAX(high, timeperiod) - multiplier * atr
    short_stop = talib.MIN(low, timeperiod) + multiplier * atr
    return long_stop, short_stop


def _zigzag_step(
    state: FloatArray, start: int, high: FloatArray, low: FloatArray, deviation: float = 5.0
) -> tuple[FloatArray, ...]:
    return _zigzag_kernel(high, low, deviation / 100.0, state, start)


@_own(
    ("high", "low"),
    ("pivot", "direction", "age"),
    lambda p: 0,
    Memory.PATH,
    "ZigZag (confirmed)",
    resumable=(_zigzag_step, lambda: np.zeros(9)),
)
def zigzag(high: FloatArray, low: FloatArray, deviation: float = 5.0) -> tuple[FloatArray, ...]:
    """Return the non-repainting ZigZag: the last confirmed pivot as known at each bar.

    A swing high is confirmed only on the bar whose low falls `deviation` percent below it
    (a swing low, when a high rises that far above it), so a pivot appears in these columns
    at its confirmation bar, never at the (earlier) bar where it happened. Outputs:
    `pivot` (price of the latest confirmed pivot), `direction` (+1 after a confirmed low,
    the swing up in progress; -1 after a confirmed high) and `age` (bars since the pivot
    bar). A chart ZigZag that draws pivots at their own bars needs hindsight: that is
    `zigzag_pivots`, kept out of the registry.
    """
    return _zigzag_step(np.zeros(9), 0, high, low, deviation)


@_own(
    ("high", "low"),
    ("fisher", "signal"),
    lambda p: p["timeperiod"],
    Memory.CONVERGING,
    "Fisher Transform",
)
def fisher(high: FloatArray, low: FloatArray, timeperiod: int = 9) -> tuple[FloatArray, FloatArray]:
    """Return Ehlers' Fisher transform of hl2 and its one-bar-lagged trigger (`signal`).

    value = 0.66*((hl2-min)/(max-min) - 0.5) + 0.67*value[1], clamped to +-0.999 beyond
    +-0.99; fisher = 0.5*ln((1+value)/(1-value)) + 0.5*fisher[1] (Ehlers 2002, as TradingView
    computes it). A flat window (max == min) counts as the midpoint.
    """
    hl2 = talib.MEDPRICE(high, low)
    return _fisher_kernel(hl2, talib.MAX(hl2, timeperiod), talib.MIN(hl2, timeperiod))


@_own(
    ("high", "low", "close"),
    ("chop",),
    lambda p: p["timeperiod"],
    Memory.FINITE,
    "Choppiness Index",
)
def chop(high: FloatArray, low: FloatArray, close: FloatArray, timeperiod: int = 14) -> FloatArray:
    """Return the Choppiness index: 100*log10(sum(TR, n) / (max high - min low)) / log10(n).

    True range needs the previous close, so the first value is at bar n (TradingView uses
    high-low for the very first bar instead).
    """
    tr_sum = talib.SUM(talib.TRANGE(high, low, close), timeperiod)
    return _chop_kernel(tr_sum, talib.MAX(high, timeperiod), talib.MIN(low, timeperiod), timeperiod)


@_own(
    ("high", "low", "close"),
    ("squeeze_on", "momentum"),
    lambda p: max(p["timeperiod"], 2 * p["timeperiod"] - 2),
    Memory.CONVERGING,
    "TTM Squeeze",
)
def squeeze(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    timeperiod: int = 20,
    bb_mult: float = 2.0,
    kc_mult: float = 1.5,
) -> tuple[FloatArray, FloatArray]:
    """Return John Carter's TTM Squeeze: `squeeze_on` (1 when Bollinger is inside Keltner).

    Bollinger = SMA(n) +- bb_mult * population stdev(n); Keltner = EMA(n) +- kc_mult *
    Wilder ATR(n). `momentum` is LazyBear's: the n-bar linear-regression value of
    close - ((highest high + lowest low)/2 + SMA(close))/2.
    """
    basis = talib.SMA(close, timeperiod)
    on, delta = _squeeze_kernel(
        close,
        basis,
        talib.STDDEV(close, timeperiod, 1.0),
        talib.EMA(close, timeperiod),
        talib.ATR(high, low, close, timeperiod),
        talib.MAX(high, timeperiod),
        talib.MIN(low, timeperiod),
        bb_mult,
        kc_mult,
    )
    return on, talib.LINEARREG(delta, timeperiod)


@_own(("close",), ("zscore",), lambda p: p["timeperiod"] - 1, Memory.FINITE, "Rolling z-score")
def zscore(price: FloatArray, timeperiod: int = 20) -> FloatArray:
    """Return the rolling z-score (x - mean) / population stdev over `timeperiod` bars.

    A window with no spread scores 0.
    """
    return _zscore_kernel(price, timeperiod)


@_own(("close",), ("alma",), lambda p: p["timeperiod"] - 1, Memory.FINITE, "Arnaud Legoux MA")
def alma(
    price: FloatArray, timeperiod: int = 9, offset: float = 0.85, sigma: float = 6.0
) -> FloatArray:
    """Return the Arnaud Legoux moving average: Gaussian weights centred at offset*(n-1)."""
    return _alma_kernel(price, timeperiod, offset, sigma)


@_own(
    ("high", "low", "close"),
    ("wt1", "wt2"),
    lambda p: 2 * (p["channel"] - 1) + p["average"] - 1 + p["signal"] - 1,
    Memory.CONVERGING,
    "WaveTrend Oscillator",
)
def wavetrend(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    channel: int = 10,
    average: int = 21,
    signal: int = 4,
) -> tuple[FloatArray, FloatArray]:
    """Return LazyBear's WaveTrend oscillator (`wt1`) and its SMA signal (`wt2`).

    ap = hlc3, esa = EMA(ap, channel), d = EMA(|ap - esa|, channel),
    ci = (ap - esa) / (0.015 d), wt1 = EMA(ci, average), wt2 = SMA(wt1, signal). EMAs are
    TA-Lib's (seeded with an SMA; TradingView seeds with the first value; both converge).
    """
    ap = talib.TYPPRICE(high, low, close)
    esa = talib.EMA(ap, channel)
    d = talib.EMA(_abs_diff(ap, esa), channel)
    wt1 = talib.EMA(_wavetrend_ci(ap, esa, d), average)
    return wt1, talib.SMA(wt1, signal)


@_own(
    ("close",),
    ("stc",),
    lambda p: max(p["fastperiod"], p["slowperiod"]) - 1 + 2 * (p["cycle"] - 1),
    Memory.CONVERGING,
    "Schaff Trend Cycle",
)
def stc(
    price: FloatArray,
    fastperiod: int = 23,
    slowperiod: int = 50,
    cycle: int = 10,
    factor: float = 0.5,
) -> FloatArray:
    """Return Doug Schaff's trend cycle: a doubly smoothed stochastic of MACD(fast, slow)."""
    macd = talib.EMA(price, fastperiod) - talib.EMA(price, slowperiod)
    pf = _stochastic_smooth(macd, talib.MIN(macd, cycle), talib.MAX(macd, cycle), factor)
    return _stochastic_smooth(pf, talib.MIN(pf, cycle), talib.MAX(pf, cycle), factor)


@_own(("close",), ("ulcer_index",), lambda p: 2 * p["timeperiod"] - 2, Memory.FINITE, "Ulcer Index")
def ulcer_index(price: FloatArray, timeperiod: int = 14) -> FloatArray:
    """Return Peter Martin's Ulcer index: RMS of % drawdowns from the n-bar highest close."""
    highest = talib.MAX(price, timeperiod)
    drawdown = 100.0 * (price - highest) / highest
    return np.sqrt(talib.SUM(drawdown * drawdown, timeperiod) / timeperiod)


def _pivot_step(
    state: FloatArray, start: int, high: Any, low: Any, close: Any, ts: Any
) -> tuple[FloatArray, ...]:
    out = np.empty((7, len(close)))
    return tuple(_pivot_kernel(high, low, close, ts, state, out))


@_own(
    ("high", "low", "close", "ts"),
    ("pp", "r1", "s1", "r2", "s2", "r3", "s3"),
    lambda p: 0,
    Memory.SESSION,
    "Daily floor pivots",
    sessions=2,
    resumable=(_pivot_step, lambda: np.full(11, np.nan)),
)
def pivot_points(
    high: FloatArray, low: FloatArray, close: FloatArray, ts: Any
) -> tuple[FloatArray, ...]:
    """Return classic floor pivots (pp, r1..r3, s1..s3) from the previous UTC day.

    pp = (H+L+C)/3 of the last completed day with data, r1 = 2pp-L, s1 = 2pp-H,
    r2 = pp+(H-L), s2 = pp-(H-L), r3 = H+2(pp-L), s3 = L-2(H-pp). The first day is NaN.
    """
    return _pivot_step(np.full(11, np.nan), 0, high, low, close, ts)


@_own(
    ("close",), ("mcginley",), lambda p: p["timeperiod"] - 1, Memory.CONVERGING, "McGinley Dynamic"
)
def mcginley(price: FloatArray, timeperiod: int = 14) -> FloatArray:
    """Return the McGinley dynamic: md += (x - md) / (n * (x/md)**4), seeded with an SMA.

    The denominator is floored at 1 so md never jumps past price (only a one-bar drop of
    about 50% or more, i.e. a data gap, hits the floor).
    """
    return _mcginley_kernel(price, timeperiod)


@_own(("close",), ("supersmoother",), lambda p: 0, Memory.CONVERGING, "Ehlers Super Smoother")
def supersmoother(price: FloatArray, timeperiod: int = 10) -> FloatArray:
    """Return Ehlers' two-pole super smoother filter (Cycle Analytics for Traders, 2013)."""
    return _supersmoother_kernel(price, timeperiod)


@_own(
    ("open", "high", "low", "close"),
    ("garman_klass",),
    lambda p: p["timeperiod"] - 1,
    Memory.FINITE,
    "Garman-Klass volatility",
)
def garman_klass(
    open_: FloatArray, high: FloatArray, low: FloatArray, close: FloatArray, timeperiod: int = 20
) -> FloatArray:
    """Return Garman-Klass volatility per bar (not annualised) over `timeperiod` bars.

    sigma^2 = mean(0.5 ln(H/L)^2 - (2 ln 2 - 1) ln(C/O)^2).
    """
    return _garman_klass_kernel(open_, high, low, close, timeperiod)


@_own(
    ("close",),
    ("connors_rsi",),
    lambda p: max(p["rsi_period"], p["streak_period"], 1 + p["rank_period"]),
    Memory.CONVERGING,
    "Connors RSI",
)
def connors_rsi(
    price: FloatArray, rsi_period: int = 3, streak_period: int = 2, rank_period: int = 100
) -> FloatArray:
    """Return Connors RSI: the mean of three 0-100 scores.

    RSI(close, 3), RSI(up/down streak length, 2) and the percent rank of the one-bar return
    among the previous `rank_period` returns (TA-Lib PERCENTRANK).
    """
    streak, ratio = _streak_kernel(price)
    # the percent rank of close/prev is that of ROC(1): ranks ignore scale and offset
    rank = talib.PERCENTRANK(ratio, rank_period)
    return _mean3(talib.RSI(price, rsi_period), talib.RSI(streak, streak_period), rank)


@_own(
    ("close",),
    ("kst", "signal"),
    lambda p: max(p[f"roc{k}"] + p[f"sma{k}"] - 1 for k in range(1, 5)) + p["signalperiod"] - 1,
    Memory.FINITE,
    "Know Sure Thing",
)
def kst(
    price: FloatArray,
    roc1: int = 10,
    roc2: int = 15,
    roc3: int = 20,
    roc4: int = 30,
    sma1: int = 10,
    sma2: int = 10,
    sma3: int = 10,
    sma4: int = 15,
    signalperiod: int = 9,
) -> tuple[FloatArray, FloatArray]:
    """Return Martin Pring's Know Sure Thing: sum of k * SMA(ROC) for k = 1..4, and signal."""
    line = (
        talib.SMA(talib.ROC(price, roc1), sma1)
        + 2.0 * talib.SMA(talib.ROC(price, roc2), sma2)
        + 3.0 * talib.SMA(talib.ROC(price, roc3), sma3)
        + 4.0 * talib.SMA(talib.ROC(price, roc4), sma4)
    )
    return line, talib.SMA(line, signalperiod)


def zigzag_pivots(df: pd.DataFrame, deviation: float = 5.0) -> pd.Series:
    """Return ZigZag pivot prices at their own bars (NaN elsewhere), for charts only.

    Repaints: a pivot drawn at bar i was only confirmed at a later bar, so using this as a
    feature leaks the future. Strategies use the registry's `zigzag` instead.
    """
    pivot, _, age = zigzag(_col(df, "high"), _col(df, "low"), deviation)
    out = np.full(len(df), np.nan)
    # a new confirmation is where the age does not simply grow by one bar
    for i in np.flatnonzero(np.diff(age, prepend=np.nan) != 1.0):
        if not np.isnan(age[i]):
            out[i - int(age[i])] = pivot[i]
    return pd.Series(out, index=df.index, name="zigzag_pivots")
