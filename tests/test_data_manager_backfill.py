"""Backfill against an in-memory exchange: paging, resume, gap refill, no duplicates."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from data_manager import (
    CandleStore,
    backfill,
    find_gaps,
    frame_to_candles,
    index_ms,
    run_backfill_cli,
)
from error_handler import ConfigError, InvariantError, RateLimitError
from models import Candle
from tests.test_data_manager_support import FakeExchange, FixedClock, end_of, sample_frame


BYBIT = "bybit_BTC-USDT_1m.csv.gz"
COINBASE_EUR = "coinbase_BTC-EUR_1m.csv.gz"
COINBASE_USD = "coinbase_BTC-USD_1m.csv.gz"  # 8 days spread over 18 months
ALTS = ("ADA", "DASH", "ETC", "ETH", "LTC", "NXT", "TRX", "XLM", "XMR", "ZEC")


@pytest.fixture
def btc(sample_dir: Path) -> pd.DataFrame:
    """Return the Bybit BTC/USDT 1m sample day."""
    return sample_frame(sample_dir, BYBIT, "1m")


def start_of(frame: pd.DataFrame) -> int:
    return int(index_ms(frame)[0])


async def test_backfill_pages_through_history(tmp_path: Path, btc: pd.DataFrame) -> None:
    """A fresh backfill stores the whole day in pages of 1000 and equals the exchange's data."""
    now = end_of(btc, "1m")
    exchange = FakeExchange({"BTC/USDT": btc}, "1m", now)
    report = await backfill(
        exchange, tmp_path, ["BTC/USDT"], "1m", start_of(btc), progress=False, clock=FixedClock(now)
    )
    assert report.ok
    assert report.stored == len(btc) == 1440
    assert [(since, limit) for _, since, limit in exchange.calls] == [
        (start_of(btc), 1000),
        (start_of(btc) + 1000 * 60_000, 440),
    ]
    store = CandleStore(tmp_path, "bybit")
    assert store.load("BTC/USDT", "1m").equals(btc)
    assert report.pairs[0].first_ts == start_of(btc)
    assert report.pairs[0].last_ts == int(index_ms(btc)[-1])


async def test_backfill_resumes_where_it_stopped(tmp_path: Path, btc: pd.DataFrame) -> None:
    """An interrupted run keeps its pages; the next run asks only for what is missing."""
    now = end_of(btc, "1m")
    failing = FakeExchange({"BTC/USDT": btc}, "1m", now, fail_after=1)
    first = await backfill(
        failing, tmp_path, ["BTC/USDT"], "1m", start_of(btc),
        progress=False, clock=FixedClock(now), attempts=1,
    )  # fmt: skip
    assert not first.ok
    assert "NetworkError" in (first.pairs[0].error or "")
    assert first.stored == 1000
    healthy = FakeExchange({"BTC/USDT": btc}, "1m", now)
    second = await backfill(
        healthy, tmp_path, ["BTC/USDT"], "1m", start_of(btc), progress=False, clock=FixedClock(now)
    )
    assert second.ok
    assert second.stored == 440
    assert [since for _, since, _ in healthy.calls] == [start_of(btc) + 1000 * 60_000]
    assert CandleStore(tmp_path, "bybit").load("BTC/USDT", "1m").equals(btc)
    third = await backfill(
        healthy, tmp_path, ["BTC/USDT"], "1m", start_of(btc), progress=False, clock=FixedClock(now)
    )
    assert third.requests == 0
    assert third.stored == 0


async def test_backfill_refills_gaps_inside_the_archive(tmp_path: Path, btc: pd.DataFrame) -> None:
    """Holes in the archive are fetched (and only they) and filled from the exchange."""
    store = CandleStore(tmp_path, "bybit")
    holed = btc.drop(btc.index[500:510]).drop(btc.index[900:903])
    store.append("BTC/USDT", "1m", holed)
    now = end_of(btc, "1m")
    exchange = FakeExchange({"BTC/USDT": btc}, "1m", now)
    report = await backfill(
        exchange, store, ["BTC/USDT"], "1m", start_of(btc), progress=False, clock=FixedClock(now)
    )
    ts = index_ms(btc)
    assert [(since, limit) for _, since, limit in exchange.calls] == [
        (int(ts[500]), 10),
        (int(ts[900]), 3),
    ]
    assert report.pairs[0].gaps_found == 2
    assert report.stored == 13
    assert store.load("BTC/USDT", "1m").equals(btc)


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("name", [COINBASE_EUR, COINBASE_USD])
async def test_backfill_remembers_stretches_without_trades(
    tmp_path: Path, sample_dir: Path, name: str, windowed: bool
) -> None:
    """Sparse minutes and months-long holes are crossed, confirmed once, never asked again."""
    sparse = sample_frame(sample_dir, name, "1m")
    now = end_of(sparse, "1m")
    exchange = FakeExchange({"BTC/X": sparse}, "1m", now, windowed=windowed)
    report = await backfill(
        exchange, tmp_path, ["BTC/X"], "1m", start_of(sparse),
        progress=False, clock=FixedClock(now), exchange_name="coinbase",
    )  # fmt: skip
    store = CandleStore(tmp_path, "coinbase")
    assert store.load("BTC/X", "1m").equals(sparse)
    gaps = find_gaps(index_ms(sparse), "1m")
    assert store.empty_ranges("BTC/X", "1m") == gaps
    assert report.pairs[0].empty_ranges >= len(gaps)
    again = FakeExchange({"BTC/X": sparse}, "1m", now, windowed=windowed)
    rerun = await backfill(
        again, store, ["BTC/X"], "1m", start_of(sparse), progress=False, clock=FixedClock(now)
    )
    assert rerun.requests == 0


async def test_backfill_refills_a_gap_the_exchange_now_has(
    tmp_path: Path, btc: pd.DataFrame
) -> None:
    """A hole the exchange can serve is not marked empty; one it cannot serve is."""
    store = CandleStore(tmp_path, "bybit")
    store.append("BTC/USDT", "1m", btc.drop(btc.index[100 : 2 * 100]))
    now = end_of(btc, "1m")
    missing_too = btc.drop(btc.index[150:160])  # the exchange lacks ten of those minutes
    exchange = FakeExchange({"BTC/USDT": missing_too}, "1m", now, windowed=True)
    await backfill(
        exchange, store, ["BTC/USDT"], "1m", start_of(btc), progress=False, clock=FixedClock(now)
    )
    ts = index_ms(btc)
    assert store.empty_ranges("BTC/USDT", "1m") == [(int(ts[150]), int(ts[160]))]
    assert store.load("BTC/USDT", "1m").equals(missing_too)


async def test_backfill_never_stores_open_duplicate_or_stray_candles(
    tmp_path: Path, btc: pd.DataFrame
) -> None:
    """Candles outside the range, repeated, or still open at `now` are not archived."""
    day = btc.iloc[:300]
    now = end_of(day, "1m") - 30_000  # the last candle is half way through
    stray = frame_to_candles(day.iloc[:2], "BTC/USDT", "1m")
    exchange = FakeExchange(
        {"BTC/USDT": day}, "1m", now, serve_open=True, extra=[*stray, replace(stray[0], close=1.0)]
    )
    report = await backfill(
        exchange, tmp_path, ["BTC/USDT"], "1m", start_of(day) + 120_000,
        progress=False, clock=FixedClock(now), page_limit=100,
    )  # fmt: skip
    stored = CandleStore(tmp_path, "bybit").load("BTC/USDT", "1m")
    assert stored.equals(day.iloc[2:-1])
    assert report.stored == len(day) - 3


async def test_backfill_until_bounds_the_range(tmp_path: Path, btc: pd.DataFrame) -> None:
    """With until_ms only candles before it are stored; the next run extends the archive."""
    now = end_of(btc, "1m")
    ts = index_ms(btc)
    exchange = FakeExchange({"BTC/USDT": btc}, "1m", now)
    await backfill(
        exchange, tmp_path, ["BTC/USDT"], "1m", int(ts[0]),
        until_ms=int(ts[600]), progress=False, clock=FixedClock(now),
    )  # fmt: skip
    store = CandleStore(tmp_path, "bybit")
    assert store.load("BTC/USDT", "1m").equals(btc.iloc[:600])
    await backfill(
        exchange, store, ["BTC/USDT"], "1m", int(ts[0]), progress=False, clock=FixedClock(now)
    )
    assert store.load("BTC/USDT", "1m").equals(btc)


async def test_backfill_many_pairs_at_once(tmp_path: Path, sample_dir: Path) -> None:
    """The ten Bittrex pairs are archived concurrently, each equal to its sample."""
    frames = {
        f"{alt}/BTC": sample_frame(sample_dir, f"bittrex_{alt}-BTC_5m.csv.gz", "5m") for alt in ALTS
    }
    now = max(end_of(f, "5m") for f in frames.values())
    since = min(start_of(f) for f in frames.values())
    exchange = FakeExchange(frames, "5m", now)
    report = await backfill(
        exchange, tmp_path, list(frames), "5m", since,
        progress=False, clock=FixedClock(now), exchange_name="bittrex",
    )  # fmt: skip
    assert report.ok
    store = CandleStore(tmp_path, "bittrex")
    assert store.pairs("5m") == sorted(frames)
    for pair, frame in frames.items():
        assert store.load(pair, "5m").equals(frame)


async def test_backfill_retries_recoverable_errors(tmp_path: Path, btc: pd.DataFrame) -> None:
    """A rate-limited call is retried after the server's delay and the run completes."""
    now = end_of(btc, "1m")
    day = btc.iloc[:50]

    class FlakyOnce(FakeExchange):
        async def fetch_ohlcv(self, *args: Any, **kwargs: Any) -> list[Candle]:
            if not self.calls:
                self.calls.append(("flaky", None, None))
                raise RateLimitError("slow down", retry_after=0.0)
            return await super().fetch_ohlcv(*args, **kwargs)

    exchange = FlakyOnce({"BTC/USDT": day}, "1m", now)
    report = await backfill(
        exchange, tmp_path, ["BTC/USDT"], "1m", start_of(day),
        until_ms=end_of(day, "1m"), progress=False, clock=FixedClock(now), attempts=3,
    )  # fmt: skip
    assert report.ok
    assert report.stored == 50
    assert len(exchange.calls) == 2


async def test_backfill_fatal_error_stops_but_keeps_pages(
    tmp_path: Path, btc: pd.DataFrame
) -> None:
    """A FatalError propagates, after the pages already fetched were archived."""
    now = end_of(btc, "1m")
    exchange = FakeExchange(
        {"BTC/USDT": btc}, "1m", now, fail_after=1, error=InvariantError("broken")
    )
    with pytest.raises(ExceptionGroup) as caught:
        await backfill(
            exchange,
            tmp_path,
            ["BTC/USDT"],
            "1m",
            start_of(btc),
            progress=False,
            clock=FixedClock(now),
        )
    assert caught.group_contains(InvariantError)
    assert len(CandleStore(tmp_path, "bybit").load("BTC/USDT", "1m")) == 1000


async def test_backfill_cancelled_keeps_pages(tmp_path: Path, btc: pd.DataFrame) -> None:
    """Cancelling a backfill mid-run still archives what was fetched."""
    now = end_of(btc, "1m")
    gate = asyncio.Event()

    class Slow(FakeExchange):
        async def fetch_ohlcv(self, *args: Any, **kwargs: Any) -> list[Candle]:
            if self.calls:
                gate.set()
                await asyncio.Event().wait()
            return await super().fetch_ohlcv(*args, **kwargs)

    task = asyncio.create_task(
        backfill(
            Slow({"BTC/USDT": btc}, "1m", now),
            tmp_path,
            ["BTC/USDT"],
            "1m",
            start_of(btc),
            progress=False,
            clock=FixedClock(now),
        )
    )
    await gate.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(CandleStore(tmp_path, "bybit").load("BTC/USDT", "1m")) == 1000


async def test_backfill_shows_a_progress_bar(
    tmp_path: Path, btc: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    """With progress on, a bar per pair is drawn and reaches the candle count."""
    now = end_of(btc, "1m")
    day = btc.iloc[:120]
    await backfill(
        FakeExchange({"BTC/USDT": day}, "1m", now), tmp_path, ["BTC/USDT"], "1m", start_of(day),
        until_ms=end_of(day, "1m"), progress=True, clock=FixedClock(now),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "BTC/USDT" in out
    assert "120/120" in out


async def test_backfill_cli_needs_since(tmp_path: Path) -> None:
    """`--mode backfill` without --since is a configuration error."""
    from config import load_settings

    args = argparse.Namespace(since=None, timerange=None)
    with pytest.raises(ConfigError, match="--since"):
        await run_backfill_cli(args, load_settings(env_file=None))
    args = argparse.Namespace(since="not a date", timerange=None)
    with pytest.raises(ConfigError):
        await run_backfill_cli(args, load_settings(env_file=None))


def test_archive_ts_is_unique_after_overlapping_runs(tmp_path: Path, btc: pd.DataFrame) -> None:
    """Running overlapping backfills many times never duplicates an open time."""
    now = end_of(btc, "1m")
    ts = index_ms(btc)
    for lo, hi in ((0, 700), (300, 1000), (0, 1440), (650, 1440)):
        asyncio.run(
            backfill(
                FakeExchange({"BTC/USDT": btc}, "1m", now),
                tmp_path,
                ["BTC/USDT"],
                "1m",
                int(ts[lo]),
                until_ms=int(ts[hi - 1]) + 60_000,
                progress=False,
                clock=FixedClock(now),
            )
        )
    stored = CandleStore(tmp_path, "bybit").load_ts("BTC/USDT", "1m")
    assert np.array_equal(stored, ts)
