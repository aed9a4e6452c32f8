"""Candlestick patterns: TA-Lib's 61, normalised to -100/0/100, and the latest ones found."""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from indicator_base import OHLCV, _col, _index_ms
from indicator_kernels import _normalise_patterns
from indicator_registry import _REGISTRY, PATTERN_NAMES


PATTERN_VALUE: Final = 100  # every detected pattern reads +-100: sign = direction
# TA-Lib marks these patterns +100 whatever the direction: they signal indecision.
NEUTRAL_PATTERNS: Final = frozenset(
    {"cdldoji", "cdldragonflydoji", "cdlgravestonedoji", "cdllongleggeddoji", "cdlrickshawman"}
)


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
