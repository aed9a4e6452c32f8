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

This module keeps the multi-timeframe merge and the regime labels and re-exports the rest
from its parts: `indicator_kernels` (numba loops), `indicator_base` (shared contracts),
`kestrel_indicators` (Kestrel's own), `indicator_registry` (TA-Lib, compute, memory probe,
custom indicators), `indicator_formulas`, `candle_patterns` and `feature_engine`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import talib

from candle_patterns import NEUTRAL_PATTERNS, PATTERN_VALUE, detect_patterns, pattern_summary
from feature_engine import (
    NON_FEATURE_GROUPS,
    Feature,
    FeatureEngine,
    FeatureSpec,
    default_spec,
    feature_frame,
)
from indicator_base import (
    DAY_MS,
    OHLCV,
    FloatArray,
    IndicatorError,
    IndicatorInfo,
    Memory,
    Output,
    ParamValue,
    _col,
    _index_ms,
)
from indicator_formulas import Evaluator, Warmup, register_formula
from indicator_kernels import _shift
from indicator_kernels import _streak_kernel as _streak_kernel  # re-exported for tests
from indicator_registry import _REGISTRY as _REGISTRY  # re-exported for tests
from indicator_registry import (
    CONVERGE_BARS,
    PATTERN_NAMES,
    available,
    compute,
    indicator,
    lookback,
    memory_of,
    unregister,
)
from indicator_registry import _probe as _probe  # re-exported for tests
from kestrel_indicators import (
    alma,
    anchored_vwap,
    chandelier,
    chop,
    connors_rsi,
    fisher,
    garman_klass,
    ichimoku,
    kst,
    mcginley,
    pivot_points,
    session_vwap,
    squeeze,
    stc,
    supersmoother,
    ulcer_index,
    wavetrend,
    zigzag,
    zigzag_pivots,
    zscore,
)
from utils.utilities import timeframe_to_ms


__all__ = [
    "CONVERGE_BARS",
    "DAY_MS",
    "NEUTRAL_PATTERNS",
    "NON_FEATURE_GROUPS",
    "OHLCV",
    "PATTERN_NAMES",
    "PATTERN_VALUE",
    "Evaluator",
    "Feature",
    "FeatureEngine",
    "FeatureSpec",
    "FloatArray",
    "IndicatorError",
    "IndicatorInfo",
    "Memory",
    "Output",
    "ParamValue",
    "Regime",
    "Warmup",
    "alma",
    "anchored_vwap",
    "available",
    "chandelier",
    "chop",
    "compute",
    "connors_rsi",
    "default_spec",
    "detect_patterns",
    "detect_regime",
    "feature_frame",
    "fisher",
    "garman_klass",
    "ichimoku",
    "indicator",
    "kst",
    "lookback",
    "mcginley",
    "memory_of",
    "merge_higher_timeframe",
    "pattern_summary",
    "pivot_points",
    "register_formula",
    "session_vwap",
    "squeeze",
    "stc",
    "supersmoother",
    "ulcer_index",
    "unregister",
    "wavetrend",
    "zigzag",
    "zigzag_pivots",
    "zscore",
]


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
