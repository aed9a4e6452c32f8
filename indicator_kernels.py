"""Kestrel's numba kernels: the loops behind its own indicators and the pattern normaliser.

Kernels take float64 arrays (ts: int64 ms) and tolerate leading NaNs; each is compiled once
and cached on disk. `technical_indicators` re-exports the public API built on them.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
from numba import njit


FloatArray: TypeAlias = npt.NDArray[np.float64]


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
def _zigzag_first_swing(
    h: float,
    lo_bar: float,
    i: float,
    deviation: float,
    hi: float,
    hi_i: float,
    lo: float,
    lo_i: float,
    last_p: float,
    last_d: float,
    last_i: float,
) -> tuple[float, float, float, float, float, float, float, float]:
    # Before the first swing (trend 0): track both extremes until price moves `deviation`
    # away from the older one, which becomes the first pivot. Returns the zigzag state
    # (trend, hi, hi_i, lo, lo_i, last_p, last_d, last_i) after bar i.
    trend = 0.0
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
    return trend, hi, hi_i, lo, lo_i, last_p, last_d, last_i


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
            trend, hi, hi_i, lo, lo_i, last_p, last_d, last_i = _zigzag_first_swing(
                h, lo_bar, i, deviation, hi, hi_i, lo, lo_i, last_p, last_d, last_i
            )
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


@njit(cache=True)
def _normalise_patterns(out: npt.NDArray[np.int32]) -> None:
    # in place, writing only the rare +-80/+-200 cells: a read-mostly pass
    for i in range(out.size):
        value = out[i]
        if value != 0 and value != 100 and value != -100:
            out[i] = 100 if value > 0 else -100
