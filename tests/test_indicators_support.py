"""Shared helpers for the indicator tests: sample loading and plain-python references.

The references are written from the published definitions with lists, loops and `math`
only, independently of technical_indicators.py, so a test compares two implementations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd


SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
NAN = math.nan


def load_sample(name: str = "bybit_BTC-USDT_1m.csv.gz") -> pd.DataFrame:
    """Load a bundled OHLCV sample as a float64 frame on a UTC DatetimeIndex."""
    raw = pd.read_csv(SAMPLE / name)
    index = pd.to_datetime(raw.pop("timestamp"), unit="ms", utc=True)
    frame = raw.astype("float64")
    frame.index = index
    return frame


def frame(
    rows: Sequence[Sequence[float]], start: str = "2024-01-01", freq: str = "1min"
) -> pd.DataFrame:
    """Build a candle frame from (open, high, low, close, volume) rows."""
    index = pd.date_range(start, periods=len(rows), freq=freq, tz="UTC")
    return pd.DataFrame(
        rows, columns=["open", "high", "low", "close", "volume"], index=index, dtype="float64"
    )


def isnan(x: float) -> bool:
    """Return True for NaN."""
    return x != x


def sma(x: Sequence[float], n: int) -> list[float]:
    """Return the n-bar simple average (NaN if the window holds a NaN or is short)."""
    out = [NAN] * len(x)
    for i in range(n - 1, len(x)):
        window = x[i - n + 1 : i + 1]
        out[i] = NAN if any(isnan(v) for v in window) else sum(window) / n
    return out


def ema(x: Sequence[float], n: int) -> list[float]:
    """Return TA-Lib's EMA: seeded with the SMA of the first n valid values, k = 2/(n+1)."""
    out = [NAN] * len(x)
    first = next((i for i, v in enumerate(x) if not isnan(v)), len(x))
    if first + n > len(x):
        return out
    k = 2.0 / (n + 1)
    out[first + n - 1] = sum(x[first : first + n]) / n
    for i in range(first + n, len(x)):
        out[i] = out[i - 1] + k * (x[i] - out[i - 1])
    return out


def true_range(high: Sequence[float], low: Sequence[float], close: Sequence[float]) -> list[float]:
    """Return Wilder's true range; the first bar has no previous close (NaN)."""
    out = [NAN]
    for i in range(1, len(close)):
        out.append(max(high[i] - low[i], abs(high[i] - close[i - 1]), abs(low[i] - close[i - 1])))
    return out


def atr(high: Sequence[float], low: Sequence[float], close: Sequence[float], n: int) -> list[float]:
    """Return Wilder's ATR: the mean of the first n true ranges, then (prev*(n-1)+tr)/n."""
    tr = true_range(high, low, close)
    out = [NAN] * len(close)
    if n >= len(close):
        return out
    out[n] = sum(tr[1 : n + 1]) / n
    for i in range(n + 1, len(close)):
        out[i] = (out[i - 1] * (n - 1) + tr[i]) / n
    return out


def rsi(x: Sequence[float], n: int) -> list[float]:
    """Return Wilder's RSI as TA-Lib computes it (first value at bar n)."""
    out = [NAN] * len(x)
    if n >= len(x):
        return out
    gains = [max(x[i] - x[i - 1], 0.0) for i in range(1, len(x))]
    losses = [max(x[i - 1] - x[i], 0.0) for i in range(1, len(x))]
    gain = sum(gains[:n]) / n
    loss = sum(losses[:n]) / n
    out[n] = 0.0 if gain + loss == 0 else 100.0 * gain / (gain + loss)
    for i in range(n + 1, len(x)):
        gain = (gain * (n - 1) + gains[i - 1]) / n
        loss = (loss * (n - 1) + losses[i - 1]) / n
        out[i] = 0.0 if gain + loss == 0 else 100.0 * gain / (gain + loss)
    return out


def highest(x: Sequence[float], n: int, i: int) -> float:
    """Return the maximum of the n bars ending at bar i."""
    return max(x[i - n + 1 : i + 1])


def lowest(x: Sequence[float], n: int, i: int) -> float:
    """Return the minimum of the n bars ending at bar i."""
    return min(x[i - n + 1 : i + 1])


def pstdev(window: Sequence[float]) -> float:
    """Return the population standard deviation."""
    mean = sum(window) / len(window)
    return math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))


def linreg(y: Sequence[float], n: int) -> list[float]:
    """Return the least-squares line's value at the last of each n-bar window."""
    out = [NAN] * len(y)
    xs = list(range(n))
    x_mean = sum(xs) / n
    for i in range(n - 1, len(y)):
        window = y[i - n + 1 : i + 1]
        if any(isnan(v) for v in window):
            continue
        y_mean = sum(window) / n
        slope = sum((a - x_mean) * (b - y_mean) for a, b in zip(xs, window, strict=True)) / sum(
            (a - x_mean) ** 2 for a in xs
        )
        out[i] = y_mean + slope * (n - 1 - x_mean)
    return out


def roc(x: Sequence[float], n: int) -> list[float]:
    """Return the n-bar rate of change in percent."""
    return [NAN] * n + [(x[i] / x[i - n] - 1.0) * 100.0 for i in range(n, len(x))]


def columns(
    df: pd.DataFrame,
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """Return open, high, low, close, volume as plain lists."""
    return tuple(df[c].tolist() for c in ("open", "high", "low", "close", "volume"))


def assert_close(actual: object, expected: npt.ArrayLike, rtol: float = 1e-9) -> None:
    """Assert two series agree, NaN where the other is NaN."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=float),
        np.asarray(expected, dtype=float),
        rtol=rtol,
        atol=1e-9,
        equal_nan=True,
    )
