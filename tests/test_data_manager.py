"""data_manager: normalisation, Parquet/CSV/tick storage, resampling and rolling windows."""

from __future__ import annotations

import argparse
import gzip
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import data_manager as dm
from config import load_settings
from data_manager import (
    CandleAggregator,
    CandleStore,
    DataManager,
    export_csv,
    find_gaps,
    frame_to_candles,
    index_ms,
    load_candles,
    load_frames,
    normalise_frame,
    replay_frames,
    resample,
    trades_to_candles,
)
from error_handler import ConfigError, DataError
from models import Candle, Side, Trade


BYBIT = "bybit_BTC-USDT_1m.csv.gz"
COINBASE_EUR = "coinbase_BTC-EUR_1m.csv.gz"
BITTREX = sorted(
    f"bittrex_{alt}-BTC_5m.csv.gz"
    for alt in ("ADA", "DASH", "ETC", "ETH", "LTC", "NXT", "TRX", "XLM", "XMR", "ZEC")
)
AGG = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}


@pytest.fixture
def btc(sample_dir: Path) -> pd.DataFrame:
    """Return the Bybit BTC/USDT 1m sample day."""
    return load_candles(sample_dir / BYBIT, timeframe="1m")


def raw_sample(sample_dir: Path, name: str = BYBIT) -> pd.DataFrame:
    return pd.read_csv(sample_dir / name)


# -- Normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [BYBIT, COINBASE_EUR, *BITTREX])
def test_samples_load_clean(sample_dir: Path, name: str) -> None:
    """Every bundled sample loads sorted, unique, float64, ms UTC index, unchanged."""
    raw = raw_sample(sample_dir, name)
    frame, report = normalise_frame(raw, timeframe="5m" if "bittrex" in name else "1m")
    assert not report.changed
    assert len(frame) == len(raw)
    assert str(frame.index.dtype) == "datetime64[ms, UTC]"
    assert frame.index.is_monotonic_increasing
    assert frame.index.is_unique
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"]
    assert (frame.dtypes == np.float64).all()
    np.testing.assert_array_equal(index_ms(frame), raw["timestamp"].to_numpy())
    np.testing.assert_array_equal(frame["close"].to_numpy(), raw["close"].to_numpy())


def test_normalise_counts_every_repair_and_drop(sample_dir: Path) -> None:
    """Each corruption of real rows is dropped or repaired and counted under its reason."""
    raw = raw_sample(sample_dir).iloc[:50].copy()
    raw.loc[1, "close"] = np.nan
    raw.loc[2, "volume"] = np.inf
    raw.loc[3, "low"] = -1.0
    raw.loc[4, "volume"] = -0.5
    raw.loc[5, ["high", "low"]] = [100.0, 200.0]
    raw.loc[6, "open"] = raw.loc[6, "high"] + 5  # open above high: repaired
    dup = raw.iloc[[10]].assign(close=raw.loc[10, "low"])  # a later update of the bar wins
    assert raw.loc[10, "low"] != raw.loc[10, "close"]
    off_grid = raw.iloc[[20]].assign(timestamp=raw.loc[20, "timestamp"] + 1)
    shuffled = pd.concat([raw.iloc[::-1], dup, off_grid], ignore_index=True)
    frame, report = normalise_frame(shuffled, timeframe="1m")
    assert report.rows_in == 52
    assert (report.dropped_nan, report.dropped_nonpositive, report.dropped_high_below_low) == (
        2,
        2,
        1,
    )
    assert (report.repaired_range, report.dropped_duplicates, report.dropped_off_grid) == (1, 1, 1)
    assert report.reordered
    assert report.rows_in == report.rows_out + report.dropped
    assert len(frame) == 50 - 5
    ts6 = pd.Timestamp(int(raw.loc[6, "timestamp"]), unit="ms", tz="UTC")
    assert frame.loc[ts6, "high"] == raw.loc[6, "open"]
    ts10 = pd.Timestamp(int(raw.loc[10, "timestamp"]), unit="ms", tz="UTC")
    assert frame.loc[ts10, "close"] == raw.loc[10, "low"]


def test_normalise_drops_the_still_open_candle(sample_dir: Path) -> None:
    """With now inside the last bar, that bar is dropped as open; at its close it is kept."""
    raw = raw_sample(sample_dir).iloc[:10]
    last = int(raw["timestamp"].iloc[-1])
    open_frame, report = normalise_frame(raw, timeframe="1m", now_ms=last + 59_999)
    assert report.dropped_open == 1
    assert len(open_frame) == 9
    closed_frame, report = normalise_frame(raw, timeframe="1m", now_ms=last + 60_000)
    assert report.dropped_open == 0
    assert len(closed_frame) == 10


def test_normalise_accepts_a_naive_datetime_index(btc: pd.DataFrame) -> None:
    """A naive DatetimeIndex is read as UTC; no timestamps at all is a DataError."""
    naive = btc.copy()
    naive.index = naive.index.tz_localize(None)
    frame, report = normalise_frame(naive)
    assert frame.equals(btc)
    assert not report.changed
    with pytest.raises(DataError):
        normalise_frame(btc.reset_index(drop=True))
    with pytest.raises(DataError, match="lacks columns"):
        normalise_frame(btc.drop(columns=["volume"]))
    with pytest.raises(ValueError, match="timeframe"):
        normalise_frame(btc, now_ms=0)


def test_load_candles_rejects_missing_and_corrupt_files(tmp_path: Path) -> None:
    """Missing, truncated and headerless files raise DataError naming the file."""
    with pytest.raises(DataError, match="not found"):
        load_candles(tmp_path / "nope.csv")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(b"timestamp,open,high,low,close,volume\n1,2,3")[:-8])
    with pytest.raises(DataError):
        load_candles(broken)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError):
        load_candles(junk)


# -- Gaps ------------------------------------------------------------------------------------


def test_find_gaps_on_bittrex_samples(sample_dir: Path) -> None:
    """The known missing Bittrex bars (ADA 40, TRX 6) are reported as gaps."""
    for alt, missing in (("ADA", 40), ("TRX", 6)):
        ts = index_ms(load_candles(sample_dir / f"bittrex_{alt}-BTC_5m.csv.gz"))
        gaps = find_gaps(ts, "5m")
        assert sum((end - start) // 300_000 for start, end in gaps) == missing
        present = set(ts.tolist())
        for start, end in gaps:
            assert start - 300_000 in present
            assert end in present
            assert not present.intersection(range(start, end, 300_000))


def test_missing_ranges_covers_head_gaps_and_tail() -> None:
    """Missing ranges inside explicit bounds include the head, interior gaps and the tail."""
    ts = np.array([3, 4, 7, 8], dtype=np.int64) * 60_000
    got = dm.missing_ranges(ts, "1m", 0, 11 * 60_000)
    assert got == [(0, 180_000), (300_000, 420_000), (540_000, 660_000)]
    assert dm.missing_ranges(np.empty(0, np.int64), "1m", 30_000, 120_000) == [(60_000, 120_000)]


# -- Parquet archives ------------------------------------------------------------------------


def test_archive_round_trip_and_layout(tmp_path: Path, btc: pd.DataFrame) -> None:
    """Append stores zstd Parquet at ohlcv/<exchange>/<BASE-QUOTE>/<tf>.parquet, loads equal."""
    store = CandleStore(tmp_path / "data", "bybit")
    assert store.append("BTC/USDT", "1m", btc) == len(btc)
    path = tmp_path / "data" / "ohlcv" / "bybit" / "BTC-USDT" / "1m.parquet"
    assert store.path("BTC/USDT", "1m") == path
    assert path.is_file()
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(1).compression == "ZSTD"
    assert pq.read_schema(path).field("ts").type == "int64"
    loaded = store.load("BTC/USDT", "1m")
    assert loaded.equals(btc)
    assert store.span("BTC/USDT", "1m") == (int(index_ms(btc)[0]), int(index_ms(btc)[-1]))
    assert store.pairs("1m") == ["BTC/USDT"]
    assert store.pairs("5m") == []
    assert not list(path.parent.glob("*.tmp"))


def test_archive_time_range_load(tmp_path: Path, btc: pd.DataFrame) -> None:
    """A time-range load returns exactly the candles with start <= ts < end."""
    store = CandleStore(tmp_path, "bybit")
    store.append("BTC/USDT", "1m", btc)
    ts = index_ms(btc)
    part = store.load("BTC/USDT", "1m", int(ts[100]), int(ts[160]))
    assert part.equals(btc.iloc[100:160])
    assert store.load("BTC/USDT", "1m", int(ts[-1]) + 1).empty
    assert len(store.load("BTC/USDT", "1m", end_ms=int(ts[5]))) == 5


def test_load_frames_prefers_the_archive_then_the_sample(
    tmp_path: Path, sample_dir: Path, btc: pd.DataFrame
) -> None:
    """A pair's archive wins over the bundled sample; without one the sample is replayed."""
    settings = load_settings(env_file=None, storage={"data_dir": tmp_path})
    before = load_frames(settings, ["BTC/USDT"], "1m")
    assert before["BTC/USDT"][0].equals(btc)
    assert before["BTC/USDT"][1] == str(sample_dir / BYBIT)
    store = CandleStore(tmp_path, "bybit")
    store.append("BTC/USDT", "1m", btc.iloc[:50])
    after = load_frames(settings, ["BTC/USDT"], "1m")
    assert after["BTC/USDT"][0].equals(btc.iloc[:50])
    assert after["BTC/USDT"][1] == str(store.path("BTC/USDT", "1m"))
    replayed = replay_frames(argparse.Namespace(data=None), settings)
    assert list(replayed) == ["BTC/USDT"]
    assert replayed["BTC/USDT"].equals(btc.iloc[:50])


def test_load_frames_rejects_one_file_for_many_pairs_and_an_empty_range(
    tmp_path: Path, sample_dir: Path
) -> None:
    """`--data` serves one pair only; a timerange holding no candles is a DataError."""
    settings = load_settings(env_file=None, storage={"data_dir": tmp_path})
    with pytest.raises(ConfigError, match="one pair"):
        load_frames(settings, ["BTC/USDT", "ETH/USDT"], "1m", data=sample_dir / BYBIT)
    with pytest.raises(DataError, match="BTC/USDT"):
        load_frames(settings, ["BTC/USDT"], "1m", timerange="20300101-")


def test_append_never_stores_a_candle_twice(tmp_path: Path, btc: pd.DataFrame) -> None:
    """Overlapping appends add only new open times; an archived candle is kept as it was."""
    store = CandleStore(tmp_path, "bybit")
    assert store.append("BTC/USDT", "1m", btc.iloc[:800]) == 800
    changed = btc.iloc[700:].copy()
    changed.loc[changed.index[0], "close"] = changed["close"].iloc[0] * 1.0001
    assert store.append("BTC/USDT", "1m", changed) == len(btc) - 800
    assert store.append("BTC/USDT", "1m", btc) == 0
    loaded = store.load("BTC/USDT", "1m")
    assert loaded.index.is_unique
    assert loaded.equals(btc)


def test_append_refuses_candles_off_the_grid_and_logs_what_it_drops(
    tmp_path: Path, btc: pd.DataFrame
) -> None:
    """Open times shifted off the timeframe's grid (or the wrong timeframe) are refused with
    a clear error and nothing is written; a few bad rows among good ones are dropped, and
    the log says how many and why."""
    store = CandleStore(tmp_path, "bybit")
    shifted = btc.iloc[:50].copy()
    shifted.index = shifted.index + pd.Timedelta(seconds=30)
    with pytest.raises(DataError, match="grid"):
        store.append("BTC/USDT", "1m", shifted)
    with pytest.raises(DataError, match="1h grid"):
        store.append("BTC/USDT", "1h", btc.iloc[1:50])  # minutes, not hours
    broken = btc.iloc[:5].copy()
    broken["close"] = np.nan
    with pytest.raises(DataError, match="NaN or infinite: 5"):
        store.append("BTC/USDT", "1m", broken)
    assert not store.path("BTC/USDT", "1m").exists()
    assert not store.path("BTC/USDT", "1h").exists()
    mixed = pd.concat([btc.iloc[:50], shifted.iloc[:3]]).sort_index()
    with capture_logs() as logs:
        assert store.append("BTC/USDT", "1m", mixed) == 50
    dropped = [e for e in logs if e["event"] == "archive_candles_dropped"]
    assert len(dropped) == 1
    assert dropped[0]["dropped_off_grid"] == 3


def test_failed_write_keeps_the_old_archive(
    tmp_path: Path, btc: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails midway leaves the previous archive readable and no temp file."""
    store = CandleStore(tmp_path, "bybit")
    store.append("BTC/USDT", "1m", btc.iloc[:100])

    def broken(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        store.append("BTC/USDT", "1m", btc)
    monkeypatch.undo()
    assert store.load("BTC/USDT", "1m").equals(btc.iloc[:100])
    assert not list(store.path("BTC/USDT", "1m").parent.glob(".*tmp"))


def test_corrupt_archive_raises_data_error(tmp_path: Path) -> None:
    """An unreadable archive is a DataError, not a crash deep in pyarrow."""
    store = CandleStore(tmp_path, "bybit")
    path = store.path("BTC/USDT", "1m")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1garbagePAR1")
    with pytest.raises(DataError):
        store.load("BTC/USDT", "1m")


def test_load_candles_reads_archives_and_foreign_parquet(tmp_path: Path, btc: pd.DataFrame) -> None:
    """load_candles reads our archive and a freqtrade-style `date` Parquet file alike."""
    store = CandleStore(tmp_path, "bybit")
    store.append("BTC/USDT", "1m", btc)
    assert load_candles(store.path("BTC/USDT", "1m")).equals(btc)
    foreign = btc.reset_index().rename(columns={"ts": "date"})
    foreign.to_parquet(tmp_path / "ft.parquet")
    assert load_candles(tmp_path / "ft.parquet").equals(btc)


@pytest.mark.parametrize("unit", ["ns", "us", "ms"])
def test_load_candles_reads_a_pandas_parquet_indexed_by_ts(
    tmp_path: Path, btc: pd.DataFrame, unit: str
) -> None:
    """A frame saved by pandas with its DatetimeIndex named `ts` loads with the right dates."""
    frame = btc.set_axis(btc.index.as_unit(unit).rename("ts"))
    frame.to_parquet(tmp_path / "pandas.parquet")
    assert load_candles(tmp_path / "pandas.parquet").equals(btc)


# -- CSV import and export -------------------------------------------------------------------


def test_csv_export_matches_the_sample_format(tmp_path: Path, sample_dir: Path) -> None:
    """Exporting the Bybit sample writes the same header and values it was read from."""
    frame = load_candles(sample_dir / BYBIT)
    out = export_csv(frame, tmp_path / "out.csv.gz")
    with gzip.open(out, "rt") as handle:
        assert handle.readline().strip() == "timestamp,open,high,low,close,volume"
    again = pd.read_csv(out)
    original = raw_sample(sample_dir)
    pd.testing.assert_frame_equal(again, original)


def test_csv_import_and_export_through_the_store(tmp_path: Path, sample_dir: Path) -> None:
    """Importing a sample CSV archives it; exporting a range writes just that range."""
    store = CandleStore(tmp_path, "bittrex")
    assert store.import_csv(sample_dir / BITTREX[0], "ADA/BTC", "5m") == 5760 - 40
    assert store.import_csv(sample_dir / BITTREX[0], "ADA/BTC", "5m") == 0
    frame = store.load("ADA/BTC", "5m")
    ts = index_ms(frame)
    out = store.export_csv("ADA/BTC", "5m", tmp_path / "ada.csv", int(ts[10]), int(ts[20]))
    back = pd.read_csv(out)
    assert back["timestamp"].tolist() == ts[10:20].tolist()
    np.testing.assert_array_equal(back["close"].to_numpy(), frame["close"].to_numpy()[10:20])


# -- Ticks -----------------------------------------------------------------------------------


def _trades(sample_dir: Path) -> list[Trade]:
    # One print at each real minute's close, across the first UTC day boundary of the file.
    frame = load_candles(sample_dir / COINBASE_EUR)
    day = index_ms(frame) // 86_400_000
    boundary = int(np.flatnonzero(np.diff(day))[0]) + 1
    frame = frame.iloc[boundary - 300 : boundary + 300]
    ts = index_ms(frame)
    return [
        Trade(
            "BTC/EUR",
            int(t) + 59_000,
            float(c),
            float(v),
            Side.BUY if i % 2 else Side.SELL,
            f"t{t}",
        )
        for i, (t, c, v) in enumerate(zip(ts, frame["close"], frame["volume"], strict=True))
    ]


def test_trades_stored_per_pair_and_day(tmp_path: Path, sample_dir: Path) -> None:
    """Trades land in one file per UTC day; saving them again stores nothing new."""
    trades = _trades(sample_dir)
    store = CandleStore(tmp_path, "coinbase")
    assert store.save_trades(trades) == len(trades)
    days = {dm._day(t.ts) for t in trades}
    files = sorted(p.stem for p in (tmp_path / "ticks" / "coinbase" / "BTC-EUR").glob("*.parquet"))
    assert files == sorted(days)
    assert len(files) == 2
    assert store.save_trades(trades[:10]) == 0
    no_id = [replace(t, trade_id="") for t in trades[:3]]
    assert store.save_trades(no_id + no_id) == 3
    loaded = store.load_trades("BTC/EUR")
    assert len(loaded) == len(trades) + 3
    assert loaded.index.is_monotonic_increasing


def test_trades_range_load_and_candles(tmp_path: Path, sample_dir: Path) -> None:
    """A range load returns trades in [start, end); candles built from them match the bars."""
    trades = _trades(sample_dir)
    store = CandleStore(tmp_path, "coinbase")
    store.save_trades(trades)
    start, end = trades[100].ts, trades[200].ts
    part = store.load_trades("BTC/EUR", start, end)
    assert len(part) == 100
    assert int(index_ms(part)[0]) == start
    candles = trades_to_candles(part, "1h")
    prices = part["price"].to_numpy()
    hours = index_ms(part) // 3_600_000
    first_hour = prices[hours == hours[0]]
    assert candles["open"].iloc[0] == first_hour[0]
    assert candles["close"].iloc[0] == first_hour[-1]
    assert candles["high"].iloc[0] == first_hour.max()
    assert candles["low"].iloc[0] == first_hour.min()
    assert math.isclose(candles["volume"].sum(), part["qty"].sum())
    assert store.load_trades("ETH/EUR").empty


# -- Resampling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source", "target"),
    [
        (BYBIT, "1m", "5m"),
        (BYBIT, "1m", "1h"),
        (COINBASE_EUR, "1m", "1h"),
        (BITTREX[0], "5m", "4h"),
    ],
)
def test_resample_equals_pandas(sample_dir: Path, name: str, source: str, target: str) -> None:
    """OHLCV aggregation equals pandas' resample (bars labelled by open time), gaps included."""
    frame = load_candles(sample_dir / name, timeframe=source)
    got = resample(frame, target, source_timeframe=source, include_partial=True)
    want = frame.resample(
        pd.Timedelta(target.replace("m", "min")), label="left", closed="left"
    ).agg(AGG)
    want = want.dropna()
    assert got.index.equals(want.index)
    pd.testing.assert_frame_equal(got, want, check_freq=False, rtol=1e-12)


def test_resample_drops_the_incomplete_last_bar(btc: pd.DataFrame) -> None:
    """A last hour with only 30 minutes is dropped unless include_partial."""
    half = btc.iloc[: 60 * 5 + 30]
    assert len(resample(half, "1h")) == 5
    partial = resample(half, "1h", include_partial=True)
    assert len(partial) == 6
    assert partial["close"].iloc[-1] == half["close"].iloc[-1]
    assert len(resample(btc.iloc[:360], "1h")) == 6


def test_resample_weekly_bars_open_on_monday(sample_dir: Path) -> None:
    """Weekly bars are labelled on Mondays 00:00 UTC, like Bybit's."""
    frame = load_candles(sample_dir / BITTREX[0])
    weekly = resample(frame, "1w", include_partial=True)
    assert all(ts.day_of_week == 0 and ts.hour == 0 for ts in weekly.index)


def test_resample_rejects_bad_input(btc: pd.DataFrame) -> None:
    """Unsorted frames and non-multiple timeframes are refused."""
    with pytest.raises(DataError):
        resample(btc.iloc[::-1], "5m")
    with pytest.raises(ValueError, match="multiple"):
        resample(btc, "90s")
    with pytest.raises(ValueError, match="source_timeframe"):
        resample(btc.iloc[:1], "5m")
    assert resample(btc.iloc[:0], "5m").empty


@pytest.mark.parametrize(
    ("name", "source", "target"), [(BYBIT, "1m", "15m"), (COINBASE_EUR, "1m", "1h")]
)
def test_incremental_bars_equal_resample(
    sample_dir: Path, name: str, source: str, target: str
) -> None:
    """Bars built candle by candle equal resample's, including across gaps."""
    frame = load_candles(sample_dir / name, timeframe=source)
    aggregator = CandleAggregator("BTC/X", source, target)
    bars = [
        bar for c in frame_to_candles(frame, "BTC/X", source) for bar in aggregator.on_candle(c)
    ]
    want = resample(frame, target, source_timeframe=source)
    assert [b.ts for b in bars] == index_ms(want).tolist()
    got = np.array([[b.open, b.high, b.low, b.close, b.volume] for b in bars])
    np.testing.assert_allclose(got, want.to_numpy(), rtol=1e-12)


# -- Rolling windows -------------------------------------------------------------------------


def test_rolling_window_rejects_open_duplicate_late_and_bad(btc: pd.DataFrame) -> None:
    """Only new, closed, valid candles are applied; each refusal is counted by reason."""
    data = DataManager(window=10)
    candles = frame_to_candles(btc.iloc[:5], "BTC/USDT", "1m")
    assert all(data.on_candle(c) for c in candles[:3])
    assert not data.on_candle(replace(candles[3], closed=False))
    assert not data.on_candle(candles[2])
    assert not data.on_candle(candles[1])
    assert not data.on_candle(replace(candles[3], high=math.nan))
    assert not data.on_candle(replace(candles[3], volume=math.inf))
    assert not data.on_candle(replace(candles[3], low=candles[3].high * 2))
    assert data.rejected == {"open": 1, "duplicate": 1, "out_of_order": 1, "bad": 3}
    assert data.on_candle(candles[3])
    assert data.last_ts("BTC/USDT", "1m") == candles[3].ts


def test_rolling_window_keeps_the_latest_candles(btc: pd.DataFrame) -> None:
    """After a whole day through a 100-candle window it holds exactly the last 100."""
    data = DataManager(window=100)
    for candle in frame_to_candles(btc, "BTC/USDT", "1m"):
        data.on_candle(candle)
    assert data.frame("BTC/USDT", "1m").equals(btc.tail(100))
    assert list(data.pairs()) == [("BTC/USDT", "1m")]
    assert data.frame("ETH/USDT", "1m").empty
    assert data.last_ts("ETH/USDT", "1m") is None


def test_arrays_are_contiguous_views_of_the_window(btc: pd.DataFrame) -> None:
    """arrays() returns the window's columns as contiguous no-copy views equal to frame()."""
    data = DataManager(window=50)
    for candle in frame_to_candles(btc.iloc[:130], "BTC/USDT", "1m"):
        data.on_candle(candle)
    first = data.arrays("BTC/USDT", "1m")
    second = data.arrays("BTC/USDT", "1m")
    frame = data.frame("BTC/USDT", "1m")
    assert frame.equals(btc.iloc[80:130])
    assert first.ts.tolist() == index_ms(frame).tolist()
    for name in ("open", "high", "low", "close", "volume"):
        column = getattr(first, name)
        assert column.flags.c_contiguous
        assert column.dtype == np.float64
        np.testing.assert_array_equal(column, frame[name].to_numpy())
        assert np.shares_memory(column, getattr(second, name))
    assert not np.shares_memory(frame["close"].to_numpy(), first.close)
    assert len(data.arrays("ETH/USDT", "1m").ts) == 0


def test_seed_then_stream_continues_the_window(btc: pd.DataFrame) -> None:
    """Seeding history then streaming gives the same window as streaming everything."""
    seeded = DataManager(window=200)
    seeded.seed("BTC/USDT", "1m", btc.iloc[:700])
    seeded.seed("BTC/USDT", "1m", btc.iloc[:600])  # older: nothing changes
    for candle in frame_to_candles(btc.iloc[650:], "BTC/USDT", "1m"):
        seeded.on_candle(candle)
    assert seeded.frame("BTC/USDT", "1m").equals(btc.tail(200))
    assert seeded.rejected["duplicate"] + seeded.rejected["out_of_order"] == 50


def test_higher_timeframes_are_built_from_closed_candles(sample_dir: Path) -> None:
    """With higher_timeframes, each 1m candle builds 5m and 1h windows equal to resample."""
    frame = load_candles(sample_dir / COINBASE_EUR, timeframe="1m")
    data = DataManager(window=5000, higher_timeframes={"1m": ("5m", "1h")})
    for candle in frame_to_candles(frame, "BTC/EUR", "1m"):
        data.on_candle(candle)
    for target in ("5m", "1h"):
        want = resample(frame, target, source_timeframe="1m")
        got = data.frame("BTC/EUR", target)
        assert got.index.equals(want.index)
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12)
    data.drop("BTC/EUR")
    assert list(data.pairs()) == []


async def test_flush_archives_streamed_candles(tmp_path: Path, btc: pd.DataFrame) -> None:
    """With a store, closed candles are archived on flush, each once."""
    store = CandleStore(tmp_path, "bybit")
    data = DataManager(window=10, store=store)
    candles = frame_to_candles(btc.iloc[:30], "BTC/USDT", "1m")
    for candle in candles[:20]:
        data.on_candle(candle)
    data.on_candle(candles[5])
    assert await data.flush() == 20
    for candle in candles[20:]:
        data.on_candle(candle)
    assert await data.flush() == 10
    assert await data.flush() == 0
    assert store.load("BTC/USDT", "1m").equals(btc.iloc[:30])


# -- Candlestick patterns --------------------------------------------------------------------


def test_detect_patterns_delegates_to_the_indicator_library(btc: pd.DataFrame) -> None:
    """detect_patterns gives all 61 TA-Lib patterns as -100/0/100, signed as TA-Lib's."""
    talib = pytest.importorskip("talib")
    pytest.importorskip("technical_indicators")
    patterns = dm.detect_patterns(btc)
    assert patterns.shape == (len(btc), 61)
    assert patterns.index.equals(btc.index)
    assert set(np.unique(patterns.to_numpy()).tolist()) <= {-100, 0, 100}
    args = [btc[c].to_numpy() for c in ("open", "high", "low", "close")]
    for name in ("cdlengulfing", "cdlharami", "cdldoji", "cdlhammer"):
        expected = np.sign(getattr(talib, name.upper())(*args)) * 100
        np.testing.assert_array_equal(patterns[name].to_numpy(), expected)
    assert (patterns["cdlengulfing"] != 0).any()


def test_latest_patterns_summarises_the_last_candles(btc: pd.DataFrame) -> None:
    """latest_patterns lists only patterns on the last `lookback` candles, newest first."""
    pytest.importorskip("technical_indicators")
    patterns = dm.detect_patterns(btc)
    summary = dm.latest_patterns(btc, lookback=3)
    expected = {
        (name, 2 - row)
        for row, values in enumerate(patterns.tail(3).to_numpy())
        for name, value in zip(patterns.columns, values, strict=True)
        if value
    }
    assert {(item["name"], item["bars_ago"]) for item in summary} == expected
    assert [item["bars_ago"] for item in summary] == sorted(item["bars_ago"] for item in summary)
    assert dm.latest_patterns(btc, lookback=0) == []


def test_engine_patterns_read_the_rolling_window(btc: pd.DataFrame) -> None:
    """Engine.patterns (what /why shows) is latest_patterns of the pair's live window."""
    from config import load_settings
    from models import Candle
    from runner import Daemon
    from tests.test_backtest_support import cli_args

    args = cli_args("--mode", "sim", "--feed", "replay")
    daemon = Daemon(args, load_settings(env_file=None))
    daemon.build_replay()
    engine = daemon.engine
    assert engine is not None
    assert engine.patterns("BTC/USDT") == []  # nothing seen yet
    end = next(i for i in range(60, len(btc)) if dm.latest_patterns(btc.iloc[:i]))
    ts = btc.index.as_unit("ms").asi8
    bars = btc[["open", "high", "low", "close", "volume"]].to_numpy().tolist()
    for t, (o, h, lo, c, v) in zip(ts[:end].tolist(), bars[:end], strict=True):
        engine.data.on_candle(Candle("BTC/USDT", "1m", t, o, h, lo, c, v))
    found = engine.patterns("BTC/USDT")
    assert found
    assert found == dm.latest_patterns(btc.iloc[:end])


@settings(max_examples=25, deadline=None)
@given(window=st.integers(2, 12), steps=st.lists(st.integers(0, 3), min_size=1, max_size=60))
def test_arrays_and_tails_follow_every_candle_through_compactions(
    window: int, steps: list[int]
) -> None:
    """However often the window is read between candles (its views are reused while no
    candle arrives), arrays(), tail(), hlc_tail() and window_end() always show the latest
    candles, across the buffer's compactions."""
    data = DataManager(window=window)
    closes: list[float] = []
    for i, reads in enumerate(steps):
        close = float(i + 1)
        data.on_candle(Candle("A/USDT", "1m", i * 60_000, close, close, close, close, 1.0))
        closes.append(close)
        for _ in range(reads):
            bars = data.arrays("A/USDT", "1m")
            assert bars.close.tolist() == closes[-window:]
            assert bars.ts.tolist() == [60_000 * k for k in range(len(closes))][-window:]
            ts, block = data.tail("A/USDT", "1m", 3)
            assert block[3].tolist() == closes[-window:][-3:]
            assert ts.tolist() == bars.ts.tolist()[-3:]
            # The key a stop's ATR is kept by: the window's last open time and its length.
            assert data.window_end("A/USDT", "1m") == (bars.ts[-1], len(bars.ts))
            tail = data.hlc_tail("A/USDT", "1m", 3)
            assert tail is not None
            assert tail[:2] == data.window_end("A/USDT", "1m")
            assert tail[4].tolist() == closes[-window:][-3:]
    assert data.window_end("B/USDT", "1m") is None
