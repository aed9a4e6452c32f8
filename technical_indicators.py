"""Indicators, candlestick patterns and features: TA-Lib first, Kestrel's own where it has none.

Every function TA-Lib has (201 in the 0.8.2 wheel, 61 of them candlestick patterns) is served
from TA-Lib itself, under its lower-case name, with TA-Lib's parameter names, defaults and
output names; the registry is generated from `talib.abstract`, never hand-listed. Kestrel adds
the indicators TA-Lib lacks (session and anchored VWAP, Ichimoku, Chandelier exit, ZigZag,
Fisher transform, Choppiness, TTM Squeeze, z-score, ALMA, WaveTrend, Schaff trend cycle, Ulcer
index, daily pivot points, McGinley dynamic, Ehlers super smoother, Garman-Klass volatility,
Connors RSI, KST) in numpy/numba, built on TA-Lib's primitives where it has them. SuperTrend,
Keltner (`kc`), Donchian, Hull (`hma`), Heikin-Ashi (`ha`), Vortex and cumulative `vwap` exist
in TA-Lib 0.8.2 and are therefore TA-Lib's.

Time is honest everywhere: a value at row t uses candles up to and including t only. The one
function that needs hindsight, `zigzag_pivots`, says so and is kept out of the registry.

Public API::

    compute(df, "rsi", timeperiod=14) -> Series | DataFrame   (aligned with df.index)
    available() -> {name: IndicatorInfo};  lookback(name, **params);  memory_of(name)
    detect_patterns(df), pattern_summary(df, lookback=3)
    @indicator(...), register_formula(name, expression), unregister(name)
    feature_frame(df, spec=None), FeatureEngine(spec, window=...)
    merge_higher_timeframe(df_low, df_high, "1h"), detect_regime(df)
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import talib
from numba import njit
from talib import abstract, stream

from error_handler import ConfigError, InvariantError
from models import Candle
from utils.utilities import datetime_to_ms, parse_date_ms, timeframe_to_ms


FloatArray: TypeAlias = npt.NDArray[np.float64]
Output: TypeAlias = "npt.NDArray[Any] | tuple[npt.NDArray[Any], ...]"
ParamValue: TypeAlias = "int | float"

OHLCV: Final = ("open", "high", "low", "close", "volume")
DAY_MS: Final = 86_400_000
PATTERN_VALUE: Final = 100  # every detected pattern reads +-100: sign = direction
# TA-Lib marks these patterns +100 whatever the direction: they signal indecision.
NEUTRAL_PATTERNS: Final = frozenset(
    {"cdldoji", "cdldragonflydoji", "cdlgravestonedoji", "cdllongleggeddoji", "cdlrickshawman"}
)
# Groups of TA-Lib functions that are arithmetic, not indicators: kept out of the default
# feature spec (they stay available by name).
NON_FEATURE_GROUPS: Final = frozenset({"Math Operators", "Math Transform"})


class IndicatorError(ConfigError):
    """An unknown indicator, parameter or input column, or a malformed formula."""


class Memory(enum.StrEnum):
    """How far back a value's dependence reaches; decides how live updates recompute it."""

    FINITE = "finite"  # the last warmup+1 bars fix the value exactly (SMA, MAX, patterns)
    CONVERGING = "converging"  # recursive smoothing: old bars fade out (EMA, Wilder, KAMA)
    ADDITIVE = "additive"  # a running total: the level depends on the first bar (OBV, AD)
    MULTIPLICATIVE = "multiplicative"  # a running product (NVI, PVI)
    SESSION = "session"  # restarts at each UTC day (session VWAP, daily pivots)
    PATH = "path"  # depends on an anchor or past reversals (SAR, SuperTrend, ZigZag)


@dataclass(frozen=True, slots=True)
class IndicatorInfo:
    """Describe one registered indicator: inputs, parameters, outputs and warm-up.

    Attributes:
        name: Registry name (lower case).
        group: TA-Lib group, "Kestrel", "Custom" or "Formula".
        source: "talib", "kestrel", "custom" or "formula".
        inputs: Input slots as (slot, columns); a slot can be overridden per call with a
            column name or an array, as in TA-Lib's abstract API (`price="open"`).
        params: Parameter defaults.
        outputs: Output names; a single output is returned as a Series named `name`.
        warmup: Leading rows without a value at the default parameters (TA-Lib lookback).
        memory: How far back values depend, or None when not yet probed (TA-Lib).
        description: One line for the UI.
    """

    name: str
    group: str
    source: str
    inputs: tuple[tuple[str, tuple[str, ...]], ...]
    params: Mapping[str, ParamValue]
    outputs: tuple[str, ...]
    warmup: int
    memory: Memory | None
    description: str

    @property
    def columns(self) -> tuple[str, ...]:
        """Return the flattened input column names, in call order."""
        return tuple(col for _, cols in self.inputs for col in cols)


@dataclass(frozen=True, slots=True)
class _Spec:
    """A registry entry: metadata plus the array function, cached once for fast calls."""

    info: IndicatorInfo
    func: Callable[..., Output]
    warmup_fn: Callable[[Mapping[str, Any]], int]
    slot_names: frozenset[str]
    param_names: frozenset[str]
    is_pattern: bool = False
    sessions: int = 0  # UTC days of history a SESSION indicator needs (live updates)
    talib_name: str | None = None  # TA-Lib function name
    stream: Callable[..., Any] | None = None  # opens an O(1)-per-bar live handle on history

    def call(self, arrays: Sequence[npt.NDArray[Any]], params: Mapping[str, Any]) -> Output:
        out = self.func(*arrays, **params)
        if self.is_pattern and isinstance(out, np.ndarray):
            _normalise_patterns(out)
        return out


# -- TA-Lib ----------------------------------------------------------------------------------


def _talib_spec(func_name: str) -> _Spec:
    fn = abstract.Function(func_name)  # type: ignore[attr-defined]
    info = fn.info
    slots: list[tuple[str, tuple[str, ...]]] = []
    for slot, cols in info["input_names"].items():
        slots.append((slot, (cols,) if isinstance(cols, str) else tuple(cols)))
    params = dict(info["parameters"])
    name = func_name.lower()
    outputs = tuple(info["output_names"])
    if len(outputs) == 1:
        outputs = (name,)
    is_pattern = info["group"] == "Pattern Recognition"
    meta = IndicatorInfo(
        name=name,
        group=info["group"],
        source="talib",
        inputs=tuple(slots),
        params=MappingProxyType(params),
        outputs=outputs,
        warmup=int(fn.lookback),
        memory=Memory.FINITE if is_pattern else None,
        description=info["display_name"],
    )
    return _Spec(
        info=meta,
        func=getattr(talib, func_name),
        warmup_fn=functools.partial(_talib_lookback, func_name),
        slot_names=frozenset(s for s, _ in slots),
        param_names=frozenset(params),
        is_pattern=is_pattern,
        talib_name=func_name,
        stream=getattr(stream, func_name),
    )


@functools.lru_cache(maxsize=4096)
def _talib_lookback_cached(func_name: str, items: tuple[tuple[str, Any], ...]) -> int:
    fn = abstract.Function(func_name)  # type: ignore[attr-defined]
    if items:
        fn.set_parameters(dict(items))
    return int(fn.lookback)


def _talib_lookback(func_name: str, params: Mapping[str, Any]) -> int:
    return _talib_lookback_cached(func_name, tuple(sorted(params.items())))


# -- Kestrel's own indicators: numba kernels --------------------------------------------------
# Kernels take float64 arrays (ts: int64 ms) and tolerate leading NaNs, so they compose with
# TA-Lib outputs in formulas. Loops are numba-compiled once and cached on disk.


@njit(cache=True, error_model="numpy")
def _first_valid(x: FloatArray) -> int:
    for i in range(x.size):
        if not np.isnan(x[i]):
            return i
    return x.size


@njit(cache=True, error_model="numpy")
def _session_vwap_kernel(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    volume: FloatArray,
    ts: npt.NDArray[np.int64],
    session_ms: int,
    state: FloatArray,
) -> FloatArray:
    # state = [session number, sum(tp * v), sum(v)], carried across calls for live updates
    n = close.size
    out = np.empty(n)
    for i in range(n):
        session = float(ts[i] // session_ms)
        if session != state[0]:
            state[0] = session
            state[1] = 0.0
            state[2] = 0.0
        state[1] += (high[i] + low[i] + close[i]) / 3.0 * volume[i]
        state[2] += volume[i]
        out[i] = state[1] / state[2] if state[2] > 0.0 else np.nan
    return out


@njit(cache=True, error_model="numpy")
def _anchored_vwap_kernel(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    volume: FloatArray,
    ts: npt.NDArray[np.int64],
    anchor: int,
    state: FloatArray,
) -> FloatArray:
    # state = [sum(tp * v), sum(v)] since the anchor
    n = close.size
    out = np.full(n, np.nan)
    for i in range(n):
        if ts[i] < anchor:
            continue
        state[0] += (high[i] + low[i] + close[i]) / 3.0 * volume[i]
        state[1] += volume[i]
        if state[1] > 0.0:
            out[i] = state[0] / state[1]
    return out


@njit(cache=True, error_model="numpy")
def _zigzag_kernel(
    high: FloatArray, low: FloatArray, deviation: float, state: FloatArray, start: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    # A state machine over bars, resumable: state = [started, trend, hi, hi_i, lo, lo_i,
    # pivot, pivot direction, pivot bar]; bar numbers count from `start`. trend 0 = no swing
    # yet, 1 = rising (tracking a candidate high), -1 = falling (tracking a candidate low).
    # A candidate becomes a pivot only on the bar where price has moved `deviation` away
    # from it: that bar is when it is known.
    n = high.size
    pivot = np.full(n, np.nan)
    direction = np.full(n, np.nan)
    age = np.full(n, np.nan)
    if n > 0 and state[0] == 0.0:
        state[:] = [1.0, 0.0, high[0], start, low[0], start, np.nan, 0.0, -1.0]
    trend, hi, hi_i, lo, lo_i = state[1], state[2], state[3], state[4], state[5]
    last_p, last_d, last_i = state[6], state[7], state[8]
    for k in range(n):
        i = float(start + k)
        h = high[k]
        lo_bar = low[k]
        if trend == 1.0:
            if h > hi:
                hi, hi_i = h, i
            elif lo_bar <= hi * (1.0 - deviation):
                last_p, last_d, last_i = hi, -1.0, hi_i
                trend, lo, lo_i = -1.0, lo_bar, i
        elif trend == -1.0:
            if lo_bar < lo:
                lo, lo_i = lo_bar, i
            elif h >= lo * (1.0 + deviation):
                last_p, last_d, last_i = lo, 1.0, lo_i
                trend, hi, hi_i = 1.0, h, i
        else:
            if h > hi:
                hi, hi_i = h, i
            if lo_bar < lo:
                lo, lo_i = lo_bar, i
            if lo_i < hi_i and hi >= lo * (1.0 + deviation):
                last_p, last_d, last_i = lo, 1.0, lo_i
                trend = 1.0
            elif hi_i < lo_i and lo <= hi * (1.0 - deviation):
                last_p, last_d, last_i = hi, -1.0, hi_i
                trend = -1.0
        if last_i >= 0.0:
            pivot[k] = last_p
            direction[k] = last_d
            age[k] = i - last_i
    state[1:] = [trend, hi, hi_i, lo, lo_i, last_p, last_d, last_i]
    return pivot, direction, age


@njit(cache=True, error_model="numpy")
def _fisher_kernel(
    hl2: FloatArray, highest: FloatArray, lowest: FloatArray
) -> tuple[FloatArray, FloatArray]:
    n = hl2.size
    fisher = np.full(n, np.nan)
    signal = np.full(n, np.nan)
    value = 0.0
    fish = 0.0
    started = False
    for i in range(n):
        if np.isnan(highest[i]) or np.isnan(lowest[i]):
            continue
        span = highest[i] - lowest[i]
        x = (hl2[i] - lowest[i]) / span - 0.5 if span > 0.0 else 0.0
        value = 0.66 * x + 0.67 * value
        if value > 0.99:
            value = 0.999
        elif value < -0.99:
            value = -0.999
        if started:
            signal[i] = fish
        fish = 0.5 * math.log((1.0 + value) / (1.0 - value)) + 0.5 * fish
        fisher[i] = fish
        started = True
    return fisher, signal


@njit(cache=True, error_model="numpy")
def _zscore_kernel(x: FloatArray, n: int) -> FloatArray:
    size = x.size
    out = np.full(size, np.nan)
    begin = _first_valid(x) + n - 1
    ref = 0.0
    s = 0.0
    ss = 0.0
    for i in range(begin, size):
        if (i - begin) % n == 0:
            # Re-sum exactly every n bars around a recent value: running sums of raw prices
            # lose precision (x*x ~ 1e9 for BTC) and drift over a million bars.
            ref = x[i]
            s = 0.0
            ss = 0.0
            for j in range(i - n + 1, i + 1):
                d = x[j] - ref
                s += d
                ss += d * d
        else:
            d_in = x[i] - ref
            d_out = x[i - n] - ref
            s += d_in - d_out
            ss += d_in * d_in - d_out * d_out
        mean = s / n
        var = ss / n - mean * mean
        if var <= 1e-12 * (ss / n):
            out[i] = 0.0
        else:
            out[i] = (x[i] - ref - mean) / math.sqrt(var)
    return out


@njit(cache=True, error_model="numpy")
def _alma_kernel(x: FloatArray, n: int, offset: float, sigma: float) -> FloatArray:
    size = x.size
    out = np.full(size, np.nan)
    m = offset * (n - 1)
    s = n / sigma
    weights = np.empty(n)
    for k in range(n):
        weights[k] = math.exp(-((k - m) ** 2) / (2.0 * s * s))
    weights /= weights.sum()
    for i in range(_first_valid(x) + n - 1, size):
        acc = 0.0
        base = i - n + 1
        for k in range(n):
            acc += weights[k] * x[base + k]
        out[i] = acc
    return out


@njit(cache=True, error_model="numpy")
def _stochastic_smooth(
    x: FloatArray, lowest: FloatArray, highest: FloatArray, factor: float
) -> FloatArray:
    # Schaff's step: %K of x in its window (the last %K when the window is flat), then
    # smoothed by `factor`, seeded with the first %K.
    n = x.size
    out = np.full(n, np.nan)
    k = 0.0
    smooth = np.nan
    for i in range(n):
        if np.isnan(lowest[i]):
            continue
        span = highest[i] - lowest[i]
        if span > 0.0:
            k = (x[i] - lowest[i]) / span * 100.0
        smooth = k if np.isnan(smooth) else smooth + factor * (k - smooth)
        out[i] = smooth
    return out


@njit(cache=True, error_model="numpy")
def _pivot_kernel(
    high: FloatArray,
    low: FloatArray,
    close: FloatArray,
    ts: npt.NDArray[np.int64],
    state: FloatArray,
    out: FloatArray,
) -> FloatArray:
    # state = [day (NaN before any), day high, day low, last close, pp, r1, s1, r2, s2, r3, s3];
    # `out` is (7, n), allocated by numpy: a 56 MB numba allocation page-faults 4x slower
    n = close.size
    day, dh, dl, dc = state[0], state[1], state[2], state[3]
    p, r1, s1, r2, s2, r3, s3 = (
        state[4],
        state[5],
        state[6],
        state[7],
        state[8],
        state[9],
        state[10],
    )
    for i in range(n):
        today = float(ts[i] // 86_400_000)
        if today != day:
            if not np.isnan(day):
                # the previous session is complete: its floor pivots hold for this one
                p = (dh + dl + dc) / 3.0
                r1 = 2.0 * p - dl
                s1 = 2.0 * p - dh
                r2 = p + (dh - dl)
                s2 = p - (dh - dl)
                r3 = dh + 2.0 * (p - dl)
                s3 = dl - 2.0 * (dh - p)
            day = today
            dh = high[i]
            dl = low[i]
        else:
            dh = max(dh, high[i])
            dl = min(dl, low[i])
        dc = close[i]
        out[0, i] = p
        out[1, i] = r1
        out[2, i] = s1
        out[3, i] = r2
        out[4, i] = s2
        out[5, i] = r3
        out[6, i] = s3
    state[:] = [day, dh, dl, dc, p, r1, s1, r2, s2, r3, s3]
    return out


@njit(cache=True, error_model="numpy")
def _mcginley_kernel(x: FloatArray, n: int) -> FloatArray:
    size = x.size
    out = np.full(size, np.nan)
    first = _first_valid(x)
    if first + n > size:
        return out
    md = 0.0
    for j in range(first, first + n):
        md += x[j]
    md /= n
    out[first + n - 1] = md
    for i in range(first + n, size):
        # floored at 1: after a >~50% one-bar drop (a data gap) the raw formula overshoots
        # past price, goes negative and diverges
        md = md + (x[i] - md) / max(1.0, n * (x[i] / md) ** 4)
        out[i] = md
    return out


@njit(cache=True, error_model="numpy")
def _supersmoother_kernel(x: FloatArray, n: int) -> FloatArray:
    size = x.size
    out = np.full(size, np.nan)
    a1 = math.exp(-1.414 * math.pi / n)
    c2 = 2.0 * a1 * math.cos(1.414 * math.pi / n)
    c3 = -a1 * a1
    c1 = 1.0 - c2 - c3
    first = _first_valid(x)
    for i in range(first, size):
        if i < first + 2:
            out[i] = x[i]
        else:
            out[i] = c1 * (x[i] + x[i - 1]) / 2.0 + c2 * out[i - 1] + c3 * out[i - 2]
    return out


@njit(cache=True, error_model="numpy")
def _garman_klass_kernel(
    open_: FloatArray, high: FloatArray, low: FloatArray, close: FloatArray, n: int
) -> FloatArray:
    size = close.size
    out = np.full(size, np.nan)
    term = np.empty(size)
    k = 2.0 * math.log(2.0) - 1.0
    for i in range(size):
        hl = math.log(high[i] / low[i])
        co = math.log(close[i] / open_[i])
        term[i] = 0.5 * hl * hl - k * co * co
    total = 0.0
    for i in range(size):
        if i % n == 0 and i >= n - 1:
            total = 0.0  # re-sum now and then so the running sum never drifts
            for j in range(i - n + 1, i + 1):
                total += term[j]
        else:
            total += term[i]
            if i >= n:
                total -= term[i - n]
        if i >= n - 1:
            out[i] = math.sqrt(max(total, 0.0) / n)
    return out


@njit(cache=True, error_model="numpy")
def _streak_kernel(close: FloatArray) -> tuple[FloatArray, FloatArray]:
    # Connors' up/down streak length and the one-bar return ratio (NaN at bar 0)
    # Branch-free: up and down moves come in random order, and mispredicted branches cost
    # more than computing both continuations and selecting one arithmetically.
    n = close.size
    streak = np.empty(n)
    ratio = np.empty(n)
    if n == 0:
        return streak, ratio
    streak[0] = 0.0
    ratio[0] = np.nan
    s = 0.0
    for i in range(1, n):
        now, before = close[i], close[i - 1]
        ratio[i] = now / before
        up = 1.0 if now > before else 0.0
        down = 1.0 if now < before else 0.0
        s = up * (max(s, 0.0) + 1.0) + down * (min(s, 0.0) - 1.0)
        streak[i] = s
    return streak, ratio


@njit(cache=True, error_model="numpy")
def _squeeze_kernel(
    close: FloatArray,
    basis: FloatArray,
    dev: FloatArray,
    kc_mid: FloatArray,
    atr: FloatArray,
    highest: FloatArray,
    lowest: FloatArray,
    bb_mult: float,
    kc_mult: float,
) -> tuple[FloatArray, FloatArray]:
    # one pass for both: at a million bars every extra pass over memory costs ~2 ns a bar
    n = basis.size
    on = np.full(n, np.nan)
    delta = np.empty(n)
    for i in range(n):
        delta[i] = close[i] - ((highest[i] + lowest[i]) / 2.0 + basis[i]) / 2.0
        if np.isnan(dev[i]) or np.isnan(atr[i]) or np.isnan(kc_mid[i]):
            continue
        inside_low = basis[i] - bb_mult * dev[i] > kc_mid[i] - kc_mult * atr[i]
        inside_high = basis[i] + bb_mult * dev[i] < kc_mid[i] + kc_mult * atr[i]
        on[i] = 1.0 if inside_low and inside_high else 0.0
    return on, delta


@njit(cache=True, error_model="numpy")
def _abs_diff(a: FloatArray, b: FloatArray) -> FloatArray:
    out = np.empty(a.size)
    for i in range(a.size):
        out[i] = abs(a[i] - b[i])
    return out


@njit(cache=True, error_model="numpy")
def _wavetrend_ci(ap: FloatArray, esa: FloatArray, d: FloatArray) -> FloatArray:
    out = np.empty(ap.size)
    for i in range(ap.size):
        if d[i] > 0.0:
            out[i] = (ap[i] - esa[i]) / (0.015 * d[i])
        else:
            out[i] = np.nan if np.isnan(d[i]) else 0.0
    return out


@njit(cache=True, error_model="numpy")
def _mean3(a: FloatArray, b: FloatArray, c: FloatArray) -> FloatArray:
    out = np.empty(a.size)
    for i in range(a.size):
        out[i] = (a[i] + b[i] + c[i]) / 3.0
    return out


@njit(cache=True, error_model="numpy")
def _chop_kernel(tr_sum: FloatArray, highest: FloatArray, lowest: FloatArray, n: int) -> FloatArray:
    size = tr_sum.size
    out = np.full(size, np.nan)
    scale = 100.0 / math.log10(n)
    for i in range(size):
        span = highest[i] - lowest[i]
        if span > 0.0 and tr_sum[i] > 0.0:
            out[i] = scale * math.log10(tr_sum[i] / span)
    return out


def _shift(x: FloatArray, periods: int) -> FloatArray:
    """Return `x` delayed by `periods` bars (values move later in time, never earlier)."""
    if periods <= 0:
        return x
    out = np.empty_like(x)
    out[:periods] = np.nan
    out[periods:] = x[:-periods]
    return out


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
    return _session_vwap_kernel(high, low, close, volume, ts, DAY_MS, state)  # type: ignore[no-any-return]


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
    return _anchored_vwap_kernel(high, low, close, volume, ts, int(anchor), state)  # type: ignore[no-any-return]


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
    return _zigzag_kernel(high, low, deviation / 100.0, state, start)  # type: ignore[no-any-return]


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
    return _fisher_kernel(hl2, talib.MAX(hl2, timeperiod), talib.MIN(hl2, timeperiod))  # type: ignore[no-any-return]


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
    return _chop_kernel(tr_sum, talib.MAX(high, timeperiod), talib.MIN(low, timeperiod), timeperiod)  # type: ignore[no-any-return]


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
    return _zscore_kernel(price, timeperiod)  # type: ignore[no-any-return]


@_own(("close",), ("alma",), lambda p: p["timeperiod"] - 1, Memory.FINITE, "Arnaud Legoux MA")
def alma(
    price: FloatArray, timeperiod: int = 9, offset: float = 0.85, sigma: float = 6.0
) -> FloatArray:
    """Return the Arnaud Legoux moving average: Gaussian weights centred at offset*(n-1)."""
    return _alma_kernel(price, timeperiod, offset, sigma)  # type: ignore[no-any-return]


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
    return _stochastic_smooth(pf, talib.MIN(pf, cycle), talib.MAX(pf, cycle), factor)  # type: ignore[no-any-return]


@_own(("close",), ("ulcer_index",), lambda p: 2 * p["timeperiod"] - 2, Memory.FINITE, "Ulcer Index")
def ulcer_index(price: FloatArray, timeperiod: int = 14) -> FloatArray:
    """Return Peter Martin's Ulcer index: RMS of % drawdowns from the n-bar highest close."""
    highest = talib.MAX(price, timeperiod)
    drawdown = 100.0 * (price - highest) / highest
    return np.sqrt(talib.SUM(drawdown * drawdown, timeperiod) / timeperiod)  # type: ignore[no-any-return]


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
    return _mcginley_kernel(price, timeperiod)  # type: ignore[no-any-return]


@_own(("close",), ("supersmoother",), lambda p: 0, Memory.CONVERGING, "Ehlers Super Smoother")
def supersmoother(price: FloatArray, timeperiod: int = 10) -> FloatArray:
    """Return Ehlers' two-pole super smoother filter (Cycle Analytics for Traders, 2013)."""
    return _supersmoother_kernel(price, timeperiod)  # type: ignore[no-any-return]


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
    return _garman_klass_kernel(open_, high, low, close, timeperiod)  # type: ignore[no-any-return]


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
    return _mean3(talib.RSI(price, rsi_period), talib.RSI(streak, streak_period), rank)  # type: ignore[no-any-return]


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


# -- Registry --------------------------------------------------------------------------------


def _build_registry() -> dict[str, _Spec]:
    specs = {spec.info.name: spec for spec in map(_talib_spec, talib.get_functions())}  # type: ignore[no-untyped-call]
    for spec in _OWN:
        if spec.info.name in specs:  # TA-Lib serves what it has; never shadow it
            raise InvariantError(f"{spec.info.name} is a TA-Lib function")
        specs[spec.info.name] = spec
    return specs


# The indicator catalogue, like talib's own function table: definitions, not runtime state.
# Custom indicators and formulas are added by `indicator`/`register_formula`.
_REGISTRY: Final[dict[str, _Spec]] = _build_registry()
PATTERN_NAMES: Final = tuple(sorted(n for n, s in _REGISTRY.items() if s.is_pattern))


def _spec(name: str) -> _Spec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IndicatorError(
            f"unknown indicator {name!r}", component="technical_indicators"
        ) from None


def _col(df: pd.DataFrame, name: str) -> npt.NDArray[Any]:
    if name == "ts":
        return _index_ms(df.index)
    try:
        position = df.columns.get_loc(name)
    except KeyError:
        raise IndicatorError(
            f"input column {name!r} missing", component="technical_indicators"
        ) from None
    # df[name] builds a Series through ~100 us of pandas machinery once TA-Lib has flushed
    # the caches, 10% of SMA(20) on a million candles; the block manager hands out the
    # column in 10 us. Guarded: any other layout or pandas version takes the public path.
    if not isinstance(position, int):
        raise IndicatorError(f"column {name!r} appears twice", component="technical_indicators")
    fast: Callable[[int], Any] | None = getattr(getattr(df, "_mgr", None), "iget_values", None)
    if fast is not None:
        values = fast(position)
        if isinstance(values, np.ndarray) and values.dtype == np.float64:
            view: npt.NDArray[Any] = values.view()
            view.flags.writeable = False  # as pandas' own to_numpy(): never write into df
            return view
    array: npt.NDArray[Any] = df.iloc[:, position].to_numpy(dtype=np.float64, copy=False)
    return array


def _index_ms(index: pd.Index) -> npt.NDArray[np.int64]:
    if not isinstance(index, pd.DatetimeIndex):
        raise IndicatorError("frame needs a UTC DatetimeIndex", component="technical_indicators")
    raw: npt.NDArray[np.int64] = index.asi8
    unit = index.unit
    if unit == "ms":
        return raw
    if unit == "s":
        return raw * 1_000
    return raw // (1_000 if unit == "us" else 1_000_000)


def _coerce(spec: _Spec, params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = params.keys() - spec.param_names
    if unknown:
        raise IndicatorError(
            f"{spec.info.name} has no parameter {sorted(unknown)}; it takes "
            f"{sorted(spec.param_names)}",
            component="technical_indicators",
        )
    out: dict[str, Any] = {}
    for key, value in params.items():
        default = spec.info.params[key]
        if isinstance(value, str | datetime):  # a time parameter such as an anchor
            value = parse_date_ms(value) if isinstance(value, str) else datetime_to_ms(value)
        out[key] = (
            int(value) if isinstance(default, int) and not isinstance(default, bool) else value
        )
    return out


def _inputs(
    df: pd.DataFrame, spec: _Spec, params: dict[str, Any]
) -> tuple[list[npt.NDArray[Any]], dict[str, Any]]:
    overrides: dict[str, Any] = {}
    if params:
        overrides = {k: params.pop(k) for k in spec.slot_names & params.keys()}
        params = _coerce(spec, params)
    arrays: list[npt.NDArray[Any]] = []
    for slot, cols in spec.info.inputs:
        if slot not in overrides:
            arrays.extend(_col(df, c) for c in cols)
            continue
        value = overrides[slot]
        items = [value] if isinstance(value, str) or np.ndim(value) == 1 else list(value)
        if len(items) != len(cols):
            raise IndicatorError(
                f"{spec.info.name}: input {slot!r} takes {len(cols)} series",
                component="technical_indicators",
            )
        for item in items:
            if isinstance(item, str):
                arrays.append(_col(df, item))
            else:
                arrays.append(np.asarray(item, dtype=np.float64))
    return arrays, params


def _wrap(spec: _Spec, out: Output, index: pd.Index) -> pd.Series | pd.DataFrame:
    if isinstance(out, np.ndarray):
        return pd.Series(out, index=index, name=spec.info.name, copy=False)
    return pd.DataFrame(dict(zip(spec.info.outputs, out, strict=True)), index=index, copy=False)


def compute(df: pd.DataFrame, name: str, **params: Any) -> pd.Series | pd.DataFrame:
    """Compute one registered indicator on a candle frame.

    Args:
        df: Candles with float64 columns open high low close volume and a UTC
            DatetimeIndex (bar open times).
        name: Registry name, e.g. "rsi", "macd", "cdlengulfing", "ichimoku".
        **params: The indicator's parameters (TA-Lib names and defaults); an input slot
            name (`price`, `prices`, `periods`...) overrides the input with a column name or
            an array, as in TA-Lib's abstract API.

    Returns:
        A Series named `name` for one output, else a DataFrame of the output names; both
        aligned with `df.index`. Warm-up rows are NaN; patterns are -100, 0 or 100.

    Raises:
        IndicatorError: for an unknown name, parameter or input column.
    """
    spec = _spec(name)
    arrays, params = _inputs(df, spec, params)
    with np.errstate(all="ignore"):  # NaN in warm-up or on flat data is a value, not an error
        out = spec.call(arrays, params)
    return _wrap(spec, out, df.index)


def lookback(name: str, **params: Any) -> int:
    """Return how many leading rows of `name` are NaN (warm-up) for these parameters."""
    spec = _spec(name)
    return spec.warmup_fn({**spec.info.params, **_coerce(spec, params)})


def available() -> dict[str, IndicatorInfo]:
    """Return every registered indicator, TA-Lib's, Kestrel's and custom, by name."""
    return {name: _with_memory(_REGISTRY[name]) for name in sorted(_REGISTRY)}


def _with_memory(spec: _Spec) -> IndicatorInfo:
    if spec.info.memory is not None:
        return spec.info
    try:
        memory = memory_of(spec.info.name)
    except IndicatorError:  # a formula whose indicator was unregistered since
        return spec.info
    return IndicatorInfo(**{**_fields(spec.info), "memory": memory})


def _fields(info: IndicatorInfo) -> dict[str, Any]:
    return {k: getattr(info, k) for k in IndicatorInfo.__slots__}


# -- Memory probe ----------------------------------------------------------------------------
# How far back a TA-Lib function's value depends is read from its behaviour, not hand-listed:
# on a seeded random walk, compare the full computation with recomputations on short tails.

_PROBE_BARS: Final = 3000
CONVERGE_BARS: Final = 1000  # tail that reproduces converging indicators to ~1e-9


@functools.lru_cache(maxsize=1)
def _probe_data() -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(20240101)
    n = _PROBE_BARS
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, n)))
    open_ = np.concatenate(([close[0]], close[:-1]))
    spread = close * rng.uniform(0.0005, 0.004, n)
    data = {
        "open": open_,
        "high": np.maximum(open_, close) + spread * rng.random(n),
        "low": np.minimum(open_, close) - spread * rng.random(n),
        "close": close,
        "volume": rng.lognormal(3.0, 1.0, n),
        "ts": 1_704_067_200_000 + 60_000 * np.arange(n, dtype=np.int64),
        "periods": np.full(n, 10.0),
    }
    for values in data.values():
        values.flags.writeable = False  # shared by every probe: no indicator may alter it
    return data


def _outputs(out: Output) -> tuple[npt.NDArray[Any], ...]:
    return (out,) if isinstance(out, np.ndarray) else tuple(out)


def _same(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return bool(np.allclose(a, b, rtol=1e-8, atol=1e-8, equal_nan=True))


def _tail_rows(
    spec: _Spec, arrays: Sequence[npt.NDArray[Any]], params: Mapping[str, Any], end: int, size: int
) -> tuple[npt.NDArray[Any], ...]:
    start = max(0, end - size)
    return _outputs(spec.call([a[start:end] for a in arrays], params))


def _probe(spec: _Spec, params: Mapping[str, Any]) -> Memory:
    data = _probe_data()
    try:
        arrays = [data[c] for c in spec.info.columns]
    except KeyError:
        return Memory.PATH
    try:
        with np.errstate(all="ignore"):
            full = _outputs(spec.call(arrays, params))
    except Exception:  # a user function that fails on the probe: assume the longest memory
        return Memory.PATH
    warm = spec.warmup_fn({**spec.info.params, **params})
    ends = (_PROBE_BARS, _PROBE_BARS - 137, _PROBE_BARS - 611, _PROBE_BARS - 1009, 1500)

    def matches(size: int, step: Callable[[npt.NDArray[Any], int], Any]) -> bool:
        for end in ends:
            tail = _tail_rows(spec, arrays, params, end, size)
            for t, f in zip(tail, full, strict=True):
                if not _same(np.asarray(step(t, len(t))), np.asarray(step(f, end))):
                    return False
        return True

    with np.errstate(all="ignore"):
        if matches(warm + 1, lambda x, n: x[n - 1]):
            return Memory.FINITE
        # converging first: a decaying sum such as PLUS_DM has bar-to-bar ratios that match
        # by accident whenever the new term is zero
        if warm < CONVERGE_BARS and matches(CONVERGE_BARS, lambda x, n: x[n - 1]):
            return Memory.CONVERGING
        if matches(warm + 2, lambda x, n: x[n - 1] - x[n - 2]):
            return Memory.ADDITIVE
        if matches(warm + 2, lambda x, n: x[n - 1] / x[n - 2]):
            return Memory.MULTIPLICATIVE
    return Memory.PATH


def _converge_tail(spec: _Spec, params: Mapping[str, Any], limit: int) -> int:
    # 1.5x the shortest tail that reproduces the full computation on the probe data
    # (to 1e-8), capped at `limit`
    data = _probe_data()
    arrays = [data[c] for c in spec.info.columns]
    size = max(32, spec.warmup_fn({**spec.info.params, **params}) + 1)
    with np.errstate(all="ignore"):
        full = _outputs(spec.call(arrays, params))
        while size < limit:
            if all(
                _same(t[-1], f[end - 1])
                for end in (_PROBE_BARS, _PROBE_BARS - 137, _PROBE_BARS - 611, 1500)
                for t, f in zip(_tail_rows(spec, arrays, params, end, size), full, strict=True)
            ):
                return min(limit, size * 3 // 2)
            size = size * 3 // 2
    return limit


@functools.lru_cache(maxsize=4096)
def _converge_cached(name: str, items: tuple[tuple[str, Any], ...], limit: int) -> int:
    return _converge_tail(_spec(name), dict(items), limit)


def _key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=4096)
def _memory_cached(name: str, items: tuple[tuple[str, Any], ...]) -> Memory:
    spec = _spec(name)
    if spec.info.memory is not None:
        return spec.info.memory
    return _probe(spec, dict(items))


def memory_of(name: str, **params: Any) -> Memory:
    """Return how far back `name`'s values depend (probed once for TA-Lib functions)."""
    spec = _spec(name)
    return _memory_cached(name, _key(_coerce(spec, params)))


# -- Candlestick patterns --------------------------------------------------------------------


@njit(cache=True)
def _normalise_patterns(out: npt.NDArray[np.int32]) -> None:
    # in place, writing only the rare +-80/+-200 cells: a read-mostly pass
    for i in range(out.size):
        value = out[i]
        if value != 0 and value != 100 and value != -100:
            out[i] = 100 if value > 0 else -100


def _pattern_value(value: float) -> float:
    return float(PATTERN_VALUE if value > 0 else -PATTERN_VALUE if value < 0 else 0)


def detect_patterns(df: pd.DataFrame) -> pd.DataFrame:
    """Return all 61 TA-Lib candlestick patterns as int32 columns -100, 0 or 100.

    Columns are named like TA-Lib's functions in lower case (`cdlengulfing`...). Besides
    +-100, TA-Lib emits +-200 for a confirmed Hikkake (`cdlhikkake`, `cdlhikkakemod`) and +-80
    for a weaker Engulfing/Harami/Harami Cross (bodies sharing an edge); every non-zero value
    becomes +-100 by its sign, so each column reads the same way: sign = direction, 0 = none.
    """
    arrays = [_col(df, c) for c in OHLCV[:4]]
    columns: dict[str, npt.NDArray[np.int32]] = {}
    for name in PATTERN_NAMES:
        out: npt.NDArray[np.int32] = _REGISTRY[name].func(*arrays)  # type: ignore[assignment]
        _normalise_patterns(out)
        columns[name] = out
    return pd.DataFrame(columns, index=df.index, copy=False)


def pattern_summary(df: pd.DataFrame, lookback: int = 3) -> list[dict[str, Any]]:
    """Return the patterns found on the latest `lookback` candles, newest first.

    Each item is {"name", "label", "direction", "bars_ago", "ts"}: direction is "bullish" or
    "bearish" from the pattern's sign, "neutral" for the doji family (TA-Lib marks those
    +100 whatever the direction); bars_ago 0 is the last candle; ts is its open time in ms.
    Only a tail long enough for every pattern's warm-up is evaluated.
    """
    if lookback <= 0 or df.empty:
        return []
    longest = max(_REGISTRY[name].info.warmup for name in PATTERN_NAMES)
    tail = df.iloc[-(lookback + longest + 1) :]
    found = detect_patterns(tail).iloc[-lookback:]
    ts = _index_ms(found.index)
    rows = len(found)
    items: list[dict[str, Any]] = []
    for row, col in zip(*np.nonzero(found.to_numpy()), strict=True):
        name = PATTERN_NAMES[col]
        value = int(found.iat[row, col])
        direction = (
            "neutral" if name in NEUTRAL_PATTERNS else ("bullish" if value > 0 else "bearish")
        )
        items.append(
            {
                "name": name,
                "label": _REGISTRY[name].info.description,
                "direction": direction,
                "bars_ago": rows - 1 - int(row),
                "ts": int(ts[row]),
            }
        )
    items.sort(key=lambda item: (item["bars_ago"], item["name"]))
    return items


# -- Custom indicators and formulas ----------------------------------------------------------


def _register(spec: _Spec, replace: bool) -> None:
    name = spec.info.name
    current = _REGISTRY.get(name)
    if current is not None and (current.info.source in ("talib", "kestrel") or not replace):
        raise IndicatorError(f"indicator {name!r} already exists", component="technical_indicators")
    if not name.isidentifier() or name != name.lower():
        raise IndicatorError(f"bad indicator name {name!r}", component="technical_indicators")
    _REGISTRY[name] = spec
    _memory_cached.cache_clear()
    _converge_cached.cache_clear()


def unregister(name: str) -> None:
    """Remove a custom indicator or formula (built-ins cannot be removed)."""
    spec = _spec(name)
    if spec.info.source in ("talib", "kestrel"):
        raise IndicatorError(f"{name!r} is built in", component="technical_indicators")
    del _REGISTRY[name]
    _memory_cached.cache_clear()
    _converge_cached.cache_clear()


def _slots(columns: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (("price", tuple(columns)),) if len(columns) == 1 else (("prices", tuple(columns)),)


def _warmup_fn(
    warmup: int | Callable[[Mapping[str, Any]], int],
) -> Callable[[Mapping[str, Any]], int]:
    if callable(warmup):
        return warmup
    return lambda _params: int(warmup)


def indicator(
    name: str,
    *,
    outputs: Sequence[str] | None = None,
    params: Mapping[str, ParamValue] | None = None,
    warmup: int | Callable[[Mapping[str, Any]], int] = 0,
    inputs: Sequence[str] = ("close",),
    memory: Memory | None = None,
    description: str = "",
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a user function as an indicator usable by compute(), features and formulas.

    The function receives the `inputs` columns as float64 arrays (read-only views of the
    frame: do not write into them), positionally, and the parameters as keywords; it
    returns one array (or Series) per output, as a tuple when there are several. Example::

        @indicator("range_pct", params={"timeperiod": 14}, inputs=("high", "low", "close"),
                   warmup=lambda p: p["timeperiod"] - 1)
        def range_pct(high, low, close, timeperiod=14):
            return talib.SMA((high - low) / close, timeperiod)

    Args:
        name: Lower-case identifier, unique in the registry.
        outputs: Output names (default: the indicator's name, one output).
        params: Parameter defaults.
        warmup: Leading NaN rows, or a function of the parameters returning it.
        inputs: Input column names ("open", "high", "low", "close", "volume", "ts").
        memory: How far back values depend; probed from the function when None.
        description: One line for the UI.
        replace: Allow replacing an earlier custom indicator of that name.
    """
    outs = tuple(outputs or (name,))
    defaults = dict(params or {})

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        def call(*arrays: npt.NDArray[Any], **kwargs: Any) -> Output:
            result = func(*arrays, **kwargs)
            parts = (result,) if len(outs) == 1 else tuple(result)
            converted = tuple(np.asarray(part, dtype=np.float64) for part in parts)
            if len(converted) != len(outs) or any(p.shape != arrays[0].shape for p in converted):
                raise IndicatorError(
                    f"{name} must return {len(outs)} array(s) of the input's length",
                    component="technical_indicators",
                )
            return converted[0] if len(outs) == 1 else converted

        fn = _warmup_fn(warmup)
        info = IndicatorInfo(
            name=name,
            group="Custom",
            source="custom",
            inputs=_slots(inputs),
            params=MappingProxyType(defaults),
            outputs=outs,
            warmup=fn(defaults),
            memory=memory,
            description=description or (func.__doc__ or name).strip().splitlines()[0],
        )
        _register(
            _Spec(info, call, fn, frozenset(s for s, _ in info.inputs), frozenset(defaults)),
            replace,
        )
        return func

    return decorate


_MAX_FORMULA_CHARS: Final = 2000
_MAX_FORMULA_NODES: Final = 400
_UNARY_FUNCS: Final[dict[str, Callable[[Any], Any]]] = {
    "abs": np.abs,
    "sqrt": np.sqrt,
    "log": np.log,
    "exp": np.exp,
    "sign": np.sign,
}
_BINARY_FUNCS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "min": np.minimum,  # NaN-propagating: a warm-up NaN stays NaN
    "max": np.maximum,
}
_BINOPS: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.divide,
    ast.Pow: np.power,
    ast.Mod: np.mod,
}
_CMPOPS: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
}
_COLUMN_ORDER: Final = (*OHLCV, "ts")

Evaluator: TypeAlias = Callable[["_Context"], Any]
Warmup: TypeAlias = Callable[[Mapping[str, Any]], int]


@dataclass(slots=True)
class _Context:
    columns: dict[str, npt.NDArray[Any]]
    params: Mapping[str, Any]


@dataclass(slots=True)
class _FormulaCompiler:
    """Turn a whitelisted expression AST into closures; anything else is refused."""

    name: str
    params: Mapping[str, ParamValue]
    columns: set[str] = field(default_factory=set)

    def fail(self, message: str) -> IndicatorError:
        return IndicatorError(f"formula {self.name}: {message}", component="technical_indicators")

    def compile(self, node: ast.AST) -> tuple[Evaluator, Warmup]:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            value = float(node.value)  # (bools are ints: True reads as 1.0)
            return (lambda _ctx: value), (lambda _p: 0)
        if isinstance(node, ast.Name):
            return self.name_node(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner, warm = self.compile(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return (lambda ctx: sign * inner(ctx)), warm
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.combine(_BINOPS[type(node.op)], node.left, node.right)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            op = _CMPOPS[type(node.ops[0])]
            return self.combine(_compare(op), node.left, node.comparators[0])
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call):
            return self.call(node.value, node.attr)
        if isinstance(node, ast.Call):
            return self.call(node, None)
        raise self.fail(f"{type(node).__name__} is not allowed")

    def name_node(self, name: str) -> tuple[Evaluator, Warmup]:
        if name in self.params:
            return (lambda ctx: ctx.params[name]), (lambda _p: 0)
        if name in _COLUMN_ORDER:
            self.columns.add(name)
            return (lambda ctx: ctx.columns[name]), (lambda _p: 0)
        raise self.fail(f"unknown name {name!r}")

    def combine(
        self, op: Callable[[Any, Any], Any], left: ast.AST, right: ast.AST
    ) -> tuple[Evaluator, Warmup]:
        lhs, lwarm = self.compile(left)
        rhs, rwarm = self.compile(right)
        return (lambda ctx: op(lhs(ctx), rhs(ctx))), (lambda p: max(lwarm(p), rwarm(p)))

    def call(self, node: ast.Call, output: str | None) -> tuple[Evaluator, Warmup]:
        if not isinstance(node.func, ast.Name):
            raise self.fail("only plain function names may be called")
        fname = node.func.id
        args = [self.compile(arg) for arg in node.args]
        if fname in _UNARY_FUNCS or fname in _BINARY_FUNCS or fname == "shift":
            if node.keywords or output is not None:
                raise self.fail(f"{fname}() takes positional arguments only")
            return self.helper(fname, args, node)
        if fname == self.name:
            raise self.fail("a formula cannot call itself")
        inner = _spec(fname)
        index = 0
        if output is not None:
            if output not in inner.info.outputs:
                raise self.fail(f"{fname} has no output {output!r}")
            index = inner.info.outputs.index(output)
        elif len(inner.info.outputs) > 1:
            raise self.fail(f"pick an output of {fname}: {', '.join(inner.info.outputs)}")
        kwargs = {kw.arg: self.keyword(kw.value) for kw in node.keywords if kw.arg}
        _coerce(inner, dict.fromkeys(kwargs, 0))
        if args and len(args) != len(inner.info.columns):
            raise self.fail(f"{fname} takes {len(inner.info.columns)} input series")
        if not args:
            self.columns.update(inner.info.columns)
        return self.indicator_call(fname, index, args, kwargs)

    def keyword(self, node: ast.AST) -> Callable[[Mapping[str, Any]], Any]:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
            return lambda _p: value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.keyword(node.operand)
            return lambda p: -inner(p)
        if isinstance(node, ast.Name) and node.id in self.params:
            key = node.id
            return lambda p: p[key]
        raise self.fail("indicator parameters must be numbers or formula parameters")

    def indicator_call(
        self,
        fname: str,
        index: int,
        args: list[tuple[Evaluator, Warmup]],
        kwargs: dict[str, Callable[[Mapping[str, Any]], Any]],
    ) -> tuple[Evaluator, Warmup]:
        def evaluate(ctx: _Context) -> Any:
            inner = _spec(fname)
            params = _coerce(inner, {k: f(ctx.params) for k, f in kwargs.items()})
            if args:
                size = len(next(iter(ctx.columns.values())))
                arrays = [_as_series(arg(ctx), size) for arg, _ in args]
            else:
                arrays = [ctx.columns[c] for c in inner.info.columns]
            return _outputs(inner.call(arrays, params))[index].astype(np.float64, copy=False)

        def warm(p: Mapping[str, Any]) -> int:
            inner = _spec(fname)
            params = {**inner.info.params, **_coerce(inner, {k: f(p) for k, f in kwargs.items()})}
            return inner.warmup_fn(params) + max((w(p) for _, w in args), default=0)

        return evaluate, warm

    def helper(
        self, fname: str, args: list[tuple[Evaluator, Warmup]], node: ast.Call
    ) -> tuple[Evaluator, Warmup]:
        if fname in _UNARY_FUNCS and len(args) == 1:
            func, (arg, warm) = _UNARY_FUNCS[fname], args[0]
            return (lambda ctx: func(arg(ctx))), warm
        if fname in _BINARY_FUNCS and len(args) == 2:
            return self.combine(_BINARY_FUNCS[fname], node.args[0], node.args[1])
        if fname == "shift" and len(args) == 2:
            periods = node.args[1]
            if not (isinstance(periods, ast.Constant) and type(periods.value) is int):
                raise self.fail("shift(x, n) needs a literal whole n")
            if periods.value < 0:
                raise self.fail("shift(x, n) with n < 0 would read the future")
            n_bars, (arg, warm) = periods.value, args[0]

            def shifted(ctx: _Context) -> Any:
                size = len(next(iter(ctx.columns.values())))
                return _shift(_as_series(arg(ctx), size).astype(np.float64), n_bars)

            return shifted, (lambda p: warm(p) + n_bars)
        raise self.fail(f"wrong number of arguments to {fname}()")


def _compare(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def compare(a: Any, b: Any) -> Any:
        with np.errstate(invalid="ignore"):
            return np.where(np.isnan(a) | np.isnan(b), np.nan, op(a, b).astype(np.float64))

    return compare


def _as_series(value: Any, size: int) -> FloatArray:
    array = np.asarray(value, dtype=np.float64)
    return np.full(size, float(array)) if array.ndim == 0 else array


def register_formula(
    name: str,
    expression: str,
    *,
    params: Mapping[str, ParamValue] | None = None,
    description: str = "",
    replace: bool = False,
) -> IndicatorInfo:
    """Register an indicator defined by a formula over columns and registered indicators.

    The expression is parsed with `ast` and only a whitelist is compiled: numbers, the
    columns open/high/low/close/volume, formula parameters, + - * / ** %, comparisons
    (1.0/0.0, NaN in warm-up), abs/sqrt/log/exp/sign, min/max, shift(x, n >= 0), and calls
    to registered indicators with input series as positional arguments (default: their
    usual columns), numeric keyword parameters and `.output` to pick one of several.
    Nothing is ever passed to `eval`. Example::

        register_formula("ema_gap", "ema(close, timeperiod=fast) - ema(close, timeperiod=slow)",
                         params={"fast": 10, "slow": 30})

    Returns:
        The new indicator's info.

    Raises:
        IndicatorError: for a syntax error, a name or construct outside the whitelist, or a
            name already taken.
    """
    defaults = dict(params or {})
    if len(expression) > _MAX_FORMULA_CHARS:
        raise IndicatorError(f"formula {name}: too long", component="technical_indicators")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise IndicatorError(f"formula {name}: {e.msg}", component="technical_indicators") from e
    if sum(1 for _ in ast.walk(tree)) > _MAX_FORMULA_NODES:
        raise IndicatorError(f"formula {name}: too complex", component="technical_indicators")
    compiler = _FormulaCompiler(name, defaults)
    evaluate, warm = compiler.compile(tree.body)
    columns = tuple(c for c in _COLUMN_ORDER if c in compiler.columns) or ("close",)

    def call(*arrays: npt.NDArray[Any], **kwargs: Any) -> Output:
        ctx = _Context(dict(zip(columns, arrays, strict=True)), {**defaults, **kwargs})
        with np.errstate(divide="ignore", invalid="ignore"):
            return _as_series(evaluate(ctx), len(arrays[0]))

    def warmup(p: Mapping[str, Any]) -> int:
        return warm({**defaults, **p})

    info = IndicatorInfo(
        name=name,
        group="Formula",
        source="formula",
        inputs=_slots(columns),
        params=MappingProxyType(defaults),
        outputs=(name,),
        warmup=warmup(defaults),
        memory=None,
        description=description or expression,
    )
    _register(
        _Spec(info, call, warmup, frozenset(s for s, _ in info.inputs), frozenset(defaults)),
        replace,
    )
    return info


# -- Feature frames --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Feature:
    """One indicator with parameters in a feature spec; `key` prefixes its columns.

    Columns are `key` for a single output and `key_<output>` for several (`macd_macdhist`).
    The key is the alias, else the name, suffixed with the parameter values when any are
    given (`rsi_7`).
    """

    name: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    alias: str | None = None

    @property
    def key(self) -> str:
        """Return the column prefix."""
        if self.alias:
            return self.alias
        if not self.params:
            return self.name
        values = (str(v) if isinstance(v, int) else f"{v:g}" for v in self.params.values())
        return "_".join([self.name, *values])

    @property
    def columns(self) -> tuple[str, ...]:
        """Return the output column names."""
        outputs = _spec(self.name).info.outputs
        if len(outputs) == 1:
            return (self.key,)
        return tuple(f"{self.key}_{out}" for out in outputs)


FeatureSpec: TypeAlias = Iterable["str | Feature | tuple[str, Mapping[str, ParamValue]]"]


def default_spec() -> tuple[Feature, ...]:
    """Return every registered indicator at its defaults, plus the 61 patterns.

    Left out: TA-Lib's arithmetic groups (Math Operators/Transform), indicators needing an
    input that is not a candle column (`mavp`'s periods) and `anchored_vwap`, which needs an
    anchor chosen by the strategy.
    """
    usable = set(_COLUMN_ORDER)
    names = [
        name
        for name, spec in sorted(_REGISTRY.items())
        if spec.info.group not in NON_FEATURE_GROUPS
        and set(spec.info.columns) <= usable
        and name != "anchored_vwap"
    ]
    return tuple(Feature(name) for name in names)


def _features(spec: FeatureSpec | None) -> list[Feature]:
    items: list[Feature] = []
    for item in default_spec() if spec is None else spec:
        if isinstance(item, Feature):
            items.append(item)
        elif item == "patterns":
            items.extend(Feature(name) for name in PATTERN_NAMES)
        elif isinstance(item, str):
            items.append(Feature(item))
        else:
            name, params = item
            items.append(Feature(name, dict(params)))
    seen: set[str] = set()
    for feature in items:
        _coerce(_spec(feature.name), feature.params)
        clash = seen.intersection(feature.columns)
        if clash:
            raise IndicatorError(
                f"feature columns {sorted(clash)} appear twice", component="technical_indicators"
            )
        seen.update(feature.columns)
    return items


def feature_frame(df: pd.DataFrame, spec: FeatureSpec | None = None) -> pd.DataFrame:
    """Compute many indicators and patterns at once, one column per output.

    Args:
        df: Candle frame (open high low close volume, UTC DatetimeIndex).
        spec: Names, (name, params) pairs, `Feature`s, or "patterns" for all 61; None for
            `default_spec()`.

    Returns:
        A frame aligned with `df.index`; floats, patterns as int32.
    """
    features = _features(spec)
    cache: dict[str, npt.NDArray[Any]] = {}
    data: dict[str, npt.NDArray[Any]] = {}
    for feature in features:
        entry = _spec(feature.name)
        arrays = [
            cache[c] if c in cache else cache.setdefault(c, _col(df, c)) for c in entry.info.columns
        ]
        with np.errstate(all="ignore"):
            outs = _outputs(entry.call(arrays, _coerce(entry, feature.params)))
        data.update(zip(feature.columns, outs, strict=True))
    return pd.DataFrame(data, index=df.index, copy=False)


# -- Live incremental features ---------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    spec: _Spec
    params: dict[str, Any]
    columns: tuple[str, ...]
    memory: Memory
    tail: int  # bars recomputed per candle; 0 = the whole window
    inputs: tuple[str, ...] = ()
    level: list[float] | None = None  # chained values of additive/multiplicative outputs
    handle: Any = None  # a talib.stream handle, once open
    streams: bool = False
    single: bool = True
    pick: Callable[[Mapping[str, float]], tuple[float, ...]] = lambda bar: ()

    def __post_init__(self) -> None:
        self.inputs = self.spec.info.columns
        self.streams = self.spec.stream is not None
        self.single = len(self.columns) == 1
        getter = operator.itemgetter(*self.inputs)
        self.pick = (lambda bar: (getter(bar),)) if len(self.inputs) == 1 else getter
        if self.memory in (Memory.ADDITIVE, Memory.MULTIPLICATIVE):
            self.level = []


class FeatureEngine:
    """Keep one pair's features current, candle by candle, from a bounded tail window.

    Stateful features run on live handles, opened once on the seed history and then advanced
    O(1) per closed candle: TA-Lib's own streaming API (`talib.stream`, bit-identical to the
    Function API over the whole history, running totals such as OBV and path-dependent ones
    such as SAR included) and Kestrel's resumable kernels (session VWAP, anchored VWAP,
    ZigZag, daily pivots), which carry their state the same way.

    Every other feature (Kestrel's windowed ones, custom indicators, formulas) is recomputed
    per closed candle from a ring of the last `window` candles, on only the tail its memory
    needs (see `Memory`):

    - finite (z-score, Ichimoku, ALMA...): the last warm-up + 1 bars; exact.
    - converging (Fisher, Schaff, WaveTrend... anything with an EMA or Wilder average
      inside): a tail found by probing (1.5x the shortest that reproduces the full result
      to 1e-8 on a random walk), at most `converge_bars`. Old bars fade out geometrically,
      so the value matches a full recomputation to ~1e-8 of its scale; `converge_bars`
      (1000) is many times the longest default lookback (a custom indicator with a longer
      memory needs a larger one).
    - additive / multiplicative (a custom running total): the last step is chained onto the
      level computed over the whole seed history; exact.
    - session / path without a resumable kernel (custom): the whole window; exact while the
      window reaches back past the session start or anchor they depend on.

    Args:
        spec: Feature spec as for `feature_frame` (None: `default_spec()`).
        window: Candles kept; default: the largest tail any feature needs.
        converge_bars: Longest tail for converging features.
    """

    def __init__(
        self,
        spec: FeatureSpec | None = None,
        *,
        window: int | None = None,
        converge_bars: int = CONVERGE_BARS,
    ) -> None:
        self._plans: list[_Plan] = []
        for feature in _features(spec):
            entry = _spec(feature.name)
            params = _coerce(entry, feature.params)
            warm = entry.warmup_fn({**entry.info.params, **params})
            if entry.stream is not None:
                self._plans.append(_Plan(entry, params, feature.columns, Memory.PATH, warm + 1))
                continue
            memory = memory_of(feature.name, **params)
            tail = 0  # session / path: the whole window
            if memory is Memory.FINITE:
                tail = warm + 1
            elif memory is Memory.CONVERGING:
                tail = max(warm + 1, _converge_cached(feature.name, _key(params), converge_bars))
            elif memory in (Memory.ADDITIVE, Memory.MULTIPLICATIVE):
                tail = warm + 2
            self._plans.append(_Plan(entry, params, feature.columns, memory, tail))
        self._streams = [plan for plan in self._plans if plan.streams]
        self._template: dict[str, float] = dict.fromkeys(
            (col for plan in self._plans for col in plan.columns), math.nan
        )
        self._requested_window = window
        self._window = 0
        self._count = 0  # candles seen since seed
        self._end = 0
        self._buffers: dict[str, npt.NDArray[Any]] = {}
        self._latest: dict[str, float] = {}

    @property
    def columns(self) -> tuple[str, ...]:
        """Return the feature names, in spec order."""
        return tuple(self._template)

    @property
    def window(self) -> int:
        """Return the number of candles kept (known after `seed`)."""
        return self._window

    @property
    def latest(self) -> dict[str, float]:
        """Return the latest feature row."""
        return dict(self._latest)

    def seed(self, history: pd.DataFrame) -> dict[str, float]:
        """Load closed candles (oldest first) and return the features of the last one.

        TA-Lib handles and running totals are computed once over the whole history;
        afterwards only the window is kept.

        Raises:
            IndicatorError: for an empty history or one missing a column.
        """
        if history.empty:
            raise IndicatorError("seed needs at least one candle", component="technical_indicators")
        arrays = {c: _col(history, c) for c in _COLUMN_ORDER}
        self._window = self._requested_window or self._default_window(arrays["ts"])
        keep = min(len(history), self._window)
        self._buffers = {
            c: np.empty(2 * self._window, dtype=np.int64 if c == "ts" else np.float64)
            for c in _COLUMN_ORDER
        }
        for c, values in arrays.items():
            self._buffers[c][:keep] = values[-keep:]
        self._end = keep
        self._count = len(history)
        row = self._template.copy()
        for plan in self._plans:
            plan.handle = None
            if plan.streams:
                row.update(self._open(plan, [arrays[c] for c in plan.inputs]))
            elif plan.level is not None:
                with np.errstate(all="ignore"):
                    outs = _outputs(plan.spec.call([arrays[c] for c in plan.inputs], plan.params))
                plan.level = [float(out[-1]) for out in outs]
        self._recompute(row, step=False)
        self._latest = row
        return dict(row)

    def update(self, candle: Candle) -> dict[str, float]:
        """Append one closed candle and return the features as of its close.

        Raises:
            InvariantError: if the candle is still open, not newer than the last one, or
                has a non-finite price or volume.
            IndicatorError: if `seed` was not called first.
        """
        if not self._buffers:
            raise IndicatorError("call seed() before update()", component="technical_indicators")
        bar = {
            "ts": candle.ts,
            "open": candle.open,
            "high": candle.high,
            "low": candle.low,
            "close": candle.close,
            "volume": candle.volume,
        }
        self._check(candle, bar)
        if self._end == 2 * self._window:  # compact: keep the newest window, contiguous
            for buffer in self._buffers.values():
                buffer[: self._window] = buffer[self._window :]
            self._end = self._window
        for c, value in bar.items():
            self._buffers[c][self._end] = value
        self._end += 1
        self._count += 1
        row = self._template.copy()
        for plan in self._streams:
            if plan.handle is None:
                row.update(self._reopen(plan))
                continue
            value = plan.handle.update(*plan.pick(bar))
            if not plan.single:
                row.update(zip(plan.columns, value, strict=True))
            elif plan.spec.is_pattern:
                row[plan.columns[0]] = _pattern_value(value)
            else:
                row[plan.columns[0]] = value
        self._recompute(row, step=True)
        self._latest = row
        return dict(row)

    def _check(self, candle: Candle, bar: Mapping[str, float]) -> None:
        if not candle.closed:
            raise InvariantError("features only take closed candles", pair=candle.pair)
        if candle.ts <= int(self._buffers["ts"][self._end - 1]):
            raise InvariantError(
                "candle is not newer than the last one", pair=candle.pair, ts=candle.ts
            )
        if not all(math.isfinite(v) for v in bar.values()):
            raise InvariantError("candle has a non-finite value", pair=candle.pair, ts=candle.ts)

    def _open(self, plan: _Plan, arrays: list[npt.NDArray[Any]]) -> dict[str, float]:
        assert plan.spec.stream is not None
        try:
            plan.handle = plan.spec.stream(*arrays, **plan.params)
        except talib.InsufficientHistory:  # type: ignore[attr-defined]
            return dict.fromkeys(plan.columns, math.nan)
        value = plan.handle.value
        values = value if isinstance(value, tuple) else (value,)
        if plan.spec.is_pattern:
            values = tuple(_pattern_value(v) for v in values)
        return dict(zip(plan.columns, map(float, values), strict=True))

    def _reopen(self, plan: _Plan) -> dict[str, float]:
        # Too little history at seed: open on the window, which still holds every candle
        # unless the window is shorter than the function's warm-up.
        begin = max(0, self._end - self._window)
        return self._open(plan, [self._buffers[c][begin : self._end] for c in plan.inputs])

    def _default_window(self, ts: npt.NDArray[np.int64]) -> int:
        plans = [plan for plan in self._plans if not plan.streams]
        needed = max((plan.tail for plan in plans), default=1)
        sessions = max((plan.spec.sessions for plan in plans), default=0)
        if sessions:
            bar_ms = int(np.median(np.diff(ts))) if len(ts) > 1 else 60_000
            needed = max(needed, sessions * DAY_MS // max(bar_ms, 1) + 1)
        if any(plan.memory is Memory.PATH for plan in plans):
            needed = max(needed, CONVERGE_BARS)
        return needed

    @staticmethod
    def _session_tail(ts: npt.NDArray[np.int64], sessions: int) -> int:
        # walk back over UTC days that have candles, as the kernels do across data gaps
        start = int(np.searchsorted(ts, int(ts[-1]) // DAY_MS * DAY_MS))
        for _ in range(sessions - 1):
            if start == 0:
                break
            start = int(np.searchsorted(ts, int(ts[start - 1]) // DAY_MS * DAY_MS))
        return len(ts) - start

    def _recompute(self, row: dict[str, float], *, step: bool) -> None:
        begin = max(0, self._end - self._window)
        views = {c: buffer[begin : self._end] for c, buffer in self._buffers.items()}
        for view in views.values():
            view.flags.writeable = False  # custom code must not alter the window
        complete = self._count <= self._window  # the window still holds every candle
        with np.errstate(all="ignore"):
            for plan in self._plans:
                if plan.streams:
                    continue
                tail = plan.tail
                if plan.memory is Memory.SESSION:
                    tail = self._session_tail(views["ts"], plan.spec.sessions)
                elif complete and plan.level is not None:
                    tail = 0
                arrays = [views[c][-tail:] if tail else views[c] for c in plan.inputs]
                outs = _outputs(plan.spec.call(arrays, plan.params))
                values = [float(out[-1]) for out in outs]
                if plan.level is not None:
                    values = self._chain(plan, outs, values, exact=complete, step=step)
                row.update(zip(plan.columns, values, strict=True))

    @staticmethod
    def _chain(
        plan: _Plan,
        outs: tuple[npt.NDArray[Any], ...],
        values: list[float],
        *,
        exact: bool,
        step: bool,
    ) -> list[float]:
        level = plan.level or values
        if exact:  # computed over every candle seen: nothing to chain
            level = values
        elif step and plan.memory is Memory.ADDITIVE:
            level = [lv + float(o[-1] - o[-2]) for lv, o in zip(level, outs, strict=True)]
        elif step:
            level = [lv * float(o[-1] / o[-2]) for lv, o in zip(level, outs, strict=True)]
        plan.level = level
        return list(level)


# -- Multi-timeframe -------------------------------------------------------------------------


def merge_higher_timeframe(
    df_low: pd.DataFrame,
    df_high: pd.DataFrame,
    high_timeframe: str,
    columns: Sequence[str] | None = None,
    suffix: str | None = None,
    *,
    low_timeframe: str | None = None,
) -> pd.DataFrame:
    """Return `df_low` with higher-timeframe columns, using only closed higher candles.

    Rows are indexed by bar open time. A low row opening at t is acted on at its close,
    t + low; a high candle opening at H is closed at H + high. The row gets the latest high
    candle with H + high <= t + low. So with 1m rows and 1h candles, the 10:00 hour (closed
    at 11:00) first appears on the 10:59 row (which closes at 11:00), and the 10:00..10:58
    rows still see the 09:00 hour. Rows before the first closed high candle are NaN.

    Args:
        df_low: Lower-timeframe frame (sorted UTC DatetimeIndex of open times).
        df_high: Higher-timeframe frame with the columns to merge (e.g. its indicators).
        high_timeframe: ccxt timeframe of `df_high` ("1h", "4h"...).
        columns: Columns of `df_high` to merge (default: all).
        suffix: Appended to merged names (default: "_<high_timeframe>").
        low_timeframe: Timeframe of `df_low`; inferred from its index when None.

    Raises:
        IndicatorError: for unsorted indexes or a low timeframe that cannot be inferred.
    """
    high_ms = timeframe_to_ms(high_timeframe)
    low_ts = _index_ms(df_low.index)
    high_ts = _index_ms(df_high.index)
    if low_timeframe is not None:
        low_ms = timeframe_to_ms(low_timeframe)
    elif len(low_ts) > 1:
        low_ms = int(np.min(np.diff(low_ts)))
    else:
        raise IndicatorError(
            "pass low_timeframe for a one-row frame", component="technical_indicators"
        )
    if np.any(np.diff(high_ts) <= 0) or np.any(np.diff(low_ts) <= 0) or low_ms <= 0:
        raise IndicatorError("frames must be sorted and unique", component="technical_indicators")
    position = np.searchsorted(high_ts, low_ts + low_ms - high_ms, side="right") - 1
    missing = position < 0
    position[missing] = 0
    names = list(df_high.columns if columns is None else columns)
    tag = f"_{high_timeframe}" if suffix is None else suffix
    merged: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        values = (
            df_high[name].to_numpy(dtype=np.float64)[position]
            if len(high_ts)
            else np.full(len(low_ts), np.nan)
        )
        values[missing] = np.nan
        merged[f"{name}{tag}"] = values
    return pd.concat([df_low, pd.DataFrame(merged, index=df_low.index)], axis=1)


# -- Market regime ---------------------------------------------------------------------------


class Regime(enum.StrEnum):
    """Market regime labels."""

    TRENDING_UP = "trending_up"
    TRENDING_DOWN = "trending_down"
    RANGING = "ranging"
    HIGH_VOLATILITY = "high_volatility"


def detect_regime(
    df: pd.DataFrame,
    *,
    adx_period: int = 14,
    adx_threshold: float = 25.0,
    slope_period: int = 20,
    atr_period: int = 14,
    vol_window: int = 500,
    vol_ratio: float = 1.8,
) -> pd.Series:
    """Label each bar trending_up, trending_down, ranging or high_volatility.

    high_volatility wins when ATR as % of price (NATR) is at least `vol_ratio` times its
    median over the previous `vol_window` bars: relative and causal, so a calm market that
    turns wild is flagged, and one that stays wild becomes its own normal after about half
    the window. Otherwise a bar trends when ADX >= `adx_threshold`, up or down by the sign of
    the linear-regression slope of close over `slope_period` bars; else it is ranging. Bars
    in the ADX/slope warm-up are missing (NaN); before `vol_window` bars there is no
    volatility baseline and the test is skipped.

    Returns:
        A categorical Series named "regime" aligned with `df.index`.
    """
    high, low, close = _col(df, "high"), _col(df, "low"), _col(df, "close")
    adx = talib.ADX(high, low, close, adx_period)
    slope = talib.LINEARREG_SLOPE(close, slope_period)
    natr = talib.NATR(high, low, close, atr_period)
    baseline = _shift(talib.PERCENTILE(natr, vol_window, 50.0), 1)
    labels = np.full(len(df), None, dtype=object)
    known = ~np.isnan(adx) & ~np.isnan(slope)
    trending = known & (adx >= adx_threshold)
    labels[known] = Regime.RANGING.value
    labels[trending & (slope > 0)] = Regime.TRENDING_UP.value
    labels[trending & (slope < 0)] = Regime.TRENDING_DOWN.value
    with np.errstate(invalid="ignore"):
        labels[known & (natr >= vol_ratio * baseline)] = Regime.HIGH_VOLATILITY.value
    categories = [r.value for r in Regime]
    return pd.Series(pd.Categorical(labels, categories=categories), index=df.index, name="regime")
