"""Chunked candle reads give exactly the candles, report and backtest of a whole-file read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from candle_reader import read_candles
from candle_store import CandleStore
from data_manager import CandleArrays, export_csv, normalise_frame
from tests.test_backtest_support import MINUTE, random_walk, replay_in_process


def _dirty(frame: pd.DataFrame, *, ordered: bool = False) -> pd.DataFrame:
    """Return `frame` as raw rows (`timestamp` column) with dirt spread over the file.

    `ordered` keeps the rows in order on the grid (only row-local dirt and repairs).
    """
    raw = frame.reset_index(drop=True)
    raw.insert(0, "timestamp", frame.index.as_unit("ms").asi8)
    raw.loc[3, "close"] = np.nan  # NaN
    raw.loc[10, "low"] = -1.0  # non-positive price
    raw.loc[17, ["high", "low"]] = [1.0, 2.0]  # high below low
    raw.loc[25, "high"] = raw.loc[25, "low"]  # close above the range: repaired
    if ordered:
        return raw
    raw.loc[40, "timestamp"] += 17  # off the grid
    # Duplicates (a later update of a bar wins) and rows out of order, far apart.
    later = raw.iloc[[5, 33, 60]].assign(close=lambda d: d["close"] * 1.001)
    later["high"] = np.maximum(later["high"], later["close"])
    early = raw.iloc[[70, 71]]
    return pd.concat([raw.drop(index=[70, 71]), later, early], ignore_index=True)


def _whole(raw: pd.DataFrame) -> tuple[pd.DataFrame, object]:
    """Return what a whole-file read makes of `raw`: one normalise over every row."""
    return normalise_frame(raw, timeframe="1m")


def _same(arrays: CandleArrays, frame: pd.DataFrame) -> None:
    np.testing.assert_array_equal(arrays.ts, frame.index.as_unit("ms").asi8)
    for name in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(getattr(arrays, name), frame[name].to_numpy())


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 2, 7, 64, 10_000])
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_chunked_read_equals_the_whole_file(
    tmp_path: Path, chunk_rows: int, suffix: str, ordered: bool
) -> None:
    """Any chunk size gives the whole read's candles and report, dirt across chunk edges."""
    raw = _dirty(random_walk(90), ordered=ordered)
    path = tmp_path / f"candles{suffix}"
    if suffix == ".parquet":
        raw.to_parquet(path, index=False, row_group_size=13)
    else:
        raw.to_csv(path, index=False, compression="gzip" if suffix.endswith("gz") else None)
    expected, expected_report = _whole(raw)
    arrays, report = read_candles(path, timeframe="1m", chunk_rows=chunk_rows)
    _same(arrays, expected)
    assert report == expected_report
    assert report.dropped_duplicates == (0 if ordered else 3)
    assert report.reordered is not ordered
    assert report.repaired_range >= 1
    assert report.dropped == 3 + (0 if ordered else 4)


@pytest.mark.parametrize("chunk_rows", [3, 50])
def test_pandas_parquet_with_a_datetime_index_reads_in_chunks(
    tmp_path: Path, chunk_rows: int
) -> None:
    """A pandas-written Parquet file (DatetimeIndex in us) gives the whole read's candles."""
    frame = random_walk(120)
    path = tmp_path / "pandas.parquet"
    frame.index = frame.index.as_unit("us")
    frame.iloc[::-1].to_parquet(path, row_group_size=40)  # stored newest first
    arrays, report = read_candles(path, timeframe="1m", chunk_rows=chunk_rows)
    expected, expected_report = normalise_frame(pd.read_parquet(path), timeframe="1m")
    _same(arrays, expected)
    assert report == expected_report
    assert report.reordered
    assert report.rows_out == 120


@pytest.mark.parametrize("chunk_rows", [1, 9, 1_000])
def test_archive_loads_in_chunks_with_and_without_a_range(tmp_path: Path, chunk_rows: int) -> None:
    """An archive read a few rows at a time gives the same candles, whole and in a range."""
    frame = random_walk(200)
    CandleStore(tmp_path, "bybit").append("BTC/USDT", "1m", frame)
    store = CandleStore(tmp_path, "bybit", chunk_rows=chunk_rows)
    _same(store.load_arrays("BTC/USDT", "1m"), frame)
    start = int(frame.index.as_unit("ms").asi8[50])
    _same(store.load_arrays("BTC/USDT", "1m", start, start + 30 * MINUTE), frame.iloc[50:80])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    drops=st.lists(st.integers(0, 59), max_size=8),
    dupes=st.lists(st.integers(0, 59), max_size=8),
    nans=st.lists(st.tuples(st.integers(0, 59), st.sampled_from(["open", "close", "volume"]))),
    chunk_rows=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_any_dirt_and_chunk_size_read_like_the_whole_file(
    tmp_path: Path,
    drops: list[int],
    dupes: list[int],
    nans: list[tuple[int, str]],
    chunk_rows: int,
    seed: int,
) -> None:
    """Random gaps, duplicates, NaN and shuffles: the chunked read equals the whole read."""
    raw = random_walk(60, seed=seed).reset_index(drop=True)
    raw.insert(0, "timestamp", random_walk(60).index.as_unit("ms").asi8)
    for row, column in nans:
        raw.loc[row, column] = np.nan
    raw = pd.concat([raw.drop(index=drops), raw.iloc[dupes]], ignore_index=True)
    raw = raw.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    path = tmp_path / "hyp.csv"
    raw.to_csv(path, index=False)
    expected, expected_report = _whole(pd.read_csv(path))
    if expected.empty:
        return
    arrays, report = read_candles(path, timeframe="1m", chunk_rows=chunk_rows)
    _same(arrays, expected)
    assert report == expected_report


async def test_backtest_on_a_dirty_file_read_in_tiny_chunks_is_the_whole_read_backtest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dirty file read 5 rows at a time backtests exactly like its whole-read candles."""
    dirty = tmp_path / "dirty.csv"
    _dirty(random_walk(600, seed=7)).to_csv(dirty, index=False)
    clean = export_csv(_whole(pd.read_csv(dirty))[0], tmp_path / "clean.csv")
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path / "data"))
    args = ("--mode", "backtest", "--strategy", "sma_cross", "--param", "fast=5",
            "--param", "slow=20", "--pairs", "BTC/USDT", "--timeframe", "1m")  # fmt: skip
    monkeypatch.setenv("KESTREL_STORAGE__READ_CHUNK_ROWS", "5")
    chunked, chunked_curve = await replay_in_process(*args, "--data", str(dirty))
    monkeypatch.setenv("KESTREL_STORAGE__READ_CHUNK_ROWS", "1000000")
    whole, whole_curve = await replay_in_process(*args, "--data", str(clean))
    assert chunked["n_trades"] > 0
    assert chunked == whole
    assert chunked_curve == whole_curve
