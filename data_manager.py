"""Market data: load and normalise candles, keep rolling frames per pair, find sample files.

Candle frames are pandas DataFrames indexed by a UTC DatetimeIndex with float64 columns
`open high low close volume`, sorted and unique. Everything that enters the bot passes
through `normalise_frame`, which repairs or drops bad rows and reports how many.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import structlog

from error_handler import DataError
from models import Candle
from utils.utilities import timeframe_to_ms


log = structlog.get_logger(__name__)

OHLCV: Final = ("open", "high", "low", "close", "volume")
CSV_HEADER: Final = ("timestamp", *OHLCV)


# -- Normalisation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NormaliseReport:
    """What `normalise_frame` changed, row counts per reason."""

    rows_in: int
    rows_out: int
    dropped_nan: int = 0
    dropped_nonpositive: int = 0
    dropped_high_below_low: int = 0
    repaired_range: int = 0
    dropped_duplicates: int = 0
    dropped_off_grid: int = 0
    reordered: bool = False

    @property
    def changed(self) -> bool:
        """Return True if any row was dropped, repaired or moved."""
        return self.rows_in != self.rows_out or self.repaired_range > 0 or self.reordered


def normalise_frame(
    df: pd.DataFrame, *, timeframe: str | None = None
) -> tuple[pd.DataFrame, NormaliseReport]:
    """Return a clean candle frame and a report of what was repaired or dropped.

    Accepts a `timestamp` column (ms UTC) or a DatetimeIndex. Rows with NaN, non-positive
    prices, negative volume or high < low are dropped; open/close outside [low, high] are
    repaired by widening the range to include them (the extreme print is real, the bar's
    range was truncated). Duplicated timestamps keep the last row; the frame is sorted.
    With `timeframe`, rows off the timeframe grid are dropped.
    """
    rows_in = len(df)
    frame = df.copy()
    if "timestamp" in frame.columns:
        ts = pd.to_numeric(frame["timestamp"], errors="coerce")
        frame = frame.drop(columns=["timestamp"])
        frame.index = pd.to_datetime(ts, unit="ms", utc=True, errors="coerce")
    elif not isinstance(frame.index, pd.DatetimeIndex):
        raise DataError("candle frame needs a 'timestamp' column or a DatetimeIndex")
    elif frame.index.tz is None:
        frame.index = frame.index.tz_localize("UTC")
    missing = [c for c in OHLCV if c not in frame.columns]
    if missing:
        raise DataError(f"candle frame lacks columns {missing}")
    frame = frame.loc[:, list(OHLCV)].apply(pd.to_numeric, errors="coerce").astype("float64")
    frame.index.name = "ts"

    bad_nan = frame.isna().any(axis=1).to_numpy() | frame.index.isna()
    frame = frame[~bad_nan]
    prices = frame[["open", "high", "low", "close"]].to_numpy()
    bad_nonpos = (prices <= 0).any(axis=1) | (frame["volume"].to_numpy() < 0)
    frame = frame[~bad_nonpos]
    bad_hl = (frame["high"] < frame["low"]).to_numpy()
    frame = frame[~bad_hl]

    lo = np.minimum(frame["open"].to_numpy(), frame["close"].to_numpy())
    hi = np.maximum(frame["open"].to_numpy(), frame["close"].to_numpy())
    out_of_range = (lo < frame["low"].to_numpy()) | (hi > frame["high"].to_numpy())
    if out_of_range.any():
        frame = frame.copy()
        frame["low"] = np.minimum(frame["low"].to_numpy(), lo)
        frame["high"] = np.maximum(frame["high"].to_numpy(), hi)

    reordered = not frame.index.is_monotonic_increasing
    if reordered:
        frame = frame.sort_index(kind="stable")
    dup = frame.index.duplicated(keep="last")
    frame = frame[~dup]
    off_grid = 0
    if timeframe is not None and len(frame):
        step = timeframe_to_ms(timeframe)
        ms = frame.index.as_unit("ms").asi8
        on_grid = ms % step == 0
        off_grid = int((~on_grid).sum())
        frame = frame[on_grid]

    report = NormaliseReport(
        rows_in=rows_in,
        rows_out=len(frame),
        dropped_nan=int(bad_nan.sum()),
        dropped_nonpositive=int(bad_nonpos.sum()),
        dropped_high_below_low=int(bad_hl.sum()),
        repaired_range=int(out_of_range.sum()),
        dropped_duplicates=int(dup.sum()),
        dropped_off_grid=off_grid,
        reordered=reordered,
    )
    if report.changed:
        log.warning("candles_normalised", **_report_fields(report))
    return frame, report


def _report_fields(report: NormaliseReport) -> dict[str, int | bool]:
    return {name: getattr(report, name) for name in NormaliseReport.__slots__}


# -- Files -----------------------------------------------------------------------------------


def load_candles(path: Path | str, *, timeframe: str | None = None) -> pd.DataFrame:
    """Load a candle file (CSV, CSV.gz or Parquet) and return a normalised frame.

    Raises:
        DataError: when the file is missing, unreadable, or has no usable rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", path=str(path))
    try:
        if path.suffix == ".parquet":
            raw = pd.read_parquet(path)
            if "timestamp" not in raw.columns and isinstance(raw.index, pd.DatetimeIndex):
                raw = raw.reset_index(names="ts").set_index("ts")
        else:
            raw = pd.read_csv(path)
    except (
        OSError,
        ValueError,
        EOFError,
        gzip.BadGzipFile,
        zlib.error,
        UnicodeDecodeError,
        pd.errors.ParserError,
    ) as e:
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


def frame_to_candles(frame: pd.DataFrame, pair: str, timeframe: str) -> list[Candle]:
    """Return the frame's rows as closed `Candle`s."""
    ts = frame.index.as_unit("ms").asi8
    values = frame.loc[:, list(OHLCV)].to_numpy()
    return [
        Candle(pair, timeframe, int(t), float(o), float(h), float(lo), float(c), float(v))
        for t, (o, h, lo, c, v) in zip(ts, values, strict=True)
    ]


def pair_to_filename(pair: str) -> str:
    """Return the file-name form of a pair: 'BTC/USDT' -> 'BTC-USDT' (settle dropped)."""
    return pair.split(":")[0].replace("/", "-")


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


# -- Rolling frames --------------------------------------------------------------------------


@dataclass(slots=True)
class _Ring:
    """A fixed-capacity OHLCV buffer for one pair and timeframe."""

    capacity: int
    ts: np.ndarray = field(init=False)
    values: np.ndarray = field(init=False)
    size: int = 0

    def __post_init__(self) -> None:
        # Twice the capacity so appends are amortised O(1) memmoves, not per-candle copies.
        self.ts = np.zeros(self.capacity * 2, dtype=np.int64)
        self.values = np.zeros((self.capacity * 2, 5), dtype=np.float64)

    def append(self, candle: Candle) -> None:
        if self.size == len(self.ts):
            keep = self.capacity
            self.ts[:keep] = self.ts[self.size - keep : self.size]
            self.values[:keep] = self.values[self.size - keep : self.size]
            self.size = keep
        self.ts[self.size] = candle.ts
        self.values[self.size] = (candle.open, candle.high, candle.low, candle.close, candle.volume)
        self.size += 1

    @property
    def last_ts(self) -> int | None:
        return int(self.ts[self.size - 1]) if self.size else None

    def frame(self) -> pd.DataFrame:
        start = max(0, self.size - self.capacity)
        index = pd.DatetimeIndex(
            pd.to_datetime(self.ts[start : self.size], unit="ms", utc=True), name="ts"
        )
        return pd.DataFrame(self.values[start : self.size], index=index, columns=list(OHLCV))


class DataManager:
    """Keep a rolling candle window per pair and timeframe, fed one closed candle at a time.

    Out-of-order and duplicate candles (streams reconnecting, REST gap fills) are dropped
    and counted, never applied twice; a still-open candle is never stored as closed.
    """

    def __init__(self, *, window: int = 500) -> None:
        self.window = window
        self._rings: dict[tuple[str, str], _Ring] = {}
        self.rejected: dict[str, int] = {"open": 0, "duplicate": 0, "out_of_order": 0, "bad": 0}

    def seed(self, pair: str, timeframe: str, frame: pd.DataFrame) -> None:
        """Load history (e.g. the warm-up) into a pair's window."""
        for candle in frame_to_candles(frame.tail(self.window), pair, timeframe):
            self.on_candle(candle)

    def on_candle(self, candle: Candle) -> bool:
        """Append a closed candle; return False (and count why) if it was not applied."""
        if not candle.closed:
            self.rejected["open"] += 1
            return False
        if not _valid(candle):
            self.rejected["bad"] += 1
            log.warning("candle_rejected", pair=candle.pair, ts=candle.ts, reason="invalid")
            return False
        ring = self._rings.get((candle.pair, candle.timeframe))
        if ring is None:
            ring = self._rings[(candle.pair, candle.timeframe)] = _Ring(self.window)
        last = ring.last_ts
        if last is not None and candle.ts <= last:
            self.rejected["duplicate" if candle.ts == last else "out_of_order"] += 1
            return False
        ring.append(candle)
        return True

    def frame(self, pair: str, timeframe: str) -> pd.DataFrame:
        """Return the pair's rolling window as a candle frame (a copy)."""
        ring = self._rings.get((pair, timeframe))
        if ring is None:
            return pd.DataFrame(columns=list(OHLCV), dtype="float64")
        return ring.frame()

    def last_ts(self, pair: str, timeframe: str) -> int | None:
        """Return the open time of the pair's latest closed candle."""
        ring = self._rings.get((pair, timeframe))
        return ring.last_ts if ring else None

    def pairs(self) -> Iterable[tuple[str, str]]:
        """Return the (pair, timeframe) keys held."""
        return self._rings.keys()


def _valid(c: Candle) -> bool:
    values = (c.open, c.high, c.low, c.close)
    if any(not np.isfinite(v) or v <= 0 for v in values) or not np.isfinite(c.volume):
        return False
    return c.low <= min(c.open, c.close) and c.high >= max(c.open, c.close) and c.volume >= 0
