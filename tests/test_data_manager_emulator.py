"""Backfill through exchange.Exchange (ccxt, unmodified) against the loopback Bybit emulator."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from data_manager import CandleStore, backfill, run_backfill_cli
from exchange import Exchange
from tests.bybit_emulator import MINUTE_MS, BybitEmulator, exchange_settings
from tests.test_data_manager_support import FixedClock


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator with 3,000 minutes of history."""
    async with BybitEmulator(history_minutes=3000) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator with fast retries."""
    async with Exchange(
        exchange_settings(emu), retry_attempts=3, retry_base_s=0.01, retry_cap_s=0.05
    ) as exchange:
        yield exchange


def assert_served(emu: BybitEmulator, store: CandleStore, pair: str, symbol: str) -> np.ndarray:
    """Check every archived candle equals the emulator's bar; return the archived times."""
    frame = store.load(pair, "1m")
    ts = store.load_ts(pair, "1m")
    for t, row in zip(ts.tolist(), frame.to_numpy(), strict=True):
        bar = emu.candle(symbol, "spot", "1", t)
        assert tuple(row) == tuple(
            float(x) for x in (bar.open, bar.high, bar.low, bar.close, bar.volume)
        )
    return ts


async def test_backfill_from_the_emulator(emu: BybitEmulator, ex: Exchange, tmp_path: Path) -> None:
    """2,500 minutes of two pairs are archived in 1,000-candle pages, equal to what was served."""
    now = emu.clock.now_ms()
    since = now - now % MINUTE_MS - 2500 * MINUTE_MS
    before = len(emu.requests_to("/v5/market/kline"))
    report = await backfill(
        ex, tmp_path, ["BTC/USDT", "ETH/USDT"], "1m", since,
        progress=False, clock=FixedClock(now),
    )  # fmt: skip
    assert report.ok
    assert report.stored == 5000
    assert len(emu.requests_to("/v5/market/kline")) - before == 6
    store = CandleStore(tmp_path, "bybit")
    for pair, symbol in (("BTC/USDT", "BTCUSDT"), ("ETH/USDT", "ETHUSDT")):
        ts = assert_served(emu, store, pair, symbol)
        assert ts.tolist() == list(range(since, since + 2500 * MINUTE_MS, MINUTE_MS))


async def test_backfill_resumes_with_new_candles_only(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """A rerun after the market moved on fetches just the new closed candles."""
    now = emu.clock.now_ms()
    since = now - now % MINUTE_MS - 300 * MINUTE_MS
    await backfill(ex, tmp_path, ["BTC/USDT"], "1m", since, progress=False, clock=FixedClock(now))
    await emu.advance(minutes=7)
    await ex.check_clock_offset()  # the market moved on: resynchronise like against Bybit
    kline_calls = len(emu.requests_to("/v5/market/kline"))
    # Seven minutes after the first run, not the emulator's wall-driven clock: that one may
    # have crossed another minute boundary by now, which would close an eighth candle.
    later = now + 7 * MINUTE_MS
    assert later <= emu.clock.now_ms()
    report = await backfill(
        ex, tmp_path, ["BTC/USDT"], "1m", since, progress=False, clock=FixedClock(later)
    )
    assert report.stored == 7
    assert len(emu.requests_to("/v5/market/kline")) == kline_calls + 1
    ts = assert_served(emu, CandleStore(tmp_path, "bybit"), "BTC/USDT", "BTCUSDT")
    assert len(ts) == 307
    assert int(ts[-1]) + MINUTE_MS <= later


async def test_backfill_survives_server_errors(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """A 5xx and a rate-limit answer mid-run are retried; the archive is still complete."""
    now = emu.clock.now_ms()
    since = now - now % MINUTE_MS - 1500 * MINUTE_MS
    emu.fail_next("5xx", path="/v5/market/kline")
    emu.fail_next("10006", path="/v5/market/kline")
    report = await backfill(
        ex, tmp_path, ["BTC/USDT"], "1m", since, progress=False, clock=FixedClock(now)
    )
    assert report.ok
    assert report.stored == 1500


async def test_backfill_command_line(
    emu: BybitEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`--mode backfill` archives the pairs under the data dir, shows progress, exits 0."""
    from config import load_settings

    for key, value in exchange_settings(emu).model_dump(exclude_none=True).items():
        if key in ("base_url", "timeout_s"):
            monkeypatch.setenv(f"KESTREL_EXCHANGE__{key.upper()}", str(value))
    monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", "BTC/USDT,XRP/USDT")
    now = emu.clock.now_ms()
    start = datetime.fromtimestamp((now - now % MINUTE_MS - 90 * MINUTE_MS) / 1000, tz=UTC)
    args = argparse.Namespace(since=start.strftime("%Y-%m-%dT%H:%M:%S"), timerange=None)
    settings = load_settings(env_file=None)
    assert await run_backfill_cli(args, settings) == 0
    store = CandleStore(settings.storage.data_dir, "bybit")
    assert store.pairs("1m") == ["BTC/USDT", "XRP/USDT"]
    assert len(store.load_ts("XRP/USDT", "1m")) >= 90
    out = capsys.readouterr().out
    assert "Backfill 1m" in out
    assert "XRP/USDT" in out
