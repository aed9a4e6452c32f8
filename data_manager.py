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
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog

from error_handler import BotError, ConfigError, DataError, FatalError
from models import Candle, Trade
from utils.utilities import (
    Clock,
    WallClock,
    atomic_write,
    parse_date_ms,
    parse_timerange,
    retry_async,
    timeframe_to_ms,
)


if TYPE_CHECKING:
    import argparse

    import pyarrow as pa

    from config import Settings

log = structlog.get_logger(__name__)

OHLCV: Final = ("open", "high", "low", "close", "volume")
CSV_HEADER: Final = ("timestamp", *OHLCV)
KLINE_LIMIT: Final = 1000  # Bybit V5 /v5/market/kline returns at most 1000 rows per call
_WEEK_OFFSET_MS: Final = 4 * 86_400_000  # 1970-01-05 was a Monday: weeks start on Mondays

Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


# -- Normalisation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NormaliseReport:
    """What `normalise_frame` changed, row counts per reason.

    Every dropped row is counted exactly once: `rows_in == rows_out + dropped`.
    """

    rows_in: int
    rows_out: int
    dropped_nan: int = 0
    dropped_nonpositive: int = 0
    dropped_high_below_low: int = 0
    repaired_range: int = 0
    dropped_duplicates: int = 0
    dropped_off_grid: int = 0
    dropped_open: int = 0
    reordered: bool = False

    @property
    def dropped(self) -> int:
        """Return the number of rows dropped for any reason."""
        return (
            self.dropped_nan
            + self.dropped_nonpositive
            + self.dropped_high_below_low
            + self.dropped_duplicates
            + self.dropped_off_grid
            + self.dropped_open
        )

    @property
    def changed(self) -> bool:
        """Return True if any row was dropped, repaired or moved."""
        return self.rows_in != self.rows_out or self.repaired_range > 0 or self.reordered


class CandleArrays(NamedTuple):
    """Column arrays of a candle series: int64 ms open times and float64 OHLCV."""

    ts: Int64Array
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray


def ms_index(ts: Int64Array) -> pd.DatetimeIndex:
    """Return a `datetime64[ms, UTC]` index named `ts` for epoch-ms open times (no copy)."""
    values = np.ascontiguousarray(ts, dtype=np.int64).view("datetime64[ms]")
    return pd.DatetimeIndex(values, name="ts").tz_localize("UTC")


def index_ms(frame: pd.DataFrame) -> Int64Array:
    """Return a candle frame's open times as int64 epoch ms."""
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex):
        raise DataError("candle frame needs a DatetimeIndex")
    return np.asarray(index.as_unit("ms").asi8, dtype=np.int64)


def arrays_to_frame(arrays: CandleArrays) -> pd.DataFrame:
    """Return a candle frame built on the given arrays (no copy)."""
    data = dict(zip(OHLCV, arrays[1:], strict=True))
    return pd.DataFrame(data, index=ms_index(arrays.ts), copy=False)


def frame_to_arrays(frame: pd.DataFrame) -> CandleArrays:
    """Return a candle frame's columns as arrays (views where the frame allows)."""
    cols = [np.asarray(frame[name].to_numpy(), dtype=np.float64) for name in OHLCV]
    return CandleArrays(index_ms(frame), *cols)


def normalise_frame(
    df: pd.DataFrame, *, timeframe: str | None = None, now_ms: int | None = None
) -> tuple[pd.DataFrame, NormaliseReport]:
    """Return a clean candle frame and a report of what was repaired or dropped.

    Accepts a `timestamp` column (ms UTC) or a DatetimeIndex. Rows with NaN or infinite
    values, non-positive prices, negative volume or high < low are dropped; open/close
    outside [low, high] are repaired by widening the range to include them (the extreme
    print is real, the bar's range was truncated). Duplicated timestamps keep the last
    row (a stream's latest update of a bar wins); the frame is sorted. With `timeframe`,
    rows off the timeframe grid are dropped; with `now_ms` too, a candle that has not
    closed by `now_ms` (open time + timeframe > now) is dropped.

    Raises:
        DataError: when the frame has no timestamps or lacks an OHLCV column.
        ValueError: for `now_ms` without `timeframe`.
    """
    ts, ts_ok, values = _raw_columns(df)
    arrays, report = normalise_arrays(ts, values, ts_ok=ts_ok, timeframe=timeframe, now_ms=now_ms)
    if report.changed:
        log.warning("candles_normalised", **_report_fields(report))
    return arrays_to_frame(arrays), report


def _raw_columns(df: pd.DataFrame) -> tuple[Int64Array, npt.NDArray[np.bool_], FloatArray]:
    if "timestamp" in df.columns:
        raw_ts = df["timestamp"].to_numpy()
        if raw_ts.dtype.kind in "iu":
            ts = raw_ts.astype(np.int64, copy=False)
            ts_ok = np.ones(len(ts), dtype=bool)
        else:
            as_float = pd.to_numeric(df["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
            ts_ok = np.isfinite(as_float)
            ts = np.where(ts_ok, as_float, 0).astype(np.int64)
    elif isinstance(df.index, pd.DatetimeIndex):
        index = df.index if df.index.tz is not None else df.index.tz_localize("UTC")
        ts_ok = ~np.asarray(index.isna())
        ts = np.where(ts_ok, index.as_unit("ms").asi8, 0).astype(np.int64)
    else:
        raise DataError("candle frame needs a 'timestamp' column or a DatetimeIndex")
    missing = [c for c in OHLCV if c not in df.columns]
    if missing:
        raise DataError(f"candle frame lacks columns {missing}")
    values = np.empty((5, len(df)), dtype=np.float64)
    for row, name in enumerate(OHLCV):
        column = df[name]
        if column.dtype != np.float64:
            column = pd.to_numeric(column, errors="coerce")
        values[row] = column.to_numpy(dtype=np.float64, na_value=np.nan)
    return ts, ts_ok, values


def normalise_arrays(
    ts: Int64Array,
    values: FloatArray,
    *,
    ts_ok: npt.NDArray[np.bool_] | None = None,
    timeframe: str | None = None,
    now_ms: int | None = None,
) -> tuple[CandleArrays, NormaliseReport]:
    """Return clean candle arrays from raw open times and a (5, n) OHLCV block.

    The numpy core of `normalise_frame`, with the same rules, for callers that already
    hold arrays (backfill pages, archives). Does not log. When nothing needs changing the
    result may share memory with the input.
    """
    if now_ms is not None and timeframe is None:
        raise ValueError("now_ms needs a timeframe to know when a candle closes")
    rows_in = len(ts)
    o, h, lo, c, v = values
    keep = np.isfinite(values).all(axis=0)
    if ts_ok is not None:
        keep &= ts_ok
    dropped_nan = rows_in - int(keep.sum())
    with np.errstate(invalid="ignore"):
        bad = keep & ((values[:4] <= 0).any(axis=0) | (v < 0))
        dropped_nonpositive = int(bad.sum())
        keep &= ~bad
        bad = keep & (h < lo)
        dropped_high_below_low = int(bad.sum())
        keep &= ~bad
    # Work on row indices and gather the values once at the end: fancy-indexing the whole
    # (5, n) block at every step is what made this slow.
    whole = bool(keep.all())
    idx = np.arange(rows_in) if whole else np.flatnonzero(keep)
    kept_ts = ts if whole else ts[idx]
    reordered = bool(len(kept_ts) > 1 and (np.diff(kept_ts) < 0).any())
    if reordered:
        order = np.argsort(kept_ts, kind="stable")
        idx, kept_ts = idx[order], kept_ts[order]
    # Keep the last row of each run of equal timestamps.
    select = np.ones(len(kept_ts), dtype=bool)
    if len(kept_ts) > 1:
        select[:-1] = kept_ts[1:] != kept_ts[:-1]
    dropped_duplicates = len(kept_ts) - int(select.sum())
    dropped_off_grid = dropped_open = 0
    if timeframe is not None:
        step = timeframe_to_ms(timeframe)
        on_grid = select & ((kept_ts - _grid_offset(step)) % step == 0)
        dropped_off_grid = int(select.sum() - on_grid.sum())
        select = on_grid
        if now_ms is not None:
            closed = select & (kept_ts + step <= now_ms)
            dropped_open = int(select.sum() - closed.sum())
            select = closed
    if select.all() and whole and not reordered:
        out_ts, out = np.ascontiguousarray(ts), np.ascontiguousarray(values)
        copied = out is not values
    else:
        idx = idx[select]
        out_ts, out = kept_ts[select], np.take(values, idx, axis=1)
        copied = True
    o, h, lo, c, v = out
    body_lo, body_hi = np.minimum(o, c), np.maximum(o, c)
    out_of_range = (body_lo < lo) | (body_hi > h)
    repaired = int(out_of_range.sum())
    if repaired:
        out = out if copied else out.copy()
        np.minimum(out[2], body_lo, out=out[2])
        np.maximum(out[1], body_hi, out=out[1])
    report = NormaliseReport(
        rows_in=rows_in,
        rows_out=len(out_ts),
        dropped_nan=dropped_nan,
        dropped_nonpositive=dropped_nonpositive,
        dropped_high_below_low=dropped_high_below_low,
        repaired_range=repaired,
        dropped_duplicates=dropped_duplicates,
        dropped_off_grid=dropped_off_grid,
        dropped_open=dropped_open,
        reordered=reordered,
    )
    return CandleArrays(np.ascontiguousarray(out_ts), *out), report


def _grid_offset(step: int) -> int:
    # Weekly bars open on Mondays (Bybit, ccxt), not on the epoch's Thursday.
    return _WEEK_OFFSET_MS if step % 604_800_000 == 0 else 0


def bucket_start(ts: Int64Array, step: int) -> Int64Array:
    """Return the open time of the `step`-long bar holding each open time."""
    offset = _grid_offset(step)
    return ts - (ts - offset) % step


def _report_fields(report: NormaliseReport) -> dict[str, int | bool]:
    return {name: getattr(report, name) for name in NormaliseReport.__slots__}


def _is_clean(arrays: CandleArrays) -> bool:
    # Fast check for data we wrote ourselves: only a dirty file pays for a full normalise.
    ts, o, h, lo, c, v = arrays
    with np.errstate(invalid="ignore"):
        return bool(
            (len(ts) < 2 or (np.diff(ts) > 0).all())
            and np.isfinite(h).all()
            and np.isfinite(v).all()
            and (lo > 0).all()
            and (v >= 0).all()
            and (lo <= np.minimum(o, c)).all()
            and (h >= np.maximum(o, c)).all()
        )


# -- Files -----------------------------------------------------------------------------------

_READ_ERRORS: Final = (
    OSError,
    ValueError,
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    UnicodeDecodeError,
    pd.errors.ParserError,
)


def load_candles(path: Path | str, *, timeframe: str | None = None) -> pd.DataFrame:
    """Load a candle file (CSV, CSV.gz or Parquet) and return a normalised frame.

    Raises:
        DataError: when the file is missing, unreadable, or has no usable rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", path=str(path))
    try:
        raw = _read_parquet_any(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except _READ_ERRORS as e:
        raise DataError(f"cannot read data file {path}: {e}", path=str(path)) from e
    if "timestamp" not in raw.columns and not isinstance(raw.index, pd.DatetimeIndex):
        raise DataError(
            f"{path}: expected the header {','.join(CSV_HEADER)}, got {list(raw.columns)}",
            path=str(path),
        )
    frame, _ = normalise_frame(raw, timeframe=timeframe)
    if frame.empty:
        raise DataError(f"{path}: no usable candles", path=str(path))
    return frame


def _read_parquet_any(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if "ts" in names and all(c in names for c in OHLCV):
        return arrays_to_frame(_read_archive(path, None, None))
    raw = pd.read_parquet(path)
    if "timestamp" not in raw.columns and "date" in raw.columns:  # freqtrade's layout
        raw = raw.set_index(pd.DatetimeIndex(raw.pop("date")))
    return raw


def frame_to_candles(frame: pd.DataFrame, pair: str, timeframe: str) -> list[Candle]:
    """Return the frame's rows as closed `Candle`s."""
    ts = index_ms(frame).tolist()
    cols = [frame[name].to_numpy(dtype=np.float64).tolist() for name in OHLCV]
    return [
        Candle(pair, timeframe, t, o, h, lo, c, v)
        for t, o, h, lo, c, v in zip(ts, *cols, strict=True)
    ]


def candles_to_arrays(candles: Sequence[Candle]) -> tuple[Int64Array, FloatArray]:
    """Return candles' open times and a (5, n) OHLCV block, as given (not normalised)."""
    n = len(candles)
    # One generator per attribute: about 3x faster than getattr(c, name) in a loop.
    values = np.empty((5, n), dtype=np.float64)
    values[0] = np.fromiter((c.open for c in candles), np.float64, n)
    values[1] = np.fromiter((c.high for c in candles), np.float64, n)
    values[2] = np.fromiter((c.low for c in candles), np.float64, n)
    values[3] = np.fromiter((c.close for c in candles), np.float64, n)
    values[4] = np.fromiter((c.volume for c in candles), np.float64, n)
    return np.fromiter((c.ts for c in candles), np.int64, n), values


def candles_to_frame(candles: Sequence[Candle]) -> pd.DataFrame:
    """Return candles as a (not yet normalised) frame with a `timestamp` column."""
    ts, values = candles_to_arrays(candles)
    return pd.DataFrame({"timestamp": ts, **dict(zip(OHLCV, values, strict=True))})


def export_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write a candle frame in the sample format (gzip when the name ends in .gz).

    The header is `timestamp,open,high,low,close,volume` with `timestamp` in epoch ms;
    the file is written atomically.
    """
    path = Path(path)
    out = pd.DataFrame({"timestamp": index_ms(frame)})
    for name in OHLCV:
        out[name] = frame[name].to_numpy(dtype=np.float64)
    text = out.to_csv(index=False, lineterminator="\n")  # repr floats: exact round trip
    raw = text.encode("utf-8")
    atomic_write(path, gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)
    return path


def pair_to_filename(pair: str) -> str:
    """Return the file-name form of a pair: 'BTC/USDT' -> 'BTC-USDT' (settle dropped)."""
    return pair.split(":")[0].replace("/", "-")


def filename_to_pair(name: str) -> str:
    """Return the pair for a file-name form: 'BTC-USDT' -> 'BTC/USDT'."""
    return name.replace("-", "/", 1)


# Which bundled file serves a pair/timeframe in a replay, first match wins.
_SAMPLE_PREFIXES: Final = ("bybit", "bybitlinear", "binance", "coinbase", "bittrex")


def sample_file(sample_dir: Path, pair: str, timeframe: str) -> Path:
    """Return the bundled sample file for a pair and timeframe.

    Raises:
        DataError: when no sample covers it (the message lists what is bundled).
    """
    name = pair_to_filename(pair)
    for prefix in _SAMPLE_PREFIXES:
        candidate = sample_dir / f"{prefix}_{name}_{timeframe}.csv.gz"
        if candidate.is_file():
            return candidate
    bundled = sorted(p.name for p in sample_dir.glob("*.csv.gz"))
    raise DataError(
        f"no bundled sample for {pair} {timeframe}; bundled: {', '.join(bundled)}",
        pair=pair,
    )


# -- Gaps ------------------------------------------------------------------------------------


def find_gaps(ts: Int64Array, timeframe: str) -> list[tuple[int, int]]:
    """Return the missing stretches inside a sorted series as half-open [start, end) ms.

    A gap is a run of grid timestamps between two present candles; a market with no
    trades in a minute legitimately has one, so callers decide what a gap means.
    """
    return missing_ranges(ts, timeframe, None, None)


def missing_ranges(
    ts: Int64Array, timeframe: str, start_ms: int | None, end_ms: int | None
) -> list[tuple[int, int]]:
    """Return the grid stretches of [start_ms, end_ms) that `ts` (sorted) does not hold.

    `None` bounds mean "from the first" / "to the last" candle held, so only interior
    gaps are returned.
    """
    step = timeframe_to_ms(timeframe)
    ts = np.asarray(ts, dtype=np.int64)
    lo = int(ts[0]) if start_ms is None and len(ts) else start_ms
    hi = int(ts[-1]) + step if end_ms is None and len(ts) else end_ms
    if lo is None or hi is None or lo >= hi:
        return []
    lo = _ceil_to_grid(lo, step)
    inside = ts[(ts >= lo) & (ts < hi)]
    if len(inside) == 0:
        return [(lo, hi)] if lo < hi else []
    # Sentinels one step before the start and at the end turn head and tail into gaps too.
    edges = np.concatenate(([lo - step], inside, [_ceil_to_grid(hi, step)]))
    holes = np.flatnonzero(np.diff(edges) > step)
    return [(int(edges[i]) + step, min(int(edges[i + 1]), hi)) for i in holes]


def _ceil_to_grid(ts: int, step: int) -> int:
    offset = _grid_offset(step)
    return -((-(ts - offset)) // step) * step + offset


def _subtract(
    ranges: Iterable[tuple[int, int]], holes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        pieces = [(start, end)]
        for h_start, h_end in holes:
            pieces = [
                piece
                for a, b in pieces
                for piece in ((a, min(b, h_start)), (max(a, h_end), b))
                if piece[0] < piece[1]
            ]
        out.extend(pieces)
    return out


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# -- Storage ---------------------------------------------------------------------------------

_ROW_GROUP: Final = 131_072  # ~3 months of 1m bars: lets time-range loads skip row groups


def _atomic_parquet(table: pa.Table, path: Path, **options: Any) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", **options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_archive(path: Path, arrays: CandleArrays, meta: Mapping[str, str]) -> None:
    import pyarrow as pa

    schema = pa.schema(
        [("ts", pa.int64()), *((name, pa.float64()) for name in OHLCV)],
        metadata={b"kestrel": json.dumps(dict(meta)).encode()},
    )
    table = pa.Table.from_arrays([pa.array(a) for a in arrays], schema=schema)
    # No dictionaries (prices rarely repeat; trying costs time), delta-encoded times (a
    # regular grid packs to almost nothing). zstd decompression dominates a load: measured
    # ~60 ms for 1M candles, where byte-stream-split floats and plain times were slower.
    _atomic_parquet(
        table,
        path,
        row_group_size=_ROW_GROUP,
        use_dictionary=False,
        column_encoding={"ts": "DELTA_BINARY_PACKED"},
    )


def _read_archive(path: Path, start_ms: int | None, end_ms: int | None) -> CandleArrays:
    import pyarrow.parquet as pq

    filters: list[tuple[str, str, int]] = []
    if start_ms is not None:
        filters.append(("ts", ">=", int(start_ms)))
    if end_ms is not None:
        filters.append(("ts", "<", int(end_ms)))
    try:
        table = pq.read_table(path, columns=["ts", *OHLCV], filters=filters or None)
    except _READ_ERRORS as e:
        raise DataError(f"cannot read archive {path}: {e}", path=str(path)) from e
    cols = [table.column(name).to_numpy() for name in ("ts", *OHLCV)]
    arrays = CandleArrays(*cols)
    # Our own archives are normalised before every write; anything else is checked.
    ours = b"kestrel" in (table.schema.metadata or {})
    if not ours and not _is_clean(arrays):
        arrays, report = normalise_arrays(arrays.ts, np.vstack(arrays[1:]))
        log.warning("archive_normalised", path=str(path), **_report_fields(report))
    return arrays


class CandleStore:
    """Parquet archives of one exchange's candles and trades under `data_dir`.

    Candles: `<data_dir>/ohlcv/<exchange>/<BASE-QUOTE>/<timeframe>.parquet`; trades:
    `<data_dir>/ticks/<exchange>/<BASE-QUOTE>/<YYYY-MM-DD>.parquet`. Appends merge with
    what is stored (a candle already archived is never stored twice) and replace the file
    atomically. Not safe for two writers of the same archive at once; one process owns it.
    """

    def __init__(self, data_dir: Path | str, exchange: str = "bybit") -> None:
        self.data_dir = Path(data_dir)
        self.exchange = exchange

    # -- Candles -----------------------------------------------------------------------------

    def path(self, pair: str, timeframe: str) -> Path:
        """Return the archive path of a pair and timeframe."""
        return (
            self.data_dir
            / "ohlcv"
            / self.exchange
            / pair_to_filename(pair)
            / f"{timeframe}.parquet"
        )

    def has(self, pair: str, timeframe: str) -> bool:
        """Return True if an archive exists for the pair and timeframe."""
        return self.path(pair, timeframe).is_file()

    def load_arrays(
        self, pair: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> CandleArrays:
        """Return archived candles with start_ms <= ts < end_ms as arrays (empty if none)."""
        path = self.path(pair, timeframe)
        if not path.is_file():
            return _empty_arrays()
        return _read_archive(path, start_ms, end_ms)

    def load(
        self, pair: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> pd.DataFrame:
        """Return archived candles with start_ms <= ts < end_ms as a candle frame."""
        return arrays_to_frame(self.load_arrays(pair, timeframe, start_ms, end_ms))

    def load_ts(self, pair: str, timeframe: str) -> Int64Array:
        """Return only the archived open times (cheap: one column is read)."""
        import pyarrow.parquet as pq

        path = self.path(pair, timeframe)
        if not path.is_file():
            return np.empty(0, dtype=np.int64)
        try:
            ts = pq.read_table(path, columns=["ts"]).column("ts").to_numpy()
        except _READ_ERRORS as e:
            raise DataError(f"cannot read archive {path}: {e}", path=str(path)) from e
        return np.asarray(ts, dtype=np.int64)

    def span(self, pair: str, timeframe: str) -> tuple[int, int] | None:
        """Return (first, last) archived open time from the file's statistics, or None."""
        import pyarrow.parquet as pq

        path = self.path(pair, timeframe)
        if not path.is_file():
            return None
        try:
            meta = pq.ParquetFile(path).metadata
        except _READ_ERRORS as e:
            raise DataError(f"cannot read archive {path}: {e}", path=str(path)) from e
        stats = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
        known = [s for s in stats if s is not None and s.has_min_max]
        if not known:
            return None
        return int(min(s.min for s in known)), int(max(s.max for s in known))

    def append(self, pair: str, timeframe: str, frame: pd.DataFrame | CandleArrays) -> int:
        """Merge candles into the archive and return how many new ones were stored.

        Candles already archived win over incoming ones with the same open time: a stored
        candle was closed when it was written, so it is final.
        """
        new = frame if isinstance(frame, CandleArrays) else frame_to_arrays(frame)
        new, _ = normalise_arrays(new.ts, np.vstack(new[1:]), timeframe=timeframe)
        path = self.path(pair, timeframe)
        old = _read_archive(path, None, None) if path.is_file() else _empty_arrays()
        # Both sides are unique after normalisation, which lets isin use its sort-merge path.
        fresh = ~np.isin(new.ts, old.ts, assume_unique=True)
        added = int(fresh.sum())
        if added == 0:
            return 0
        ts = np.concatenate((old.ts, new.ts[fresh]))
        order = np.argsort(ts, kind="stable")
        merged = CandleArrays(
            ts[order],
            *(np.concatenate((a, b[fresh]))[order] for a, b in zip(old[1:], new[1:], strict=True)),
        )
        meta = {"exchange": self.exchange, "pair": pair, "timeframe": timeframe}
        _write_archive(path, merged, meta)
        log.debug("archive_appended", pair=pair, timeframe=timeframe, added=added, rows=len(ts))
        return added

    def pairs(self, timeframe: str) -> list[str]:
        """Return the pairs that have an archive for `timeframe`."""
        root = self.data_dir / "ohlcv" / self.exchange
        if not root.is_dir():
            return []
        return sorted(
            filename_to_pair(d.name)
            for d in root.iterdir()
            if (d / f"{timeframe}.parquet").is_file()
        )

    def import_csv(self, source: Path | str, pair: str, timeframe: str) -> int:
        """Import a candle CSV (sample format) into the archive; return candles added."""
        return self.append(pair, timeframe, load_candles(source, timeframe=timeframe))

    def export_csv(
        self,
        pair: str,
        timeframe: str,
        target: Path | str,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Path:
        """Write archived candles to a CSV in the sample format."""
        return export_csv(self.load(pair, timeframe, start_ms, end_ms), target)

    # Ranges confirmed to have no candles (no trades), so backfill does not ask again.
    def _empty_path(self, pair: str, timeframe: str) -> Path:
        return self.path(pair, timeframe).with_suffix(".empty.json")

    def empty_ranges(self, pair: str, timeframe: str) -> list[tuple[int, int]]:
        """Return the [start, end) ranges the exchange confirmed to hold no candles."""
        path = self._empty_path(pair, timeframe)
        if not path.is_file():
            return []
        try:
            return [(int(a), int(b)) for a, b in json.loads(path.read_text("utf-8"))]
        except (ValueError, TypeError) as e:
            log.warning("empty_ranges_unreadable", path=str(path), error=str(e))
            return []

    def add_empty_ranges(
        self, pair: str, timeframe: str, ranges: Iterable[tuple[int, int]]
    ) -> None:
        """Remember ranges confirmed empty (merged with those already known)."""
        ranges = list(ranges)
        if ranges:
            merged = _merge([*self.empty_ranges(pair, timeframe), *ranges])
            atomic_write(self._empty_path(pair, timeframe), json.dumps(merged))

    # -- Trades ------------------------------------------------------------------------------

    def trades_path(self, pair: str, day: str) -> Path:
        """Return the tick file of a pair for one UTC day ('YYYY-MM-DD')."""
        return self.data_dir / "ticks" / self.exchange / pair_to_filename(pair) / f"{day}.parquet"

    def save_trades(self, trades: Iterable[Trade]) -> int:
        """Store trades per pair and UTC day and return how many were new.

        A trade already stored (same trade id, or same time, price, size and side when
        the id is empty) is not stored again.
        """
        groups: dict[tuple[str, str], list[Trade]] = {}
        for trade in trades:
            day = datetime.fromtimestamp(trade.ts / 1000, tz=UTC).strftime("%Y-%m-%d")
            groups.setdefault((trade.pair, day), []).append(trade)
        added = 0
        for (pair, day), items in groups.items():
            added += self._merge_trades(self.trades_path(pair, day), items)
        return added

    def _merge_trades(self, path: Path, trades: list[Trade]) -> int:
        import pyarrow as pa

        new = pd.DataFrame(
            {
                "ts": np.fromiter((t.ts for t in trades), np.int64, len(trades)),
                "price": np.fromiter((t.price for t in trades), np.float64, len(trades)),
                "qty": np.fromiter((t.qty for t in trades), np.float64, len(trades)),
                "side": [str(t.side) for t in trades],
                "trade_id": [t.trade_id for t in trades],
            }
        )
        old = pd.read_parquet(path) if path.is_file() else new.iloc[:0]
        merged = pd.concat([old, new], ignore_index=True)
        key = merged["trade_id"].where(
            merged["trade_id"] != "",
            merged["ts"].astype(str)
            + ":"
            + merged["price"].astype(str)
            + ":"
            + merged["qty"].astype(str)
            + ":"
            + merged["side"],
        )
        merged = merged[~key.duplicated(keep="first")].sort_values("ts", kind="stable")
        added = len(merged) - len(old)
        if added:
            _atomic_parquet(pa.Table.from_pandas(merged, preserve_index=False), path)
        return added

    def load_trades(
        self, pair: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> pd.DataFrame:
        """Return stored trades with start_ms <= ts < end_ms, indexed by time (ms UTC)."""
        folder = self.trades_path(pair, "x").parent
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        first = _day(start_ms) if start_ms is not None else ""
        last = _day(end_ms - 1) if end_ms is not None else "~"
        parts = [pd.read_parquet(f) for f in files if first <= f.stem <= last]
        columns = {"price": "float64", "qty": "float64", "side": "str", "trade_id": "str"}
        if not parts:
            return pd.DataFrame(
                {k: pd.Series(dtype=v) for k, v in columns.items()},
                index=ms_index(np.empty(0, np.int64)),
            )
        trades = pd.concat(parts, ignore_index=True)
        ts = trades.pop("ts").to_numpy(dtype=np.int64)
        mask = np.ones(len(ts), dtype=bool)
        if start_ms is not None:
            mask &= ts >= start_ms
        if end_ms is not None:
            mask &= ts < end_ms
        trades = trades[mask]
        trades.index = ms_index(ts[mask])
        return trades


def _day(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d")


def _empty_arrays() -> CandleArrays:
    return CandleArrays(np.empty(0, np.int64), *(np.empty(0, np.float64) for _ in OHLCV))


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

    __slots__ = ("capacity", "size", "ts", "values")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Twice the capacity so appends are amortised O(1) memmoves, not per-candle copies;
        # one contiguous row per column so `arrays()` hands out contiguous views.
        self.ts = np.zeros(capacity * 2, dtype=np.int64)
        self.values = np.zeros((5, capacity * 2), dtype=np.float64)
        self.size = 0

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

    def arrays(self) -> CandleArrays:
        start = max(0, self.size - self.capacity)
        end = self.size
        v = self.values
        return CandleArrays(
            self.ts[start:end], v[0, start:end], v[1, start:end], v[2, start:end],
            v[3, start:end], v[4, start:end],
        )  # fmt: skip


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
        if self.store is not None:
            self._pending.setdefault(key, []).append(candle)
        targets = self._higher.get(candle.timeframe)
        if targets:
            self._build_higher(candle, targets)
        return True

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


# -- Backfill --------------------------------------------------------------------------------


class CandleSource(Protocol):
    """What backfill needs from an exchange: closed candles by time (`exchange.Exchange`)."""

    async def fetch_ohlcv(
        self,
        pair: str,
        timeframe: str,
        since: int | None = None,
        limit: int | None = None,
        until: int | None = None,
    ) -> list[Candle]:
        """Return closed candles with ts >= since, oldest first, at most `limit`."""
        ...


@dataclass(frozen=True, slots=True)
class PairBackfill:
    """What backfill did for one pair."""

    pair: str
    requests: int = 0
    fetched: int = 0
    stored: int = 0
    dropped: int = 0
    gaps_found: int = 0
    empty_ranges: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BackfillReport:
    """What backfill did, per pair."""

    timeframe: str
    since_ms: int
    until_ms: int
    pairs: tuple[PairBackfill, ...]

    @property
    def stored(self) -> int:
        """Return the number of candles newly archived across pairs."""
        return sum(p.stored for p in self.pairs)

    @property
    def requests(self) -> int:
        """Return the number of exchange calls made."""
        return sum(p.requests for p in self.pairs)

    @property
    def ok(self) -> bool:
        """Return True when every pair finished without error."""
        return all(p.error is None for p in self.pairs)


@dataclass(slots=True)
class _PairJob:
    pair: str
    ranges: list[tuple[int, int]]
    archive_end: int  # one step past the last archived candle (0 if none)
    stats: dict[str, int] = field(default_factory=dict)
    buffer: list[Candle] = field(default_factory=list)
    empties: list[tuple[int, int]] = field(default_factory=list)


class _Backfill:
    """One backfill run: plans the missing ranges per pair and pages through them."""

    def __init__(
        self,
        exchange: CandleSource,
        store: CandleStore,
        timeframe: str,
        start: int,
        end: int,
        now: int,
        *,
        page_limit: int,
        flush_every: int,
        attempts: int,
        progress: Any,
    ) -> None:
        self.exchange, self.store, self.timeframe = exchange, store, timeframe
        self.step = timeframe_to_ms(timeframe)
        self.start, self.end, self.now = start, end, now
        self.page_limit, self.flush_every, self.attempts = page_limit, flush_every, attempts
        self.progress = progress

    def plan(self, pair: str) -> _PairJob:
        ts = self.store.load_ts(pair, self.timeframe)
        wanted = missing_ranges(ts, self.timeframe, self.start, self.end)
        known_empty = self.store.empty_ranges(pair, self.timeframe)
        job = _PairJob(
            pair, _subtract(wanted, known_empty), int(ts[-1]) + self.step if len(ts) else 0
        )
        # Interior gaps only: the head before the first candle and the tail after the last
        # are history not yet fetched, not holes.
        job.stats["gaps_found"] = sum(
            1 for a, b in job.ranges if len(ts) and a > ts[0] and b <= ts[-1]
        )
        return job

    async def run(self, job: _PairJob) -> PairBackfill:
        total = sum((b - a) // self.step for a, b in job.ranges)
        task = self.progress.add_task(job.pair, total=total)
        error: str | None = None
        try:
            for start, end in job.ranges:
                await self._fill_range(job, start, end, task)
        except FatalError:
            raise
        except BotError as e:
            error = f"{type(e).__name__}: {e}"
            log.error("backfill_failed", **{**e.describe(), "pair": job.pair})
        finally:
            await self._flush(job)
            self.store.add_empty_ranges(job.pair, self.timeframe, job.empties)
        span = self.store.span(job.pair, self.timeframe)
        return PairBackfill(
            job.pair,
            requests=job.stats.get("requests", 0),
            fetched=job.stats.get("fetched", 0),
            stored=job.stats.get("stored", 0),
            dropped=job.stats.get("dropped", 0),
            gaps_found=job.stats.get("gaps_found", 0),
            empty_ranges=len(job.empties),
            first_ts=span[0] if span else None,
            last_ts=span[1] if span else None,
            error=error,
        )

    async def _fill_range(self, job: _PairJob, start: int, end: int, task: Any) -> None:
        # Works with either kline semantics: "the next `limit` candles from since" (Bybit's
        # REST) and "the candles in [since, since + limit steps)" (exchange.Exchange). An
        # empty window is skipped, not taken as the end, and counts as a stretch without
        # trades only once a later candle proves the market was trading after it.
        cursor = start
        empty_from: int | None = None
        later = job.archive_end > end  # the archive already holds candles after the range
        while cursor < end:
            limit = min(self.page_limit, (end - cursor) // self.step)
            fetch = functools.partial(
                self.exchange.fetch_ohlcv, job.pair, self.timeframe, since=cursor, limit=limit
            )
            candles = await retry_async(fetch, attempts=self.attempts)
            job.stats["requests"] = job.stats.get("requests", 0) + 1
            job.stats["fetched"] = job.stats.get("fetched", 0) + len(candles)
            page = sorted((c for c in candles if cursor <= c.ts < end), key=lambda c: c.ts)
            if not page:
                if any(c.ts >= end for c in candles):
                    later = True  # the exchange skipped past the range: nothing left in it
                    break
                empty_from = cursor if empty_from is None else empty_from
                self.progress.advance(task, limit)
                cursor += limit * self.step
                continue
            hole_from = cursor if empty_from is None else empty_from
            empty_from = None
            edges = [hole_from - self.step, *(c.ts for c in page)]
            job.empties.extend(
                (a + self.step, b) for a, b in itertools.pairwise(edges) if b - a > self.step
            )
            job.buffer.extend(page)
            new_cursor = page[-1].ts + self.step
            self.progress.advance(task, (new_cursor - cursor) // self.step)
            cursor = new_cursor
            if len(job.buffer) >= self.flush_every:
                await self._flush(job)
        if cursor < end:
            self.progress.advance(task, (end - cursor) // self.step)
            empty_from = cursor if empty_from is None else empty_from
        if empty_from is not None and later:
            job.empties.append((empty_from, end))

    async def _flush(self, job: _PairJob) -> None:
        if not job.buffer:
            return
        candles, job.buffer = job.buffer, []
        closed = [c for c in candles if c.closed]
        ts, values = candles_to_arrays(closed)
        arrays, report = normalise_arrays(ts, values, timeframe=self.timeframe, now_ms=self.now)
        job.stats["dropped"] = (
            job.stats.get("dropped", 0) + report.dropped + len(candles) - len(closed)
        )
        if report.changed:
            log.warning("backfill_normalised", pair=job.pair, **_report_fields(report))
        stored = await asyncio.to_thread(self.store.append, job.pair, self.timeframe, arrays)
        job.stats["stored"] = job.stats.get("stored", 0) + stored


class _NoProgress:
    def add_task(self, description: str, total: int) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        return None


async def backfill(
    exchange: CandleSource,
    store_dir: Path | str | CandleStore,
    pairs: Sequence[str],
    timeframe: str,
    since_ms: int,
    *,
    until_ms: int | None = None,
    progress: bool = True,
    exchange_name: str = "bybit",
    clock: Clock | None = None,
    page_limit: int = KLINE_LIMIT,
    flush_every: int = 200_000,
    concurrency: int = 4,
    attempts: int = 1,
) -> BackfillReport:
    """Download closed candles for `pairs` into the Parquet archives under `store_dir`.

    Fetches every grid time in [since_ms, until_ms) (until defaults to the open candle,
    which is never stored) that the archive lacks: the stretch before the first archived
    candle, gaps inside the archive and the tail after its last candle, so a rerun
    resumes where the last one stopped and refills holes. Stretches the exchange
    confirms empty (later candles exist, none there: no trades) are remembered beside
    the archive and not asked again. Candles go through `normalise_arrays` and are
    flushed every `flush_every` candles and on exit, even when cancelled. A pair whose
    calls keep failing is reported with its error; a `FatalError` stops the run.
    `exchange.Exchange` retries its own calls; `attempts` > 1 adds retries (with backoff)
    for a source that does not.
    """
    store = (
        store_dir if isinstance(store_dir, CandleStore) else CandleStore(store_dir, exchange_name)
    )
    step = timeframe_to_ms(timeframe)
    now = (clock or WallClock()).now_ms()
    end = now - (now - _grid_offset(step)) % step  # the open candle's ts: exclusive bound
    if until_ms is not None:
        end = min(end, _ceil_to_grid(until_ms, step))
    start = _ceil_to_grid(since_ms, step)
    with _progress_bar(progress) as bar:
        run = _Backfill(
            exchange, store, timeframe, start, end, now,
            page_limit=page_limit, flush_every=flush_every, attempts=attempts, progress=bar,
        )  # fmt: skip
        limiter = asyncio.Semaphore(concurrency)

        async def one(pair: str) -> PairBackfill:
            async with limiter:
                return await run.run(await asyncio.to_thread(run.plan, pair))

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(pair), name=f"backfill:{pair}") for pair in pairs]
    report = BackfillReport(timeframe, start, end, tuple(t.result() for t in tasks))
    log.info(
        "backfill_done",
        timeframe=timeframe,
        pairs=len(pairs),
        stored=report.stored,
        requests=report.requests,
        ok=report.ok,
    )
    return report


class _progress_bar:  # used like a function: `with _progress_bar(on) as bar`
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._rich: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return _NoProgress()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._rich = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._rich.__enter__()
        return self._rich

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)


async def run_backfill_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Run `--mode backfill`: archive `--pairs` at `--timeframe` from `--since`.

    `--timerange` may bound the end (its right side). Returns 0 when every pair
    finished, 1 otherwise.

    Raises:
        ConfigError: without `--since` or with a malformed date.
    """
    pairs = list(settings.strategy.pairs)
    timeframe = settings.strategy.timeframe
    since_text = getattr(args, "since", None)
    if not since_text:
        raise ConfigError("--mode backfill needs --since, e.g. --since 2024-01-01")
    try:
        since_ms = parse_date_ms(since_text)
        until_ms = None
        if getattr(args, "timerange", None):
            until_ms = parse_timerange(args.timerange)[1]
    except ValueError as e:
        raise ConfigError(f"backfill: {e}") from e
    from exchange import Exchange

    async with Exchange(settings.exchange) as exchange:
        report = await backfill(
            exchange,
            settings.storage.data_dir,
            pairs,
            timeframe,
            since_ms,
            until_ms=until_ms,
            exchange_name=settings.exchange.name,
        )
    _print_backfill(report)
    return 0 if report.ok else 1


def _print_backfill(report: BackfillReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Backfill {report.timeframe}")
    for column in ("pair", "stored", "requests", "gaps", "empty", "first", "last", "error"):
        table.add_column(column)
    for p in report.pairs:
        table.add_row(
            p.pair,
            str(p.stored),
            str(p.requests),
            str(p.gaps_found),
            str(p.empty_ranges),
            _iso(p.first_ts),
            _iso(p.last_ts),
            p.error or "",
        )
    Console().print(table)


def _iso(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
