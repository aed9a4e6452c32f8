"""The candle store: candle files, Parquet archives of candles and trades, and their gaps.

Archives are zstd Parquet files, one per exchange, pair and timeframe::

    <data_dir>/ohlcv/<exchange>/<BASE-QUOTE>/<timeframe>.parquet     int64 ts + float64 OHLCV
    <data_dir>/ticks/<exchange>/<BASE-QUOTE>/<YYYY-MM-DD>.parquet    one file per UTC day

Every write goes to a temporary file renamed over the old one, so a reader or a crash sees
the old or the new archive, never half of one.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import numpy as np
import pandas as pd
import structlog

from candle_frames import (
    OHLCV,
    CandleArrays,
    Int64Array,
    NormaliseReport,
    _empty_arrays,
    _grid_offset,
    arrays_to_frame,
    frame_to_arrays,
    index_ms,
    ms_index,
    normalise_arrays,
    report_fields,
)
from candle_reader import (
    DEFAULT_CHUNK_ROWS,
    READ_ERRORS,
    collect_archive,
    read_candles,
)
from error_handler import ConfigError, DataError
from models import Trade
from perpetuals import FundingSchedule, funding_beside, load_funding
from utils.utilities import atomic_write, parse_timerange, timeframe_to_ms


if TYPE_CHECKING:
    import argparse

    import pyarrow as pa

    from config import Settings


# Events keep the logger they had before data_manager was split.
log = structlog.get_logger("data_manager")


# -- Files -----------------------------------------------------------------------------------

_READ_ERRORS: Final = READ_ERRORS


def load_candles(
    path: Path | str, *, timeframe: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> pd.DataFrame:
    """Load a candle file (CSV, CSV.gz or Parquet) and return a normalised frame.

    Read `chunk_rows` rows at a time (`candle_reader.read_candles`): the frame sits on
    the compact arrays, with no whole-file copy on the way.

    Raises:
        DataError: when the file is missing, unreadable, or has no usable rows.
    """
    arrays, _ = read_candles(path, timeframe=timeframe, chunk_rows=chunk_rows)
    return arrays_to_frame(arrays)


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
    # A perpetual (`BTC/USDT:USDT`) replays the perpetual's sample before the spot one.
    prefixes = ("bybitlinear", *_SAMPLE_PREFIXES) if ":" in pair else _SAMPLE_PREFIXES
    for prefix in prefixes:
        candidate = sample_dir / f"{prefix}_{name}_{timeframe}.csv.gz"
        if candidate.is_file():
            return candidate
    bundled = sorted(p.name for p in sample_dir.glob("*.csv.gz"))
    raise DataError(
        f"no bundled sample for {pair} {timeframe}; bundled: {', '.join(bundled)}",
        pair=pair,
    )


def load_frames(
    settings: Settings,
    pairs: Sequence[str],
    timeframe: str,
    *,
    data: Path | None = None,
    timerange: str | None = None,
) -> dict[str, tuple[pd.DataFrame, str]]:
    """Return each pair's candles and where they came from: `data`, an archive, the sample.

    The one candle loader of the replays (backtest, paper, optimisation): `--data FILE`
    for one pair; else the pair's Parquet archive under the data directory (filled by
    `--mode backfill`); else the bundled sample. `timerange` keeps start <= ts < end.

    Raises:
        ConfigError: `data` with more than one pair, or a malformed timerange.
        DataError: no candles for a pair (in the timerange).
    """
    start_ms = end_ms = None
    if timerange:
        try:
            start_ms, end_ms = parse_timerange(timerange)
        except ValueError as e:
            raise ConfigError(str(e), component="data") from e
    if data is not None and len(pairs) != 1:
        raise ConfigError("--data holds one pair: pass exactly one with --pairs")
    chunk_rows = settings.storage.read_chunk_rows
    store = CandleStore(settings.storage.data_dir, settings.exchange.name, chunk_rows=chunk_rows)
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    for pair in pairs:
        if data is not None:
            frame, source = (
                load_candles(data, timeframe=timeframe, chunk_rows=chunk_rows),
                str(data),
            )
        elif store.has(pair, timeframe):
            frame = store.load(pair, timeframe, start_ms, end_ms)
            source = str(store.path(pair, timeframe))
        else:
            path = sample_file(settings.storage.sample_dir, pair, timeframe)
            frame = load_candles(path, timeframe=timeframe, chunk_rows=chunk_rows)
            source = str(path)
        frame = _in_range(frame, start_ms, end_ms)
        if frame.empty:
            raise DataError(
                f"no {timeframe} candles for {pair} in {timerange or source}", pair=pair
            )
        out[pair] = (frame, source)
    return out


def _in_range(frame: pd.DataFrame, start_ms: int | None, end_ms: int | None) -> pd.DataFrame:
    # The frame itself when the range keeps it whole: no copy of a long archive.
    if start_ms is None and end_ms is None:
        return frame
    ts = index_ms(frame)
    keep = np.ones(len(ts), dtype=bool)
    if start_ms is not None:
        keep &= ts >= start_ms
    if end_ms is not None:
        keep &= ts < end_ms
    return frame if keep.all() else frame[keep]


def replay_frames(args: argparse.Namespace, settings: Settings) -> dict[str, pd.DataFrame]:
    """Return the candle frames a run replays, by pair: `load_frames` for the settings.

    Reads the settings' pairs and timeframe and `args.data` (a file for one pair).
    """
    loaded = load_frames(
        settings, settings.traded_pairs(), settings.strategy.timeframe, data=args.data
    )
    return {pair: frame for pair, (frame, _) in loaded.items()}


def own_archives(
    settings: Settings, pairs: Sequence[str], timeframe: str, data: Path | None
) -> dict[str, Path] | None:
    """Return each pair's candle archive when every pair replays one of ours, else None.

    Ours (written by `CandleStore`, normalised before every write) can be read a time
    range at a time and give the candles a whole read would (a long backtest's segments,
    `archive_range`); a sample, a CSV or a foreign Parquet file is read whole.
    """
    import pyarrow.parquet as pq

    out: dict[str, Path] = {}
    for pair in pairs:
        path = candle_source(settings, pair, timeframe, data)
        if path.suffix != ".parquet" or not path.is_file():
            return None
        try:
            meta = pq.read_schema(path).metadata or {}
        except _READ_ERRORS:
            return None  # the whole read reports what is wrong with it
        if b"kestrel" not in meta:
            return None
        out[pair] = path
    return out


def archive_rows(path: Path, start_ms: int | None, end_ms: int | None) -> tuple[int, int, int]:
    """Return an archive of ours' candle count in [start_ms, end_ms), first and last open time.

    The first and last times come from the file's statistics; the count reads at most the
    open times of the row groups the range cuts.
    """
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    try:
        dataset = ds.dataset(path, format="parquet")
        rows = dataset.count_rows(filter=_ts_range(start_ms, end_ms))
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.to_arrow_schema().get_field_index("ts")
        stats = [meta.row_group(i).column(column).statistics for i in range(meta.num_row_groups)]
    except _READ_ERRORS as e:
        raise DataError(f"cannot read archive {path}: {e}", path=str(path)) from e
    known = [x for x in stats if x is not None and x.has_min_max]
    if not rows or not known:
        return rows, 0, 0
    return rows, int(min(x.min for x in known)), int(max(x.max for x in known))


def archive_range(
    path: Path, start_ms: int, end_ms: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> pd.DataFrame:
    """Return the candles of an archive of ours with start_ms <= ts < end_ms (a frame)."""
    return arrays_to_frame(_read_archive(path, start_ms, end_ms, chunk_rows))


class ArchiveSegments(NamedTuple):
    """Archives of ours read a time segment at a time (`archive_segments`)."""

    windows: list[tuple[int, int]]  # each segment's [first, end) open times, in order
    load: Callable[[int, int], dict[str, pd.DataFrame]]  # the pairs' candles in a window
    total: int  # candles in the time range over all archives
    first: int  # the first candle's open time
    first_closes: dict[str, float]  # each archive's first close (its market's rules)


def archive_segments(
    paths: Mapping[str, Path],
    rows: int,
    timeframe: str,
    start_ms: int | None,
    end_ms: int | None,
    chunk: int = DEFAULT_CHUNK_ROWS,
    *,
    span_rows: int | None = None,
) -> ArchiveSegments | None:
    """Return how to read `paths` (archives of ours) `rows` candles of the timeframe at a time.

    What goes to the signals runs from each archive's start up to the time range's end,
    what is simulated is the time range's. None: an empty archive (the whole read reports
    it), or none longer than `rows` up to the range's end (worth reading whole).
    `span_rows`: each segment's length, if not `rows` (a segment holds every pair's).
    """
    files = {pair: archive_rows(path, None, None) for pair, path in paths.items()}
    signalled = [archive_rows(path, None, end_ms)[0] for path in paths.values()]
    if min(n for n, _, _ in files.values()) == 0 or max(signalled) <= rows:
        return None
    replayed = sum(archive_rows(path, start_ms, end_ms)[0] for path in paths.values())
    first = min(at for _, at, _ in files.values())
    end = max(last for _, _, last in files.values()) + 1
    end = end if end_ms is None else min(end, end_ms)
    span = (rows if span_rows is None else span_rows) * timeframe_to_ms(timeframe)

    def load(lo: int, hi: int) -> dict[str, pd.DataFrame]:
        frames = {pair: archive_range(path, lo, hi, chunk) for pair, path in paths.items()}
        return {pair: frame for pair, frame in frames.items() if len(frame)}

    closes = {  # each archive's first candle's, as the whole read's frames give
        pair: float(archive_range(paths[pair], at, at + 1, chunk)["close"].iloc[0])
        for pair, (_, at, _) in files.items()
    }
    windows = [(lo, min(lo + span, end)) for lo in range(first, end, span)]
    return ArchiveSegments(windows, load, replayed, first, closes)


def candle_source(settings: Settings, pair: str, timeframe: str, data: Path | None) -> Path:
    """Return the file `load_frames` reads a pair's candles from (without reading it)."""
    if data is not None:
        return Path(data)
    store = CandleStore(settings.storage.data_dir, settings.exchange.name)
    if store.has(pair, timeframe):
        return store.path(pair, timeframe)
    return sample_file(settings.storage.sample_dir, pair, timeframe)


def replay_funding(args: argparse.Namespace, settings: Settings) -> dict[str, FundingSchedule]:
    """Return the recorded funding of each perpetual pair a replay trades.

    `--funding FILE` (`args.funding`, one pair); else a funding file beside the pair's
    candle source (`perpetuals.funding_beside`: `funding.csv[.gz]` in an archive folder,
    which backfill writes, or `<exchange>_<BASE-QUOTE>_funding.csv.gz` beside a sample).
    Spot pairs (no `:settle`) have none.

    Raises:
        ConfigError: `--funding` with more than one pair.
    """
    pairs = list(settings.strategy.pairs)
    explicit = getattr(args, "funding", None)
    if explicit is not None:
        if len(pairs) != 1:
            raise ConfigError("--funding holds one pair: pass exactly one with --pairs")
        if ":" not in pairs[0]:
            raise ConfigError(f"--funding is for perpetuals (BASE/QUOTE:SETTLE), not {pairs[0]}")
        return {pairs[0]: load_funding(explicit)}
    out: dict[str, FundingSchedule] = {}
    for pair in pairs:
        if ":" not in pair:
            continue
        source = candle_source(settings, pair, settings.strategy.timeframe, args.data)
        found = funding_beside(source)
        if found is not None:
            out[pair] = load_funding(found)
    return out


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


def _ts_range(start_ms: int | None, end_ms: int | None) -> Any:
    """Return the dataset filter start_ms <= ts < end_ms (None: no bound, or none at all)."""
    import pyarrow.dataset as ds

    condition = None
    if start_ms is not None:
        condition = ds.field("ts") >= int(start_ms)
    if end_ms is not None:
        before = ds.field("ts") < int(end_ms)
        condition = before if condition is None else condition & before
    return condition


def _read_archive(
    path: Path, start_ms: int | None, end_ms: int | None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> CandleArrays:
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(path, format="parquet")
        condition = _ts_range(start_ms, end_ms)
        # Our own archives are normalised before every write; anything else is checked.
        ours = b"kestrel" in (dataset.schema.metadata or {})
        # Row group by row group (the filter skips those outside the range): the candles
        # are held once, never as a whole Arrow table beside the arrays.
        # No read-ahead and no pre-buffering: the scanner would otherwise hold many row
        # groups (compressed and decoded) at once beside the candles.
        batches = dataset.to_batches(
            columns=["ts", *OHLCV],
            filter=condition,
            batch_size=chunk_rows,
            batch_readahead=1,
            fragment_readahead=1,
            fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False),
        )
        rows = dataset.count_rows(filter=condition)  # the file's metadata when unfiltered
        return collect_archive(batches, trusted=ours, rows=rows, path=path)
    except _READ_ERRORS as e:
        raise DataError(f"cannot read archive {path}: {e}", path=str(path)) from e


class CandleStore:
    """Parquet archives of one exchange's candles and trades under `data_dir`.

    Candles: `<data_dir>/ohlcv/<exchange>/<BASE-QUOTE>/<timeframe>.parquet`; trades:
    `<data_dir>/ticks/<exchange>/<BASE-QUOTE>/<YYYY-MM-DD>.parquet`. Appends merge with
    what is stored (a candle already archived is never stored twice) and replace the file
    atomically. Not safe for two writers of the same archive at once; one process owns it.
    """

    def __init__(
        self, data_dir: Path | str, exchange: str = "bybit", *, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> None:
        self.data_dir = Path(data_dir)
        self.exchange = exchange
        self.chunk_rows = chunk_rows  # rows read at a time from an archive

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
        return _read_archive(path, start_ms, end_ms, self.chunk_rows)

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
        candle was closed when it was written, so it is final. Rows `normalise_arrays`
        drops (NaN, off the timeframe's grid, ...) are logged with their counts.

        Raises:
            DataError: when no row is usable (all off the timeframe's grid: the wrong
                timeframe, or shifted open times; or all NaN, ...); nothing is written.
        """
        new = frame if isinstance(frame, CandleArrays) else frame_to_arrays(frame)
        new, report = normalise_arrays(new.ts, np.vstack(new[1:]), timeframe=timeframe)
        if report.dropped:
            log.warning(
                "archive_candles_dropped", pair=pair, timeframe=timeframe, **report_fields(report)
            )
            if report.rows_out == 0:
                raise DataError(_unusable(pair, timeframe, report), pair=pair)
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


def _unusable(pair: str, timeframe: str, report: NormaliseReport) -> str:
    # Why none of the candles given to `CandleStore.append` could be stored.
    reasons = {
        f"off the {timeframe} grid": report.dropped_off_grid,
        "NaN or infinite": report.dropped_nan,
        "non-positive": report.dropped_nonpositive,
        "high below low": report.dropped_high_below_low,
    }
    why = ", ".join(f"{name}: {n}" for name, n in reasons.items() if n)
    hint = (
        ": is the timeframe right, or are the open times shifted?"
        if report.dropped_off_grid
        else ""
    )
    return f"{pair} {timeframe}: none of the {report.rows_in} candles is usable ({why}){hint}"
