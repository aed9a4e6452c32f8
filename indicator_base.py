"""What the indicator modules share: IndicatorInfo, Memory, the registry entry, frame access.

`_Spec` is one registry entry (metadata plus the array function); `_col` and `_index_ms`
read a candle frame's columns and open times without copying.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd

from error_handler import ConfigError
from indicator_kernels import FloatArray as FloatArray
from indicator_kernels import _normalise_patterns


Output: TypeAlias = "npt.NDArray[Any] | tuple[npt.NDArray[Any], ...]"
ParamValue: TypeAlias = "int | float"

OHLCV: Final = ("open", "high", "low", "close", "volume")
DAY_MS: Final = 86_400_000
_COLUMN_ORDER: Final = (*OHLCV, "ts")


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
