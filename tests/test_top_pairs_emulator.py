"""top_pairs through exchange.Exchange (ccxt, unmodified) against the loopback Bybit emulator."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from config import PairsSettings
from exchange import Exchange
from tests.bybit_emulator import MINUTE_MS, BybitEmulator, exchange_settings
from top_pairs import TopPairs, book_depth, run_pairs_cli


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator listing two extra coins besides BTC, ETH, SOL and XRP."""
    async with BybitEmulator(extra_bases=("USDC", "BTC3L")) as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator with fast retries."""
    async with Exchange(
        exchange_settings(emu), retry_attempts=2, retry_base_s=0.01, retry_cap_s=0.02
    ) as exchange:
        yield exchange


def day_quote_volume(emu: BybitEmulator, symbol: str) -> Decimal:
    """Return the 24h quote volume the emulator reports for a spot symbol."""
    now = emu.clock.now_ms()
    minute = now - now % MINUTE_MS
    day = emu.series[("spot", symbol)].bar(minute - 1439 * MINUTE_MS, 1440, now)
    return day.volume * emu.last_price(symbol, "spot")


async def test_ranks_the_emulators_spot_pairs(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """Spot USDT pairs above the minimum volume are ranked by it; leveraged and stables go."""
    settings = PairsSettings(min_quote_volume=1e6, max_spread_bps=50.0, count=5)
    top = TopPairs(ex, settings, state_path=tmp_path / "pairs.json", market_type="spot")
    result = await top.refresh()
    assert result.source == "exchange"
    assert all(":" not in p for p in result.pairs)
    assert "USDC/USDT" not in result.pairs
    assert "BTC3L/USDT" not in result.pairs
    volumes = {
        f"{base}/USDT": day_quote_volume(emu, f"{base}USDT")
        for base in ("BTC", "ETH", "SOL", "XRP")
    }
    expected = sorted(
        (p for p, v in volumes.items() if v >= Decimal(10**6)), key=lambda p: -volumes[p]
    )
    assert list(result.pairs) == expected
    for stats in result.stats:
        book = await ex.fetch_order_book(stats.pair, 200)
        assert stats.depth_quote == pytest.approx(book_depth(book), rel=1e-9)
        assert stats.spread_bps is not None
        assert stats.spread_bps < 50


async def test_linear_ranking_and_cache_without_calls(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """Linear perps rank on their own; a second instance answers from the cache file."""
    settings = PairsSettings(min_quote_volume=0.0, max_spread_bps=100.0, count=3)
    path = tmp_path / "pairs.json"
    first = await TopPairs(ex, settings, state_path=path, market_type="linear").current()
    assert len(first.pairs) == 3
    assert all(p.endswith(":USDT") for p in first.pairs)
    assert json.loads(path.read_text())["pairs"] == list(first.pairs)
    calls = len(emu.requests)
    again = await TopPairs(ex, settings, state_path=path, market_type="linear").current()
    assert again.source == "cache"
    assert again.pairs == first.pairs
    assert len(emu.requests) == calls


async def test_falls_back_when_the_exchange_is_down(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path
) -> None:
    """When every ticker call fails with 5xx, the configured fallback list is used."""
    emu.fail_next("5xx", times=10, path="/v5/market/tickers")
    settings = PairsSettings(fallback=["BTC/USDT", "SOL/USDT"])
    result = await TopPairs(ex, settings, state_path=tmp_path / "pairs.json").refresh()
    assert result.source == "fallback"
    assert result.pairs == ("BTC/USDT", "SOL/USDT")


async def test_pairs_command_line(
    emu: BybitEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--mode pairs` prints the ranked table, persists it, and exits 0."""
    from config import load_settings

    monkeypatch.setenv("KESTREL_EXCHANGE__BASE_URL", emu.base_url)
    monkeypatch.setenv("KESTREL_PAIRS__MIN_QUOTE_VOLUME", "0")
    monkeypatch.setenv("KESTREL_PAIRS__MAX_SPREAD_BPS", "100")
    settings = load_settings(env_file=None)
    assert await run_pairs_cli(argparse.Namespace(), settings) == 0
    out = capsys.readouterr().out
    assert "Top pairs (exchange)" in out
    for pair in ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT"):
        assert pair in out
    assert (settings.storage.data_dir / "state" / "pairs.json").is_file()
