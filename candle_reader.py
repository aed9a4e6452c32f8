"""Chunked candle reading: files and archives become compact arrays a chunk at a time.

A candle file (CSV, CSV.gz, Parquet) or archive is read in chunks of `chunk_rows` rows
(Parquet batches, CSV chunks). Each chunk passes the checks that need no other row (NaN,
non-positive prices, high < low) and only its good rows are kept, as int64 open times and
float64 OHLCV; the last step (order, duplicates, the timeframe grid, ranges) runs once over
those compact arrays. So the result, and the report of what was dropped, are those of a
whole-file `normalise_frame`, while the peak holds the candles once plus one chunk: no
whole-file pandas or Arrow copy, no object columns. Part of `data_manager`.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd
import structlog

from candle_frames import (
    OHLCV,
    CandleArrays,
    FloatArray,
    Int64Array,
    NormaliseReport,
    _grid_offset,
    _repair_ranges,
    normalise_arrays,
    raw_columns,
    report_fields,
    row_checks,
)
from error_handler import DataError
from utils.utilities import timeframe_to_ms


if TYPE_CHECKING:
    import numpy.typing as npt
    import pyarrow as pa


# Events keep the logger they had before data_manager was split.
log = structlog.get_logger("data_manager")

DEFAULT_CHUNK_ROWS: Final = 131_072  # one archive row group: ~6 MB of candles per chunk
CSV_HEADER: Final = ("timestamp", *OHLCV)

READ_ERRORS: Final = (
    OSError,
    ValueError,
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    UnicodeDecodeError,
    pd.errors.ParserError,
)

RawChunk = tuple["Int64Array", "npt.NDArray[np.bool_] | None", "FloatArray"]


class _Collector:
    """Compact chunks of good rows, and the row-local drops counted on the way.

    With a `capacity` (a Parquet file's row count) the rows go straight into arrays of
    that size; without one (CSV) each chunk's rows are kept apart and joined at the end.
    The boundary state (the last open time) is carried from chunk to chunk, so a file
    already in order and on the `timeframe` grid needs no whole-file pass at the end.
    """

    def __init__(self, capacity: int | None = None, timeframe: str | None = None) -> None:
        self.last_ts: int | None = None
        self.ordered = True  # strictly increasing open times so far: no reorder, no duplicate
        self.on_grid = True
        self.step = timeframe_to_ms(timeframe) if timeframe is not None else None
        self.ts: list[Int64Array] = []
        self.values: list[FloatArray] = []
        self.rows_in = 0
        self.drops = (0, 0, 0)
        self.filled = 0
        self.buffered = 0  # rows written into `buffers`
        self.buffers: tuple[Int64Array, FloatArray] | None = None
        if capacity is not None:
            self.buffers = np.empty(capacity, np.int64), np.empty((5, capacity), np.float64)

    def add(self, ts: Int64Array, ts_ok: npt.NDArray[np.bool_] | None, values: FloatArray) -> None:
        keep, drops = row_checks(values, ts_ok)
        self.rows_in += len(ts)
        self.drops = tuple(a + b for a, b in zip(self.drops, drops, strict=True))  # type: ignore[assignment]
        if not keep.all():
            ts, values = np.asarray(ts)[keep], values[:, keep]
        self.put(ts, values)

    def put(self, ts: Int64Array, values: FloatArray) -> None:
        at, n = self.filled, len(ts)
        if n:
            self._track(ts)
        if self.buffers is not None and at + n <= len(self.buffers[0]):
            self.buffers[0][at : at + n] = ts
            self.buffers[1][:, at : at + n] = values
            self.buffered = at + n
        else:
            # Own copies: a view would keep the chunk's whole buffer alive.
            self.ts.append(np.array(ts, dtype=np.int64))
            self.values.append(np.array(values, dtype=np.float64))
        self.filled = at + n

    def _track(self, ts: Int64Array) -> None:
        if self.ordered:
            after_last = self.last_ts is None or int(ts[0]) > self.last_ts
            self.ordered = after_last and bool((ts[1:] > ts[:-1]).all())
        self.last_ts = int(ts[-1])
        if self.step is not None and self.on_grid:
            self.on_grid = bool(((ts - _grid_offset(self.step)) % self.step == 0).all())

    def concatenate(self) -> tuple[Int64Array, FloatArray]:
        if self.buffers is not None and not self.ts:
            ts, block = self.buffers
            self.buffers = None
            if self.filled == len(ts):
                return ts, block
            # Rows were dropped: a compact copy, so the (5, n) block stays contiguous.
            return ts[: self.filled].copy(), block[:, : self.filled].copy()
        if self.buffers is not None:  # more rows than the file said: join all
            ts, block = self.buffers
            self.ts.insert(0, ts[: self.buffered])
            self.values.insert(0, block[:, : self.buffered])
            self.buffers = None
        n = sum(len(t) for t in self.ts)
        ts = np.empty(n, dtype=np.int64)
        block = np.empty((5, n), dtype=np.float64)
        at = 0
        # Each chunk is released once copied: the candles are held once, plus a chunk.
        self.ts.reverse()
        self.values.reverse()
        while self.ts:
            part, values = self.ts.pop(), self.values.pop()
            ts[at : at + len(part)] = part
            block[:, at : at + len(part)] = values
            at += len(part)
        return ts, block

    def finish(self, timeframe: str | None) -> tuple[CandleArrays, NormaliseReport]:
        ts, block = self.concatenate()
        if self.ordered and (self.on_grid or timeframe is None):
            # Nothing left to drop or move: only the ranges, window by window in place, so
            # no whole-file temporaries (the whole pass costs ~35 bytes a candle).
            repaired, window = 0, DEFAULT_CHUNK_ROWS
            for start in range(0, len(ts), window):
                repaired += _repair_ranges(block[:, start : start + window], copied=True)[1]
            dropped_nan, dropped_nonpositive, dropped_high_below_low = self.drops
            report = NormaliseReport(
                rows_in=self.rows_in,
                rows_out=len(ts),
                dropped_nan=dropped_nan,
                dropped_nonpositive=dropped_nonpositive,
                dropped_high_below_low=dropped_high_below_low,
                repaired_range=repaired,
            )
            return CandleArrays(ts, *block), report
        arrays, report = normalise_arrays(ts, block, timeframe=timeframe)
        # The row-local drops happened chunk by chunk; the last pass found none left.
        dropped_nan, dropped_nonpositive, dropped_high_below_low = self.drops
        report = dataclasses.replace(
            report,
            rows_in=self.rows_in,
            dropped_nan=dropped_nan,
            dropped_nonpositive=dropped_nonpositive,
            dropped_high_below_low=dropped_high_below_low,
        )
        return arrays, report


def read_candles(
    path: Path | str, *, timeframe: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[CandleArrays, NormaliseReport]:
    """Return a candle file's normalised arrays, read `chunk_rows` rows at a time.

    The same candles and report as `normalise_frame` over the whole file (a test compares
    them with dirty rows across chunk boundaries). Logs `candles_normalised` when rows
    were dropped, repaired or moved.

    Raises:
        DataError: when the file is missing, unreadable, lacks the candle columns, or has
            no usable rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", path=str(path))
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    try:
        parquet = path.suffix == ".parquet"
        collector = _Collector(_parquet_rows(path) if parquet else None, timeframe)
        chunks = _parquet_chunks(path, chunk_rows) if parquet else _csv_chunks(path, chunk_rows)
        for ts, ts_ok, values in chunks:
            collector.add(ts, ts_ok, values)
    except READ_ERRORS as e:
        raise DataError(f"cannot read data file {path}: {e}", path=str(path)) from e
    finally:
        release_arrow_memory()
    arrays, report = collector.finish(timeframe)
    if report.changed:
        log.warning("candles_normalised", path=str(path), **report_fields(report))
    if len(arrays.ts) == 0:
        raise DataError(f"{path}: no usable candles", path=str(path))
    return arrays, report


def release_arrow_memory() -> None:
    """Hand memory Arrow's pool keeps for reuse back to the system (it never needs it again).

    Arrow's allocator holds freed buffers for reuse: after a read, that is the size of the
    file's columns kept for nothing.
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _raw_chunk(raw: pd.DataFrame, path: Path) -> RawChunk:
    if "timestamp" not in raw.columns and not isinstance(raw.index, pd.DatetimeIndex):
        raise DataError(
            f"{path}: expected the header {','.join(CSV_HEADER)}, got {list(raw.columns)}",
            path=str(path),
        )
    return raw_columns(raw)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    with pd.read_csv(path, chunksize=chunk_rows) as reader:
        for raw in reader:
            yield _raw_chunk(raw, path)


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # No pre-buffering: it would read every row group's compressed bytes up front (the
    # whole file in memory beside the candles); a row group at a time is as fast here.
    with pq.ParquetFile(path, pre_buffer=False) as file:
        schema = file.schema_arrow
        # Our archive layout (`ts` as epoch ms integers) and a pandas frame's UTC time index
        # are read column by column; anything else (freqtrade's `date` layout, a
        # `timestamp` column) goes through pandas per chunk, as a whole-file read would.
        time_column = _arrow_time_column(schema)
        if time_column is not None:
            for batch in file.iter_batches(batch_size=chunk_rows, columns=[time_column, *OHLCV]):
                yield _arrow_chunk(batch)
            return
        for batch in file.iter_batches(batch_size=chunk_rows):
            raw = pa.Table.from_batches([batch], schema=schema).to_pandas()
            if "timestamp" not in raw.columns and "date" in raw.columns:  # freqtrade's layout
                raw = raw.set_index(pd.DatetimeIndex(raw.pop("date")))
            yield _raw_chunk(raw, path)


def _arrow_time_column(schema: pa.Schema) -> str | None:
    """Return the column to read open times from directly, None for the pandas route."""
    import json

    import pyarrow as pa

    names = schema.names
    if not all(c in names for c in OHLCV) or "timestamp" in names:
        return None
    if "ts" in names and pa.types.is_integer(schema.field("ts").type):
        return "ts"
    meta = json.loads((schema.metadata or {}).get(b"pandas", b"{}"))
    index = meta.get("index_columns", [])
    if len(index) != 1 or not isinstance(index[0], str) or index[0] not in names:
        return None
    kind = schema.field(index[0]).type
    # Epoch times in any unit and zone (Arrow stores UTC); pandas reads them the same way.
    return index[0] if pa.types.is_timestamp(kind) else None


def _arrow_chunk(batch: pa.RecordBatch) -> RawChunk:
    import pyarrow as pa
    import pyarrow.compute as pc

    ts_column = batch.column(0)
    ts_ok = None
    if ts_column.null_count:
        ts_ok = np.asarray(ts_column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        ts_column = pc.fill_null(ts_column, 0)
    if pa.types.is_timestamp(ts_column.type):
        # To ms, as pandas' `as_unit("ms")` does: finer digits are cut (never set in bars).
        ts_column = ts_column.cast(pa.timestamp("ms", ts_column.type.tz), safe=False)
    ts = np.asarray(ts_column.cast(pa.int64()).to_numpy(), dtype=np.int64)
    values = np.empty((5, batch.num_rows), dtype=np.float64)
    for row in range(5):
        column = batch.column(row + 1).cast(pa.float64())
        values[row] = column.to_numpy(zero_copy_only=False)  # nulls become NaN
    return ts, ts_ok, values


def collect_archive(
    batches: Iterator[pa.RecordBatch],
    *,
    trusted: bool,
    rows: int | None = None,
    path: Path | str = "",
) -> CandleArrays:
    """Return an archive's candles from its record batches (`ts` then OHLCV), compactly.

    `trusted` (our own archives, normalised before every write) only copies the batches
    into the result; anything else is checked and normalised as `read_candles` does.
    `rows`, the number of rows the batches hold, lets them go straight into the result.
    """
    collector = _Collector(rows)
    try:
        for batch in batches:
            ts, ts_ok, values = _arrow_chunk(batch)
            if trusted:
                collector.rows_in += len(ts)
                collector.put(ts, values)
            else:
                collector.add(ts, ts_ok, values)
    finally:
        release_arrow_memory()
    if trusted:
        ts, block = collector.concatenate()
        return CandleArrays(ts, *block)
    arrays, report = collector.finish(None)
    if report.changed:
        log.warning("archive_normalised", path=str(path), **report_fields(report))
    return arrays
