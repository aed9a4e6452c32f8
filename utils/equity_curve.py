"""An equity curve held as two packed arrays, 16 bytes a point instead of ~110.

A replay records one point per candle: a list of `(ts, value)` tuples costs a tuple, an int
and a float object per point (about 110 bytes), which a multi-year minute backtest turns
into gigabytes. `EquityCurve` keeps the times and values in `array.array` buffers (int64 and
float64, amortised growth, appends as cheap as a list's) and hands numpy views of them to
the reports without a copy. It reads like the list it replaces: `len`, iteration and
indexing give `(ts, value)` tuples, and a slice gives a list of them.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np


class EquityCurve:
    """Equity points `(ts ms, value)` in time order, stored packed."""

    __slots__ = ("_ts", "_values")

    def __init__(self, points: Iterable[tuple[int, float]] = ()) -> None:
        self._ts = array("q")
        self._values = array("d")
        for ts, value in points:
            self.append(ts, value)

    def append(self, ts: int, value: float) -> None:
        """Add a point at the end."""
        self._ts.append(ts)
        self._values.append(value)

    def set_last(self, ts: int, value: float) -> None:
        """Replace the last point (a second value for the same time)."""
        self._ts[-1] = ts
        self._values[-1] = value

    def extend_flat(self, ts: Sequence[int], value: float) -> None:
        """Add one point at each of `ts`, all with the same `value`."""
        self._ts.extend(ts)
        self._values.extend(array("d", [value]) * len(ts))

    @property
    def last_ts(self) -> int:
        """Return the time of the last point (IndexError when empty)."""
        return self._ts[-1]

    @property
    def last_value(self) -> float:
        """Return the value of the last point (IndexError when empty)."""
        return self._values[-1]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (ts int64, values float64) as copies owned by numpy."""
        return np.array(self._ts, dtype=np.int64), np.array(self._values, dtype=np.float64)

    def views(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (ts int64, values float64) as read-only numpy views: no copy, for a finished run.

        While a view lives the curve cannot grow: `append` raises `BufferError` (loudly, never
        a silent stale view). A long replay's report reads the curve without a second copy.
        """
        return np.frombuffer(self._ts, dtype=np.int64), np.frombuffer(
            self._values, dtype=np.float64
        )

    def values(self) -> np.ndarray:
        """Return the values as a float64 array (a copy)."""
        return np.array(self._values, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._ts)

    def __bool__(self) -> bool:
        return len(self._ts) > 0

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return zip(self._ts, self._values, strict=True)

    @overload
    def __getitem__(self, index: int) -> tuple[int, float]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, float]]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, float] | list[tuple[int, float]]:
        if isinstance(index, slice):
            return list(zip(self._ts[index], self._values[index], strict=True))
        return self._ts[index], self._values[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EquityCurve):
            return self._ts == other._ts and self._values == other._values
        if isinstance(other, list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EquityCurve({len(self)} points)"
