"""Market data: normalise, archive, backfill, resample and keep rolling frames per pair.

Candle frames are pandas DataFrames indexed by a `datetime64[ms, UTC]` DatetimeIndex named
`ts` (the bar's open time) with float64 columns `open high low close volume`, sorted and
unique. Everything that enters the bot passes through `normalise_frame`, which repairs or
drops bad rows and counts each one; a candle still open at `now_ms` is never kept.

Archives are zstd Parquet files, one per exchange, pair and timeframe::

    <data_dir>/ohlcv/<exchange>/<BASE-QUOTE>/<timeframe>.parquet     int64 ts + float64 OHLCV
    <data_dir>/ticks/<exchange>/<BASE-QUOTE>/<YYYY-MM-DD>.parquet    one file per UTC day

Every write goes to a temporary file renamed over the old one, so a reader or a crash sees
the old or the new archive, never half of one. `backfill` pages through an exchange's
history into these archives, resuming where it stopped and refilling gaps.

This module keeps resampling and the rolling windows (`DataManager`) and re-exports the rest
from its parts: `candle_frames` (frames, arrays and normalisation), `candle_store` (candle
files, archives and gaps) and `candle_backfill`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import structlog

from candle_backfill import (
    KLINE_LIMIT,
    BackfillReport,
    CandleSource,
    PairBackfill,
    backfill,
    run_backfill_cli,
)
from candle_frames import (
    OHLCV,
    CandleArrays,
    FloatArray,
    Int64Array,
    NormaliseReport,
    _empty_arrays,
    _grid_offset,
    _is_clean,
    arrays_to_frame,
    bucket_start,
    candles_to_arrays,
    candles_to_frame,
    frame_to_arrays,
    frame_to_candles,
    index_ms,
    ms_index,
    normalise_arrays,
    normalise_frame,
)
from candle_reader import CSV_HEADER, read_candles
from candle_store import (
    ArchiveSegments,
    CandleStore,
    archive_range,
    archive_rows,
    archive_segments,
    export_csv,
    filename_to_pair,
    find_gaps,
    load_candles,
    load_frames,
    missing_ranges,
    own_archives,
    pair_to_filename,
    replay_frames,
    replay_funding,
    sample_file,
)
from candle_store import _day as _day  # re-exported for tests
from error_handler import DataError
from models import Candle
from utils.utilities import timeframe_to_ms


__all__ = [
    "CSV_HEADER",
    "KLINE_LIMIT",
    "OHLCV",
    "ArchiveSegments",
    "BackfillReport",
    "CandleAggregator",
    "CandleArrays",
    "CandleSource",
    "CandleStore",
    "DataManager",
    "FloatArray",
    "Int64Array",
    "NormaliseReport",
    "PairBackfill",
    "archive_range",
    "archive_rows",
    "archive_segments",
    "arrays_to_frame",
    "backfill",
    "bucket_start",
    "candles_to_arrays",
    "candles_to_frame",
    "detect_patterns",
    "export_csv",
    "filename_to_pair",
    "find_gaps",
    "frame_to_arrays",
    "frame_to_candles",
    "index_ms",
    "latest_patterns",
    "load_candles",
    "load_frames",
    "missing_ranges",
    "ms_index",
    "normalise_arrays",
    "normalise_frame",
    "own_archives",
    "pair_to_filename",
    "read_candles",
    "replay_frames",
    "replay_funding",
    "resample",
    "run_backfill_cli",
    "sample_file",
    "trades_to_candles",
]


log = structlog.get_logger(__name__)


def trades_to_candles(trades: pd.DataFrame, timeframe: str) -> pd.DataFrame:
    """Return OHLCV candles built from trades (a bar only where a trade happened)."""
    if trades.empty:
        return arrays_to_frame(_empty_arrays())
    ts = index_ms(trades)
    order = np.argsort(ts, kind="stable")
    price = trades["price"].to_numpy(dtype=np.float64)[order]
    qty = trades["qty"].to_numpy(dtype=np.float64)[order]
    return _aggregate(
        bucket_start(ts[order], timeframe_to_ms(timeframe)), price, price, price, price, qty
    )


# -- Resampling ------------------------------------------------------------------------------


def _aggregate(
    bucket: Int64Array, o: FloatArray, h: FloatArray, lo: FloatArray, c: FloatArray, v: FloatArray
) -> pd.DataFrame:
    starts = np.flatnonzero(np.concatenate(([True], bucket[1:] != bucket[:-1])))
    ends = np.concatenate((starts[1:], [len(bucket)])) - 1
    return arrays_to_frame(
        CandleArrays(
            bucket[starts],
            o[starts],
            np.maximum.reduceat(h, starts),
            np.minimum.reduceat(lo, starts),
            c[ends],
            np.add.reduceat(v, starts),
        )
    )


def resample(
    df: pd.DataFrame,
    timeframe: str,
    *,
    source_timeframe: str | None = None,
    include_partial: bool = False,
) -> pd.DataFrame:
    """Return candles aggregated to a higher timeframe, labelled by bar open time.

    open = first, high = max, low = min, close = last, volume = sum. The last bar is
    dropped while incomplete (its last source candle does not close at the bar's end)
    unless `include_partial`. A bar whose first source candles are missing (data starts
    mid-bar, or a gap) is kept: it is closed, only thinner. `source_timeframe` defaults to
    the smallest spacing in `df`.

    Raises:
        DataError: for an unsorted or duplicated frame (normalise it first).
        ValueError: when `timeframe` is not a multiple of the source timeframe.
    """
    arrays = frame_to_arrays(df)
    ts = arrays.ts
    if len(ts) == 0:
        return arrays_to_frame(_empty_arrays())
    diffs = np.diff(ts)
    if (diffs <= 0).any():
        raise DataError("resample needs a sorted, unique frame: normalise_frame it first")
    step = timeframe_to_ms(timeframe)
    if source_timeframe is not None:
        src_step = timeframe_to_ms(source_timeframe)
    elif len(diffs):
        src_step = int(diffs.min())
    else:
        raise ValueError("one candle: pass source_timeframe to know when its bar closes")
    if step % src_step:
        raise ValueError(f"{timeframe} is not a multiple of the source timeframe ({src_step} ms)")
    bucket = bucket_start(ts, step)
    out = _aggregate(bucket, *arrays[1:])
    if not include_partial and int(ts[-1]) + src_step < int(bucket[-1]) + step:
        out = out.iloc[:-1]
    return out


class CandleAggregator:
    """Build higher-timeframe candles from closed lower-timeframe candles, one at a time.

    A bar is emitted when its last source candle closes, or when a candle of a later bar
    arrives (the source had a gap). Its output equals `resample` of the same candles.
    """

    def __init__(self, pair: str, source_timeframe: str, timeframe: str) -> None:
        self.pair = pair
        self.source_timeframe = source_timeframe
        self.timeframe = timeframe
        self._src_step = timeframe_to_ms(source_timeframe)
        self._step = timeframe_to_ms(timeframe)
        if self._step % self._src_step or self._step <= self._src_step:
            raise ValueError(f"{timeframe} is not a multiple of {source_timeframe}")
        self._offset = _grid_offset(self._step)
        self._bar: list[float] | None = None  # open, high, low, close, volume
        self._bar_ts = 0

    def on_candle(self, candle: Candle) -> list[Candle]:
        """Add a closed source candle and return the bars it completed (usually 0 or 1)."""
        out: list[Candle] = []
        bar_ts = candle.ts - (candle.ts - self._offset) % self._step
        bar = self._bar
        if bar is not None and bar_ts != self._bar_ts:
            if bar_ts < self._bar_ts:
                return out  # out of order: the bar was already built without it
            out.append(self._emit())
            bar = None
        if bar is None:
            self._bar_ts = bar_ts
            self._bar = [candle.open, candle.high, candle.low, candle.close, candle.volume]
        else:
            bar[1] = max(bar[1], candle.high)
            bar[2] = min(bar[2], candle.low)
            bar[3] = candle.close
            bar[4] += candle.volume
        # The bar is complete once its last source candle has closed: emit it now rather
        # than one candle late, when the next bar starts.
        if candle.ts + self._src_step >= bar_ts + self._step:
            out.append(self._emit())
        return out

    def _emit(self) -> Candle:
        assert self._bar is not None
        o, h, lo, c, v = self._bar
        self._bar = None
        return Candle(self.pair, self.timeframe, self._bar_ts, o, h, lo, c, v)


# -- Rolling frames --------------------------------------------------------------------------


class _Ring:
    """A fixed-capacity OHLCV buffer for one pair and timeframe, column-major."""

    __slots__ = ("_view", "capacity", "size", "ts", "values")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Twice the capacity so appends are amortised O(1) memmoves, not per-candle copies;
        # one contiguous row per column so `arrays()` hands out contiguous views.
        self.ts = np.zeros(capacity * 2, dtype=np.int64)
        self.values = np.zeros((5, capacity * 2), dtype=np.float64)
        self.size = 0
        # The last `arrays()` answer and the size it was taken at: the buffers are never
        # reallocated, so the same size means the same views (read several times a candle).
        self._view: tuple[int, CandleArrays] | None = None

    def _compact(self) -> None:
        keep = self.capacity - 1
        self.ts[:keep] = self.ts[self.size - keep : self.size]
        self.values[:, :keep] = self.values[:, self.size - keep : self.size]
        self.size = keep

    def append(self, ts: int, o: float, h: float, lo: float, c: float, v: float) -> None:
        if self.size == len(self.ts):
            self._compact()
        i = self.size
        self.ts[i] = ts
        self.values[:, i] = (o, h, lo, c, v)
        self.size = i + 1

    def extend(self, arrays: CandleArrays) -> None:
        n = min(len(arrays.ts), self.capacity)
        if self.size + n > len(self.ts):
            keep = min(self.size, self.capacity - n)
            self.ts[:keep] = self.ts[self.size - keep : self.size]
            self.values[:, :keep] = self.values[:, self.size - keep : self.size]
            self.size = keep
        end = self.size + n
        self.ts[self.size : end] = arrays.ts[len(arrays.ts) - n :]
        for row, col in enumerate(arrays[1:]):
            self.values[row, self.size : end] = col[len(col) - n :]
        self.size = end

    @property
    def last_ts(self) -> int | None:
        return int(self.ts[self.size - 1]) if self.size else None

    @property
    def length(self) -> int:
        # How many candles the window holds (at most `capacity` of the buffer's `size`).
        return self.size - max(0, self.size - self.capacity)

    def arrays(self) -> CandleArrays:
        view = self._view
        if view is not None and view[0] == self.size:
            return view[1]
        start = max(0, self.size - self.capacity)
        end = self.size
        v = self.values
        arrays = CandleArrays(
            self.ts[start:end], v[0, start:end], v[1, start:end], v[2, start:end],
            v[3, start:end], v[4, start:end],
        )  # fmt: skip
        self._view = (end, arrays)
        return arrays

    def tail(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        start = max(0, self.size - self.capacity, self.size - rows)
        return self.ts[start : self.size], self.values[:, start : self.size]


class DataManager:
    """Keep a rolling candle window per pair and timeframe, fed one closed candle at a time.

    Out-of-order and duplicate candles (streams reconnecting, REST gap fills) are dropped
    and counted, never applied twice; a still-open candle is never stored as closed.
    With `higher_timeframes={"1m": ("5m", "1h")}`, each closed 1m candle also builds the
    5m and 1h windows incrementally. With a `store`, closed candles are archived on
    `flush()`.
    """

    def __init__(
        self,
        *,
        window: int = 500,
        higher_timeframes: Mapping[str, Sequence[str]] | None = None,
        store: CandleStore | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.store = store
        self._rings: dict[tuple[str, str], _Ring] = {}
        self._higher = {src: tuple(targets) for src, targets in (higher_timeframes or {}).items()}
        self._aggregators: dict[tuple[str, str, str], CandleAggregator] = {}
        self._pending: dict[tuple[str, str], list[Candle]] = {}
        self.rejected: dict[str, int] = {"open": 0, "duplicate": 0, "out_of_order": 0, "bad": 0}
        # Moves whenever any window changes: what was computed from the windows at one
        # version holds until the next (a burst's decisions share their returns by it).
        self.version = 0

    def seed(self, pair: str, timeframe: str, frame: pd.DataFrame) -> None:
        """Load history (e.g. the warm-up) into a pair's window; older candles are skipped."""
        arrays = frame_to_arrays(frame)
        ring = self._ring(pair, timeframe)
        last = ring.last_ts
        if last is not None:
            newer = arrays.ts > last
            arrays = CandleArrays._make(a[newer] for a in arrays)
        if not _is_clean(arrays):
            arrays, _ = normalise_arrays(arrays.ts, np.vstack(arrays[1:]), timeframe=timeframe)
        if len(arrays.ts):
            ring.extend(arrays)
            self.version += 1

    def _ring(self, pair: str, timeframe: str) -> _Ring:
        ring = self._rings.get((pair, timeframe))
        if ring is None:
            ring = self._rings[(pair, timeframe)] = _Ring(self.window)
        return ring

    def on_candle(self, candle: Candle) -> bool:
        """Append a closed candle; return False (and count why) if it was not applied."""
        if not candle.closed:
            self.rejected["open"] += 1
            return False
        o, h, lo, c, v = candle.open, candle.high, candle.low, candle.close, candle.volume
        # Comparisons with NaN are False, so NaN fails here too; inf is caught by the bounds.
        if not (0 < lo <= o <= h < math.inf and lo <= c <= h and 0 <= v < math.inf):
            self.rejected["bad"] += 1
            log.warning("candle_rejected", pair=candle.pair, ts=candle.ts, reason="invalid")
            return False
        key = (candle.pair, candle.timeframe)
        ring = self._rings.get(key) or self._ring(*key)
        if ring.size and candle.ts <= ring.ts[ring.size - 1]:
            self.rejected[
                "duplicate" if candle.ts == ring.ts[ring.size - 1] else "out_of_order"
            ] += 1
            return False
        ring.append(candle.ts, o, h, lo, c, v)
        self.version += 1
        if self.store is not None:
            self._pending.setdefault(key, []).append(candle)
        targets = self._higher.get(candle.timeframe)
        if targets:
            self._build_higher(candle, targets)
        return True

    @property
    def can_extend_run(self) -> bool:
        """Return True when `extend_run` equals `on_candle` per candle (no archive, no rollup)."""
        return self.store is None and not self._higher

    def extend_run(
        self, pair: str, timeframe: str, ts: np.ndarray, columns: Sequence[np.ndarray]
    ) -> None:
        """Append consecutive closed candles of one pair at once (a replay's quiet stretch).

        `columns` are the candles' open, high, low, close and volume. The window ends up
        as `on_candle` per candle leaves it. The caller hands only candles `on_candle`
        would accept (valid, newer than the window's last), without a store or higher
        timeframes (`can_extend_run`); anything else is a bug, not data.
        """
        if not len(ts):
            return
        ring = self._rings.get((pair, timeframe)) or self._ring(pair, timeframe)
        last = ring.last_ts
        if not self.can_extend_run or (last is not None and int(ts[0]) <= last):
            raise ValueError(f"extend_run on {pair}: not a run on_candle would accept")
        o, h, lo, c, v = columns
        ring.extend(CandleArrays(ts, o, h, lo, c, v))
        self.version += 1

    def _build_higher(self, candle: Candle, targets: Sequence[str]) -> None:
        for target in targets:
            key = (candle.pair, candle.timeframe, target)
            aggregator = self._aggregators.get(key)
            if aggregator is None:
                aggregator = self._aggregators[key] = CandleAggregator(*key)
            for bar in aggregator.on_candle(candle):
                self.on_candle(bar)

    def frame(self, pair: str, timeframe: str) -> pd.DataFrame:
        """Return the pair's rolling window as a candle frame (a copy)."""
        return arrays_to_frame(CandleArrays._make(a.copy() for a in self.arrays(pair, timeframe)))

    def arrays(self, pair: str, timeframe: str) -> CandleArrays:
        """Return the pair's rolling window as contiguous numpy views, without copying.

        The fast path for per-candle work (indicators, risk): the views alias the buffer,
        so they are valid until the next candle for this pair and timeframe is applied.
        """
        ring = self._rings.get((pair, timeframe))
        return ring.arrays() if ring is not None else _empty_arrays()

    def tail(self, pair: str, timeframe: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the open times and the (5, n) OHLCV block of the window's last `rows` rows.

        Views of the buffer, like `arrays` (n < `rows` when the window is shorter): what
        a burst gathers from every pair to advance their indicators in one pass.
        """
        ring = self._rings.get((pair, timeframe))
        if ring is None:
            return np.zeros(0, dtype=np.int64), np.zeros((5, 0))
        return ring.tail(rows)

    def hlc_tail(
        self, pair: str, timeframe: str, n: int
    ) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray] | None:
        """Return the window's latest open time, its length, and its last `n` highs, lows, closes.

        As `arrays`, without the other columns (a stop's ATR per candle); views valid until
        the pair's next candle. None when the window is empty.
        """
        ring = self._rings.get((pair, timeframe))
        if ring is None or not ring.size:
            return None
        end = ring.size
        start = max(0, end - min(n, ring.capacity))
        v = ring.values
        return int(ring.ts[end - 1]), ring.length, v[1, start:end], v[2, start:end], v[3, start:end]

    def window_end(self, pair: str, timeframe: str) -> tuple[int, int] | None:
        """Return the window's latest open time and its length (None when it is empty).

        `hlc_tail`'s first two values, without its views: a key for what is computed from
        the window (a stop's ATR, asked again by the candle's risk context).
        """
        ring = self._rings.get((pair, timeframe))
        if ring is None or not ring.size:
            return None
        return int(ring.ts[ring.size - 1]), ring.length

    def size(self, pair: str, timeframe: str) -> int:
        """Return how many candles the pair's window holds (`len(arrays(...).ts)`)."""
        ring = self._rings.get((pair, timeframe))
        return 0 if ring is None else ring.length

    def last_ts(self, pair: str, timeframe: str) -> int | None:
        """Return the open time of the pair's latest closed candle."""
        ring = self._rings.get((pair, timeframe))
        return ring.last_ts if ring else None

    def pairs(self) -> Iterable[tuple[str, str]]:
        """Return the (pair, timeframe) keys held."""
        return self._rings.keys()

    def drop(self, pair: str) -> None:
        """Forget every window of a pair (it left the pair list and has no position)."""
        for key in [k for k in self._rings if k[0] == pair]:
            del self._rings[key]
        self.version += 1
        for akey in [k for k in self._aggregators if k[0] == pair]:
            del self._aggregators[akey]

    async def flush(self) -> int:
        """Archive the closed candles received since the last flush; return how many."""
        if self.store is None or not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        stored = 0
        for (pair, timeframe), candles in pending.items():
            ts, values = candles_to_arrays(candles)
            stored += await asyncio.to_thread(
                self.store.append, pair, timeframe, CandleArrays(ts, *values)
            )
        return stored


# -- Candlestick patterns --------------------------------------------------------------------


def detect_patterns(df: pd.DataFrame) -> pd.DataFrame:
    """Return one column per TA-Lib candlestick pattern (`cdlengulfing`...), -100/0/100.

    Delegates to `technical_indicators`, which owns the indicator library.
    """
    import technical_indicators

    result: pd.DataFrame = technical_indicators.detect_patterns(df)
    return result


def latest_patterns(df: pd.DataFrame, lookback: int = 3) -> list[dict[str, Any]]:
    """Return the patterns found on the last `lookback` candles, newest first.

    Each item is {"name", "label", "direction", "bars_ago", "ts"}, for strategies, the UI
    and `/why`; delegates to `technical_indicators.pattern_summary`.
    """
    import technical_indicators

    summary: list[dict[str, Any]] = technical_indicators.pattern_summary(df, lookback=lookback)
    return summary
